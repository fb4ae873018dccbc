"""Everything the module does, without Qt: organs, cases, backend, training, models, prediction.

`LTUDALogicCore` is the base of the module's logic class (LTUDASegmentation.py adds Slicer's
ScriptedLoadableModuleLogic, QSettings, a QTimer that drives running jobs and GUI-friendly
waiting). It works on any MRML scene, so pytest drives it with slicer-core. Every user error is
raised as LTUDAError with the message the panel shows.
"""

import datetime
import os
import shutil

from . import jobs as jobsModule
from .backend import Backend
from .cases import Case, requireUsable, scanCase, scanSignature, summarize, uniqueCaseIds
from .errors import LTUDAError
from .export import TrainingExport, exportTrainingData
from .folders import findImageLabelPairs, parseValueMap
from .gpus import SETTINGS_KEY as GPUS_SETTINGS_KEY
from .gpus import parseGpus, planProcesses, torchrunEnvironment
from .models import HEADS, ModelInfo, ModelRegistry, readModel
from .organs import (OrganError, defaultOrgans, findOrgan, organClass, organsFromJson, organsToJson, renumber,
                     validateOrgans)
from .runner import ProcessRunner
from .settings import MemorySettings

PRESETS = ("fast", "paper")
DEVICES = ("auto", "cpu", "cuda")


def _timestamp():
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _uniqueFolder(parent, base):
    path, n = os.path.join(parent, base), 2
    while os.path.exists(path):
        path = os.path.join(parent, f"{base}-{n}")
        n += 1
    return path


