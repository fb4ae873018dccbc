"""LTUDASegmentation.py itself (module, parameter node, widget, logic, self-test) outside Slicer.

Only the Slicer application is replaced: `qt`, the ScriptedLoadableModule base classes and
parameterNodeWrapper get small stand-ins, widgets are mocks named after the .ui; MRML, the Lib and
the backend subprocess are real. This runs the panel's handlers (add case, add missing labels,
train, segment, errors) and the self-test behind Slicer's Reload & Test button.
"""

import functools
import importlib
import os
import sys
import time
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
MODULE_DIR = Path(__file__).resolve().parents[1] / "LTUDASegmentation"
sys.path.insert(0, str(MODULE_DIR))

from LTUDASegmentationLib import jobs, synthetic  # noqa: E402
from LTUDASegmentationLib.logic import LTUDALogicCore  # noqa: E402

TINY = ["--iterations-per-epoch", "2", "--image-size", "32", "--batch-size", "2"]


class _FakeQSettings:
    store = {}

    def value(self, key, default=None):
        return self.store.get(key, default)

    def setValue(self, key, value):
        self.store[key] = value

    def remove(self, key):
        self.store.pop(key, None)


def _fakeParameterNodeWrapper(cls):
    annotations = dict(cls.__annotations__)
    defaults = {k: getattr(cls, k) for k in annotations if hasattr(cls, k)}

    class Wrapper:
        def __init__(self, node):
            object.__setattr__(self, "_node", node)

        def __getattr__(self, name):
            if name not in annotations:
                raise AttributeError(name)
            empty = [] if str(annotations[name]).startswith("list") else None
            return self._node.setdefault(name, defaults.get(name, empty))

        def __setattr__(self, name, value):
            assert name in annotations, name
            self._node[name] = value

        def connectGui(self, ui):
            return "tag"

        def AddObserver(self, event, callback, priority=0.0):
            return 1

        def RemoveObserver(self, tag):
            pass

        def disconnectGui(self, tag):
            pass

    return Wrapper


def _uiMocks():
    root = ET.parse(MODULE_DIR / "Resources" / "UI" / "LTUDASegmentation.ui").getroot()
    ui = types.SimpleNamespace()
    for widget in root.iter("widget"):
        m = mock.MagicMock(name=widget.get("name"))
        m.currentRow.return_value = -1
        m.findData.return_value = 0
        m.currentData, m.currentText, m.currentPath, m.checked, m.text = None, "", "", False, ""
        setattr(ui, widget.get("name"), m)
    return ui


def pumpProbe(widget, timeout=300):
    """Do what the probe's QTimer does in Slicer until the backend check is over."""
    deadline = time.monotonic() + timeout
    while widget.setupSection._probeRunner is not None and time.monotonic() < deadline:
        widget.setupSection._onProbeTick()
        time.sleep(0.05)
    assert widget.setupSection._probeRunner is None


def _forgetModule():
    """Import the module and its sections afresh, with this test's stand-in for qt."""
    for name in list(sys.modules):
        if name == "LTUDASegmentation" or name.split(".")[0] == "LTUDASegmentationWidgets":
            sys.modules.pop(name)


