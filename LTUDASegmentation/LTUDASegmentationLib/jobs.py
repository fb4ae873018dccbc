"""A running backend command as a handle: status, progress, log, cancel, optional blocking wait.

States follow MONAIAuto3DSeg's idea: (exporting) -> starting -> running -> (importing) -> completed,
or cancelling -> cancelled, or failed. Exporting and importing run in steps inside process(), so
the owner's thread is never blocked for the whole export or import (see export.TrainingExport and
results.ClosedSurfaceSteps). `process()` must be called regularly on the owner's thread
(Slicer: a 100 ms QTimer; scripts and tests: `wait()`); callbacks run inside it, so they may touch
MRML and Qt.
"""

import collections
import os
import time

from .errors import LTUDAError
from .progress import ProgressState
from .runner import EXIT, STDERR, STDOUT

EXPORTING = "exporting"
STARTING = "starting"
RUNNING = "running"
CANCELLING = "cancelling"
IMPORTING = "importing"
COMPLETED = "completed"
CANCELLED = "cancelled"
FAILED = "failed"
FINAL_STATES = (COMPLETED, CANCELLED, FAILED)
EXIT_STOPPED = 130


class BackendJob:
    """One backend command. Callbacks (all optional, called on the owner's thread):
    onUpdate(job) after new progress, onLog(job, line) per log line, onFinished(job) once at the end,
    onSuccess(job) when the command succeeded (may raise LTUDAError: then the job fails)."""

    kind = "job"
    cancelGrace = 0.0

    def __init__(self, runner, title="", onUpdate=None, onLog=None, onFinished=None, onSuccess=None,
                 preparation=None, makeRunner=None):
        """preparation: work in steps before the command (step() -> True when done, cancel(), fraction(),
        statusText(), result); makeRunner(preparation.result) then gives the runner. onSuccess may
        return such a stepper too (e.g. building 3D surfaces): the job completes after its last step."""
        self.runner = runner
        self.preparation = preparation
        self.makeRunner = makeRunner
        self._finishing = None
        self.title = title or self.kind
        self.progress = ProgressState()
        self.status = STARTING
        self.message = ""
        self.details = ""
        self.returncode = None
        self.logLines = collections.deque(maxlen=400)
        self.onUpdate = onUpdate
        self.onLog = onLog
        self.onFinished = onFinished
        self.onSuccess = onSuccess
        self.startTime = None
        self.endTime = None
        self._processing = False
        self._cancelRequested = False

    # -- state ------------------------------------------------------------------------------
    @property
    def logPath(self):
        return self.runner.logPath if self.runner is not None else None

    @property
    def finished(self):
        return self.status in FINAL_STATES

    @property
    def succeeded(self):
        return self.status == COMPLETED

    def elapsedSeconds(self):
        if self.startTime is None:
            return 0.0
        return (self.endTime or time.time()) - self.startTime

    def fraction(self):
        if self.status == EXPORTING:
            return self.preparation.fraction()
        if self.status == IMPORTING and self._finishing is not None:
            return self._finishing.fraction()
        return self.progress.fraction()

    def statusText(self):
        if self.status == EXPORTING:
            return self.preparation.statusText()
        if self.status == IMPORTING and self._finishing is not None:
            return self._finishing.statusText()
        if self.status == STARTING:
            return "Starting..."
        if self.status == CANCELLING:
            return "Cancelling (waiting for the backend to save its state)..."
        if self.status == IMPORTING:
            return "Importing results..."
        if self.finished:
            return self.message
        return self.progress.statusText()

    # -- running ----------------------------------------------------------------------------
    def start(self):
        self.startTime = time.time()
        if self.preparation is not None:
            self.status = EXPORTING
            self._notify()
            return self
        return self._startRunner()

    def _startRunner(self):
        self.status = STARTING
        try:
            self.runner.start()
        except OSError as exc:
            self._fail(f"Could not start the backend: {exc}. Check the Python chosen in the Setup section.")
            return self
        self.status = RUNNING
        self._notify()
        return self

    def process(self):
        """Handle everything the child printed since the last call; True when something changed."""
        if self._processing or self.finished or self.status == STARTING:
            return False
        if self.status == EXPORTING:
            return self._prepareStep()
        if self._finishing is not None:
            return self._finishStep()
        self._escalateStop()
        self._processing = True
        changed = False
        try:
            for kind, value in self.runner.poll():
                changed = True
                if kind == STDOUT:
                    if self.progress.feed(value) is None and value.strip():
                        self._log(value)
                elif kind == STDERR:
                    self._log(value)
                elif kind == EXIT:
                    self._exited(value)
            if changed and not self.finished:
                self._notify()
        finally:
            self._processing = False
        return changed

    def wait(self, timeout=None, idle=None, raiseOnError=True, interval=0.05):
        """Block until the job ends (or `timeout` s): returns the status. With raiseOnError a failed
        job raises LTUDAError carrying the same message the panel shows."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            self.process()
            if self.finished:
                break
            if deadline is not None and time.monotonic() >= deadline:
                return self.status
            if self.status == EXPORTING and getattr(self.preparation, "lastStepTookCase", False):
                continue  # the next case can be read at once
            if self._finishing is not None:
                continue
            if idle is not None:
                idle()
            time.sleep(interval)
        if raiseOnError and self.status == FAILED:
            raise LTUDAError(self.message, self.details)
        return self.status

    def cancel(self):
        """Stop the run: training gets a grace period to save its checkpoint, then the tree is killed."""
        if self.finished or self._cancelRequested or self._finishing is not None:
            return  # (the result is already in the scene while its 3D surfaces are built)
        self._cancelRequested = True
        if self.status == EXPORTING:
            self._cancelPreparation()
            return
        if self.status == STARTING:
            self._end(CANCELLED, "Cancelled.")
            return
        self.status = CANCELLING
        self._askToStop()
        self._notify()

    def kill(self):
        """Stop at once (scene close, application exit)."""
        if self.finished:
            return
        self._cancelRequested = True
        if self.status == EXPORTING:
            self._cancelPreparation()
            return
        if self._finishing is not None:
            self._finishing = None
            self._end(CANCELLED, self._cancelledMessage())
            return
        self.runner.stop(grace=0)

    def _askToStop(self):
        """Cancel's request to the running command (training: a stop file first, then a signal)."""
        self.runner.stop(grace=self.cancelGrace)

    def _escalateStop(self):
        """Hook called by process(): turn a polite stop request into a signal when it is due."""

    # -- steps before and after the command ---------------------------------------------------------
    def _prepareStep(self):
        try:
            done = self.preparation.step()
            if done:
                self.runner = self.makeRunner(self.preparation.result)
        except LTUDAError as exc:
            self._preparationFailed(str(exc), getattr(exc, "details", ""))
            return True
        except Exception as exc:  # a bug or an unexpected OS error: still one readable message
            self._preparationFailed(f"{self.title} could not export the cases: {type(exc).__name__}: {exc}")
            return True
        if done:
            self._startRunner()
        else:
            self._notify()
        return True

    def _preparationFailed(self, message, details=""):
        try:
            self.preparation.cancel()
        finally:
            self._preparationEnded()
        self._fail(message, details)

    def _cancelPreparation(self):
        try:
            self.preparation.cancel()
        finally:
            self._preparationEnded()
        self._end(CANCELLED, self._cancelledDuringPreparationMessage())

    def _preparationEnded(self):
        """Hook: the preparation was cancelled or failed (its files are already removed)."""

    def _cancelledDuringPreparationMessage(self):
        return f"{self.title} cancelled before it started."

    def _finishStep(self):
        try:
            done = self._finishing.step()
        except LTUDAError as exc:
            self._finishing = None
            self._fail(str(exc), getattr(exc, "details", ""))
            return True
        except Exception as exc:
            self._finishing = None
            self._fail(f"{self.title} finished but its results could not be loaded: {type(exc).__name__}: {exc}")
            return True
        if done:
            self._finishing = None
            self._end(COMPLETED, self._completedMessage())
        else:
            self._notify()
        return True

    # -- internals --------------------------------------------------------------------------
    def _log(self, line):
        self.logLines.append(line)
        if self.onLog is not None:
            self.onLog(self, line)

    def _notify(self):
        if self.onUpdate is not None:
            self.onUpdate(self)

    def _lastErrorLine(self):
        for line in reversed(self.logLines):
            text = line.strip()
            if text and not text.startswith("[exit code"):
                return text
        return ""

    def _exited(self, code):
        self.returncode = code
        done = self.progress.done or {}
        if self._cancelRequested and (code != 0 or done.get("status") == "cancelled"):
            self._end(CANCELLED, self._cancelledMessage())
            return
        if code == 0 and self.progress.error is None and done.get("status", "completed") != "cancelled":
            try:
                if self.onSuccess is not None:
                    self.status = IMPORTING
                    self._notify()
                    steps = self.onSuccess(self)
                    if steps is not None and hasattr(steps, "step"):
                        self._finishing = steps  # process() runs them, one per call
                        self._notify()
                        return
            except LTUDAError as exc:
                self._fail(str(exc), getattr(exc, "details", ""))
                return
            except Exception as exc:  # a bug in result handling: still one readable message
                self._fail(f"{self.title} finished but its results could not be loaded: {type(exc).__name__}: {exc}")
                return
            self._end(COMPLETED, self._completedMessage())
            return
        if done.get("status") == "cancelled" or (code == EXIT_STOPPED and self.progress.error is None):
            self._end(CANCELLED, self._cancelledMessage())
            return
        self._fail(self._failureMessage(code))

    def _failureMessage(self, code):
        if self.progress.error:
            reason = self.progress.error
        elif code is not None and code < 0:
            reason = (f"the backend process was killed (signal {-code}), often because the computer ran out of "
                      "memory; try the 'fast' preset, the CPU, or close other programs")
        else:
            reason = self._lastErrorLine() or f"the backend exited with code {code}"
        text = f"{self.title} failed: {reason}"
        if "No module named" in reason:
            text += (". The backend Python lacks a package: in the Setup section click Check, then Install missing "
                     "packages (or choose another Python)")
        return text

    def _completedMessage(self):
        return f"{self.title} completed in {_duration(self.elapsedSeconds())}."

    def _cancelledMessage(self):
        return f"{self.title} cancelled."

    def _fail(self, message, details=""):
        extra = []
        if details:
            extra.append(details)
        if self.logPath:
            extra.append(f"Log: {self.logPath}")
        tail = list(self.logLines)[-15:]
        if tail:
            extra.append("Last lines of the log:\n" + "\n".join(tail))
        self.details = "\n".join(extra)
        if self.logPath and "Log:" not in message:
            message = f"{message}\n(log: {self.logPath})"
        self._end(FAILED, message)

    def _end(self, status, message):
        self.status = status
        self.message = message
        self.endTime = time.time()
        if self.onFinished is not None:
            self.onFinished(self)