class LTUDALogicCore:
    """Console API (also what the panel calls):

    logic.addCase(volumeNode, segmentationNode); logic.caseTable(); logic.labelSummary()
    job = logic.train(modelFolder, preset="fast"); job.status, job.progress, job.cancel(), job.wait()
    job = logic.train(modelFolder, preset="paper", gpus="all")  (1 | "all" | N training processes, torchrun)
    logic.models(); segNode = logic.predict(volumeNode, model).segmentationNode
    Annotation loop: job = logic.suggest(model); row = logic.reviewNext(); logic.markReviewed(case, organ);
    logic.train(initFrom=model) fine-tunes the model on the enlarged label set.
    """

    def __init__(self, scene=None, settings=None, startupEnvironment=None):
        self._scene = scene
        self.settings = settings if settings is not None else MemorySettings()
        self.startupEnvironment = startupEnvironment
        self.organs = defaultOrgans()
        self.cases = []
        self.registry = ModelRegistry(self.settings)
        self.trainingJob = None
        self.predictionJob = None
        self.suggestionJob = None
        self.suggestions = None  # the review list (suggestions.readSuggestions) of the last pre-fill
        self._suggestionCases = {}  # case id in that list -> Case
        self.lastProbe = None
        self._plotNodes = None
        self._scanCache = {}  # id(case) -> (scanSignature, CaseStatus)

    # ---------------------------------------------------------------------------------- scene
    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        return slicer.mrmlScene

    def _casesChanged(self):
        """Hook: the Slicer logic saves the case list in the parameter node."""

    def _organsChanged(self):
        """Hook: the Slicer logic saves the organ list in the parameter node."""

    def _schedule(self, job):
        """Hook: drive a started job (Slicer: a QTimer calling job.process())."""

    def _idle(self):
        """Hook: called while a blocking wait polls (Slicer: process GUI events)."""

    # --------------------------------------------------------------------------------- organs
    def setOrgans(self, organs):
        """Replace the organ list (dicts, or names of known organs); values become 1..C in order."""
        built = []
        for i, organ in enumerate(organs):
            if isinstance(organ, str):
                built.append(organClass(organ, i + 1))
            else:
                built.append(organClass(organ["name"], i + 1, organ.get("color"), organ.get("terminology", "auto")))
        problems = validateOrgans(built)
        if problems:
            raise LTUDAError(" ".join(problems))
        self.organs = renumber(built)
        self._organsChanged()
        return self.organs

    def resetOrgans(self):
        return self.setOrgans(defaultOrgans())

    def addOrgan(self, name, color=None, terminology="auto"):
        if findOrgan(self.organs, name) is not None:
            raise LTUDAError(f"The organ '{name}' is already in the list.")
        organs = self.organs + [organClass(name, len(self.organs) + 1, color, terminology)]
        return self.setOrgans(organs)

    def removeOrgan(self, name):
        organ = findOrgan(self.organs, name)
        if organ is None:
            raise LTUDAError(f"There is no organ '{name}'.")
        return self.setOrgans([o for o in self.organs if o is not organ])

    def updateOrgan(self, name, newName=None, color=None, terminology="keep"):
        organ = findOrgan(self.organs, name)
        if organ is None:
            raise LTUDAError(f"There is no organ '{name}'.")
        organs = []
        for o in self.organs:
            if o is organ:
                term = o.get("terminology") if terminology == "keep" else terminology
                renamed = newName if newName is not None else o["name"]
                if terminology == "keep" and newName is not None and newName != o["name"]:
                    term = "auto"  # a renamed organ takes the code of its new name (None if unknown)
                o = organClass(renamed, o["value"], color if color is not None else o["color"], term)
            organs.append(o)
        return self.setOrgans(organs)

    def organsJson(self):
        return organsToJson(self.organs)

    def setOrgansFromJson(self, text):
        try:
            return self.setOrgans(organsFromJson(text))
        except OrganError as exc:
            raise LTUDAError(str(exc)) from None

    # ---------------------------------------------------------------------------------- cases
    def addCase(self, volumeNode, segmentationNode=None):
        """Add a training case from scene nodes (returns the Case). Raises LTUDAError for a missing
        volume or segmentation, or a segmentation that does not fit the volume's grid."""
        if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA(
                "vtkMRMLLabelMapVolumeNode"):
            raise LTUDAError("Choose a CT volume (a scalar volume, not a label map) for the training case.")
        if volumeNode.GetImageData() is None:
            raise LTUDAError(f"The volume '{volumeNode.GetName()}' has no image data.")
        if segmentationNode is None:
            raise LTUDAError(
                f"The volume '{volumeNode.GetName()}' has no segmentation: choose the segmentation that labels it. "
                "To start one from scratch, create a segmentation in the Segment Editor (or pick 'Create new "
                "Segmentation' in the segmentation selector) and add the case again.")
        if not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise LTUDAError("The case's labels must be a segmentation node.")
        case = Case(volumeNode, segmentationNode)
        for existing in self.cases:
            if existing.sameAs(case):
                return existing
        from .segments import geometryProblem

        problem = geometryProblem(volumeNode, segmentationNode)
        if problem:
            raise LTUDAError(problem)
        self.cases.append(case)
        self._casesChanged()
        return case

    def addCasesFromNodes(self, pairs):
        return [self.addCase(volume, segmentation) for volume, segmentation in pairs]

    def addFileCase(self, imagePath, labelPath, valueMap, name=None):
        if isinstance(valueMap, str):
            valueMap = parseValueMap(valueMap, self.organs)
        for path in (imagePath, labelPath):
            if not os.path.isfile(str(path)):
                raise LTUDAError(f"The file {path} does not exist.")
        case = Case(imagePath=imagePath, labelPath=labelPath, valueMap=valueMap, name=name)
        for existing in self.cases:
            if existing.sameAs(case):
                existing.valueMap = dict(valueMap)
                self._casesChanged()
                return existing
        self.cases.append(case)
        self._casesChanged()
        return case

    def importCaseFolder(self, folder, valueMap):
        """Add every image/label pair of a dataset folder (MSD, LiTS, KiTS, images/+labels/ ...) with
        one label value -> organ map, e.g. "1=liver, 2=liver" for LiTS. Returns the added cases."""
        if isinstance(valueMap, str):
            valueMap = parseValueMap(valueMap, self.organs)
        pairs = findImageLabelPairs(folder)
        return [self.addFileCase(image, label, valueMap, name=name) for name, image, label in pairs]

    def _caseIndex(self, case):
        if isinstance(case, int):
            if not 0 <= case < len(self.cases):
                raise LTUDAError(f"There is no case #{case + 1}.")
            return case
        for i, existing in enumerate(self.cases):
            if existing is case:
                return i
        raise LTUDAError("That case is not in the list.")

    def removeCase(self, case):
        del self.cases[self._caseIndex(case)]
        self._casesChanged()

    def clearCases(self):
        self.cases = []
        self._casesChanged()

    def pruneCases(self):
        """Drop cases whose nodes were removed from the scene; True when some were."""
        alive = [c for c in self.cases if c.isAlive()]
        if len(alive) != len(self.cases):
            self.cases = alive
            self._casesChanged()
            return True
        return False

    def caseStatuses(self):
        """CaseStatus of every case; a scene case is scanned again only when one of its nodes, segments,
        transforms or the organ list changed since the last scan (the panel asks on every update)."""
        self.pruneCases()
        statuses, cache = [], {}
        for case in self.cases:
            signature = scanSignature(case, self.organs)
            cached = self._scanCache.get(id(case))
            if signature is not None and cached is not None and cached[0] == signature and cached[1].case is case:
                status = cached[1]
            else:
                status = scanCase(case, self.organs)
            cache[id(case)] = (signature, status)
            statuses.append(status)
        self._scanCache = cache
        return statuses

    def caseTable(self):
        """One row per case: {"name", "volume", "segmentation", "organs": {organ: 'labelled'|'reviewed'|
        'proposed'|'empty'|'missing'}, "unmatched": [segment names], "problems": [sentences], "kind":
        'scene'|'files'}. 'reviewed' (a checked model proposal) is a label; 'proposed' is not."""
        rows = []
        for status in self.caseStatuses():
            case = status.case
            rows.append({"name": case.name, "volume": case.volumeText, "segmentation": case.segmentationText,
                         "organs": dict(status.organStatus), "unmatched": list(status.unmatched),
                         "problems": list(status.problems), "kind": "scene" if case.isScene else "files"})
        return rows

    def labelSummary(self):
        """{"counts": {organ: labelled cases}, "warnings": [...], "errors": [...]} (errors block training)."""
        return summarize(self.caseStatuses(), self.organs)

    def addMissingSegments(self, case):
        """Add an empty, named, coloured, coded segment for each organ the case does not have yet
        (this edits the case's segmentation, on the user's request); returns the new segment ids."""
        case = self.cases[self._caseIndex(case)]
        if not case.isScene:
            case = self.loadFileCase(case)
        from .segments import addSegmentForOrgan

        status = scanCase(case, self.organs, checkGeometry=False)
        added = []
        for organ in self.organs:
            if status.organStatus.get(organ["name"]) == "missing":
                added.append(addSegmentForOrgan(case.segmentationNode, organ))
        self._casesChanged()
        return added

    def loadFileCase(self, case):
        """Load a file case into the scene (volume + segmentation with one segment per mapped organ)
        and replace it in the list by the scene case; returns the new Case."""
        index = self._caseIndex(case)
        case = self.cases[index]
        if case.isScene:
            return case
        from .segments import loadFileCaseNodes

        volume, segmentation = loadFileCaseNodes(self.scene, case, self.organs)
        newCase = Case(volume, segmentation)
        self.cases[index] = newCase
        self._casesChanged()
        return newCase

    # -------------------------------------------------------------------------------- backend
    def backendPython(self):
        """The external interpreter chosen in Setup, or None for Slicer's own Python."""
        return self.settings.value("BackendPython", "") or None

    def setBackendPython(self, path=None):
        if path:
            path = os.path.abspath(str(path))
            if not os.path.isfile(path):
                raise LTUDAError(f"{path} is not a file: choose the python executable of the environment "
                                 "(e.g. .../envs/NAME/bin/python or ...\\envs\\NAME\\python.exe).")
        self.settings.setValue("BackendPython", path or "")
        self.lastProbe = None

    def backend(self):
        return Backend(self.backendPython(), startupEnvironment=self.startupEnvironment)

    def probeBackend(self):
        """Check the backend interpreter (packages with versions, GPU); returns a ProbeResult."""
        self.lastProbe = self.backend().probe()
        return self.lastProbe

    def currentProbe(self):
        """The last probe of the chosen backend Python, probing it when there is none."""
        probe = self.lastProbe
        if probe is None or probe.backend is None or probe.backend.python != self.backendPython():
            probe = self.probeBackend()
        return probe

    def requireBackendReady(self, device="auto"):
        probe = self.currentProbe()
        if not probe.ready():
            raise LTUDAError(probe.missingMessage())
        if device == "cuda" and not probe.gpu:
            raise LTUDAError(f"No CUDA GPU is visible to {probe.backend.describe()}: choose the device 'auto' or "
                             "'cpu', or pick a Python with a CUDA build of torch in the Setup section.")
        return probe

    # -------------------------------------------------------------------------------- folders
    def dataFolder(self):
        return self.settings.value("DataFolder", "") or os.path.join(os.path.expanduser("~"), "LTUDA")

    def workFolder(self):
        return self.settings.value("WorkFolder", "") or os.path.join(self.dataFolder(), "work")

    def setWorkFolder(self, path):
        self.settings.setValue("WorkFolder", os.path.abspath(str(path)) if path else "")

    def modelsFolder(self):
        return self.settings.value("ModelsFolder", "") or os.path.join(self.dataFolder(), "models")

    def defaultModelFolder(self):
        return _uniqueFolder(self.modelsFolder(), f"model-{_timestamp()}")

    def newRunFolder(self, kind):
        path = _uniqueFolder(self.workFolder(), f"{kind}-{_timestamp()}")
        os.makedirs(path)
        return path

    # ------------------------------------------------------------------------------- training
    def trainGpus(self):
        """The GPUs choice the panel remembers (1, "all" or N; 1 when unset or unreadable)."""
        try:
            return parseGpus(self.settings.value(GPUS_SETTINGS_KEY, "1") or "1")
        except LTUDAError:
            return 1

    def setTrainGpus(self, gpus):
        """Remember the GPUs choice (a per-machine preference, like the backend Python)."""
        self.settings.setValue(GPUS_SETTINGS_KEY, str(parseGpus(gpus)))

    def planTrainingProcesses(self, gpus=1, device="auto"):
        """(processes, note) a training with this GPUs choice would start (see gpus.planProcesses); probes
        the backend for "all" and for N on a device that may be a GPU."""
        choice = parseGpus(gpus)
        if device not in DEVICES:
            raise LTUDAError(f"Unknown device '{device}': choose one of {', '.join(DEVICES)}.")
        probe = None if choice == 1 or device == "cpu" else self.currentProbe()
        return planProcesses(choice, device, probe)

    def checkCanTrain(self, ignoreUnmatched=False):
        """Problems that block training (empty list: ready as far as the cases go)."""
        try:
            requireUsable(self.caseStatuses(), self.organs, ignoreUnmatched=ignoreUnmatched)
        except LTUDAError as exc:
            return [line[2:] for line in str(exc).splitlines()[1:]] or [str(exc)]
        problems = validateOrgans(self.organs)
        return problems

    def exportTrainingData(self, folder=None, ignoreUnmatched=False):
        """Write the cases and dataset.json to `folder` (default: a new run folder); returns the manifest path."""
        folder = folder or self.newRunFolder("train")
        path, _outside = exportTrainingData(self.cases, self.organs, folder, ignoreUnmatched=ignoreUnmatched)
        return path

    def train(self, modelFolder=None, preset="fast", epochsStage1=None, epochsStage2=None, device="auto",
              waitForCompletion=False, ignoreUnmatched=False, resume=False, overwrite=False, keepWorkFiles=False,
              extraArgs=None, checkBackend=True, onUpdate=None, onLog=None, onFinished=None, initFrom=None, gpus=1):
        """Export the cases and start `ltuda train` in a subprocess; returns a TrainingJob (status,
        progress, cancel(), wait()). With waitForCompletion, blocks and raises LTUDAError on failure.
        gpus: 1 (one process), "all" (one process per CUDA GPU the backend sees) or N: more than one
        runs the trainer under torchrun (job.processes; job.processesNote says why when it differs).
        initFrom (a model folder or ModelInfo): "Continue training", i.e. fine-tune that model on the
        current labels (`--init-from`, a shorter schedule by default) into a NEW model folder; the
        new model.json records its parent and the labels added (lineage)."""
        if self.trainingJob is not None and not self.trainingJob.finished:
            raise LTUDAError("A training is already running: wait for it or cancel it first.")
        if preset not in PRESETS:
            raise LTUDAError(f"Unknown preset '{preset}': choose one of {', '.join(PRESETS)}.")
        if device not in DEVICES:
            raise LTUDAError(f"Unknown device '{device}': choose one of {', '.join(DEVICES)}.")
        parseGpus(gpus)  # a bad value is refused before anything else is checked
        modelFolder = os.path.abspath(str(modelFolder or self.defaultModelFolder()))
        parent = None
        if initFrom is not None:
            parent = initFrom if isinstance(initFrom, ModelInfo) else readModel(initFrom)
            if os.path.normcase(parent.path) == os.path.normcase(modelFolder):
                raise LTUDAError(f"Continue training writes a new model: choose another model folder than the parent "
                                 f"{parent.path} (the parent stays as it is).")
        hasModel = os.path.exists(os.path.join(modelFolder, "model.json")) or os.path.isdir(
            os.path.join(modelFolder, "checkpoints"))
        if resume and not os.path.isfile(os.path.join(modelFolder, "checkpoints", "last.pt")):
            raise LTUDAError(f"{modelFolder} has no checkpoint to resume from: start a new training instead.")
        if hasModel and not (overwrite or resume):
            raise LTUDAError(f"The model folder {modelFolder} already holds a model. Choose another folder, resume "
                             "that training, or allow overwriting it.")
        backend = self.backend()
        if checkBackend:
            self.requireBackendReady(device)
        processes, processesNote = self.planTrainingProcesses(gpus, device)
        runFolder = self.newRunFolder("train")
        # Checked now (an error is raised here); the cases are then read one per job.process() call
        # on this thread and written by a worker thread, so the GUI stays responsive during the export.
        statuses = self.caseStatuses()  # cached scans (the panel's button check made them already)
        export = TrainingExport(self.cases, self.organs, runFolder, ignoreUnmatched=ignoreUnmatched,
                                statuses=statuses)
        try:
            export.begin()
        except Exception:
            export.cancel()
            shutil.rmtree(runFolder, ignore_errors=True)
            raise

        def makeRunner(exported):
            manifest, outside = exported
            args = ["train", "--dataset", manifest, "--out", modelFolder, "--preset", preset, "--device", device,
                    "--progress", "jsonl"]
            if epochsStage1:
                args += ["--epochs-stage1", int(epochsStage1)]
            if epochsStage2:
                args += ["--epochs-stage2", int(epochsStage2)]
            if outside:
                args.append("--allow-outside-paths")
            if parent is not None:
                args += ["--init-from", parent.path]
            if resume:
                args.append("--resume")
            elif overwrite and hasModel:
                args.append("--overwrite")
            args += [str(a) for a in (extraArgs or [])]
            if processes > 1:  # rank 0 speaks on stdout; Cancel's STOP file is agreed on by every rank
                command = backend.torchrunCommand(processes, *args)
                env = torchrunEnvironment(backend.environment(), processes)
            else:
                command, env = backend.command(*args), backend.environment()
            return ProcessRunner(command, env=env, cwd=runFolder, logPath=os.path.join(runFolder, "ltuda-train.log"))

        def onSuccess(job):
            self.registry.add(job.modelDir)
            if not keepWorkFiles:
                shutil.rmtree(runFolder, ignore_errors=True)

        def finished(job):
            if job.status == jobsModule.CANCELLED and os.path.isfile(os.path.join(job.modelDir, "model.json")):
                try:
                    self.registry.add(job.modelDir)
                except LTUDAError:
                    pass
            if onFinished is not None:
                onFinished(job)

        job = jobsModule.TrainingJob(None, modelFolder, workDir=runFolder, onUpdate=onUpdate, onLog=onLog,
                                     onFinished=finished, onSuccess=onSuccess, preparation=export,
                                     makeRunner=makeRunner, processes=processes, processesNote=processesNote)
        self.trainingJob = job
        job.start()
        self._schedule(job)
        if waitForCompletion:
            job.wait(idle=self._idle)
        return job

    def cancelTraining(self):
        if self.trainingJob is not None:
            self.trainingJob.cancel()

    # --------------------------------------------------------------------------------- models
    def models(self):
        """ModelInfo of the remembered model folders (most recent first)."""
        return self.registry.models()

    def addModel(self, path):
        """Check a model folder (raises LTUDAError for one from another version) and remember it."""
        return self.registry.add(path)

    def resolveModel(self, model=None):
        if isinstance(model, ModelInfo):
            return model
        if model is None:
            models = self.models()
            if not models:
                raise LTUDAError("No trained model yet: train one, or add a model folder in the Segment section.")
            return models[0]
        return readModel(model)

    # ----------------------------------------------------------------------------- prediction
    def predict(self, volumeNode, model=None, head="auto", postprocess=True, device="auto", waitForCompletion=True,
                keepLabelMap=False, keepWorkFiles=False, name=None, checkBackend=True, onUpdate=None, onLog=None,
                onFinished=None, show3D=True):
        """Segment a volume with a trained model in a subprocess; the result is a NEW segmentation
        node ("<volume> segmentation") in job.segmentationNode. Returns a PredictionJob; blocking by
        default (raises LTUDAError on failure)."""
        if self.predictionJob is not None and not self.predictionJob.finished:
            raise LTUDAError("A segmentation is already running: wait for it or cancel it first.")
        if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA(
                "vtkMRMLLabelMapVolumeNode"):
            raise LTUDAError("Choose the CT volume to segment (a scalar volume, not a label map).")
        if volumeNode.GetImageData() is None:
            raise LTUDAError(f"The volume '{volumeNode.GetName()}' has no image data.")
        if head not in HEADS:
            raise LTUDAError(f"Unknown head '{head}': choose one of {', '.join(HEADS)}.")
        if device not in DEVICES:
            raise LTUDAError(f"Unknown device '{device}': choose one of {', '.join(DEVICES)}.")
        info = self.resolveModel(model)
        backend = self.backend()
        if checkBackend:
            self.requireBackendReady(device)
        runFolder = self.newRunFolder("predict")
        from .export import checkFreeSpace, estimateExportBytes
        from .segments import writeVolumeFile

        try:
            checkFreeSpace(runFolder, estimateExportBytes([Case(volumeNode, None)]))
            inputPath = os.path.join(runFolder, "input.nrrd")
            writeVolumeFile(volumeNode, inputPath, compress=False)
        except Exception:
            shutil.rmtree(runFolder, ignore_errors=True)
            raise
        outputPath = os.path.join(runFolder, "output.seg.nrrd")
        labelMapPath = os.path.join(runFolder, "labels.nrrd") if keepLabelMap else None
        args = ["predict", "--model", info.path, "--input", inputPath, "--output", outputPath, "--head", head,
                "--device", device, "--progress", "jsonl"]
        if not postprocess:
            args.append("--no-postprocess")
        if labelMapPath:
            args += ["--label-map", labelMapPath]
        runner = ProcessRunner(backend.command(*args), env=backend.environment(), cwd=runFolder,
                               logPath=os.path.join(runFolder, "ltuda-predict.log"))

        def onSuccess(job):
            from .results import importPrediction

            if not os.path.isfile(outputPath):
                raise LTUDAError(f"The backend finished but wrote no result ({outputPath}).")
            job.segmentationNode = importPrediction(self.scene, outputPath, volumeNode, name=name, show3D=False)
            if not (keepWorkFiles or keepLabelMap):
                shutil.rmtree(runFolder, ignore_errors=True)
            if show3D:  # the 3D surfaces one organ per job.process() call, not all in one block
                from .results import ClosedSurfaceSteps

                return ClosedSurfaceSteps(job.segmentationNode)
            return None

        job = jobsModule.PredictionJob(runner, volumeNode, outputPath, labelMapPath, onUpdate=onUpdate, onLog=onLog,
                                       onFinished=onFinished, onSuccess=onSuccess)
        job.model = info
        job.workDir = runFolder
        self.predictionJob = job
        job.start()
        self._schedule(job)
        if waitForCompletion:
            job.wait(idle=self._idle)
        return job

    def cancelPrediction(self):
        if self.predictionJob is not None:
            self.predictionJob.cancel()

    # ------------------------------------------------------------------------- annotation loop
    def suggest(self, model=None, cases=None, device="auto", waitForCompletion=False, keepWorkFiles=False,
                extraArgs=None, checkBackend=True, onUpdate=None, onLog=None, onFinished=None):
        """Pre-fill missing organs: export the cases, run `ltuda suggest` in a subprocess, then add each
        case's proposals as NEW segments "<organ> (proposed)" (tag LTUDA.status=proposed) to its
        segmentation; existing segments are never modified. cases: None (all) or a list of cases,
        indexes or names. Returns a SuggestionJob (status, progress, cancel(), wait(), added, skipped);
        afterwards logic.reviewRows() / reviewNext() walk the ranked review list."""
        from .annotation import SuggestPreparation, casesToExport

        if self.suggestionJob is not None and not self.suggestionJob.finished:
            raise LTUDAError("A pre-fill is already running: wait for it or cancel it first.")
        if device not in DEVICES:
            raise LTUDAError(f"Unknown device '{device}': choose one of {', '.join(DEVICES)}.")
        chosen = self._resolveCases(cases)
        info = self.resolveModel(model)
        backend = self.backend()
        if checkBackend:
            self.requireBackendReady(device)
        statuses = self.caseStatuses()
        problems = [f"Case '{st.case.name}': {p}" for st in statuses if any(st.case is c for c in chosen)
                    for p in st.problems]
        if problems:
            raise LTUDAError("Pre-fill cannot start:\n- " + "\n- ".join(problems))
        exportCases, organNames = casesToExport(chosen, self.cases, statuses, self.organs)
        if not organNames:
            raise LTUDAError("Pre-fill needs at least one training case that labels an organ (the backend checks the "
                             "cases as for training). Label one organ in one case, then pre-fill the others.")
        runFolder = self.newRunFolder("suggest")
        outFolder = os.path.join(runFolder, "proposals")
        preparation = SuggestPreparation(self, chosen, exportCases, organNames, runFolder)
        holder = {}

        def makeRunner(result):
            manifest, casesById, chosenIds = result
            holder.update(casesById=casesById, chosenIds=chosenIds)
            args = ["suggest", "--model", info.path, "--dataset", manifest, "--out", outFolder, "--cases",
                    ",".join(chosenIds), "--device", device, "--progress", "jsonl"]
            args += [str(a) for a in (extraArgs or [])]
            return ProcessRunner(backend.command(*args), env=backend.environment(), cwd=runFolder,
                                 logPath=os.path.join(runFolder, "ltuda-suggest.log"))

        def onSuccess(job):
            from .annotation import ProposalImport, proposalFiles
            from .suggestions import readSuggestions

            job.suggestions = readSuggestions(outFolder)
            self.suggestions, self._suggestionCases = job.suggestions, dict(holder["casesById"])
            job.proposalImport = ProposalImport(holder["casesById"], proposalFiles(outFolder, holder["chosenIds"]),
                                                self.organs)
            return job.proposalImport

        def finished(job):
            if not keepWorkFiles:  # the exported images are no longer needed; the proposals stay for the console
                for sub in ("images", "labels"):
                    shutil.rmtree(os.path.join(runFolder, sub), ignore_errors=True)
            if job.added:
                self._casesChanged()
            if onFinished is not None:
                onFinished(job)

        job = jobsModule.SuggestionJob(None, outFolder, workDir=runFolder, onUpdate=onUpdate, onLog=onLog,
                                       onFinished=finished, onSuccess=onSuccess, preparation=preparation,
                                       makeRunner=makeRunner)
        job.model = info
        self.suggestionJob = job
        job.start()
        self._schedule(job)
        if waitForCompletion:
            job.wait(idle=self._idle)
        return job

    def cancelSuggestion(self):
        if self.suggestionJob is not None:
            self.suggestionJob.cancel()

    def addProposals(self, case, segPath):
        """Add the segments of a proposal .seg.nrrd (on the case volume's grid, as `ltuda suggest` writes
        them) to the case's segmentation as NEW "<organ> (proposed)" segments, skipping organs the case
        already labels or has a proposal for; returns [(organ, segment id)] of what was added."""
        from .annotation import ProposalImport

        target = self._resolveCase(case)
        if not target.isScene:
            target = self.loadFileCase(target)
        if not os.path.isfile(str(segPath)):
            raise LTUDAError(f"The proposal file {segPath} does not exist.")
        steps = ProposalImport({"case": target}, [("case", str(segPath))], self.organs)
        while not steps.step():
            pass
        if steps.added:
            self._casesChanged()
        return [(organ, segmentId) for _name, organ, segmentId in steps.added]

    def loadSuggestions(self, pathOrFolder):
        """Use a suggestions.json written by `ltuda suggest` (or its folder) as the review list; its case
        ids are matched to the training cases (ids as the export makes them, else names)."""
        from .suggestions import readSuggestions

        self.suggestions, self._suggestionCases = readSuggestions(pathOrFolder), {}
        return self.suggestions

    def reviewRows(self):
        """The review list in rank order: the rows of suggestions.json with "caseName", "caseIndex",
        "segmentId" and "status" (proposed | reviewed | labelled | missing) added. [] without a list."""
        from .annotation import reviewRows

        if not self.suggestions:
            return []
        rows = reviewRows(self.suggestions, self._suggestionCases, self.organs, self._findCaseById)
        for row in rows:
            case = row.pop("caseObject")
            row["caseIndex"] = next((i for i, c in enumerate(self.cases) if c is case), None)
        return rows

    def reviewNext(self):
        """The best-ranked row whose proposal is still unreviewed (a dict as in reviewRows), or None."""
        return next((row for row in self.reviewRows() if row["status"] == "proposed"), None)

    def markReviewed(self, case, organ):
        """Turn the proposal for `organ` in `case` (a Case, index, name or review-list id) into a label:
        tag LTUDA.status=reviewed and the name without " (proposed)"; returns the segment ids."""
        from .organs import findOrgan
        from .proposals import PROPOSED, markSegmentReviewed, segmentsOfOrgan

        target = self._resolveCase(case)
        organClass = findOrgan(self.organs, organ)
        if organClass is None:
            raise LTUDAError(f"There is no organ '{organ}' in the list.")
        ids = segmentsOfOrgan(target.segmentationNode, organClass, self.organs, PROPOSED) if target.isScene else []
        if not ids:
            raise LTUDAError(f"Case '{target.name}' has no unreviewed proposal for '{organClass['name']}' (already "
                             "reviewed, deleted, or never proposed).")
        for segmentId in ids:
            markSegmentReviewed(target.segmentationNode, segmentId)
        return ids

    def _findCaseById(self, caseId):
        """The case a review-list id stands for: the export's id of the case, else its name."""
        for case, candidate in zip(self.cases, uniqueCaseIds(self.cases)):
            if candidate == caseId:
                return case
        return next((c for c in self.cases if c.name == caseId), None)

    def _resolveCase(self, case):
        if isinstance(case, str):
            found = self._suggestionCases.get(case)
            if found is None or not any(found is c for c in self.cases):
                found = next((c for c in self.cases if c.name == case), None) or self._findCaseById(case)
            if found is None:
                raise LTUDAError(f"There is no training case '{case}'.")
            return found
        return self.cases[self._caseIndex(case)]

    def _resolveCases(self, cases):
        self.pruneCases()
        if cases is None:
            chosen = list(self.cases)
        else:
            chosen = []
            for case in cases:
                found = self._resolveCase(case)
                if not any(found is c for c in chosen):
                    chosen.append(found)
        if not chosen:
            raise LTUDAError("No training cases: add a volume with its segmentation, or import a folder.")
        return chosen

    # ------------------------------------------------------------------------------- plotting
    def updateTrainingPlot(self, progress):
        """Loss and validation Dice per epoch as table + plot nodes (created once); returns the chart node."""
        import vtk

        scene = self.scene
        if self._plotNodes is None or any(n.GetScene() is None for n in self._plotNodes):
            lossTable = scene.AddNewNodeByClass("vtkMRMLTableNode", "LTUDA training loss")
            diceTable = scene.AddNewNodeByClass("vtkMRMLTableNode", "LTUDA validation Dice")
            lossSeries = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", "Training loss")
            diceSeries = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", "Validation mean Dice")
            chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "LTUDA training")
            for series, table, column, color in ((lossSeries, lossTable, "loss", (0.85, 0.35, 0.2)),
                                                 (diceSeries, diceTable, "dice", (0.2, 0.45, 0.85))):
                series.SetAndObserveTableNodeID(table.GetID())
                series.SetXColumnName("epoch")
                series.SetYColumnName(column)
                series.SetPlotType(series.PlotTypeScatter)
                series.SetMarkerStyle(series.MarkerStyleCircle)
                series.SetColor(*color)
                chart.AddAndObservePlotSeriesNodeID(series.GetID())
            chart.SetTitle("LTUDA training")
            chart.SetXAxisTitle("epoch (all stages)")
            chart.SetYAxisTitle("loss / mean Dice")
            self._plotNodes = [lossTable, diceTable, lossSeries, diceSeries, chart]
        lossTable, diceTable = self._plotNodes[0], self._plotNodes[1]
        for table, column, points in ((lossTable, "loss", progress.lossHistory),
                                      (diceTable, "dice", progress.diceHistory)):
            vtable = table.GetTable()
            xs, ys = vtk.vtkFloatArray(), vtk.vtkFloatArray()
            xs.SetName("epoch")
            ys.SetName(column)
            for x, y in points:
                xs.InsertNextValue(float(x))
                ys.InsertNextValue(float(y))
            while vtable.GetNumberOfColumns():
                vtable.RemoveColumn(0)
            vtable.AddColumn(xs)
            vtable.AddColumn(ys)
            table.Modified()
        return self._plotNodes[4]

    # ------------------------------------------------------------------------------- shutdown
    def stopAll(self):
        """Kill running backend processes (scene close, application exit)."""
        for job in (self.trainingJob, self.predictionJob, self.suggestionJob):
            if job is not None and not job.finished:
                job.kill()
                job.wait(timeout=15, raiseOnError=False)