@pytest.fixture
def moduleFile(scene, tmp_path, monkeypatch):
    """LTUDASegmentation imported with stand-ins for what only the Slicer application has."""
    qt = mock.MagicMock(name="qt")
    qt.QSettings = _FakeQSettings
    _FakeQSettings.store = {"LTUDASegmentation/BackendPython": sys.executable,
                            "LTUDASegmentation/WorkFolder": str(tmp_path / "work"),
                            "LTUDASegmentation/ModelsFolder": str(tmp_path / "models")}
    parameterNodes = {}

    class Logic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            return parameterNodes.setdefault(id(slicer.mrmlScene), {})

    class Widget:
        def __init__(self, parent=None):
            self.parent = mock.MagicMock(name="parent")

        def setup(self):
            self.layout = mock.MagicMock(name="layout")

        def resourcePath(self, relative):
            return str(MODULE_DIR / "Resources" / relative)

    class Test(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            print(message)

    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {
        "__init__": lambda self, parent: setattr(self, "parent", parent)})
    slm.ScriptedLoadableModuleWidget, slm.ScriptedLoadableModuleLogic, slm.ScriptedLoadableModuleTest = Widget, Logic, Test
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = _fakeParameterNodeWrapper
    pnw.Choice = pnw.WithinRange = lambda *args: args
    for name, module in (("qt", qt), ("slicer.ScriptedLoadableModule", slm), ("slicer.parameterNodeWrapper", pnw)):
        monkeypatch.setitem(sys.modules, name, module)
    app = mock.MagicMock(name="app", majorVersion=5, minorVersion=10)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "modules", mock.MagicMock(name="modules"), raising=False)
    messages = {"error": [], "confirm": []}

    def errorDisplay(text, **kwargs):
        messages["error"].append(text)

    def confirm(text, **kwargs):
        messages["confirm"].append(text)
        return True

    for name, value in (("startupEnvironment", lambda: dict(os.environ)),
                        ("tempDirectory", lambda *a, **k: str(tmp_path / "selftest")),
                        ("loadUI", lambda path: mock.MagicMock(name="uiWidget")),
                        ("childWidgetVariables", lambda widget: _uiMocks()),
                        ("errorDisplay", errorDisplay), ("confirmOkCancelDisplay", confirm),
                        ("confirmYesNoDisplay", confirm), ("selectModule", mock.MagicMock()),
                        ("setSliceViewerLayers", mock.MagicMock()), ("showStatusMessage", mock.MagicMock())):
        monkeypatch.setattr(slicer.util, name, value)
    _forgetModule()
    module = importlib.import_module("LTUDASegmentation")
    module.testMessages = messages
    yield module
    _forgetModule()


def test_module_description(moduleFile):
    parent = types.SimpleNamespace()
    moduleFile.LTUDASegmentation(parent)
    assert parent.title == "LTUDA Segmentation" and parent.categories == ["Segmentation"]
    assert "Partially labelled" in parent.helpText and "5.10" in parent.helpText
    assert "Jiang" in parent.acknowledgementText and parent.contributors


def test_module_logic_keeps_organs_and_cases_in_the_scene(scene, moduleFile, tmp_path):
    logic = moduleFile.LTUDASegmentationLogic()
    assert isinstance(logic, LTUDALogicCore) and logic.backendPython() == sys.executable
    logic.setOrgans(["liver", "spleen"])
    volume, segmentation = synthetic.addSyntheticCase(scene, "ct", ["liver", "spleen"], ["liver"], seed=60)
    logic.addCase(volume, segmentation)
    (tmp_path / "img.nrrd").write_bytes(b"x")
    (tmp_path / "lab.nrrd").write_bytes(b"x")
    logic.addFileCase(tmp_path / "img.nrrd", tmp_path / "lab.nrrd", "1=spleen")
    # a new logic (e.g. after reloading the module) finds both in the scene's parameter node
    again = moduleFile.LTUDASegmentationLogic()
    again.restoreFromParameterNode()
    assert [o["name"] for o in again.organs] == ["liver", "spleen"]
    assert [c.name for c in again.cases] == ["ct", "img"]
    assert again.cases[0].segmentationNode is segmentation and again.cases[1].valueMap == {1: "spleen"}
    assert again.getParameterNode().preset == "fast" and again.getParameterNode().postprocess is True