class TrainingJob(BackendJob):
    """Cancel asks the trainer to stop with a file named STOP in the model folder (it saves its
    last checkpoint and exits 130 when it sees it; works on every OS, also where a console signal
    cannot reach a process started without a console). Still running after `stopFileGrace` s, it
    gets SIGTERM (CTRL_BREAK on Windows), which makes it save and exit the same way, and after
    `cancelGrace` s more its process tree is killed. The STOP file is removed when the job ends.

    Under torchrun (processes > 1) the same holds: rank 0 sees the STOP file and every rank agrees to
    stop at the same step, saves once and exits 130; torchrun itself then exits 1, which still ends
    the job "cancelled" because the stop was asked for. The signal reaches torchrun, which passes it
    on to its ranks (they run in sessions of their own); the final kill takes the whole tree."""

    kind = "training"
    cancelGrace = 60.0  # the trainer saves its checkpoint on SIGTERM before exiting
    stopFileGrace = 20.0
    STOP_FILE = "STOP"

    def __init__(self, runner, modelDir, workDir=None, processes=1, processesNote="", **kwargs):
        kwargs.setdefault("title", "Training")
        super().__init__(runner, **kwargs)
        self.modelDir = os.path.abspath(str(modelDir))
        self.workDir = workDir
        self.processes = processes  # training processes (torchrun ranks when more than one)
        self.processesNote = processesNote  # why the GPUs choice gave this many, shown in the log
        self.stopFile = os.path.join(self.modelDir, self.STOP_FILE)
        self._signalAt = None
        self._wroteStopFile = False

    def start(self):
        if self.processesNote:
            self._log(self.processesNote)
        return super().start()

    def _startRunner(self):
        self._removeStopFile(force=True)  # a stale request would stop the new training at once
        return super()._startRunner()

    def _askToStop(self):
        try:
            os.makedirs(self.modelDir, exist_ok=True)
            with open(self.stopFile, "w", encoding="utf-8") as f:
                f.write("Stop requested by the LTUDA Slicer module: save the last checkpoint and exit.\n")
            self._wroteStopFile = True
        except OSError:
            self.runner.stop(grace=self.cancelGrace)  # no stop file possible: the signal at once
            return
        self.runner.stopRequested = True
        self._signalAt = time.monotonic() + self.stopFileGrace

    def _escalateStop(self):
        if self._signalAt is not None and time.monotonic() >= self._signalAt:
            self._signalAt = None
            self.runner.stop(grace=self.cancelGrace)

    def _removeStopFile(self, force=False):
        if self._wroteStopFile or force:
            try:
                os.remove(self.stopFile)
            except OSError:
                pass
            self._wroteStopFile = False

    def _end(self, status, message):
        self._signalAt = None
        self._removeStopFile()
        super()._end(status, message)

    def _completedMessage(self):
        dice = self.progress.meanDice
        text = f"Training completed in {_duration(self.elapsedSeconds())}; model saved in {self.modelDir}."
        if dice is not None:
            text += f" Validation mean Dice {dice:.3f}."
        return text

    def _preparationEnded(self):
        if self.workDir:
            import shutil

            shutil.rmtree(self.workDir, ignore_errors=True)

    def _cancelledDuringPreparationMessage(self):
        return "Training cancelled while exporting the cases: nothing was trained and no file was left behind."

    def _cancelledMessage(self):
        if os.path.isfile(os.path.join(self.modelDir, "model.json")):
            return (f"Training cancelled. The model of the last checkpoint is usable from {self.modelDir}; "
                    "start again with the same model folder to resume.")
        return "Training cancelled before the first checkpoint; no model was saved."


