"""LTUDA Segmentation: train a multi-organ CT segmentation model from partially labelled cases, then
segment new CT volumes with it.

This file is the thin Slicer layer (module, parameter node, widget, logic, self-test). The panel's
five sections (Setup, Organs, Cases, Train, Segment) are one class each in LTUDASegmentationWidgets;
the widget here only composes them. Everything that can run without Qt lives in
LTUDASegmentationLib (tested with pytest and slicer-core).
Training, prediction and the package check never import torch or MONAI into the Slicer process:
they run in a subprocess (`python -m ltuda ...`, probe.py), read through a JSON-lines progress
stream. One exception: the Setup section's Install button installs torch with the PyTorch
extension, whose PyTorchUtilsLogic.installTorch ends by importing torch in Slicer's own process;
the installed version is then checked again in the backend subprocess.
"""

import logging
import os
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
from LTUDASegmentationLib.cases import Case
from LTUDASegmentationLib.errors import LTUDAError
from LTUDASegmentationLib.logic import DEVICES, PRESETS, LTUDALogicCore
from LTUDASegmentationLib.models import HEADS
from LTUDASegmentationLib.settings import QtSettings
from LTUDASegmentationWidgets.annotationloop import AnnotationLoop
from LTUDASegmentationWidgets.casessection import CasesSection
from LTUDASegmentationWidgets.organssection import OrgansSection
from LTUDASegmentationWidgets.panel import Panel
from LTUDASegmentationWidgets.segmentsection import SegmentSection
from LTUDASegmentationWidgets.setupsection import SetupSection
from LTUDASegmentationWidgets.trainsection import TrainSection

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
<li><b>Annotation loop</b> (in Training cases): <i>Pre-fill missing organs</i> runs a trained model on the cases and
adds its proposal for each organ a case lacks as a new segment "ORGAN (proposed)" (your segments are never changed).
<i>Next</i> opens the most useful proposal to check in the Segment Editor; correct it, then <i>Mark reviewed</i>.
Unreviewed proposals are never used as training labels. <i>Continue training</i> fine-tunes the model on the
enlarged label set.</li>
<li><b>Train</b>: runs in a separate process; Slicer stays usable. The cases are exported in the background first
(Cancel works there too and leaves no files). Cancel keeps the last checkpoint. <i>GPUs</i>: 1, all, or a number of
training processes; more than one trains one model on several GPUs with PyTorch's torchrun (remembered on this
computer).</li>
<li><b>Segment</b>: pick a model and a volume; the result is a new segmentation, one segment per organ (its 3D
surfaces are built one organ at a time after it appears).</li>
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
    prefillSelectedOnly: bool = False
    keepWorkFiles: bool = False
    inputVolume: vtkMRMLScalarVolumeNode
    head: Annotated[str, Choice(list(HEADS))] = "auto"
    segmentDevice: Annotated[str, Choice(list(DEVICES))] = "auto"
    postprocess: bool = True


#
# Widget
#


class LTUDASegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Composes the five sections (LTUDASegmentationWidgets): each wires its own widgets to the
    logic. This class only loads the .ui, owns the life cycle and the parameter node, and asks every
    section to update its buttons."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None
        self.sections = []
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    # -- life cycle -----------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LTUDASegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LTUDASegmentationLogic()

        self.panel = Panel(self.ui, self.logic)
        self.panel.updateButtonStates = self.updateButtonStates
        self.setupSection = SetupSection(self.panel, MINIMUM_SLICER_VERSION, self.resourcePath("requirements.txt"))
        self.casesSection = CasesSection(self.panel)
        self.organsSection = OrgansSection(self.panel, onChanged=self.casesSection.refreshCases)
        self.segmentSection = SegmentSection(self.panel, self.setupSection)
        self.trainSection = TrainSection(self.panel, self.setupSection,
                                         onModelsChanged=self.segmentSection.refreshModels)
        self.annotationLoop = AnnotationLoop(self.panel, self.setupSection, self.casesSection)
        self.casesSection.onRefreshed = self.annotationLoop.refreshReviewList
        self.sections = [self.setupSection, self.organsSection, self.casesSection, self.annotationLoop,
                         self.trainSection, self.segmentSection]
        for section in self.sections:
            section.setup()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        slicer.app.connect("aboutToQuit()", self.onAboutToQuit)

        self.initializeParameterNode()
        self.organsSection.refreshOrgans()
        self.casesSection.refreshCases()
        self.segmentSection.refreshModels()

    def cleanup(self):
        self.removeObservers()
        for section in self.sections:
            section.cleanup()
        try:
            slicer.app.disconnect("aboutToQuit()", self.onAboutToQuit)
        except Exception:  # already disconnected
            pass
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onReload(self):
        """Reload the Lib and the sections packages too, so Reload picks up their changes."""
        import importlib
        import sys

        import LTUDASegmentationLib
        import LTUDASegmentationWidgets

        if self.logic is not None:
            self.logic.stopAll()
        for package in (LTUDASegmentationLib, LTUDASegmentationWidgets):
            for name in package.SUBMODULES:
                module = sys.modules.get(package.__name__ + "." + name)
                if module is not None:
                    importlib.reload(module)
            importlib.reload(package)
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self):
        self.panel.entered = True
        self.initializeParameterNode()
        self.casesSection.refreshCases()  # the clinician may come back from the Segment Editor
        self.segmentSection.refreshModels()

    def exit(self):
        self.panel.entered = False
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
        self.casesSection.refreshCases()

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
        self.panel.parameterNode = parameterNode
        if self._parameterNode:
            self.logic.restoreFromParameterNode()
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtonStates)
            self.organsSection.refreshOrgans()
            self.casesSection.refreshCases()
        self.updateButtonStates()

    def updateButtonStates(self, *args):
        if self.logic is None or len(self.sections) < 5:
            return
        for section in self.sections:
            section.updateButtonStates()


