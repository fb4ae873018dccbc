"""Export training cases to a work folder: images, label maps and the dataset manifest.

Scene cases: the volume as uncompressed NRRD (images/<id>.nrrd) and the labelled organs as one
label map of class values on the volume's grid (labels/<id>.nrrd), only the segments that match an
organ and are not empty. File cases are referenced where they are (no copy of large datasets).
A segment tagged LTUDA.status=proposed (a model proposal nobody checked) is never exported as a
label: its organ is written as not labelled for that case (proposals.py).
The user's nodes are only read. TrainingExport does it in steps: VTK/MRML reads one case at a time
on the scene's thread, a worker thread writes the files (numpy and zlib only).
"""

import errno
import os
import shutil

from .cases import isLabel, requireUsable, scanCase, uniqueCaseIds
from .errors import LTUDAError
from .manifest import caseEntry, isInside, manifestDocument, writeManifest
from .organs import BACKGROUND

MANIFEST_NAME = "dataset.json"


def _volumeBytes(volumeNode):
    image = volumeNode.GetImageData()
    if image is None:
        return 0
    x, y, z = image.GetDimensions()
    return x * y * z * (image.GetScalarSize() * image.GetNumberOfScalarComponents() + 1)


def estimateExportBytes(cases):
    return int(sum(_volumeBytes(c.volumeNode) for c in cases if c.isScene) * 1.1) + 1024 * 1024


def formatBytes(count):
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024.0


def checkFreeSpace(folder, neededBytes):
    """Raise LTUDAError when `folder` (or its nearest existing parent) has less free space."""
    probe = os.path.abspath(str(folder))
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if free < neededBytes:
        raise LTUDAError(
            f"Not enough free disk space in the work folder {folder}: this needs about {formatBytes(neededBytes)}, "
            f"only {formatBytes(free)} is free. Choose another work folder (Setup section) or free some space.")


def writeFailure(exc, path, neededBytes=None):
    """One message for a write that failed (a full disk, a read-only folder): what, where, why and the fix.
    The export removes everything it wrote after this, so nothing half-written stays behind."""
    folder = os.path.dirname(os.path.abspath(str(path)))
    undone = "Nothing of this export was kept."
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        try:
            free = formatBytes(shutil.disk_usage(folder).free) + " free"
        except OSError:
            free = "no space left"
        needed = f"{formatBytes(neededBytes)} needed, " if neededBytes else ""
        return LTUDAError(f"Could not write {path}: the disk is full ({needed}{free}). Free some space or choose "
                          f"another work folder (Setup section), then try again. {undone}")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        reason = "the folder is read-only" if exc.errno == errno.EROFS else "permission denied"
        return LTUDAError(f"Could not write {path}: {reason}. Choose a work folder you can write to (Setup "
                          f"section), then try again. {undone}")
    return LTUDAError(f"Could not write {path}: {exc.strerror or exc}. Check the work folder, then try again. "
                      f"{undone}")


def exportTrainingData(cases, organs, workDir, name="slicer-cases", ignoreUnmatched=False, freeSpaceCheck=None):
    """Write the cases and `dataset.json` into workDir; returns (manifest path, needs outside paths).

    Raises LTUDAError for anything that would make training fail: no cases, an organ labelled in
    no case, a segment matching no organ (unless ignoreUnmatched), a segmentation that does not fit
    its volume, missing files, no free disk space. Blocking; the panel uses TrainingExport in steps."""
    export = TrainingExport(cases, organs, workDir, name=name, ignoreUnmatched=ignoreUnmatched,
                            freeSpaceCheck=freeSpaceCheck)
    export.begin()
    try:
        while not export.step():
            if not export.lastStepTookCase:
                export.waitForWriter(0.05)
    except BaseException:
        export.cancel()
        raise
    return export.result


