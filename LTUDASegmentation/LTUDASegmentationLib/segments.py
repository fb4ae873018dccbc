"""MRML helpers for segmentations: read segments, count voxels, check geometry, export labels.

Everything here reads the user's nodes without modifying them: label export happens in a private
scratch scene (and on a copy of the segmentation when its source representation is not a binary
labelmap), and files are written with stand-alone storage nodes. Works in Slicer and with the
slicer-core wheel (no Qt, no slicer.app, no slicer.modules).
"""

import numpy as np
import vtk

import slicer

from .errors import LTUDAError
from .organs import colorToFloat, terminologyTag

_countCache = {}


def ensureSegmentationConverters():
    """Register the labelmap <-> surface conversion rules if nobody did (Slicer's Segmentations
    module does at startup; a bare slicer-core scene has none)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules():
        return
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def binaryLabelmapName():
    return slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()


def sourceRepresentationName(segmentation):
    getter = getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName
    return getter()


def segmentTerminology(segment):
    if hasattr(segment, "GetTerminology"):
        return segment.GetTerminology() or ""
    value = vtk.reference("")
    segment.GetTag(segment.GetTerminologyEntryTagName(), value)
    return str(value)


def _scalars(image):
    from vtk.util import numpy_support

    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        return None
    dims = image.GetDimensions()
    if min(dims) <= 0:
        return None
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(tuple(reversed(dims)))


def segmentVoxelCount(segmentationNode, segmentId):
    """Voxels of the segment in its own labelmap; -1 when the segment is a non-empty surface (no
    labelmap to count without converting), 0 when empty."""
    segmentation = segmentationNode.GetSegmentation()
    segment = segmentation.GetSegment(segmentId)
    if segment is None:
        return 0
    if sourceRepresentationName(segmentation) != binaryLabelmapName():
        polydata = segment.GetRepresentation(sourceRepresentationName(segmentation))
        return -1 if polydata is not None and polydata.GetNumberOfPoints() > 0 else 0
    image = segment.GetRepresentation(binaryLabelmapName())
    if image is None:
        return 0
    key = (image.GetAddressAsString("vtkObject"), image.GetMTime(), segment.GetLabelValue())
    if key in _countCache:
        return _countCache[key]
    array = _scalars(image)
    count = 0 if array is None else int(np.count_nonzero(array == segment.GetLabelValue()))
    if len(_countCache) > 512:
        _countCache.clear()
    _countCache[key] = count
    return count


def listSegments(segmentationNode):
    """[(segment id, name, terminology tag, colour 0-1)] in display order."""
    segmentation = segmentationNode.GetSegmentation()
    out = []
    for i in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(segmentId)
        out.append((segmentId, segment.GetName(), segmentTerminology(segment), tuple(segment.GetColor())))
    return out


def addSegmentForOrgan(segmentationNode, organ):
    """Add an empty segment named, coloured and coded like the organ; returns its id."""
    segmentation = segmentationNode.GetSegmentation()
    segmentId = segmentation.AddEmptySegment("", organ["name"], colorToFloat(organ["color"]))
    if not segmentId:
        raise LTUDAError(f"Could not add a segment for '{organ['name']}' to '{segmentationNode.GetName()}'.")
    tag = terminologyTag(organ)
    if tag:
        segmentation.GetSegment(segmentId).SetTerminology(tag)
    return segmentId


def _matrixArray(matrix):
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volumeIjkToRas(volumeNode):
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return _matrixArray(matrix)


def _sameGrid(ijkToRasA, ijkToRasB, extentShiftTolerance=1e-2):
    """(same grid, integer index offset of B's voxel (0,0,0) in A's index space)."""
    scale = max(np.abs(ijkToRasA[:3, :3]).max(), 1e-6)
    if np.abs(ijkToRasA[:3, :3] - ijkToRasB[:3, :3]).max() > 1e-3 * scale:
        return False, None
    offset = np.linalg.solve(ijkToRasA[:3, :3], ijkToRasB[:3, 3] - ijkToRasA[:3, 3])
    rounded = np.round(offset)
    if np.abs(offset - rounded).max() > extentShiftTolerance:
        return False, None
    return True, rounded.astype(int)


def geometryProblem(volumeNode, segmentationNode):
    """None when the segmentation's labels lie on the volume's voxel grid and inside it, else a
    sentence saying what does not match and how to fix it."""
    volumeName, segName = volumeNode.GetName(), segmentationNode.GetName()
    if volumeNode.GetParentTransformNode() is not segmentationNode.GetParentTransformNode():
        return (f"The volume '{volumeName}' and the segmentation '{segName}' are under different transforms. "
                "Harden the transforms (Data module) or place both under the same transform.")
    image = volumeNode.GetImageData()
    if image is None:
        return f"The volume '{volumeName}' has no image data."
    segmentation = segmentationNode.GetSegmentation()
    if sourceRepresentationName(segmentation) != binaryLabelmapName():
        return None  # surfaces are voxelised onto the volume's grid at export
    dims = image.GetDimensions()
    volumeMatrix = volumeIjkToRas(volumeNode)
    seen = set()
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        labelmap = segment.GetRepresentation(binaryLabelmapName())
        if labelmap is None:
            continue
        address = labelmap.GetAddressAsString("vtkObject")
        if address in seen:
            continue
        seen.add(address)
        array = _scalars(labelmap)
        if array is None or not array.any():
            continue
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        same, offset = _sameGrid(volumeMatrix, _matrixArray(matrix))
        if not same:
            return (f"The segmentation '{segName}' was drawn on a different image grid than the volume '{volumeName}' "
                    "(voxel size, orientation or position differ). Pick the volume it was drawn on, or resample the "
                    "segmentation onto this volume (Segment Editor: 'Specify geometry', or Segmentations module: "
                    "export to a label map with this volume as reference).")
        extent = labelmap.GetExtent()
        low = np.array(extent[0::2]) + offset
        high = np.array(extent[1::2]) + offset
        if (low >= 0).all() and (high <= np.array(dims) - 1).all():
            continue
        # The labelmap reaches outside the volume: only a problem if painted voxels do.
        nonzero = np.nonzero(array)
        lowPainted = np.array([nonzero[2].min(), nonzero[1].min(), nonzero[0].min()]) + low
        highPainted = np.array([nonzero[2].max(), nonzero[1].max(), nonzero[0].max()]) + low
        if (lowPainted < 0).any() or (highPainted > np.array(dims) - 1).any():
            return (f"Part of the segmentation '{segName}' lies outside the volume '{volumeName}'. Pick the volume it "
                    "was drawn on, or erase the labels outside this volume.")
    return None


class _Scratch:
    """A private MRML scene for temporary nodes, so the user's scene sees nothing."""

    def __init__(self):
        self.scene = slicer.vtkMRMLScene()

    def add(self, className, name=""):
        return self.scene.AddNewNodeByClass(className, name)

    def close(self):
        self.scene.Clear(1)


