"""Training cases and which organs each one labels.

A case is either a pair of scene nodes (volume + segmentation) or a pair of files on disk (image +
label map with a label value -> organ map, how LiTS, KiTS and MSD ship). An organ counts as
labelled in a scene case when a segment matches it (terminology first, then name) and is not
empty; in a file case when the value map names it (the backend checks the voxels when training).
Partially labelled: organs a case does not label are unknown there, not background.

Annotation loop (proposals.py): a segment tagged LTUDA.status=proposed is the model's unchecked
proposal and never a label (the organ is PROPOSED, exported as not labelled); one tagged
reviewed is a label (REVIEWED), like a segment the user drew (LABELLED).
"""

import os
import re

from .errors import LTUDAError
from .organs import matchOrgan

LABELLED = "labelled"
REVIEWED = "reviewed"  # a model proposal the user checked: a label like LABELLED
PROPOSED = "proposed"  # only an unchecked model proposal: NOT a label
EMPTY = "empty"
MISSING = "missing"
LABEL_STATES = (LABELLED, REVIEWED)


def isLabel(state):
    """True for the organ states that are training labels (drawn or reviewed)."""
    return state in LABEL_STATES


class Case:
    """One training case. Scene case: volumeNode + segmentationNode. File case: imagePath +
    labelPath + valueMap {label value: organ name or 'background'}."""

    def __init__(self, volumeNode=None, segmentationNode=None, imagePath=None, labelPath=None, valueMap=None,
                 name=None):
        self.volumeNode = volumeNode
        self.segmentationNode = segmentationNode
        self.imagePath = None if imagePath is None else os.path.abspath(str(imagePath))
        self.labelPath = None if labelPath is None else os.path.abspath(str(labelPath))
        self.valueMap = dict(valueMap or {})
        self._name = name

    @property
    def isScene(self):
        return self.volumeNode is not None

    @property
    def name(self):
        if self._name:
            return self._name
        if self.isScene:
            return self.volumeNode.GetName()
        return fileStem(self.imagePath)

    @property
    def volumeText(self):
        return self.volumeNode.GetName() if self.isScene else os.path.basename(self.imagePath)

    @property
    def segmentationText(self):
        if self.isScene:
            return self.segmentationNode.GetName() if self.segmentationNode is not None else "(none)"
        return os.path.basename(self.labelPath) if self.labelPath else "(none)"

    def isAlive(self):
        """False once a node of a scene case was removed from its scene."""
        if not self.isScene:
            return True
        if self.volumeNode.GetScene() is None:
            return False
        return self.segmentationNode is None or self.segmentationNode.GetScene() is not None

    def sameAs(self, other):
        if self.isScene != other.isScene:
            return False
        if self.isScene:
            return self.volumeNode is other.volumeNode and self.segmentationNode is other.segmentationNode
        return self.imagePath == other.imagePath and self.labelPath == other.labelPath


class CaseStatus:
    """What a case labels: organStatus {organ name: LABELLED|REVIEWED|PROPOSED|EMPTY|MISSING},
    segmentOrgans {segment id: organ name} for matched segments that may be labels (drawn or
    reviewed), proposedSegments {segment id: organ name} for unchecked proposals (never exported as
    labels), unmatched segment names, problems (sentences)."""

    def __init__(self, case):
        self.case = case
        self.organStatus = {}
        self.segmentOrgans = {}
        self.proposedSegments = {}
        self.unmatched = []
        self.problems = []

    @property
    def labelled(self):
        return [name for name, status in self.organStatus.items() if isLabel(status)]

    @property
    def proposed(self):
        return [name for name, status in self.organStatus.items() if status == PROPOSED]

    @property
    def missing(self):
        return [name for name, status in self.organStatus.items() if status == MISSING]

    @property
    def notLabelled(self):
        return [name for name, status in self.organStatus.items() if not isLabel(status)]


def fileStem(path):
    base = os.path.basename(str(path))
    for ext in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return os.path.splitext(base)[0]


def scanCase(case, organs, checkGeometry=True):
    """CaseStatus of a case against the organ list (reads nodes, never modifies them)."""
    status = CaseStatus(case)
    for organ in organs:
        status.organStatus[organ["name"]] = MISSING
    if case.isScene:
        _scanSceneCase(case, organs, status, checkGeometry)
    else:
        _scanFileCase(case, organs, status)
    return status


def _transformSignature(node):
    signature = []
    transform = node.GetParentTransformNode() if node is not None else None
    while transform is not None:
        signature.append((transform.GetID(), transform.GetMTime()))
        transform = transform.GetParentTransformNode()
    return tuple(signature)


def scanSignature(case, organs):
    """What a scene case's scan depends on, as modification times (cheap to compute: no voxel is
    read); None for a file case (their scan only checks that two files exist). Equal signatures mean
    the scan of the case would give the same result."""
    if not case.isScene:
        return None
    volume, segmentationNode = case.volumeNode, case.segmentationNode
    image = volume.GetImageData()
    parts = [id(volume), volume.GetMTime(), image.GetMTime() if image is not None else 0,
             _transformSignature(volume), repr(organs)]
    if segmentationNode is not None:
        segmentation = segmentationNode.GetSegmentation()
        parts += [id(segmentationNode), segmentationNode.GetMTime(), segmentation.GetMTime(),
                  _transformSignature(segmentationNode)]
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            parts.append((segmentation.GetNthSegmentID(i), segment.GetMTime()))
            names = []
            segment.GetContainedRepresentationNames(names)
            for name in names:
                representation = segment.GetRepresentation(name)
                parts.append((name, representation.GetMTime() if representation is not None else 0))
    return tuple(parts)


