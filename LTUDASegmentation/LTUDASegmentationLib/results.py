"""Bring a prediction (`.seg.nrrd` written by `ltuda predict`) into the scene as a NEW segmentation.

The file already carries one segment per organ with the model's names, colours and terminology and
the input volume's exact geometry; it is read into a new vtkMRMLSegmentationNode named
"<volume name> segmentation" (made unique), linked to the volume as its reference geometry and
placed next to it in the subject hierarchy. No existing node is modified.
"""

import slicer

from .errors import LTUDAError
from .segments import ensureSegmentationConverters, readSegmentationFile


def uniqueNodeName(scene, base):
    if scene.GetFirstNodeByName(base) is None:
        return base
    n = 2
    while scene.GetFirstNodeByName(f"{base} {n}") is not None:
        n += 1
    return f"{base} {n}"


def importPrediction(scene, segPath, volumeNode, name=None, show3D=True):
    """New segmentation node read from segPath, aligned to volumeNode; returns the node."""
    ensureSegmentationConverters()
    base = name or f"{volumeNode.GetName()} segmentation"
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", uniqueNodeName(scene, base))
    try:
        node.CreateDefaultDisplayNodes()
        readSegmentationFile(segPath, node)
        # The transform first: the geometry setter maps the volume's grid into the segmentation's
        # coordinates (through both parent transforms) and adds the reference-geometry reference itself.
        if volumeNode.GetParentTransformNode() is not None:
            node.SetAndObserveTransformNodeID(volumeNode.GetParentTransformNode().GetID())
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        if node.GetSegmentation().GetNumberOfSegments() == 0:
            raise LTUDAError(f"The prediction {segPath} contains no segment.")
        if show3D:
            node.CreateClosedSurfaceRepresentation()
        _placeNextTo(scene, node, volumeNode)
    except Exception:
        scene.RemoveNode(node)
        raise
    return node


def _placeNextTo(scene, node, volumeNode):
    try:
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        volumeItem = shNode.GetItemByDataNode(volumeNode)
        nodeItem = shNode.GetItemByDataNode(node)
        if volumeItem and nodeItem:
            shNode.SetItemParent(nodeItem, shNode.GetItemParent(volumeItem))
    except Exception:  # subject hierarchy is a convenience, never a reason to fail
        pass
