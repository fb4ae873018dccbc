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


class ClosedSurfaceSteps:
    """Build the 3D (closed surface) representation of a segmentation one segment per step(), so
    the GUI thread is blocked for one organ at a time, not for all of them after an import.

    Each segment is converted in a private vtkSegmentation (no MRML node, no scene) with the node's
    own conversion parameters; its surface is then added to the node's segment. step() returns True
    when every segment has its surface."""

    def __init__(self, segmentationNode):
        self.node = segmentationNode
        segmentation = segmentationNode.GetSegmentation()
        self.segmentIds = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        self.done = 0

    def fraction(self):
        return self.done / len(self.segmentIds) if self.segmentIds else 1.0

    def statusText(self):
        return f"Building the 3D view: organ {min(self.done + 1, len(self.segmentIds))} of {len(self.segmentIds)}..."

    def step(self):
        segmentation = self.node.GetSegmentation() if self.node.GetScene() is not None else None
        if segmentation is None:  # the node was removed meanwhile: nothing left to build
            return True
        closed = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
        if self.done < len(self.segmentIds):
            segmentId = self.segmentIds[self.done]
            self.done += 1
            segment = segmentation.GetSegment(segmentId)
            if segment is not None and segment.GetRepresentation(closed) is None:
                private = slicer.vtkSegmentation()
                private.SetSourceRepresentationName(segmentation.GetSourceRepresentationName())
                private.CopyConversionParameters(segmentation)
                private.CopySegmentFromSegmentation(segmentation, segmentId)
                if private.CreateRepresentation(closed):
                    surface = private.GetSegment(segmentId).GetRepresentation(closed)
                    if surface is not None:
                        segment.AddRepresentation(closed, surface)
            if self.done < len(self.segmentIds):
                return False
        # every segment has its surface: the segmentation now contains the representation, so this
        # converts nothing; it only tells the views (and the display node) that it exists
        self.node.CreateClosedSurfaceRepresentation()
        segmentation.InvokeEvent(slicer.vtkSegmentation.ContainedRepresentationNamesModified)
        self.node.Modified()
        return True