def _scanSceneCase(case, organs, status, checkGeometry):
    from .proposals import PROPOSED as PROPOSED_TAG, REVIEWED as REVIEWED_TAG, organNameOfSegment, proposalStatus
    from .segments import geometryProblem, listSegments, segmentVoxelCount

    if case.segmentationNode is None:
        status.problems.append(
            f"The volume '{case.volumeNode.GetName()}' has no segmentation: pick the segmentation that labels it "
            "(or create one and use 'Add missing labels').")
        return
    counts, reviewed, proposed = {}, set(), set()
    segmentation = case.segmentationNode.GetSegmentation()
    for segmentId, segmentName, tag, _color in listSegments(case.segmentationNode):
        organ = matchOrgan(organs, organNameOfSegment(segmentName), tag)
        if organ is None:
            status.unmatched.append(segmentName)
            continue
        count = segmentVoxelCount(case.segmentationNode, segmentId)
        state = proposalStatus(segmentation.GetSegment(segmentId))
        if state == PROPOSED_TAG:  # the model's unchecked output: never a label
            status.proposedSegments[segmentId] = organ["name"]
            if count != 0:
                proposed.add(organ["name"])
            counts.setdefault(organ["name"], [])
            continue
        status.segmentOrgans[segmentId] = organ["name"]
        if state == REVIEWED_TAG and count != 0:
            reviewed.add(organ["name"])
        counts.setdefault(organ["name"], []).append(count)
    for name, values in counts.items():
        if any(v != 0 for v in values):
            status.organStatus[name] = REVIEWED if name in reviewed else LABELLED
        else:
            status.organStatus[name] = PROPOSED if name in proposed else EMPTY
    if checkGeometry and case.volumeNode.GetImageData() is not None:
        problem = geometryProblem(case.volumeNode, case.segmentationNode)
        if problem:
            status.problems.append(problem)


def _scanFileCase(case, organs, status):
    names = {o["name"] for o in organs}
    for path, what in ((case.imagePath, "image"), (case.labelPath, "label")):
        if path and not os.path.exists(path):
            status.problems.append(f"The {what} file {path} of case '{case.name}' does not exist any more.")
    for value, target in case.valueMap.items():
        if target in names:
            status.organStatus[target] = LABELLED
        elif str(target).lower() != "background":
            status.unmatched.append(f"label {value} ({target})")


def summarize(statuses, organs):
    """{"counts": {organ: cases labelling it}, "warnings": [sentences], "errors": [sentences]}.
    Errors block training; warnings do not."""
    counts = {o["name"]: 0 for o in organs}
    warnings, errors = [], []
    for status in statuses:
        for name in status.labelled:
            counts[name] = counts.get(name, 0) + 1
        for problem in status.problems:
            errors.append(f"Case '{status.case.name}': {problem}")
        if status.unmatched:
            warnings.append(
                f"Case '{status.case.name}': segment(s) {', '.join(repr(s) for s in status.unmatched)} match no organ; "
                "rename them to an organ name, set their terminology, add the organ, or remove them.")
        if status.case.isScene and status.case.segmentationNode is not None and not status.labelled:
            warnings.append(f"Case '{status.case.name}' labels no organ yet: LTUDA learns from it as an unlabelled "
                            "scan (labelled-only leaves it out).")
    for name, count in counts.items():
        if count == 0 and statuses:
            errors.append(f"No case labels '{name}': label it in at least one case ('Add missing labels') "
                          "or remove it from the organs.")
    if not statuses:
        errors.append("No training cases: add a volume with its segmentation, or import a folder.")
    return {"counts": counts, "warnings": warnings, "errors": errors}


def summaryText(summary, organs):
    parts = [f"{o['name']}: {summary['counts'].get(o['name'], 0)}" for o in organs]
    return "Cases labelling each organ: " + (", ".join(parts) if parts else "(no organs)")


_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def uniqueCaseIds(cases):
    """Short, file-name-safe, unique ids in case order."""
    used, ids = set(), []
    for case in cases:
        base = _ID_UNSAFE.sub("_", case.name).strip("._-")[:40] or "case"
        candidate, n = base, 1
        while candidate.lower() in used:
            n += 1
            candidate = f"{base}_{n}"
        used.add(candidate.lower())
        ids.append(candidate)
    return ids


def requireUsable(statuses, organs, ignoreUnmatched=False):
    """Raise LTUDAError listing everything that blocks training."""
    summary = summarize(statuses, organs)
    problems = list(summary["errors"])
    if not ignoreUnmatched:
        for status in statuses:
            if status.unmatched and status.case.isScene:
                problems.append(
                    f"Case '{status.case.name}': segment(s) {', '.join(repr(s) for s in status.unmatched)} match no "
                    "organ. Rename them to an organ name, set their terminology, add the organ, remove them, or tick "
                    "'Ignore segments that match no organ'.")
    if problems:
        raise LTUDAError("Training cannot start:\n- " + "\n- ".join(problems))
    return summary
