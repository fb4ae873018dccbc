"""A real headless MRML scene and the module's logic on it (slicer-core), for the slicer_* tests.

The conftest fixtures `scene` and `logic` use these; module-scoped fixtures call them directly.
"""

import sys
from pathlib import Path

import slicer

from LTUDASegmentationLib.logic import LTUDALogicCore
from LTUDASegmentationLib.segments import ensureSegmentationConverters
from LTUDASegmentationLib.settings import JsonSettings


def new_scene():
    """An empty scene, also set as slicer.mrmlScene, which slicer.util's helpers read."""
    ensureSegmentationConverters()
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    return scene


def new_logic(scene, folder, organs=None):
    """The module's logic with its settings, work and model folders under `folder` and the backend run
    on this Python."""
    folder = Path(folder)
    settings = JsonSettings(folder / "settings.json")
    settings.setValue("WorkFolder", str(folder / "work"))
    settings.setValue("ModelsFolder", str(folder / "models"))
    settings.setValue("BackendPython", sys.executable)
    logic = LTUDALogicCore(scene, settings)
    if organs is not None:
        logic.setOrgans(list(organs))
    return logic