def test_panel_handlers_from_cases_to_a_segmentation(scene, moduleFile, tmp_path):
    widget = moduleFile.LTUDASegmentationWidget()
    widget.setup()
    ui, logic, messages = widget.ui, widget.logic, moduleFile.testMessages
    ui.slicerPythonRadioButton.checked = False
    logic.setOrgans(["liver", "spleen"])
    widget.organsSection.refreshOrgans()
    assert ui.organsTableWidget.setRowCount.call_args.args == (2,)

    # bad input: a volume without a segmentation -> message in the panel and a message box
    volumes = []
    for i, (labelled, flip) in enumerate([(["liver"], False), (["spleen"], True), (["liver", "spleen"], False)]):
        volumes.append(synthetic.addSyntheticCase(scene, f"case{i}", ["liver", "spleen"], labelled, flip=flip, seed=i))
    params = widget._parameterNode
    params.caseVolume, params.caseSegmentation = volumes[0][0], None
    widget.casesSection.onAddCase()
    assert "has no segmentation" in messages["error"][-1] and ui.casesStatusLabel.text == messages["error"][-1]
    for volume, segmentation in volumes:
        params.caseVolume, params.caseSegmentation = volume, segmentation
        widget.casesSection.onAddCase()
    assert len(logic.cases) == 3
    assert "liver: 2, spleen: 2" in ui.casesSummaryLabel.text
    assert ui.casesTableWidget.setRowCount.call_args.args == (3,)

    # add missing labels on the first case -> empty spleen segment, Segment Editor opened on it
    ui.casesTableWidget.currentRow.return_value = 0
    widget.casesSection.onAddMissingLabels()
    editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
    editor.setSegmentationNode.assert_called_with(volumes[0][1])
    assert logic.caseTable()[0]["organs"]["spleen"] == "empty"
    slicer.util.selectModule.assert_called_with("SegmentEditor")

    # train (tiny settings), driven like the QTimer would
    logic.train = functools.partial(logic.train, extraArgs=TINY)
    params.epochsStage1 = params.epochsStage2 = 1
    params.device = "cpu"
    ui.modelFolderPathLineEdit.currentPath = str(tmp_path / "model")
    widget.trainSection.onStartTraining()  # checks the backend first, without blocking: pump its timer
    assert ui.trainingStatusLabel.text == "Checking the backend Python first..."
    pumpProbe(widget)
    job = logic.trainingJob
    assert job is not None and job.status in (jobs.EXPORTING, jobs.RUNNING), messages["error"]
    assert job.wait(timeout=600) == jobs.COMPLETED, job.message
    assert "Training completed" in ui.trainingStatusLabel.text
    slicer.modules.plots.logic().ShowChartInLayout.assert_called()
    assert scene.GetFirstNodeByName("LTUDA training loss").GetTable().GetNumberOfRows() == 2
    added = [c.args for c in ui.modelComboBox.addItem.call_args_list]
    assert added and added[-1][1] == str(tmp_path / "model")

    # segment the LPS volume with it
    ui.modelComboBox.currentData = str(tmp_path / "model")
    params.inputVolume, params.segmentDevice = volumes[1][0], "cpu"
    widget.segmentSection.onApply()
    assert logic.predictionJob.wait(timeout=600) == jobs.COMPLETED, logic.predictionJob.message
    node = logic.predictionJob.segmentationNode
    assert ui.resultLabel.text == "Result: case1 segmentation" and node.GetName() == "case1 segmentation"
    ui.outputShow3DButton.setSegmentationNode.assert_called_with(node)
    assert messages["error"] == [messages["error"][0]]  # only the deliberate error above

    # the probe shown in Setup, without blocking the GUI (timer ticks simulated)
    widget.setupSection.onCheckBackend()
    pumpProbe(widget)
    assert "torch" in ui.backendStatusLabel.text and "ltuda" in ui.backendStatusLabel.text
    widget.cleanup()


