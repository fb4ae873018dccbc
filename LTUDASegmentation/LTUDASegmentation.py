"""LTUDA Segmentation: train a multi-organ CT segmentation model from partially labelled cases, then
segment new CT volumes with it.

This file is the thin Slicer layer (module, parameter node, widget, logic, self-test). Everything
that can run without Qt lives in LTUDASegmentationLib (tested with pytest and slicer-core).
Training, prediction and the package check never import torch or MONAI into the Slicer process:
they run in a subprocess (`python -m ltuda ...`, probe.py), read through a JSON-lines progress
stream. One exception: the Setup section's Install button installs torch with the PyTorch
extension, whose PyTorchUtilsLogic.installTorch ends by importing torch in Slicer's own process;
the installed version is then checked again in the backend subprocess.
"""

import contextlib
import html
import logging
import os
import time
import traceback
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # very old Slicer: no translation support
    def _(text):
        return text

    def translate(context, text):
        return text

from LTUDASegmentationLib import jobs as ltudaJobs
from LTUDASegmentationLib.cases import EMPTY, LABELLED, Case, summaryText
from LTUDASegmentationLib.errors import LTUDAError
from LTUDASegmentationLib.logic import DEVICES, PRESETS, LTUDALogicCore
from LTUDASegmentationLib.models import HEADS
from LTUDASegmentationLib.organs import knownOrganNames
from LTUDASegmentationLib.settings import QtSettings

MINIMUM_SLICER_VERSION = (5, 10)

HELP_TEXT = """
<p><b>Train a multi-organ CT segmentation model from partially labelled cases, then segment new CT volumes.</b></p>
<p><b>Partially labelled</b> means each training case outlines only some of the organs: one public dataset labels
only the liver, another only the spleen, your own cases maybe the kidneys and the pancreas. An organ that a case
does not outline is <i>unknown</i> in that case, not background. LTUDA (labelled-to-unlabelled distribution
alignment) learns all organs at once from such cases; you never have to draw every organ in every case.</p>
<ol>
<li><b>Setup</b>: check that the backend Python has torch, MONAI and the LTUDA package (or install them). A typed
external Python path is checked when you press Enter or leave the field; a problem is shown under it.</li>
<li><b>Organs</b>: the organs to learn (preset: liver, spleen, kidney, pancreas).</li>
<li><b>Training cases</b>: add volumes with their segmentations, or import a folder of image/label files. A segment
counts when it matches an organ (standard terminology, else name) and is not empty. <i>Add missing labels</i>
adds empty segments for the organs a case lacks and opens the Segment Editor.</li>
<li><b>Train</b>: runs in a separate process; Slicer stays usable. Cancel keeps the last checkpoint.</li>
<li><b>Segment</b>: pick a model and a volume; the result is a new segmentation, one segment per organ.</li>
</ol>
<p>Training and segmentation never modify your volumes and segmentations and add nothing to the scene but the new
result segmentation. Volumes and segmentations under a linear transform are supported. Requires 3D Slicer 5.10 or
later.
The same steps are available from the Python console: <code>slicer.util.getModuleLogic("LTUDASegmentation")</code>
(see the extension's README).</p>
"""

ACKNOWLEDGEMENT_TEXT = """
Implements LTUDA: X. Jiang, D. Zhang, X. Li, K. Liu, K.-T. Cheng, X. Yang, "Labeled-to-unlabeled distribution
alignment for partially-supervised multi-organ medical image segmentation", Medical Image Analysis (2024).
Training and inference use PyTorch and MONAI in a separate process.
"""


def errorBox(message, details=""):
    """Message box with the error, its details (log path, last log lines) one click away."""
    if details:
        slicer.util.errorDisplay(message, detailedText=details)
    else:
        slicer.util.errorDisplay(message)


def slicerVersion():
    try:
        return (int(slicer.app.majorVersion), int(slicer.app.minorVersion))
    except Exception:
        return MINIMUM_SLICER_VERSION


#
# Module
#


class LTUDASegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LTUDA Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LTUDA for 3D Slicer developers"]
        self.parent.helpText = _(HELP_TEXT)
        if slicerVersion() < MINIMUM_SLICER_VERSION:
            self.parent.helpText += _("<p><b>This Slicer is too old: LTUDA needs Slicer {major}.{minor} or later."
                                      "</b></p>").format(major=MINIMUM_SLICER_VERSION[0], minor=MINIMUM_SLICER_VERSION[1])
            logging.error("LTUDASegmentation needs Slicer %d.%d or later", *MINIMUM_SLICER_VERSION)
        self.parent.acknowledgementText = _(ACKNOWLEDGEMENT_TEXT)


#
# Parameter node (saved with the scene)
#


@parameterNodeWrapper
class LTUDASegmentationParameterNode:
    caseVolume: vtkMRMLScalarVolumeNode
    caseSegmentation: vtkMRMLSegmentationNode
    caseVolumes: list[vtkMRMLScalarVolumeNode]
    caseSegmentations: list[vtkMRMLSegmentationNode]
    fileCasesJson: str = "[]"
    organsJson: str = ""
    importValueMap: str = ""
    preset: Annotated[str, Choice(list(PRESETS))] = "fast"
    epochsStage1: Annotated[int, WithinRange(0, 10000)] = 0
    epochsStage2: Annotated[int, WithinRange(0, 10000)] = 0
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    ignoreUnmatched: bool = False
    keepWorkFiles: bool = False
    inputVolume: vtkMRMLScalarVolumeNode
    head: Annotated[str, Choice(list(HEADS))] = "auto"
    segmentDevice: Annotated[str, Choice(list(DEVICES))] = "auto"
    postprocess: bool = True


#
# Widget
#


class LTUDASegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingOrgans = False
        self._entered = False
        self._observedSegmentations = []
        self._probeRunner = None
        self._probeTimer = None
        self._probeThen = None
        self._plotShown = False
        self._waitCursors = 0  # wait cursors this widget has pushed and not restored yet
        self._startingTraining = False
        self._startingSegment = False

    # -- life cycle -----------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LTUDASegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LTUDASegmentationLogic()

        for widget in (self.ui.trainingProgressBar, self.ui.segmentProgressBar, self.ui.trainingLogTextEdit):
            widget.hide()
        self.ui.trainingLogTextEdit.setMaximumBlockCount(2000)
        self.ui.addOrganComboBox.addItems(knownOrganNames())
        self.ui.addOrganComboBox.setCurrentText("")
        table = self.ui.organsTableWidget
        table.setColumnCount(3)
        table.setHorizontalHeaderLabels([_("Organ"), _("Colour"), _("Terminology")])
        table.horizontalHeader().setStretchLastSection(True)
        table.verticalHeader().hide()

        self._refreshTimer = qt.QTimer()
        self._refreshTimer.setSingleShot(True)
        self._refreshTimer.setInterval(300)
        self._refreshTimer.timeout.connect(self.refreshCases)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)
        slicer.app.connect("aboutToQuit()", self.onAboutToQuit)

        ui = self.ui
        ui.slicerPythonRadioButton.toggled.connect(self.onBackendChoiceChanged)
        # currentPathChanged comes on every keystroke: a typed path is checked when editing finishes
        ui.externalPythonPathLineEdit.currentPathChanged.connect(self.onExternalPythonPathChanged)
        self._externalPythonTextEdit().editingFinished.connect(self.onBackendChoiceChanged)
        ui.workFolderPathLineEdit.currentPathChanged.connect(self.onWorkFolderChanged)
        ui.checkBackendButton.clicked.connect(self.onCheckBackend)
        ui.installButton.clicked.connect(self.onInstall)
        ui.organsTableWidget.itemChanged.connect(self.onOrganItemChanged)
        ui.organsTableWidget.cellDoubleClicked.connect(self.onOrganCellDoubleClicked)
        ui.addOrganButton.clicked.connect(self.onAddOrgan)
        ui.removeOrganButton.clicked.connect(self.onRemoveOrgan)
        ui.resetOrgansButton.clicked.connect(self.onResetOrgans)
        ui.addCaseButton.clicked.connect(self.onAddCase)
        ui.removeCaseButton.clicked.connect(self.onRemoveCase)
        ui.addMissingLabelsButton.clicked.connect(self.onAddMissingLabels)
        ui.casesTableWidget.itemSelectionChanged.connect(self.updateButtonStates)
        ui.importFolderButton.clicked.connect(self.onImportFolder)
        ui.startTrainingButton.clicked.connect(self.onStartTraining)
        ui.cancelTrainingButton.clicked.connect(self.onCancelTraining)
        ui.showPlotButton.clicked.connect(self.onShowPlot)
        ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        ui.addModelButton.clicked.connect(self.onAddModel)
        ui.applyButton.clicked.connect(self.onApply)
        ui.cancelSegmentButton.clicked.connect(self.onCancelSegment)

        self.loadSettingsToGui()
        self.initializeParameterNode()
        self.refreshOrgans()
        self.refreshCases()
        self.refreshModels()

    def cleanup(self):
        self.removeObservers()
        self._refreshTimer.stop()
        try:
            slicer.app.disconnect("aboutToQuit()", self.onAboutToQuit)
        except Exception:  # already disconnected
            pass
        self._stopProbe()
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onReload(self):
        """Reload the Lib package too, so Reload picks up its changes."""
        import importlib
        import sys

        import LTUDASegmentationLib

        if self.logic is not None:
            self.logic.stopAll()
        for name in LTUDASegmentationLib.SUBMODULES:
            module = sys.modules.get("LTUDASegmentationLib." + name)
            if module is not None:
                importlib.reload(module)
        importlib.reload(LTUDASegmentationLib)
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self):
        self._entered = True
        self.initializeParameterNode()
        self.refreshCases()  # the clinician may come back from the Segment Editor
        self.refreshModels()

    def exit(self):
        self._entered = False
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtonStates)

    def onSceneStartClose(self, caller, event):
        self.logic.stopAll()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        self.logic.cases = []
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.refreshCases()

    def onNodeRemoved(self, caller, event):
        self._refreshTimer.start()

    def onAboutToQuit(self):
        if self.logic is not None:
            self.logic.stopAll()

    # -- parameter node ----------------------------------------------------------------------------
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            if self._parameterNodeGuiTag:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtonStates)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self.logic.restoreFromParameterNode()
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtonStates)
            self.refreshOrgans()
            self.refreshCases()
        self.updateButtonStates()

    # -- messages -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self, statusLabel=None, waitCursor=True):
        """Show any error of the block in the panel (statusLabel) and in a message box."""
        if statusLabel is not None:
            self.showStatus(statusLabel, "")
        if waitCursor:
            self._pushWaitCursor()
        try:
            yield
        except LTUDAError as exc:
            if waitCursor:
                self._popWaitCursor()
                waitCursor = False
            self.showError(str(exc), exc.details, statusLabel)
        except Exception as exc:
            if waitCursor:
                self._popWaitCursor()
                waitCursor = False
            logging.error(traceback.format_exc())
            self.showError(_("Unexpected error: {error}").format(error=exc), traceback.format_exc(), statusLabel)
        finally:
            if waitCursor:
                self._popWaitCursor()

    def _pushWaitCursor(self):
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        self._waitCursors += 1

    def _popWaitCursor(self):
        if self._waitCursors > 0:
            slicer.app.restoreOverrideCursor()
            self._waitCursors -= 1

    @contextlib.contextmanager
    def noWaitCursor(self):
        """The normal cursor while a dialog asks the user something; the wait cursors come back after."""
        count = self._waitCursors
        for _i in range(count):
            self._popWaitCursor()
        try:
            yield
        finally:
            for _i in range(count):
                self._pushWaitCursor()

    def confirm(self, text, yesNo=False):
        with self.noWaitCursor():
            if yesNo:
                return slicer.util.confirmYesNoDisplay(text)
            return slicer.util.confirmOkCancelDisplay(text)

    def showError(self, message, details="", statusLabel=None):
        if statusLabel is not None:
            statusLabel.text = message
            statusLabel.setStyleSheet("color: #b00020")
        errorBox(message, details)

    @staticmethod
    def showStatus(label, text, error=False):
        label.text = text
        label.setStyleSheet("color: #b00020" if error else "")

    # -- setup section ------------------------------------------------------------------------------
    def loadSettingsToGui(self):
        python = self.logic.backendPython()
        wasBlocked = [w.blockSignals(True) for w in (self.ui.slicerPythonRadioButton, self.ui.externalPythonRadioButton,
                                                       self.ui.externalPythonPathLineEdit, self.ui.workFolderPathLineEdit)]
        self.ui.externalPythonRadioButton.checked = bool(python)
        self.ui.slicerPythonRadioButton.checked = not python
        self.ui.externalPythonPathLineEdit.currentPath = python or ""
        self.ui.externalPythonPathLineEdit.enabled = bool(python)
        self.ui.workFolderPathLineEdit.currentPath = self.logic.workFolder()
        for w, blocked in zip((self.ui.slicerPythonRadioButton, self.ui.externalPythonRadioButton,
                               self.ui.externalPythonPathLineEdit, self.ui.workFolderPathLineEdit), wasBlocked):
            w.blockSignals(blocked)
        self.ui.modelFolderPathLineEdit.currentPath = self.logic.defaultModelFolder()

    def _externalPythonTextEdit(self):
        return self.ui.externalPythonPathLineEdit.comboBox().lineEdit()

    def onExternalPythonPathChanged(self, path):
        """A path browsed to or picked from the history is checked at once; one being typed (the
        field has the focus) when editing finishes (Enter or leaving the field)."""
        if self._externalPythonTextEdit().hasFocus():
            return
        self.onBackendChoiceChanged()

    def onBackendChoiceChanged(self, *args):
        """Use Slicer's Python or the external one; a problem with the path is shown under the field."""
        external = self.ui.externalPythonRadioButton.checked
        self.ui.externalPythonPathLineEdit.enabled = external
        path = self.ui.externalPythonPathLineEdit.currentPath if external else ""
        if external and not path:
            self.showStatus(self.ui.externalPythonStatusLabel, _("Choose the python executable of the environment."))
            return
        if (path or None) == self.logic.backendPython():
            self.showStatus(self.ui.externalPythonStatusLabel, "")
            return  # nothing changed (editing finished twice, or the same file browsed to again)
        try:
            self.logic.setBackendPython(path or None)
        except LTUDAError as exc:
            self.showStatus(self.ui.externalPythonStatusLabel, str(exc), error=True)
            self.updateButtonStates()
            return
        self.showStatus(self.ui.externalPythonStatusLabel, "")
        self.showStatus(self.ui.backendStatusLabel, _("Not checked yet: click Check."))
        self.updateButtonStates()

    def onWorkFolderChanged(self, path):
        self.logic.setWorkFolder(path)

    def withReadyBackend(self, action, statusLabel):
        """Run action() once the backend Python is known to have what it needs; checks it first,
        without blocking the GUI, when it was not checked yet."""
        probe = self.logic.lastProbe
        if probe is not None and probe.backend is not None and probe.backend.python == self.logic.backendPython():
            if probe.ready():
                action()
            else:
                self.showError(probe.missingMessage(), "", statusLabel)
            return
        self.showStatus(statusLabel, _("Checking the backend Python first..."))
        self.onCheckBackend(then=(action, statusLabel))

    def onCheckBackend(self, *args, then=None):
        """Run the probe in the backend Python without blocking the GUI (a torch import can take a while);
        `then` = (action, status label): run the action afterwards if the backend is ready."""
        if self._probeRunner is not None:
            if then is not None:
                self._probeThen = then
            return
        self._probeThen = then
        from LTUDASegmentationLib.runner import ProcessRunner

        with self.guard(self.ui.backendStatusLabel, waitCursor=False):
            backend = self.logic.backend()
            self._probeBackend = backend
            self._probeRunner = ProcessRunner(backend.probeCommand(), env=backend.environment()).start()
            self._probeOutput = {"stdout": [], "stderr": []}
            self._probeStarted = time.time()
            self.showStatus(self.ui.backendStatusLabel, _("Checking {backend}...").format(backend=backend.describe()))
            self.ui.checkBackendButton.enabled = False
            self._probeTimer = qt.QTimer()
            self._probeTimer.setInterval(200)
            self._probeTimer.timeout.connect(self._onProbeTick)
            self._probeTimer.start()

    def _stopProbe(self):
        if self._probeTimer is not None:
            self._probeTimer.stop()
            self._probeTimer = None
        if self._probeRunner is not None:
            self._probeRunner.kill()
            self._probeRunner = None
        self._probeThen = None

    def _onProbeTick(self):
        from LTUDASegmentationLib.backend import parseProbeOutput
        from LTUDASegmentationLib.runner import EXIT

        runner = self._probeRunner
        for kind, value in runner.poll():
            if kind == EXIT:
                self._probeTimer.stop()
                self._probeRunner = None
                self.ui.checkBackendButton.enabled = True
                then, self._probeThen = self._probeThen, None
                try:
                    result = parseProbeOutput(value, "\n".join(self._probeOutput["stdout"]),
                                              "\n".join(self._probeOutput["stderr"]), self._probeBackend)
                except LTUDAError as exc:
                    self.showStatus(self.ui.backendStatusLabel, str(exc), error=True)
                    if then is not None:
                        self.showError(str(exc), "", then[1])
                    self.updateButtonStates()
                    return
                self.logic.lastProbe = result
                self.showProbe(result)
                if then is not None:
                    action, label = then
                    if result.ready():
                        action()
                    else:
                        self.showError(result.missingMessage(), "", label)
                return
            self._probeOutput[kind].append(value)
        if time.time() - self._probeStarted > 600:
            runner.kill()

    def showProbe(self, result):
        rows = []
        for text, ok in result.lines():
            mark = "&#10004;" if ok else "&#10008;"
            color = "#1b7f3b" if ok else "#b00020"
            rows.append(f"<span style='color:{color}'>{mark}</span> {html.escape(text)}")
        if result.missing():
            rows.append(f"<b>{html.escape(result.missingMessage())}</b>")
        self.ui.backendStatusLabel.text = "<br>".join(rows)
        self.ui.backendStatusLabel.setStyleSheet("")
        self.updateButtonStates()

    def onInstall(self):
        """Install what Slicer's Python lacks: torch via the PyTorch extension, the rest with pip."""
        probe = self.logic.lastProbe
        if probe is None or self.logic.backendPython():
            return
        missing = probe.missing()
        with self.guard(self.ui.backendStatusLabel):
            installTorch = "torch" in missing
            others = [m for m in missing if m not in ("torch", "ltuda", "SimpleITK", "numpy")]
            if "SimpleITK" in missing or "numpy" in missing:
                raise LTUDAError(_("Slicer's own SimpleITK or numpy is missing or too old; LTUDA never replaces them. "
                                   "Install a current Slicer ({major}.{minor} or later).").format(
                                       major=MINIMUM_SLICER_VERSION[0], minor=MINIMUM_SLICER_VERSION[1]))
            if installTorch:
                try:
                    import PyTorchUtils
                except ImportError:
                    raise LTUDAError(_("torch is installed through the PyTorch extension, which is missing: install "
                                       "'PyTorch' from the Extensions Manager, restart Slicer and click Install "
                                       "again.")) from None
                if not self.confirm(
                        _("PyTorch (about 1-3 GB) will be downloaded and installed into Slicer's Python by the "
                          "PyTorch extension; it picks the CUDA build that matches your GPU driver. This can take "
                          "several minutes without visible progress. Continue?")):
                    self.showDeclined(["torch"])
                    return
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=">=" + "2.0")
                if torch is None:
                    self.showDeclined(["torch"])
                    return
            if others and not self._pipInstall(others):
                self.showDeclined(others)
                return
            self.showStatus(self.ui.backendStatusLabel, _("Installed. Checking again..."))
        self.onCheckBackend()

    def showDeclined(self, names):
        """Say what the user declined to install and what still works (in the panel, no message box)."""
        self.showStatus(self.ui.backendStatusLabel, _(
            "You declined installing {packages} into Slicer's Python: nothing was installed. Training and "
            "segmentation need it; organs, training cases and 'Add missing labels' still work. Click Install again "
            "when you are ready, or choose an external Python that has these packages (Backend Python above)."
        ).format(packages=", ".join(names)), error=True)

    def _pipInstall(self, names):
        """Install the pip packages among `names`; False when the user declined."""
        requirements = self.resourcePath("requirements.txt")
        if hasattr(slicer, "packaging"):
            # Slicer 5.12+: checks, asks, shows progress, offers a restart; never touches torch/numpy/SimpleITK.
            try:
                with self.noWaitCursor():
                    slicer.packaging.pip_ensure(slicer.packaging.load_requirements(requirements),
                                                skip_packages=["torch", "numpy", "SimpleITK"], requester="LTUDA")
            except RuntimeError as exc:
                if "declined" in str(exc).lower():
                    return False
                raise
            return True
        specs = {"monai": "monai>=1.3", "pynrrd": "pynrrd>=1.0"}
        wanted = [specs[n] for n in names if n in specs]
        if not wanted:
            return True
        if not self.confirm(_("These Python packages will be downloaded and installed into Slicer's Python: "
                              "{packages}. Continue?").format(packages=", ".join(wanted))):
            return False
        for spec in wanted:
            # MONAI only needs torch and numpy, which are present: --no-deps keeps Slicer's numpy untouched.
            slicer.util.pip_install(("--no-deps " if spec.startswith("monai") else "") + spec)
        return True

    # -- organs -------------------------------------------------------------------------------------
    def refreshOrgans(self):
        table = self.ui.organsTableWidget
        self._updatingOrgans = True
        try:
            table.setRowCount(len(self.logic.organs))
            for row, organ in enumerate(self.logic.organs):
                nameItem = qt.QTableWidgetItem(organ["name"])
                colorItem = qt.QTableWidgetItem("")
                colorItem.setBackground(qt.QBrush(qt.QColor(*organ["color"])))
                colorItem.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
                colorItem.setToolTip(_("Double-click to change the colour"))
                term = (organ.get("terminology") or {}).get("type")
                termItem = qt.QTableWidgetItem(f"{term[2]} ({term[0]} {term[1]})" if term else _("none (matched by name)"))
                termItem.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
                for column, item in enumerate((nameItem, colorItem, termItem)):
                    table.setItem(row, column, item)
            table.resizeColumnToContents(0)
        finally:
            self._updatingOrgans = False
        self.refreshCases()

    def onOrganItemChanged(self, item):
        if self._updatingOrgans or item.column() != 0:
            return
        row = item.row()
        if not 0 <= row < len(self.logic.organs):
            return
        with self.guard(self.ui.organsStatusLabel, waitCursor=False):
            self.logic.updateOrgan(self.logic.organs[row]["name"], newName=item.text().strip())
        self.refreshOrgans()

    def onOrganCellDoubleClicked(self, row, column):
        if column != 1 or not 0 <= row < len(self.logic.organs):
            return
        organ = self.logic.organs[row]
        color = qt.QColorDialog.getColor(qt.QColor(*organ["color"]), slicer.util.mainWindow(),
                                         _("Colour of {organ}").format(organ=organ["name"]))
        if color.isValid():
            with self.guard(self.ui.organsStatusLabel, waitCursor=False):
                self.logic.updateOrgan(organ["name"], color=[color.red(), color.green(), color.blue()])
            self.refreshOrgans()

    def onAddOrgan(self):
        name = self.ui.addOrganComboBox.currentText.strip()
        if not name:
            return
        with self.guard(self.ui.organsStatusLabel, waitCursor=False):
            self.logic.addOrgan(name)
            self.ui.addOrganComboBox.setCurrentText("")
        self.refreshOrgans()

    def onRemoveOrgan(self):
        row = self.ui.organsTableWidget.currentRow()
        if 0 <= row < len(self.logic.organs):
            with self.guard(self.ui.organsStatusLabel, waitCursor=False):
                self.logic.removeOrgan(self.logic.organs[row]["name"])
            self.refreshOrgans()

    def onResetOrgans(self):
        with self.guard(self.ui.organsStatusLabel, waitCursor=False):
            self.logic.resetOrgans()
        self.refreshOrgans()

    # -- cases --------------------------------------------------------------------------------------
    def refreshCases(self):
        if self.logic is None:
            return
        rows = self.logic.caseTable()
        organs = [o["name"] for o in self.logic.organs]
        table = self.ui.casesTableWidget
        selected = table.currentRow()
        table.clear()
        table.setColumnCount(3 + len(organs))
        table.setHorizontalHeaderLabels([_("Case"), _("Volume"), _("Segmentation")] + organs)
        table.setRowCount(len(rows))
        symbols = {LABELLED: ("\u2714", "#c8eccf", _("labelled")), EMPTY: (_("empty"), "#fbe3b4", _("segment is empty")),
                   "missing": ("\u2013", "#eeeeee", _("not labelled in this case"))}
        for r, row in enumerate(rows):
            tooltip = "\n".join(row["problems"] + ([_("Segments matching no organ: ") + ", ".join(row["unmatched"])]
                                                   if row["unmatched"] else []))
            for c, text in enumerate((row["name"], row["volume"], row["segmentation"])):
                item = qt.QTableWidgetItem(text)
                if tooltip:
                    item.setToolTip(tooltip)
                    item.setForeground(qt.QBrush(qt.QColor("#b00020")))
                table.setItem(r, c, item)
            for c, organ in enumerate(organs):
                symbol, color, tip = symbols.get(row["organs"].get(organ), symbols["missing"])
                item = qt.QTableWidgetItem(symbol)
                item.setTextAlignment(qt.Qt.AlignCenter)
                item.setBackground(qt.QBrush(qt.QColor(color)))
                item.setToolTip(f"{organ}: {tip}")
                table.setItem(r, 3 + c, item)
        table.resizeColumnsToContents()
        if 0 <= selected < len(rows):
            table.selectRow(selected)
        summary = self.logic.labelSummary()
        lines = [html.escape(summaryText(summary, self.logic.organs))] if rows else [_("No training cases yet.")]
        lines += [f"<span style='color:#b00020'>{html.escape(m)}</span>" for m in summary["errors"] if rows]
        lines += [f"<span style='color:#a05a00'>{html.escape(m)}</span>" for m in summary["warnings"]]
        self.ui.casesSummaryLabel.text = "<br>".join(lines)
        self.ui.casesSummaryLabel.setStyleSheet("")
        self._observeCaseSegmentations()
        self.updateButtonStates()

    def _observeCaseSegmentations(self):
        for node in self._observedSegmentations:
            for event in self._segmentEvents():
                self.removeObserver(node, event, self.onCaseSegmentationModified)
        self._observedSegmentations = [c.segmentationNode for c in self.logic.cases
                                       if c.isScene and c.segmentationNode is not None]
        for node in self._observedSegmentations:
            for event in self._segmentEvents():
                self.addObserver(node, event, self.onCaseSegmentationModified)

    @staticmethod
    def _segmentEvents():
        return (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                slicer.vtkSegmentation.SegmentModified)

    def onCaseSegmentationModified(self, caller, event):
        if self._entered:
            self._refreshTimer.start()

    def selectedCaseIndex(self):
        row = self.ui.casesTableWidget.currentRow()
        return row if 0 <= row < len(self.logic.cases) else None

    def onAddCase(self):
        with self.guard(self.ui.casesStatusLabel):
            self.logic.addCase(self._parameterNode.caseVolume, self._parameterNode.caseSegmentation)
        self.refreshCases()

    def onRemoveCase(self):
        index = self.selectedCaseIndex()
        if index is not None:
            self.logic.removeCase(index)
            self.refreshCases()

    def onAddMissingLabels(self):
        index = self.selectedCaseIndex()
        if index is None:
            return
        with self.guard(self.ui.casesStatusLabel):
            added = self.logic.addMissingSegments(index)
            case = self.logic.cases[index]
            self.refreshCases()
            self.openSegmentEditor(case, added[0] if added else None)

    @staticmethod
    def openSegmentEditor(case, segmentId=None):
        slicer.util.setSliceViewerLayers(background=case.volumeNode, fit=True)
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(case.segmentationNode)
        setSource = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode
        setSource(case.volumeNode)
        if segmentId:
            editor.setCurrentSegmentID(segmentId)

    def onImportFolder(self):
        folder = self.ui.importFolderPathLineEdit.currentPath
        with self.guard(self.ui.casesStatusLabel):
            if not folder:
                raise LTUDAError(_("Choose the folder to import."))
            added = self.logic.importCaseFolder(folder, self.ui.importValueMapLineEdit.text)
            slicer.util.showStatusMessage(_("Imported {count} case(s) from {folder}").format(count=len(added),
                                                                                            folder=folder), 5000)
        self.refreshCases()

    # -- training -----------------------------------------------------------------------------------
    def onStartTraining(self):
        if self._startingTraining:
            return
        folder = self.ui.modelFolderPathLineEdit.currentPath or self.logic.defaultModelFolder()
        resume = False
        if os.path.isfile(os.path.join(folder, "checkpoints", "last.pt")):
            resume = self.confirm(
                _("{folder} holds a stopped training. Resume it?\n(No: nothing is started; choose another model "
                  "folder for a new training.)").format(folder=folder), yesNo=True)
            if not resume:
                return
        self.withReadyBackend(lambda: self._startTraining(folder, resume), self.ui.trainingStatusLabel)

    def _startTraining(self, folder, resume):
        if self._startingTraining:
            return
        # Disabled before anything processes events, so a double click cannot start a second export.
        self._startingTraining = True
        self.ui.startTrainingButton.enabled = False
        try:
            self._exportAndTrain(folder, resume)
        finally:
            self._startingTraining = False
        job = self.logic.trainingJob
        if job is None or job.finished:
            self.ui.trainingProgressBar.hide()
        self.updateButtonStates()

    def _exportAndTrain(self, folder, resume):
        p = self._parameterNode
        with self.guard(self.ui.trainingStatusLabel):
            probe = self.logic.lastProbe
            if p.preset == "paper" and probe is not None and not probe.gpu and p.device != "cuda":
                if not self.confirm(
                        _("The 'paper' preset is meant for a GPU; on this CPU it can take days. Use it anyway?")):
                    return
            self.ui.trainingLogTextEdit.clear()
            self.ui.trainingLogTextEdit.show()
            self.ui.trainingProgressBar.show()
            self.ui.trainingProgressBar.setValue(0)
            self.ui.trainingProgressBar.setFormat(_("Exporting cases..."))
            self.showStatus(self.ui.trainingStatusLabel, _("Exporting cases..."))
            slicer.app.processEvents()
            self._plotShown = False
            self.logic.train(folder, preset=p.preset, epochsStage1=p.epochsStage1 or None,
                             epochsStage2=p.epochsStage2 or None, device=p.device,
                             ignoreUnmatched=p.ignoreUnmatched, keepWorkFiles=p.keepWorkFiles, resume=resume,
                             waitForCompletion=False, onUpdate=self.onTrainingUpdate, onLog=self.onTrainingLog,
                             onFinished=self.onTrainingFinished)

    def onTrainingUpdate(self, job):
        progress = job.progress
        fraction = job.fraction()
        bar = self.ui.trainingProgressBar
        if fraction is None:
            bar.setRange(0, 0)
        else:
            bar.setRange(0, 1000)
            bar.setValue(int(1000 * fraction))
        stage = f"Stage {progress.stage}" if progress.stage is not None else job.status
        bar.setFormat(f"{stage}: %p%")
        self.showStatus(self.ui.trainingStatusLabel, job.statusText())
        if progress.lossHistory:
            chart = self.logic.updateTrainingPlot(progress)
            if not self._plotShown:
                self._plotShown = True
                self.showChart(chart)
        self.updateButtonStates()

    def onTrainingLog(self, job, line):
        self.ui.trainingLogTextEdit.appendPlainText(line)

    def onTrainingFinished(self, job):
        self.ui.trainingProgressBar.hide()
        self.showStatus(self.ui.trainingStatusLabel, job.message, error=job.status == ltudaJobs.FAILED)
        if job.status == ltudaJobs.FAILED:
            errorBox(job.message, job.details)
        elif job.status == ltudaJobs.COMPLETED:
            self.ui.modelFolderPathLineEdit.currentPath = self.logic.defaultModelFolder()
        self.refreshModels(select=job.modelDir)
        self.updateButtonStates()

    def onCancelTraining(self):
        self.logic.cancelTraining()
        self.updateButtonStates()

    def onShowPlot(self):
        job = self.logic.trainingJob
        if job is not None:
            self.showChart(self.logic.updateTrainingPlot(job.progress))

    @staticmethod
    def showChart(chartNode):
        try:
            slicer.modules.plots.logic().ShowChartInLayout(chartNode)
        except Exception as exc:  # no plot view in this layout/application
            logging.warning(f"Could not show the training plot: {exc}")

    # -- models and segmentation ----------------------------------------------------------------------
    def refreshModels(self, select=None):
        combo = self.ui.modelComboBox
        current = select or combo.currentData
        combo.blockSignals(True)
        combo.clear()
        for info in self.logic.models():
            combo.addItem(info.title(), info.path)
        index = combo.findData(current) if current else 0
        combo.setCurrentIndex(index if index >= 0 else 0)
        combo.blockSignals(False)
        self.onModelChanged()

    def onModelChanged(self, *args):
        path = self.ui.modelComboBox.currentData
        text = ""
        if path:
            try:
                from LTUDASegmentationLib.models import readModel

                text = readModel(path).summary()
            except LTUDAError as exc:
                text = str(exc)
        self.ui.modelInfoLabel.text = text
        self.updateButtonStates()

    def onAddModel(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Choose an LTUDA model folder"),
                                                     self.logic.modelsFolder())
        if not folder:
            return
        with self.guard(self.ui.segmentStatusLabel):
            info = self.logic.addModel(folder)
            self.refreshModels(select=info.path)

    def onApply(self):
        if self._startingSegment:
            return
        self.withReadyBackend(self._startSegmenting, self.ui.segmentStatusLabel)

    def _startSegmenting(self):
        if self._startingSegment:
            return
        self._startingSegment = True
        self.ui.applyButton.enabled = False  # before processEvents: a double click starts one segmentation
        try:
            self._exportAndSegment()
        finally:
            self._startingSegment = False
        job = self.logic.predictionJob
        if job is None or job.finished:
            self.ui.segmentProgressBar.hide()
        self.updateButtonStates()

    def _exportAndSegment(self):
        p = self._parameterNode
        with self.guard(self.ui.segmentStatusLabel):
            self.ui.segmentProgressBar.show()
            self.ui.segmentProgressBar.setValue(0)
            self.showStatus(self.ui.segmentStatusLabel, _("Starting..."))
            slicer.app.processEvents()
            self.logic.predict(p.inputVolume, self.ui.modelComboBox.currentData, head=p.head,
                               postprocess=p.postprocess, device=p.segmentDevice, waitForCompletion=False,
                               onUpdate=self.onSegmentUpdate, onFinished=self.onSegmentFinished)

    def onSegmentUpdate(self, job):
        fraction = job.fraction()
        bar = self.ui.segmentProgressBar
        if fraction is None:
            bar.setRange(0, 0)
        else:
            bar.setRange(0, 1000)
            bar.setValue(int(1000 * fraction))
        self.showStatus(self.ui.segmentStatusLabel, job.statusText())
        self.updateButtonStates()

    def onSegmentFinished(self, job):
        self.ui.segmentProgressBar.hide()
        self.showStatus(self.ui.segmentStatusLabel, job.message, error=job.status == ltudaJobs.FAILED)
        if job.status == ltudaJobs.FAILED:
            errorBox(job.message, job.details)
        node = job.segmentationNode
        if node is not None:
            self.ui.resultLabel.text = _("Result: {name}").format(name=node.GetName())
            self.ui.outputShow3DButton.setSegmentationNode(node)
            self.ui.outputShow3DButton.enabled = True
            slicer.util.setSliceViewerLayers(background=job.volumeNode)
        self.updateButtonStates()

    def onCancelSegment(self):
        self.logic.cancelPrediction()
        self.updateButtonStates()

    # -- button states ------------------------------------------------------------------------------
    def updateButtonStates(self, *args):
        if self.logic is None or not hasattr(self, "ui"):
            return
        p = self._parameterNode
        ui = self.ui
        external = bool(self.logic.backendPython())
        probe = self.logic.lastProbe
        ui.installButton.enabled = (not external and probe is not None and bool(probe.missing())
                                    and self._probeRunner is None)
        ui.installButton.toolTip = (_("Only Slicer's Python can be set up from here; install packages into the "
                                      "external environment yourself.") if external else
                                    _("Install torch (PyTorch extension), MONAI and pynrrd into Slicer's Python. "
                                      "Asks before downloading."))
        hasCase = p is not None and p.caseVolume is not None and p.caseSegmentation is not None
        ui.addCaseButton.enabled = hasCase
        ui.addCaseButton.toolTip = _("Add the volume and segmentation above as a training case.") if hasCase else \
            _("Choose a volume and its segmentation first.")
        selected = self.selectedCaseIndex() is not None
        ui.removeCaseButton.enabled = selected
        ui.addMissingLabelsButton.enabled = selected

        training = self._startingTraining or (self.logic.trainingJob is not None and
                                              not self.logic.trainingJob.finished)
        problems = [] if training else self.logic.checkCanTrain(ignoreUnmatched=bool(p and p.ignoreUnmatched))
        ui.startTrainingButton.enabled = not training and not problems
        ui.startTrainingButton.toolTip = ("\n".join(problems) if problems else
                                          _("Export the cases and train a model in a separate process."))
        ui.cancelTrainingButton.enabled = (training and self.logic.trainingJob is not None and
                                           self.logic.trainingJob.status == ltudaJobs.RUNNING)

        predicting = self._startingSegment or (self.logic.predictionJob is not None and
                                               not self.logic.predictionJob.finished)
        missing = []
        if p is None or p.inputVolume is None:
            missing.append(_("Choose the input volume."))
        if not ui.modelComboBox.currentData:
            missing.append(_("Train a model or add a model folder."))
        ui.applyButton.enabled = not predicting and not missing
        ui.applyButton.toolTip = "\n".join(missing) if missing else _("Segment the volume into a new segmentation.")
        ui.cancelSegmentButton.enabled = (predicting and self.logic.predictionJob is not None and
                                          self.logic.predictionJob.status == ltudaJobs.RUNNING)