class TrainingExport:
    """The training export in steps, so the GUI thread is never blocked for more than one case.

    begin() checks everything (raises LTUDAError) and starts a writer thread. Each step() runs on
    the thread that owns the scene: it reads one scene case through VTK/MRML into numpy arrays
    (the voxels, the label map) and hands them to the writer thread, which writes the NRRD files
    (nrrdfile.py: numpy and zlib only). At most `maxPending` cases wait for the writer, which
    bounds the memory. step() returns True once every file and dataset.json are written (then
    `result` is (manifest path, needs outside paths)). cancel() stops the writer and removes every
    file this export wrote. The user's nodes are only read."""

    def __init__(self, cases, organs, workDir, name="slicer-cases", ignoreUnmatched=False, freeSpaceCheck=None,
                 maxPending=2, statuses=None, requireLabels=True):
        """statuses: the cases' CaseStatus when the caller has them (the logic caches its scans).
        requireLabels=False (the export for `ltuda suggest`): only the cases' own problems (geometry,
        missing files) stop the export; an organ labelled nowhere or an unmatched segment does not."""
        self.cases = list(cases)
        self._given = statuses
        self.organs = organs
        self.workDir = os.path.abspath(str(workDir))
        self.name = name
        self.ignoreUnmatched = ignoreUnmatched
        self.requireLabels = requireLabels
        self.freeSpaceCheck = freeSpaceCheck or checkFreeSpace
        self.maxPending = maxPending
        self.result = None
        self.cancelled = False
        self.lastStepTookCase = False
        self._statuses = []
        self._ids = []
        self._next = 0
        self._entries = []
        self._outside = False
        self._written = []  # files this export finished writing (removed again on cancel)
        self._filesQueued = 0
        self._filesDone = 0
        self._error = None
        self._queue = None
        self._thread = None
        self._lock = None
        self._wake = None

    # -- main thread ------------------------------------------------------------------------------
    def begin(self):
        import queue
        import threading

        if not self.cases:
            raise LTUDAError("No training cases: add a volume with its segmentation, or import a folder.")
        given = self._given
        usable = given is not None and len(given) == len(self.cases) and all(
            st.case is c for st, c in zip(given, self.cases))
        self._statuses = list(given) if usable else [scanCase(c, self.organs) for c in self.cases]
        if self.requireLabels:
            requireUsable(self._statuses, self.organs, ignoreUnmatched=self.ignoreUnmatched)
        else:
            problems = [f"Case '{st.case.name}': {p}" for st in self._statuses for p in st.problems]
            if problems:
                raise LTUDAError("The cases cannot be exported:\n- " + "\n- ".join(problems))
        self.freeSpaceCheck(self.workDir, estimateExportBytes(self.cases))
        for folder in ("images", "labels"):
            try:
                os.makedirs(os.path.join(self.workDir, folder), exist_ok=True)
            except OSError as exc:
                self.cancel()
                raise writeFailure(exc, os.path.join(self.workDir, folder)) from None
        self._ids = uniqueCaseIds(self.cases)
        self._queue = queue.Queue()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._writer, name="LTUDA export writer", daemon=True)
        self._thread.start()
        return self

    @property
    def total(self):
        return len(self.cases)

    @property
    def casesTaken(self):
        return self._next

    def fraction(self):
        """Share of the work done: reading a case counts a quarter, writing its files the rest."""
        if not self.cases:
            return 1.0
        with self._lock:
            done, queued = self._filesDone, self._filesQueued
        written = done / queued if queued else 0.0
        return min(1.0, 0.25 * self._next / len(self.cases) + 0.75 * written * self._next / len(self.cases))

    def statusText(self):
        return f"Exporting case {min(self._next + 1, self.total)} of {self.total}..."

    def step(self):
        """Take the next case (when the writer has room) and finish when all is written; True when done."""
        if self.result is not None:
            return True
        if self.cancelled:
            raise LTUDAError("The export was cancelled.")
        self._raiseWriterError()
        self.lastStepTookCase = False
        with self._lock:
            pending = self._filesQueued - self._filesDone
        if self._next < len(self.cases) and pending <= 2 * (self.maxPending - 1):
            self._takeCase(self._next)
            self._next += 1
            self.lastStepTookCase = True
            return False
        if self._next < len(self.cases) or pending:
            return False
        self._stopWriter()
        self._raiseWriterError()
        target = os.path.join(self.workDir, MANIFEST_NAME)
        try:
            path = writeManifest(target, manifestDocument(self.name, self.organs, self._entries))
        except OSError as exc:
            self.cancel()
            raise writeFailure(exc, target) from None
        self._written.append(path)
        self.result = (path, self._outside)
        return True

    def waitForWriter(self, timeout):
        """Sleep until the writer finished a file (or `timeout` s): for blocking callers."""
        with self._wake:
            if self._filesQueued > self._filesDone and self._error is None:
                self._wake.wait(timeout)

    def cancel(self):
        """Stop the writer (it drops the file it is writing) and remove every file written so far."""
        self.cancelled = True
        self._stopWriter()
        for path in self._written:
            try:
                os.remove(path)
            except OSError:
                pass
        for folder in ("images", "labels"):
            try:
                os.rmdir(os.path.join(self.workDir, folder))
            except OSError:
                pass

    def _takeCase(self, index):
        case, status, caseId = self.cases[index], self._statuses[index], self._ids[index]
        valueOf = {o["name"]: int(o["value"]) for o in self.organs}
        if not case.isScene:
            valueMap = {v: (t if t in valueOf else BACKGROUND) for v, t in case.valueMap.items()}
            labelled = [n for n in valueOf if n in valueMap.values()]
            self._entries.append(caseEntry(caseId, case.imagePath, case.labelPath, valueMap, labelled, self.workDir))
            self._outside = self._outside or not (isInside(case.imagePath, self.workDir) and
                                                  isInside(case.labelPath, self.workDir))
            return
        entry, files = _readSceneCase(caseId, status, valueOf, self.workDir)
        self._entries.append(entry)
        for item in files:
            self._queueFile(*item)

    def _queueFile(self, path, array, ijkToRas, compress):
        if array is None:  # a volume the plain NRRD writer cannot hold: Slicer's writer, on this thread
            from .segments import writeVolumeFile

            writeVolumeFile(ijkToRas, path, compress=compress)  # here ijkToRas is the volume node
            self._written.append(path)
            return
        with self._lock:
            self._filesQueued += 1
        self._queue.put((path, array, ijkToRas, compress))

    def _raiseWriterError(self):
        if self._error is not None:
            error, self._error = self._error, None
            self.cancel()
            raise error

    def _stopWriter(self):
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    # -- writer thread: numpy and files only, never VTK or MRML ----------------------------------------
    def _writer(self):
        from .nrrdfile import WriteCancelled, writeNrrd

        while True:
            item = self._queue.get()
            if item is None:
                return
            path, array, ijkToRas, compress = item
            try:
                if self.cancelled or self._error is not None:
                    continue
                writeNrrd(path, array, ijkToRas, compress=compress, cancelled=lambda: self.cancelled)
                self._written.append(path)
            except WriteCancelled:
                pass
            except OSError as exc:
                self._error = writeFailure(exc, path, array.nbytes)
            except Exception as exc:  # still one readable message in the panel
                self._error = LTUDAError(f"Could not write {path}: {type(exc).__name__}: {exc}")
            finally:
                del array
                with self._wake:
                    self._filesDone += 1
                    self._wake.notify_all()