def test_panel_small_handlers_and_their_messages(scene, moduleFile, tmp_path):
    widget = moduleFile.LTUDASegmentationWidget()
    widget.setup()
    ui, logic, messages = widget.ui, widget.logic, moduleFile.testMessages
    widget.enter()
    # organs: add from the combo, rename in place, remove the selected one, back to the preset
    ui.addOrganComboBox.currentText = "stomach"
    widget.organsSection.onAddOrgan()
    assert [o["name"] for o in logic.organs][-1] == "stomach"
    ui.addOrganComboBox.currentText = "stomach"
    widget.organsSection.onAddOrgan()
    assert messages["error"][-1] == "The organ 'stomach' is already in the list." == ui.organsStatusLabel.text
    item = mock.MagicMock()
    item.column.return_value, item.row.return_value, item.text.return_value = 0, 4, "Gastric body"
    widget.organsSection.onOrganItemChanged(item)
    assert logic.organs[4]["name"] == "Gastric body" and logic.organs[4]["terminology"] is None
    ui.organsTableWidget.currentRow.return_value = 4
    widget.organsSection.onRemoveOrgan()
    assert len(logic.organs) == 4
    logic.setOrgans(["liver"])
    widget.organsSection.onResetOrgans()
    assert [o["name"] for o in logic.organs] == ["liver", "spleen", "kidney", "pancreas"]
    # folder import without a folder, with a bad map, then a good one
    widget.casesSection.onImportFolder()
    assert messages["error"][-1] == "Choose the folder to import."
    ui.importFolderPathLineEdit.currentPath = str(tmp_path)
    ui.importValueMapLineEdit.text = "1=lung"
    widget.casesSection.onImportFolder()
    assert "'lung' (label 1) is not one of the organs" in messages["error"][-1]
    # cases: removing with no selection does nothing; the Start button explains what is missing
    widget.casesSection.onRemoveCase()
    widget.updateButtonStates()
    assert ui.startTrainingButton.enabled is False and "No training cases" in ui.startTrainingButton.toolTip
    assert ui.applyButton.enabled is False and "Train a model or add a model folder." in ui.applyButton.toolTip
    # install into Slicer's Python without the PyTorch extension: a message saying what to do
    from LTUDASegmentationLib.backend import ProbeResult

    logic.setBackendPython(None)
    logic.lastProbe = ProbeResult({"packages": {"torch": None, "monai": "1.4", "SimpleITK": "2.4", "numpy": "2.0",
                                                "pynrrd": "1.1", "ltuda": "0.1"}}, logic.backend())
    widget.setupSection.onInstall()
    assert "PyTorch extension" in messages["error"][-1] and "Extensions Manager" in messages["error"][-1]
    # a model folder from another version is refused with its reason
    folder = tmp_path / "old-model"
    folder.mkdir()
    (folder / "model.json").write_text('{"schema": "ltuda-model", "version": 0, "classes": []}')
    with mock.patch.object(sys.modules["qt"].QFileDialog, "getExistingDirectory", return_value=str(folder)):
        widget.segmentSection.onAddModel()
    assert "another version of LTUDA" in messages["error"][-1] == ui.segmentStatusLabel.text
    # cancel buttons with nothing running, scene close, leaving the module
    widget.trainSection.onCancelTraining()
    widget.segmentSection.onCancelSegment()
    widget.trainSection.onShowPlot()
    widget.onSceneStartClose(None, None)
    widget.onSceneEndClose(None, None)
    widget.exit()
    widget.cleanup()


def test_module_self_test_runs(scene, moduleFile):
    """The Test class behind Slicer's Reload & Test button, end to end with a tiny training."""
    result = unittest.TextTestRunner(verbosity=0).run(moduleFile.LTUDASegmentationTest("runTest"))
    assert result.wasSuccessful(), [str(e[1]) for e in result.errors + result.failures]


def test_tiny_synthetic_volumes_are_partially_labelled(scene):
    volume, segmentation = synthetic.addSyntheticCase(scene, "x", ["liver", "spleen", "kidney"], ["kidney"], seed=1)
    image = slicer.util.arrayFromVolume(volume)
    assert image.shape == (12, 40, 40) and image.dtype == np.int16
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1


# ------------------------------------------------------------------------ small panel defects
def _readyProbe(logic):
    from LTUDASegmentationLib.backend import ProbeResult

    return ProbeResult({"packages": {"torch": "2.13", "monai": "1.4", "SimpleITK": "2.4", "numpy": "2.0",
                                     "pynrrd": "1.1", "ltuda": "0.1"}}, logic.backend())


def _trackCursor(monkeypatch):
    """Count override cursors like QApplication does (set pushes, restore pops)."""
    depth = {"now": 0}

    def push(*args):
        depth["now"] += 1

    def pop(*args):
        depth["now"] -= 1

    slicer.app.setOverrideCursor.side_effect = push
    slicer.app.restoreOverrideCursor.side_effect = pop
    return depth


def test_cleanup_disconnects_about_to_quit_and_stops_the_probe(scene, moduleFile):
    qt = sys.modules["qt"]
    qt.QTimer.side_effect = lambda *args: mock.MagicMock(name="QTimer")  # one object per timer
    widget = moduleFile.LTUDASegmentationWidget()
    widget.setup()
    slicer.app.connect.assert_any_call("aboutToQuit()", widget.onAboutToQuit)
    widget.setupSection.onCheckBackend()  # a real probe subprocess, still running
    runner, timer = widget.setupSection._probeRunner, widget.setupSection._probeTimer
    assert runner is not None and timer is not None
    widget.cleanup()
    slicer.app.disconnect.assert_any_call("aboutToQuit()", widget.onAboutToQuit)
    timer.stop.assert_called()
    assert runner.killed and widget.setupSection._probeRunner is None and widget.setupSection._probeTimer is None


