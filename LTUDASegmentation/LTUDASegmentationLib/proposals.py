"""Model proposals inside the user's segmentations: add them, find them, turn them into labels.

`ltuda suggest` writes <case id>.seg.nrrd files whose segments carry the tag LTUDA.status=proposed.
They are added to the case's segmentation as NEW segments, named "<organ> (proposed)" with the
organ's colour and terminology and the same tag; an existing segment is never modified or replaced.
A proposal is not a label (export.py writes its organ as not labelled) until "Mark reviewed" sets
the tag to `reviewed` and drops the name suffix. The tag is saved with the segmentation
(.seg.nrrd `SegmentN_Tags`), so a saved scene keeps what is proposed and what is reviewed.
"""

import numpy as np
import vtk

import slicer

from .errors import LTUDAError
from .organs import matchOrgan
from .segments import (_scalars, _Scratch, addSegmentForOrgan, binaryLabelmapName, ensureSegmentationConverters,
                       segmentTerminology)

STATUS_TAG = "LTUDA.status"
PROPOSED = "proposed"
REVIEWED = "reviewed"
PROPOSAL_SUFFIX = " (proposed)"


def proposalStatus(segment):
    """PROPOSED, REVIEWED, or "" for a segment without the tag (drawn by the user)."""
    if segment is None:
        return ""
    value = vtk.reference("")
    if segment.GetTag(STATUS_TAG, value):
        return str(value)
    return ""


def organNameOfSegment(segmentName):
    """The segment name without the proposal suffix ("liver (proposed)" -> "liver")."""
    name = segmentName or ""
    return name[: -len(PROPOSAL_SUFFIX)] if name.endswith(PROPOSAL_SUFFIX) else name


def segmentsOfOrgan(segmentationNode, organ, organs, status=None):
    """Ids of the segments of `segmentationNode` that stand for `organ` (and carry `status`, when given)."""
    if segmentationNode is None:
        return []
    segmentation = segmentationNode.GetSegmentation()
    found = []
    for i in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(segmentId)
        matched = matchOrgan(organs, organNameOfSegment(segment.GetName()), segmentTerminology(segment))
        if matched is None or matched["name"] != organ["name"]:
            continue
        if status is None or proposalStatus(segment) == status:
            found.append(segmentId)
    return found


def markSegmentReviewed(segmentationNode, segmentId):
    """A proposal becomes a label: tag `reviewed`, name without the suffix (voxels untouched)."""
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None:
        raise LTUDAError(f"The segmentation '{segmentationNode.GetName()}' has no segment '{segmentId}'.")
    segment.SetTag(STATUS_TAG, REVIEWED)
    segment.SetName(organNameOfSegment(segment.GetName()))
    return segmentId


def _binaryLabelmap(segmentation, segmentId):
    """A standalone 0/1 vtkOrientedImageData of one segment of a (read-only) segmentation, or None
    when the segment has no voxel. Copies, so a shared labelmap layer's other values never leak in."""
    segment = segmentation.GetSegment(segmentId)
    labelmap = segment.GetRepresentation(binaryLabelmapName()) if segment is not None else None
    array = _scalars(labelmap)
    if array is None:
        return None
    mask = array == segment.GetLabelValue()
    if not mask.any():
        return None
    from vtk.util import numpy_support

    binary = slicer.vtkOrientedImageData()
    binary.ShallowCopy(labelmap)  # geometry (extent, spacing, origin, directions)
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    binary.SetImageToWorldMatrix(matrix)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(mask, dtype=np.uint8).ravel(), deep=True,
                                         array_type=vtk.VTK_UNSIGNED_CHAR)
    binary.GetPointData().SetScalars(scalars)
    return binary


def addProposalsFromFile(segmentationNode, path, organs, skipOrgans=()):
    """Add the segments of a proposal file (written by `ltuda suggest` on the case volume's grid) as
    new segments of `segmentationNode`; returns ([(organ name, new segment id)], [(organ name, reason)]).

    A file segment that matches no organ of the list, an organ in `skipOrgans` (already labelled or
    already proposed in this case) and an empty proposal are skipped, with the reason. The file's
    geometry is the volume's own (untransformed) grid, which is the segmentation's own coordinate
    system for a case (volume and segmentation under the same transform), so the voxels are set
    without any transform. Nothing else in the node changes."""
    ensureSegmentationConverters()
    scratch = _Scratch()
    added, skipped = [], []
    try:
        source = scratch.add("vtkMRMLSegmentationNode", "proposals")
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(source):
            raise LTUDAError(f"Could not read the proposal file {path}. Run 'Pre-fill missing organs' again.")
        segmentation = source.GetSegmentation()
        skip = set(skipOrgans)
        for i in range(segmentation.GetNumberOfSegments()):
            sourceId = segmentation.GetNthSegmentID(i)
            segment = segmentation.GetSegment(sourceId)
            organ = matchOrgan(organs, organNameOfSegment(segment.GetName()), segmentTerminology(segment))
            if organ is None:
                skipped.append((segment.GetName(), "matches no organ of the list"))
                continue
            if organ["name"] in skip:
                skipped.append((organ["name"], "already labelled or proposed in this case"))
                continue
            binary = _binaryLabelmap(segmentation, sourceId)
            if binary is None:
                skipped.append((organ["name"], "the model found none"))
                continue
            newId = addSegmentForOrgan(segmentationNode, dict(organ, name=organ["name"] + PROPOSAL_SUFFIX))
            try:
                ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                    binary, segmentationNode, newId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE,
                    binary.GetExtent())
                if not ok:
                    raise LTUDAError(f"Could not add the proposal for '{organ['name']}' to "
                                     f"'{segmentationNode.GetName()}'.")
            except Exception:
                segmentationNode.GetSegmentation().RemoveSegment(newId)  # only ever our own new segment
                raise
            segmentationNode.GetSegmentation().GetSegment(newId).SetTag(STATUS_TAG, PROPOSED)
            skip.add(organ["name"])
            added.append((organ["name"], newId))
    finally:
        scratch.close()
    return added, skipped
