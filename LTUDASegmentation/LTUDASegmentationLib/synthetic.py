"""Tiny synthetic abdominal "CT" cases in the scene, for the self-test and the pytest suite.

Each organ is an ellipsoid of its own HU value in a body of soft tissue; a case labels only the
organs it is asked to label (partially labelled, like one public dataset per organ).
"""

import numpy as np
import vtk

from .organs import organClass
from .segments import addSegmentForOrgan, ensureSegmentationConverters, setSegmentFromMask

# organ -> (centre as fractions of (k, j, i), radii as fractions, HU)
_LAYOUT = {
    "liver": ((0.5, 0.45, 0.3), (0.35, 0.22, 0.18), 60.0),
    "spleen": ((0.5, 0.45, 0.75), (0.25, 0.12, 0.1), 110.0),
    "kidney": ((0.5, 0.7, 0.5), (0.25, 0.1, 0.1), 160.0),
    "pancreas": ((0.5, 0.3, 0.55), (0.15, 0.07, 0.14), 30.0),
}


def organMasks(shape, organNames, seed=0):
    """{organ: bool mask} of non-overlapping ellipsoids (shape in numpy order k, j, i)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    masks, taken = {}, np.zeros(shape, dtype=bool)
    for name in organNames:
        centre, radii, _hu = _LAYOUT.get(name, ((0.5, 0.5, 0.5), (0.15, 0.1, 0.1), 90.0))
        centre = [c + rng.uniform(-0.03, 0.03) for c in centre]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0
        masks[name] = inside & ~taken
        taken |= inside
    return masks


def ijkToRas(spacing=(1.5, 1.5, 2.5), flip=False, origin=(0.0, 0.0, 0.0)):
    """4x4 IJK->RAS: RAS-aligned axes, or LPS-aligned (x and y flipped) with flip=True."""
    sign = -1.0 if flip else 1.0
    matrix = np.diag([sign * spacing[0], sign * spacing[1], spacing[2], 1.0])
    matrix[:3, 3] = origin
    return matrix


def addSyntheticCase(scene, name, organNames, labelled, shape=(12, 40, 40), flip=False, seed=0,
                     segmentNames=None):
    """(volume node, segmentation node) in `scene`: every organ in organNames is in the image, the
    segmentation has a segment for each organ in `labelled` (named per segmentNames or the organ)."""
    ensureSegmentationConverters()
    masks = organMasks(shape, organNames, seed)
    rng = np.random.default_rng(seed + 1)
    body = np.full(shape, -1000.0)
    _, jj, ii = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body[(jj / 0.95) ** 2 + (ii / 0.95) ** 2 <= 1.0] = 20.0
    for organ, mask in masks.items():
        body[mask] = _LAYOUT.get(organ, (None, None, 90.0))[2]
    image = (body + rng.normal(0, 5, shape)).astype(np.int16)

    matrix = vtk.vtkMatrix4x4()
    for r, row in enumerate(ijkToRas(flip=flip)):
        for c, value in enumerate(row):
            matrix.SetElement(r, c, value)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    volume.SetIJKToRASMatrix(matrix)
    _setArray(volume, image)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} labels")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for index, organ in enumerate(labelled):
        cls = organClass(organ, index + 1)
        if segmentNames and organ in segmentNames:
            cls = dict(cls, name=segmentNames[organ], terminology=None)
        segmentId = addSegmentForOrgan(segmentation, cls)
        setSegmentFromMask(segmentation, segmentId, masks[organ], matrix)
    return volume, segmentation


def _setArray(volumeNode, array):
    from vtk.util import numpy_support

    array = np.ascontiguousarray(array)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    vtkArray = numpy_support.numpy_to_vtk(array.ravel(), deep=True,
                                          array_type=numpy_support.get_vtk_array_type(array.dtype))
    image.GetPointData().SetScalars(vtkArray)
    volumeNode.SetAndObserveImageData(image)
