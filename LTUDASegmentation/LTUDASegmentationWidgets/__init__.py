"""The panel of the LTUDASegmentation module, one class per section of the .ui.

panel: what the sections share (ui, logic, parameter node, messages, wait cursor).
setupsection, organssection, casessection, trainsection, segmentsection: each wires its own widgets
to the logic. annotationloop: the annotation-loop group inside the Training cases section. LTUDASegmentationWidget (LTUDASegmentation.py) only composes them.

These modules import qt and slicer; everything that runs without Qt stays in LTUDASegmentationLib.
"""

# Order matters for reloading in Slicer ("Reload" button): dependencies first.
SUBMODULES = ["panel", "setupsection", "organssection", "casessection", "annotationloop", "trainsection",
              "segmentsection"]
