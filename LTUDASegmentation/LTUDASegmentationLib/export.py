"""Export training cases to a work folder: images, label maps and the dataset manifest.

Scene cases: the volume as uncompressed NRRD (images/<id>.nrrd) and the labelled organs as one
label map of class values on the volume's grid (labels/<id>.nrrd), only the segments that match an
organ and are not empty. File cases are referenced where they are (no copy of large datasets).
The user's nodes are only read.
"""

import os
import shutil

from .cases import LABELLED, requireUsable, scanCase, uniqueCaseIds
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


def exportTrainingData(cases, organs, workDir, name="slicer-cases", ignoreUnmatched=False, freeSpaceCheck=None):
    """Write the cases and `dataset.json` into workDir; returns (manifest path, needs outside paths).

    Raises LTUDAError for anything that would make training fail: no cases, an organ labelled in
    no case, a segment matching no organ (unless ignoreUnmatched), a segmentation that does not fit
    its volume, missing files, no free disk space."""
    if not cases:
        raise LTUDAError("No training cases: add a volume with its segmentation, or import a folder.")
    statuses = [scanCase(c, organs) for c in cases]
    requireUsable(statuses, organs, ignoreUnmatched=ignoreUnmatched)
    workDir = os.path.abspath(str(workDir))
    (freeSpaceCheck or checkFreeSpace)(workDir, estimateExportBytes(cases))
    os.makedirs(os.path.join(workDir, "images"), exist_ok=True)
    os.makedirs(os.path.join(workDir, "labels"), exist_ok=True)
    valueOf = {o["name"]: int(o["value"]) for o in organs}
    entries, outside = [], False
    for caseId, status in zip(uniqueCaseIds(cases), statuses):
        case = status.case
        if case.isScene:
            entries.append(_exportSceneCase(caseId, status, valueOf, workDir))
        else:
            valueMap = {v: (t if t in valueOf else BACKGROUND) for v, t in case.valueMap.items()}
            labelled = [n for n in valueOf if n in valueMap.values()]
            entries.append(caseEntry(caseId, case.imagePath, case.labelPath, valueMap, labelled, workDir))
            outside = outside or not (isInside(case.imagePath, workDir) and isInside(case.labelPath, workDir))
    path = writeManifest(os.path.join(workDir, MANIFEST_NAME), manifestDocument(name, organs, entries))
    return path, outside


def _exportSceneCase(caseId, status, valueOf, workDir):
    import numpy as np

    from .segments import labelArrayOnVolume, segmentVoxelCount, writeLabelFile, writeVolumeFile

    case = status.case
    imagePath = os.path.join(workDir, "images", caseId + ".nrrd")
    writeVolumeFile(case.volumeNode, imagePath, compress=False)
    labelled = [n for n in valueOf if status.organStatus.get(n) == LABELLED]
    if not labelled:
        return caseEntry(caseId, imagePath, None, {}, [], workDir)
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
    writeLabelFile(labels, case.volumeNode, labelPath, compress=True)
    return caseEntry(caseId, imagePath, labelPath, {valueOf[n]: n for n in labelled}, labelled, workDir)