#
# Logic
#


class LTUDASegmentationLogic(ScriptedLoadableModuleLogic, LTUDALogicCore):
    """Console API, e.g.:

        logic = slicer.util.getModuleLogic("LTUDASegmentation")
        logic.addCase(volumeNode, segmentationNode)
        job = logic.train(preset="fast")           # returns at once; job.status, job.progress, job.cancel()
        job = logic.train(preset="paper", gpus="all")   # one process per GPU (torchrun)
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
        self.test_AnnotationLoop()
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

    def test_AnnotationLoop(self):
        """Proposals added next to the user's segments, the review order, Mark reviewed, and the export
        counting only reviewed proposals as labels (no backend needed: the proposal file is made here)."""
        import json

        from LTUDASegmentationLib import synthetic
        from LTUDASegmentationLib.organs import organClass
        from LTUDASegmentationLib.proposals import PROPOSED, STATUS_TAG
        from LTUDASegmentationLib.segments import addSegmentForOrgan, labelArrayOnVolume, setSegmentFromMask

        self.delayDisplay("Annotation loop: proposals, review list, Mark reviewed, export")
        tempDir = slicer.util.tempDirectory("LTUDASelfTest")
        os.makedirs(tempDir, exist_ok=True)

        def exportedFirstCase(folder):
            with open(logic.exportTrainingData(os.path.join(tempDir, folder)), encoding="utf-8") as f:
                return json.load(f)["cases"][0]
        logic = self._logic(tempDir)
        logic.setOrgans(["liver", "spleen"])
        volume, segmentation = synthetic.addSyntheticCase(slicer.mrmlScene, "loopA", ["liver", "spleen"], ["liver"],
                                                          seed=5)
        other = synthetic.addSyntheticCase(slicer.mrmlScene, "loopB", ["liver", "spleen"], ["spleen"], seed=6)
        logic.addCase(volume, segmentation)
        logic.addCase(*other)
        liverId = segmentation.GetSegmentation().GetNthSegmentID(0)
        liverBefore = labelArrayOnVolume(volume, segmentation, {liverId: 1}).tobytes()
        # a proposal file as `ltuda suggest` writes it: a tagged segment on the volume's grid
        spleenMask = synthetic.organMasks((12, 40, 40), ["liver", "spleen"], 5)["spleen"]
        proposal = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "proposal")
        segmentId = addSegmentForOrgan(proposal, organClass("spleen", 2))
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        setSegmentFromMask(proposal, segmentId, spleenMask, matrix)
        proposal.GetSegmentation().GetSegment(segmentId).SetTag(STATUS_TAG, PROPOSED)
        path = os.path.join(tempDir, "loopA.seg.nrrd")
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(path)
        self.assertTrue(storage.WriteData(proposal))
        slicer.mrmlScene.RemoveNode(proposal)

        added = logic.addProposals(0, path)
        self.assertEqual([organ for organ, _id in added], ["spleen"])
        self.assertEqual(labelArrayOnVolume(volume, segmentation, {liverId: 1}).tobytes(), liverBefore)
        self.assertEqual(logic.caseTable()[0]["organs"], {"liver": "labelled", "spleen": "proposed"})
        with open(os.path.join(tempDir, "suggestions.json"), "w") as f:
            json.dump({"schema": "ltuda-suggestions/1", "rows": [
                {"rank": 1, "case": "loopA", "organ": "spleen", "volume_ml": 1.0, "score": 0.5}]}, f)
        logic.loadSuggestions(tempDir)
        nextRow = logic.reviewNext()
        self.assertEqual((nextRow["caseName"], nextRow["organ"], nextRow["segmentId"]), ("loopA", "spleen", added[0][1]))
        entry = exportedFirstCase("before")
        self.assertEqual(entry["labeled"], ["liver"])  # an unreviewed proposal is not a label
        logic.markReviewed("loopA", "spleen")
        self.assertIsNone(logic.reviewNext())
        self.assertEqual(logic.caseTable()[0]["organs"], {"liver": "labelled", "spleen": "reviewed"})
        entry = exportedFirstCase("after")
        self.assertEqual(entry["labeled"], ["liver", "spleen"])
        self.delayDisplay("Annotation loop passed")

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