def _readSceneCase(caseId, status, valueOf, workDir):
    """(manifest entry, [(path, numpy array, IJK-to-RAS, compress)]) of one scene case, read through
    VTK/MRML on the calling thread. A volume the NRRD writer cannot hold (several components)
    comes back as (path, None, volume node, compress): written with Slicer's writer."""
    import numpy as np

    from .segments import labelArrayOnVolume, segmentVoxelCount, volumeIjkToRas

    case = status.case
    imagePath = os.path.join(workDir, "images", caseId + ".nrrd")
    ijkToRas = volumeIjkToRas(case.volumeNode)
    image = _voxelCopy(case.volumeNode)
    files = [(imagePath, image, ijkToRas, False) if image is not None else (imagePath, None, case.volumeNode, False)]
    labelled = [n for n in valueOf if isLabel(status.organStatus.get(n))]  # never an unchecked proposal
    if not labelled:
        return caseEntry(caseId, imagePath, None, {}, [], workDir), files
    segmentValues = {}
    for segmentId, organName in status.segmentOrgans.items():
        if organName in labelled and segmentVoxelCount(case.segmentationNode, segmentId) != 0:
            segmentValues[segmentId] = valueOf[organName]
    labels = labelArrayOnVolume(case.volumeNode, case.segmentationNode, segmentValues)
    present = np.bincount(labels.ravel(), minlength=256)
    for name in labelled:
        if present[valueOf[name]] == 0:
            raise LTUDAError(
                f"Case '{case.name}': the segment for '{name}' is hidden by other segments that overlap it. "
                "Make sure organs do not overlap (Segment Editor: 'Overwrite other segments').")
    labelPath = os.path.join(workDir, "labels", caseId + ".nrrd")
    files.append((labelPath, labels, ijkToRas, True))
    return caseEntry(caseId, imagePath, labelPath, {valueOf[n]: n for n in labelled}, labelled, workDir), files


def _voxelCopy(volumeNode):
    """A numpy copy (k, j, i) of a single-component volume's voxels; None for other volumes."""
    import numpy as np
    from vtk.util import numpy_support

    from .nrrdfile import NRRD_TYPES

    image = volumeNode.GetImageData()
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None or scalars.GetNumberOfComponents() != 1:
        return None
    array = numpy_support.vtk_to_numpy(scalars)
    if array.dtype.name not in NRRD_TYPES:
        return None
    x, y, z = image.GetDimensions()
    return np.array(array.reshape(z, y, x), copy=True)