def _workingSegmentation(scratch, segmentationNode, volumeNode):
    """The node to export from: the user's node when its source is a labelmap (read only), else a
    copy in the scratch scene, voxelised on the volume's grid."""
    segmentation = segmentationNode.GetSegmentation()
    if sourceRepresentationName(segmentation) == binaryLabelmapName():
        return segmentationNode
    ensureSegmentationConverters()
    copy = scratch.add("vtkMRMLSegmentationNode", "copy")
    copy.GetSegmentation().DeepCopy(segmentation)
    copy.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    copied = copy.GetSegmentation()
    copied.CreateRepresentation(binaryLabelmapName(), True)
    setter = getattr(copied, "SetSourceRepresentationName", None) or copied.SetMasterRepresentationName
    setter(binaryLabelmapName())
    return copy


def labelArrayOnVolume(volumeNode, segmentationNode, segmentValues, checkFit=True):
    """Class values (uint8, numpy order k, j, i) on the volume's voxel grid: each segment id in
    `segmentValues` painted with its value (later ones win where segments overlap).

    With checkFit, raises LTUDAError when a segment loses voxels on the volume's grid (drawn on
    another grid, or partly outside the volume)."""
    import slicer.util

    image = volumeNode.GetImageData()
    if image is None:
        raise LTUDAError(f"The volume '{volumeNode.GetName()}' has no image data.")
    dims = image.GetDimensions()
    out = np.zeros(tuple(reversed(dims)), dtype=np.uint8)
    if not segmentValues:
        return out
    scratch = _Scratch()
    try:
        working = _workingSegmentation(scratch, segmentationNode, volumeNode)
        labelNode = scratch.add("vtkMRMLLabelMapVolumeNode", "export")
        for segmentId, value in segmentValues.items():
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(working, ids, labelNode, volumeNode):
                raise LTUDAError(f"Could not export segment '{segmentId}' of '{segmentationNode.GetName()}' onto "
                                 f"the volume '{volumeNode.GetName()}'.")
            mask = slicer.util.arrayFromVolume(labelNode) > 0
            if mask.shape != out.shape:
                raise LTUDAError(f"The segmentation '{segmentationNode.GetName()}' could not be resampled onto the "
                                 f"volume '{volumeNode.GetName()}'.")
            if checkFit and working is segmentationNode:
                own = segmentVoxelCount(segmentationNode, segmentId)
                if own >= 0 and int(mask.sum()) != own:
                    name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
                    raise LTUDAError(
                        f"The segment '{name}' of '{segmentationNode.GetName()}' does not fit the voxel grid of the "
                        f"volume '{volumeNode.GetName()}' ({own} voxels in the segmentation, {int(mask.sum())} on the "
                        "volume). " + (geometryProblem(volumeNode, segmentationNode) or
                                       "Pick the volume the segmentation was drawn on."))
            out[mask] = value
    finally:
        scratch.close()
    return out