def test_double_click_on_start_begins_one_training(scene, moduleFile, tmp_path):
    widget = moduleFile.LTUDASegmentationWidget()
    widget.setup()
    ui, logic, messages = widget.ui, widget.logic, moduleFile.testMessages
    logic.setOrgans(["liver", "spleen"])
    logic.addCase(*synthetic.addSyntheticCase(scene, "ct", ["liver", "spleen"], ["liver", "spleen"], seed=80))
    logic.lastProbe = _readyProbe(logic)
    params = widget._parameterNode
    params.epochsStage1 = params.epochsStage2 = 1
    params.device = "cpu"
    ui.modelFolderPathLineEdit.currentPath = str(tmp_path / "model")
    widget.updateButtonStates()
    assert ui.startTrainingButton.enabled is True
    starts = []
    realTrain = logic.train

    def train(*args, **kwargs):
        starts.append(args)
        return realTrain(*args, extraArgs=TINY, **kwargs)

    logic.train = train
    clicks = []

    def processEvents(*args):
        # Qt delivers the second click of a double click here; a disabled button emits nothing
        if not clicks and ui.startTrainingButton.enabled:
            clicks.append(True)
            widget.trainSection.onStartTraining()

    slicer.app.processEvents.side_effect = processEvents
    widget.trainSection.onStartTraining()
    assert len(starts) == 1, messages["error"]
    assert messages["error"] == []
    assert logic.trainingJob.wait(timeout=600) == jobs.COMPLETED, logic.trainingJob.message
    widget.cleanup()


def test_gpus_spin_box_is_remembered_and_reaches_the_training(scene, moduleFile, tmp_path):
    """The widget only maps the spin box (0 = "all") to the logic's remembered choice; Start passes it on."""
    _FakeQSettings.store["LTUDASegmentation/TrainGpus"] = "all"
    widget = moduleFile.LTUDASegmentationWidget()
    widget.setup()
    ui, logic = widget.ui, widget.logic
    assert ui.gpusSpinBox.value == 0
    ui.gpusSpinBox.valueChanged.connect.assert_called_once_with(widget.trainSection.onGpusChanged)
    widget.trainSection.onGpusChanged(2)
    assert _FakeQSettings.store["LTUDASegmentation/TrainGpus"] == "2" and logic.trainGpus() == 2
    logic.setOrgans(["liver", "spleen"])
    logic.addCase(*synthetic.addSyntheticCase(scene, "ct", ["liver", "spleen"], ["liver", "spleen"], seed=81))
    logic.lastProbe = _readyProbe(logic)
    widget._parameterNode.device = "cpu"
    ui.modelFolderPathLineEdit.currentPath = str(tmp_path / "model")
    widget.trainSection.onStartTraining()
    job = logic.trainingJob
    assert job is not None and job.processes == 2, moduleFile.testMessages["error"]
    ui.trainingLogTextEdit.appendPlainText.assert_any_call(job.processesNote)
    job.cancel()  # still exporting: nothing was started
    assert job.status == jobs.CANCELLED
    widget.cleanup()


def test_wait_cursor_is_not_shown_over_confirmation_dialogs(scene, moduleFile, monkeypatch):
    widget = moduleFile.LTUDASegmentationWidget()
    widget.setup()
    logic = widget.logic
    depth = _trackCursor(monkeypatch)
    seen = []

    def confirm(text, **kwargs):
        seen.append((depth["now"], text))
        return False  # decline: nothing is started or installed

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm)
    # the 'paper' preset on a machine without GPU asks first
    logic.setOrgans(["liver"])
    logic.addCase(*synthetic.addSyntheticCase(scene, "ct", ["liver"], ["liver"], seed=81))
    logic.lastProbe = _readyProbe(logic)
    widget._parameterNode.preset = "paper"
    widget.trainSection._startTraining("unused", False)
    # installing packages into Slicer's Python asks first (before Slicer 5.12: our own dialog)
    logic.setBackendPython(None)
    probe = _readyProbe(logic)
    probe.report["packages"]["monai"] = None
    logic.lastProbe = probe
    monkeypatch.delattr(slicer, "packaging", raising=False)
    widget.setupSection.onInstall()
    assert len(seen) == 2 and [d for d, _t in seen] == [0, 0], seen
    assert depth["now"] == 0 and logic.trainingJob is None
    widget.cleanup()


