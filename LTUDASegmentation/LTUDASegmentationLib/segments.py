"""MRML helpers for segmentations: read segments, count voxels, check geometry, export labels.

Everything here reads the user's nodes without modifying them: label export reads the segments'
labelmaps with plain VTK (on a private vtkSegmentation copy when the source representation is a
closed surface), never through a MRML node, and files are written with stand-alone storage nodes.
Works in Slicer and with the slicer-core wheel (no Qt, no slicer.app, no slicer.modules).
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


def _vtkMatrix(array):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def _parentToParentMatrix(fromNode, toNode):
    """4x4 array mapping coordinates under the transform node `fromNode` to coordinates under
    `toNode` (None = world). Raises LTUDAError for a non-linear transform."""
    if fromNode is toNode:
        return np.eye(4)
    for node in (fromNode, toNode):
        if node is not None and not node.IsTransformToWorldLinear():
            raise LTUDAError(f"The transform '{node.GetName()}' is not linear. Harden it on the volume and the "
                             "segmentation (Data module: right-click, 'Harden transform') before training.")
    matrix = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(fromNode, toNode, matrix)
    return _matrixArray(matrix)


def _volumeGridInSegmentationSpace(volumeNode, segmentationNode):
    """The volume's voxel grid (extent and geometry, no voxels) in the segmentation's own coordinates:
    the volume's parent transform and the segmentation's are applied once each, whatever they are."""
    volumeToSegmentation = _parentToParentMatrix(volumeNode.GetParentTransformNode(),
                                                 segmentationNode.GetParentTransformNode())
    grid = slicer.vtkOrientedImageData()
    grid.SetExtent(volumeNode.GetImageData().GetExtent())
    grid.SetGeometryFromImageToWorldMatrix(_vtkMatrix(volumeToSegmentation @ volumeIjkToRas(volumeNode)))
    return grid


def _labelmapSegmentation(segmentationNode, grid):
    """A vtkSegmentation holding binary labelmaps to read: the user's own when its source is a
    labelmap (only read), else a private copy (no MRML node, no scene) voxelised on `grid`."""
    segmentation = segmentationNode.GetSegmentation()
    if sourceRepresentationName(segmentation) == binaryLabelmapName():
        return segmentation
    ensureSegmentationConverters()
    copy = slicer.vtkSegmentation()
    copy.DeepCopy(segmentation)
    copy.SetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
                                slicer.vtkSegmentationConverter.SerializeImageGeometry(grid))
    if not copy.CreateRepresentation(binaryLabelmapName(), True):
        raise LTUDAError(f"The segmentation '{segmentationNode.GetName()}' could not be converted to a label map.")
    return copy


def _maskOnGrid(segmentation, segmentId, grid, shape):
    """Boolean mask (numpy order k, j, i) of one segment resampled (nearest neighbour) onto grid."""
    segment = segmentation.GetSegment(segmentId)
    labelmap = segment.GetRepresentation(binaryLabelmapName()) if segment is not None else None
    if labelmap is None or _scalars(labelmap) is None:
        return np.zeros(shape, dtype=bool)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, grid, resampled, False, False):
        return None
    array = _scalars(resampled)
    if array is None:
        return np.zeros(shape, dtype=bool)
    extent = resampled.GetExtent()
    gridExtent = grid.GetExtent()
    mask = np.zeros(shape, dtype=bool)
    low = [max(extent[2 * a], gridExtent[2 * a]) for a in range(3)]
    high = [min(extent[2 * a + 1], gridExtent[2 * a + 1]) for a in range(3)]
    if any(h < lo for lo, h in zip(low, high)):
        return mask
    source = array[low[2] - extent[4]:high[2] - extent[4] + 1, low[1] - extent[2]:high[1] - extent[2] + 1,
                   low[0] - extent[0]:high[0] - extent[0] + 1]
    mask[low[2] - gridExtent[4]:high[2] - gridExtent[4] + 1, low[1] - gridExtent[2]:high[1] - gridExtent[2] + 1,
         low[0] - gridExtent[0]:high[0] - gridExtent[0] + 1] = source == segment.GetLabelValue()
    return mask


def labelArrayOnVolume(volumeNode, segmentationNode, segmentValues, checkFit=True):
    """Class values (uint8, numpy order k, j, i) on the volume's voxel grid: each segment id in
    `segmentValues` painted with its value (later ones win where segments overlap).

    Pure VTK: no MRML node is created and nothing is added to any scene (Slicer's labelmap export
    would add a colour table to the user's scene). Parent transforms of the volume and of the
    segmentation are taken into account once each (linear transforms only).

    With checkFit, raises LTUDAError when a segment loses voxels on the volume's grid (drawn on
    another grid, or partly outside the volume), or a closed-surface segment falls outside it."""
    image = volumeNode.GetImageData()
    if image is None:
        raise LTUDAError(f"The volume '{volumeNode.GetName()}' has no image data.")
    dims = image.GetDimensions()
    out = np.zeros(tuple(reversed(dims)), dtype=np.uint8)
    if not segmentValues:
        return out
    grid = _volumeGridInSegmentationSpace(volumeNode, segmentationNode)
    segmentation = _labelmapSegmentation(segmentationNode, grid)
    isUsersOwn = segmentation is segmentationNode.GetSegmentation()
    for segmentId, value in segmentValues.items():
        mask = _maskOnGrid(segmentation, segmentId, grid, out.shape)
        if mask is None:
            raise LTUDAError(f"The segmentation '{segmentationNode.GetName()}' could not be resampled onto the "
                             f"volume '{volumeNode.GetName()}'.")
        if checkFit:
            name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
            own = segmentVoxelCount(segmentationNode, segmentId)
            if isUsersOwn and own >= 0 and int(mask.sum()) != own:
                raise LTUDAError(
                    f"The segment '{name}' of '{segmentationNode.GetName()}' does not fit the voxel grid of the "
                    f"volume '{volumeNode.GetName()}' ({own} voxels in the segmentation, {int(mask.sum())} on the "
                    "volume). " + (geometryProblem(volumeNode, segmentationNode) or
                                   "Pick the volume the segmentation was drawn on."))
            if not isUsersOwn and own != 0 and not mask.any():
                raise LTUDAError(
                    f"The segment '{name}' of '{segmentationNode.GetName()}' lies outside the volume "
                    f"'{volumeNode.GetName()}'. Pick the volume it was drawn on, or check the transforms of both.")
        out[mask] = value
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