def writeVolumeFile(volumeNode, path, compress=False):
    """Write a volume node to a file with a stand-alone storage node (the node itself is untouched:
    no storage node is added to it and its file name does not change)."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(1 if compress else 0)
    if not storage.WriteData(volumeNode):
        raise LTUDAError(f"Could not write the volume '{volumeNode.GetName()}' to {path}. Check that the work folder "
                         "is writable and has free space.")


def writeLabelFile(array, volumeNode, path, compress=True):
    """Write a uint8 label array (numpy order k, j, i) with the volume's geometry."""
    import slicer.util

    scratch = _Scratch()
    try:
        labelNode = scratch.add("vtkMRMLLabelMapVolumeNode", "labels")
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        labelNode.SetIJKToRASMatrix(matrix)
        slicer.util.updateVolumeFromArray(labelNode, np.ascontiguousarray(array, dtype=np.uint8))
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(1 if compress else 0)
        if not storage.WriteData(labelNode):
            raise LTUDAError(f"Could not write the label map {path}. Check that the work folder is writable and has "
                             "free space.")
    finally:
        scratch.close()


def readSegmentationFile(path, segmentationNode):
    """Read a .seg.nrrd (segment names, colours, terminology) into an existing segmentation node."""
    ensureSegmentationConverters()
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(segmentationNode):
        raise LTUDAError(f"Could not read the segmentation file {path}.")


def setSegmentFromMask(segmentationNode, segmentId, mask, ijkToRasMatrix):
    """Replace a segment's voxels by a boolean mask (numpy order k, j, i) on the given grid."""
    import slicer.util

    scratch = _Scratch()
    try:
        labelNode = scratch.add("vtkMRMLLabelMapVolumeNode", "mask")
        labelNode.SetIJKToRASMatrix(ijkToRasMatrix)
        slicer.util.updateVolumeFromArray(labelNode, np.ascontiguousarray(mask, dtype=np.uint8))
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentId)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelNode, segmentationNode, ids):
            raise LTUDAError(f"Could not fill the segment '{segmentId}' of '{segmentationNode.GetName()}'.")
    finally:
        scratch.close()


def loadVolumeFile(scene, path, name, className="vtkMRMLScalarVolumeNode"):
    """Read a volume file into a new node of `scene` (with its storage node, so Save works)."""
    node = scene.AddNewNodeByClass(className, name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise LTUDAError(f"Could not read the volume file {path}.")
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def loadFileCaseNodes(scene, case, organs):
    """(volume node, segmentation node) of a file case: the image, and one segment per organ of
    the value map (label values mapped to the same organ are merged; 'background' values dropped)."""
    import slicer.util

    from .organs import findOrgan

    ensureSegmentationConverters()
    volume = loadVolumeFile(scene, case.imagePath, case.name)
    scratch = _Scratch()
    try:
        labelNode = scratch.add("vtkMRMLLabelMapVolumeNode", "labels")
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(case.labelPath)
        if not storage.ReadData(labelNode):
            raise LTUDAError(f"Could not read the label file {case.labelPath}.")
        labels = slicer.util.arrayFromVolume(labelNode)
        if labels.shape != slicer.util.arrayFromVolume(volume).shape:
            scene.RemoveNode(volume)
            raise LTUDAError(f"The label file {case.labelPath} does not have the size of the image {case.imagePath}.")
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{case.name} labels")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        for organ in organs:
            values = [v for v, target in case.valueMap.items() if target == organ["name"]]
            if not values:
                continue
            segmentId = addSegmentForOrgan(segmentation, findOrgan(organs, organ["name"]))
            setSegmentFromMask(segmentation, segmentId, np.isin(labels, values), matrix)
    finally:
        scratch.close()
    return volume, segmentation