def test_declined_package_install_says_what_was_declined(scene, moduleFile, monkeypatch):
    widget = moduleFile.LTUDASegmentationWidget()
    widget.setup()
    logic, messages = widget.logic, moduleFile.testMessages
    depth = _trackCursor(monkeypatch)
    logic.setBackendPython(None)
    probe = _readyProbe(logic)
    probe.report["packages"]["monai"] = None
    logic.lastProbe = probe
    packaging = types.SimpleNamespace(load_requirements=lambda path: ["monai>=1.3", "pynrrd>=1.0"])

    def pipEnsure(requirements, **kwargs):
        assert depth["now"] == 0, "pip_ensure shows its own confirmation dialog"
        raise RuntimeError("User declined package installation")  # what Slicer 5.12 raises

    packaging.pip_ensure = pipEnsure
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    widget.setupSection.onInstall()
    message = widget.ui.backendStatusLabel.text
    assert "Unexpected error" not in message and not any("Unexpected error" in m for m in messages["error"])
    assert "monai" in message and "declined" in message and "nothing was installed" in message
    assert "still work" in message and "external Python" in message  # what still works, and the way out
    assert messages["error"] == []  # the user just said no: an inline note, no message box
    assert depth["now"] == 0
    widget.cleanup()


def test_external_python_is_checked_when_editing_finishes_and_shown_inline(scene, moduleFile, tmp_path):
    """ctkPathLineEdit emits currentPathChanged on every keystroke: typing a path must not show one
    message box per key; the path is checked when editing finishes (or a file is browsed to) and a
    problem is shown under the field."""
    widget = moduleFile.LTUDASegmentationWidget()
    widget.setup()
    ui, logic, messages = widget.ui, widget.logic, moduleFile.testMessages
    edit = ui.externalPythonPathLineEdit
    lineEdit = edit.comboBox.return_value.lineEdit.return_value
    pathChanged = [c.args[0] for c in edit.currentPathChanged.connect.call_args_list]
    assert pathChanged
    before = logic.backendPython()
    ui.externalPythonRadioButton.checked, ui.slicerPythonRadioButton.checked = True, False
    lineEdit.hasFocus.return_value = True  # the user types
    typed = str(tmp_path / "env" / "bin" / "python")
    for end in range(1, len(typed) + 1):
        edit.currentPath = typed[:end]
        for handler in pathChanged:
            handler(typed[:end])
    assert messages["error"] == [] and logic.backendPython() == before
    editingFinished = [c.args[0] for c in lineEdit.editingFinished.connect.call_args_list]
    assert editingFinished
    for handler in editingFinished:  # Enter, or focus leaves the field
        handler()
    assert messages["error"] == [], "shown in the panel, not in a message box"
    assert "is not a file" in ui.externalPythonStatusLabel.text and logic.backendPython() == before
    # browsing to a file (the field does not have the focus): checked and used at once
    lineEdit.hasFocus.return_value = False
    edit.currentPath = sys.executable
    for handler in pathChanged:
        handler(sys.executable)
    assert logic.backendPython() == sys.executable and ui.externalPythonStatusLabel.text == ""
    assert messages["error"] == []
    widget.cleanup()


def test_self_test_stops_a_training_that_ran_past_its_timeout(scene, moduleFile, monkeypatch):
    """Reload & Test must not leave a training process behind when the training times out."""
    test = moduleFile.LTUDASegmentationTest("runTest")
    logics = []
    realLogic = test._logic

    def recordingLogic(tempDir):
        logic = realLogic(tempDir)
        logics.append(logic)
        return logic

    monkeypatch.setattr(test, "_logic", recordingLogic)
    realWait = jobs.TrainingJob.wait

    def slowMachineWait(self, timeout=None, *args, **kwargs):
        # as on a machine where the tiny training takes longer than the self-test allows
        return realWait(self, 1.0 if timeout is None or timeout > 60 else timeout, *args, **kwargs)

    monkeypatch.setattr(jobs.TrainingJob, "wait", slowMachineWait)
    test.setUp()
    with pytest.raises(AssertionError):
        test.test_TrainAndSegment()  # the tiny training needs more than a second: a timeout
    job = logics[-1].trainingJob
    assert job is not None and job.finished, job.status
    assert not job.runner.isRunning()