class PredictionJob(BackendJob):
    kind = "prediction"
    cancelGrace = 0.0

    def __init__(self, runner, volumeNode, outputPath, labelMapPath=None, **kwargs):
        kwargs.setdefault("title", "Segmentation")
        super().__init__(runner, **kwargs)
        self.volumeNode = volumeNode
        self.outputPath = outputPath
        self.labelMapPath = labelMapPath
        self.segmentationNode = None

    def _completedMessage(self):
        name = self.segmentationNode.GetName() if self.segmentationNode is not None else "the result"
        return f"Segmented '{self.volumeNode.GetName()}' in {_duration(self.elapsedSeconds())}: created '{name}'."


class SuggestionJob(BackendJob):
    """`ltuda suggest` for the annotation loop: export (preparation), the command, then the proposals
    are added to the cases' segmentations one case per process() call. Cancel sends SIGTERM (the
    backend stops after the case it is on and exits 130), then kills after `cancelGrace` s."""

    kind = "suggestion"
    cancelGrace = 10.0

    def __init__(self, runner, outFolder, workDir=None, **kwargs):
        kwargs.setdefault("title", "Pre-fill")
        super().__init__(runner, **kwargs)
        self.outFolder = outFolder
        self.workDir = workDir
        self.suggestions = None  # the review list (suggestions.read) once the command succeeded
        self.proposalImport = None

    @property
    def added(self):
        return self.proposalImport.added if self.proposalImport is not None else []

    @property
    def skipped(self):
        return self.proposalImport.skipped if self.proposalImport is not None else []

    def _preparationEnded(self):
        if self.workDir:
            import shutil

            shutil.rmtree(self.workDir, ignore_errors=True)

    def _cancelledDuringPreparationMessage(self):
        return "Pre-fill cancelled while exporting the cases: nothing was proposed."

    def _cancelledMessage(self):
        return "Pre-fill cancelled: no proposal was added."

    def _completedMessage(self):
        cases = len({name for name, _organ, _id in self.added})
        text = (f"Pre-fill completed in {_duration(self.elapsedSeconds())}: {len(self.added)} proposal(s) added to "
                f"{cases} case(s).")
        if self.added:
            text += " Review them with 'Next', then 'Mark reviewed'."
        return text


def _duration(seconds):
    from .progress import formatSeconds

    return formatSeconds(seconds)