#
# Logic
#


class LTUDASegmentationLogic(ScriptedLoadableModuleLogic, LTUDALogicCore):
    """Console API, e.g.:

        logic = slicer.util.getModuleLogic("LTUDASegmentation")
        logic.addCase(volumeNode, segmentationNode)
        job = logic.train(preset="fast")           # returns at once; job.status, job.progress, job.cancel()
        job.wait()                                 # optional: block until done (raises on failure)
        segmentation = logic.predict(otherVolume).segmentationNode
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        LTUDALogicCore.__init__(self, scene=None, settings=QtSettings(),
                                startupEnvironment=slicer.util.startupEnvironment)
        self._timers = {}
        self._restoring = False

    def getParameterNode(self):
        return LTUDASegmentationParameterNode(super().getParameterNode())

    # Jobs are driven by a QTimer on the GUI thread, so callbacks may touch MRML and widgets.
    def _schedule(self, job):
        timer = qt.QTimer()
        timer.setInterval(100)

        def tick():
            job.process()
            if job.finished:
                timer.stop()
                self._timers.pop(id(job), None)

        timer.timeout.connect(tick)
        self._timers[id(job)] = timer
        timer.start()

    def _idle(self):
        slicer.app.processEvents()

    # The organ and case lists are saved in the scene's parameter node.
    def _organsChanged(self):
        if not self._restoring:
            self.getParameterNode().organsJson = self.organsJson()

    def _casesChanged(self):
        if self._restoring:
            return
        import json

        p = self.getParameterNode()
        sceneCases = [c for c in self.cases if c.isScene]
        p.caseVolumes = [c.volumeNode for c in sceneCases]
        p.caseSegmentations = [c.segmentationNode for c in sceneCases]
        p.fileCasesJson = json.dumps([{"image": c.imagePath, "label": c.labelPath, "name": c.name,
                                       "values": {str(k): v for k, v in c.valueMap.items()}}
                                      for c in self.cases if not c.isScene])

    def restoreFromParameterNode(self):
        """Organs and cases from the scene (after loading a scene, or on entering the module)."""
        import json

        p = self.getParameterNode()
        self._restoring = True
        try:
            if p.organsJson:
                try:
                    self.setOrgansFromJson(p.organsJson)
                except LTUDAError as exc:
                    logging.warning(f"LTUDA: stored organ list ignored: {exc}")
            cases = [Case(v, s) for v, s in zip(p.caseVolumes, p.caseSegmentations) if v is not None and s is not None]
            try:
                for item in json.loads(p.fileCasesJson or "[]"):
                    cases.append(Case(imagePath=item["image"], labelPath=item["label"], name=item.get("name"),
                                      valueMap={int(k): v for k, v in item.get("values", {}).items()}))
            except (ValueError, KeyError, TypeError) as exc:
                logging.warning(f"LTUDA: stored file cases ignored: {exc}")
            if cases or not self.cases:
                self.cases = cases
        finally:
            self._restoring = False


#
# Self-test: the same end-to-end path as the pytest suite, on tiny synthetic volumes
#


class LTUDASegmentationTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_CasesAndExport()
        self.setUp()
        self.test_TrainAndSegment()

    def _logic(self, tempDir):
        from LTUDASegmentationLib.settings import MemorySettings

        logic = LTUDASegmentationLogic()
        logic.settings = MemorySettings({"WorkFolder": os.path.join(tempDir, "work"),
                                         "ModelsFolder": os.path.join(tempDir, "models"),
                                         "BackendPython": self._backendPython()})
        from LTUDASegmentationLib.models import ModelRegistry

        logic.registry = ModelRegistry(logic.settings)
        return logic

    @staticmethod
    def _backendPython():
        try:
            return QtSettings().value("BackendPython", "") or ""
        except Exception:
            return ""

    def test_CasesAndExport(self):
        from LTUDASegmentationLib import synthetic

        self.delayDisplay("Partially labelled cases, labelled/missing table, manifest export")
        tempDir = slicer.util.tempDirectory("LTUDASelfTest")
        logic = self._logic(tempDir)
        logic.setOrgans(["liver", "spleen"])
        volumeA, segA = synthetic.addSyntheticCase(slicer.mrmlScene, "caseA", ["liver", "spleen"], ["liver"], seed=1)
        volumeB, segB = synthetic.addSyntheticCase(slicer.mrmlScene, "caseB", ["liver", "spleen"], ["spleen"],
                                                   flip=True, seed=2)
        logic.addCase(volumeA, segA)
        logic.addCase(volumeB, segB)
        rows = logic.caseTable()
        self.assertEqual(rows[0]["organs"], {"liver": "labelled", "spleen": "missing"})
        self.assertEqual(rows[1]["organs"], {"liver": "missing", "spleen": "labelled"})
        self.assertEqual(logic.labelSummary()["counts"], {"liver": 1, "spleen": 1})
        with self.assertRaises(LTUDAError):
            logic.addCase(volumeA, None)
        before = segA.GetSegmentation().GetNumberOfSegments()
        added = logic.addMissingSegments(0)
        self.assertEqual(len(added), 1)
        self.assertEqual(segA.GetSegmentation().GetNumberOfSegments(), before + 1)
        self.assertEqual(logic.caseTable()[0]["organs"]["spleen"], "empty")
        manifest = logic.exportTrainingData(os.path.join(tempDir, "export"))
        self.assertTrue(os.path.isfile(manifest))
        ok, text = logic.backend().checkDataset(manifest)
        if "No module named" in text:
            self.delayDisplay("Backend not installed: dataset check skipped (" + text.splitlines()[-1] + ")")
        else:
            self.assertTrue(ok, text)
        self.delayDisplay("Cases and export passed")

    def test_TrainAndSegment(self):
        from LTUDASegmentationLib import synthetic

        tempDir = slicer.util.tempDirectory("LTUDASelfTest")
        logic = self._logic(tempDir)
        probe = logic.probeBackend()
        if not probe.ready():
            self.delayDisplay("SKIPPED training test: " + probe.missingMessage(), 3000)
            return
        self.delayDisplay("Tiny training in a subprocess (a few seconds on a CPU)")
        logic.setOrgans(["liver", "spleen"])
        volumes = []
        for i, (labelled, flip) in enumerate([(["liver"], False), (["spleen"], True), (["liver", "spleen"], False)]):
            volume, segmentation = synthetic.addSyntheticCase(slicer.mrmlScene, f"case{i}", ["liver", "spleen"],
                                                              labelled, flip=flip, seed=i)
            logic.addCase(volume, segmentation)
            volumes.append(volume)
        arraysBefore = [slicer.util.arrayFromVolume(v).copy() for v in volumes]
        job = logic.train(preset="fast", epochsStage1=1, epochsStage2=1, device="cpu",
                          extraArgs=["--iterations-per-epoch", "2", "--image-size", "32", "--batch-size", "2"])
        try:
            status = job.wait(timeout=900, idle=logic._idle)
        finally:
            logic.stopAll()  # a training still running after the timeout (or an error) is stopped, not left behind
        self.assertEqual(status, ltudaJobs.COMPLETED, job.message or f"training still {status} after 900 s")
        self.assertTrue(logic.models())
        self.delayDisplay("Segmenting a flipped (LPS) volume with the new model")
        job = logic.predict(volumes[1], device="cpu", keepLabelMap=True)
        node = job.segmentationNode
        self.assertEqual(node.GetName(), "case1 segmentation")
        names = [node.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(node.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(sorted(names), ["liver", "spleen"])
        from LTUDASegmentationLib.segments import labelArrayOnVolume, loadVolumeFile

        reference = loadVolumeFile(slicer.mrmlScene, job.labelMapPath, "backend labels", "vtkMRMLLabelMapVolumeNode")
        expected = slicer.util.arrayFromVolume(reference)

        segmentation = node.GetSegmentation()
        values = {segmentation.GetNthSegmentID(i): 1 + ["liver", "spleen"].index(segmentation.GetNthSegment(i).GetName())
                  for i in range(segmentation.GetNumberOfSegments())}
        imported = labelArrayOnVolume(volumes[1], node, values)
        self.assertTrue((imported == expected).all(), "imported segments differ from the backend's label map")
        for volume, before in zip(volumes, arraysBefore):
            self.assertTrue((slicer.util.arrayFromVolume(volume) == before).all(), "a user volume was modified")
        self.delayDisplay("Train and segment passed")
