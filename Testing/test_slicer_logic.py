"""The Slicer module's logic against real MRML (slicer-core), without the Slicer application or Qt.

Cases from volume + segmentation nodes, the labelled/missing table, adding missing segments,
exporting a manifest that `ltuda dataset check` accepts, folder import, models, importing
predictions, and a real tiny training + prediction subprocess whose result is compared voxel by
voxel with the backend's own label output, on RAS and LPS volumes.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

import vtk  # noqa: E402

from LTUDASegmentationLib import export as exportModule  # noqa: E402
from LTUDASegmentationLib import jobs, organs, synthetic  # noqa: E402
from LTUDASegmentationLib.backend import Backend  # noqa: E402
from LTUDASegmentationLib.errors import LTUDAError  # noqa: E402
from LTUDASegmentationLib.folders import findImageLabelPairs, parseValueMap  # noqa: E402
from LTUDASegmentationLib.models import ModelRegistry, readModel  # noqa: E402
from LTUDASegmentationLib.progress import ProgressState  # noqa: E402
from LTUDASegmentationLib.results import importPrediction  # noqa: E402
from LTUDASegmentationLib.segments import (addSegmentForOrgan,  # noqa: E402
                                           labelArrayOnVolume, segmentTerminology, setSegmentFromMask,
                                           writeLabelFile, writeVolumeFile)
from LTUDASegmentationLib.settings import JsonSettings  # noqa: E402
from slicer_scene import new_logic, new_scene  # noqa: E402

ORGANS = ["liver", "spleen", "kidney"]
TINY = ["--iterations-per-epoch", "2", "--image-size", "32", "--batch-size", "2"]


def snapshot(volume, segmentation):
    """What must never change: node modification times, voxels, segment names/ids."""
    seg = segmentation.GetSegmentation()
    ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    return (volume.GetMTime(), segmentation.GetMTime(), slicer.util.arrayFromVolume(volume).tobytes(),
            [(i, seg.GetSegment(i).GetName()) for i in ids],
            [labelArrayOnVolume(volume, segmentation, {i: 1}).tobytes() for i in ids])


def ltuda(*args):
    return subprocess.run([sys.executable, "-m", "ltuda", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def readLabelFile(scene, path):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "reference")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


# --------------------------------------------------------------------------------------- organs
def test_organ_preset_terminology_and_matching():
    preset = organs.defaultOrgans()
    assert [o["name"] for o in preset] == ["liver", "spleen", "kidney", "pancreas"]
    assert [o["value"] for o in preset] == [1, 2, 3, 4]
    assert preset[0]["color"] == [221, 130, 101]
    tag = organs.terminologyTag(preset[0])
    assert tag.split("~")[2] == "SCT^10200004^Liver" and tag.split("~")[0].endswith("DICOM master list")
    # terminology first (a segment coded as liver is liver whatever its name), then name
    assert organs.matchOrgan(preset, "Segment_1", tag)["name"] == "liver"
    assert organs.matchOrgan(preset, "spleen", tag)["name"] == "liver"
    assert organs.matchOrgan(preset, "Kidney_left", "")["name"] == "kidney"
    assert organs.matchOrgan(preset, "right kidney", "")["name"] == "kidney"
    tissue = "Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue~SCT^85756007^Tissue~^^~~^^~^^"
    assert organs.matchOrgan(preset, "PANCREAS", tissue)["name"] == "pancreas"
    assert organs.matchOrgan(preset, "tumor", tissue) is None
    assert organs.validateOrgans(preset + [organs.organClass("Liver", 5)])[0].startswith("The organ 'liver' is listed twice")
    custom = organs.organClass("Psoas muscle", 5)
    assert custom["terminology"] is None and organs.terminologyTag(custom) == ""
    assert organs.organsFromJson(organs.organsToJson(preset)) == preset


# ---------------------------------------------------------------------------------------- cases
def test_case_table_labelled_empty_missing_and_summary(scene, logic):
    vA, sA = synthetic.addSyntheticCase(scene, "liverCase", ORGANS, ["liver"], seed=1)
    vB, sB = synthetic.addSyntheticCase(scene, "spleenCase", ORGANS, ["spleen"], flip=True, seed=2,
                                        segmentNames={"spleen": "Spleen"})
    logic.addCase(vA, sA)
    logic.addCase(vB, sB)
    assert logic.addCase(vA, sA) is logic.cases[0] and len(logic.cases) == 2  # no duplicates
    # an empty segment named after an organ does not count as labelled
    addSegmentForOrgan(sB, organs.organClass("kidney", 3))
    rows = logic.caseTable()
    assert [r["name"] for r in rows] == ["liverCase", "spleenCase"]
    assert rows[0]["organs"] == {"liver": "labelled", "spleen": "missing", "kidney": "missing"}
    assert rows[1]["organs"] == {"liver": "missing", "spleen": "labelled", "kidney": "empty"}
    summary = logic.labelSummary()
    assert summary["counts"] == {"liver": 1, "spleen": 1, "kidney": 0}
    assert summary["errors"] == ["No case labels 'kidney': label it in at least one case ('Add missing labels') "
                                 "or remove it from the organs."]
    assert logic.checkCanTrain() == summary["errors"]
    with pytest.raises(LTUDAError, match="No case labels 'kidney'"):
        logic.exportTrainingData(str(Path(logic.workFolder()) / "x"))
    # a segment that matches no organ: shown, and blocks training unless ignored
    tumour = sA.GetSegmentation().AddEmptySegment("", "tumour", [1, 1, 0])
    setSegmentFromMask(sA, tumour, np.pad(np.ones((2, 2, 2), bool), ((4, 6), (10, 28), (10, 28))),
                       _matrix(vA))
    logic.removeOrgan("kidney")
    assert logic.caseTable()[0]["unmatched"] == ["tumour"]
    assert any("'tumour' match no organ" in p for p in logic.checkCanTrain())
    assert logic.checkCanTrain(ignoreUnmatched=True) == []
    # removing a node from the scene drops its case
    scene.RemoveNode(sB)
    assert [r["name"] for r in logic.caseTable()] == ["liverCase"]


def _matrix(volume):
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return matrix


def test_add_case_rejects_bad_input_with_clear_messages(scene, logic):
    volume, segmentation = synthetic.addSyntheticCase(scene, "ct", ORGANS, ["liver"], seed=3)
    with pytest.raises(LTUDAError, match="has no segmentation"):
        logic.addCase(volume, None)
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    with pytest.raises(LTUDAError, match="not a label map"):
        logic.addCase(label, segmentation)
    # a segmentation drawn on another grid (other voxel size)
    other, otherSeg = synthetic.addSyntheticCase(scene, "other", ORGANS, ["liver"], seed=4)
    spacingChanged = _matrix(other)
    spacingChanged.SetElement(0, 0, 0.7)
    other.SetIJKToRASMatrix(spacingChanged)
    moved, movedSeg = synthetic.addSyntheticCase(scene, "moved", ORGANS, ["liver"], shape=(12, 20, 20), seed=5)
    with pytest.raises(LTUDAError, match="different image grid"):
        logic.addCase(other, segmentation)
    # a segmentation that reaches outside the (smaller) volume
    with pytest.raises(LTUDAError, match="lies outside the volume"):
        logic.addCase(moved, segmentation)
    assert logic.cases == []
    # a volume and a segmentation under different transforms
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(LTUDAError, match="different transforms"):
        logic.addCase(volume, segmentation)


def test_add_missing_segments_names_colours_terminology(scene, logic):
    volume, segmentation = synthetic.addSyntheticCase(scene, "ct", ORGANS, ["spleen"], seed=6)
    logic.addCase(volume, segmentation)
    added = logic.addMissingSegments(0)
    seg = segmentation.GetSegmentation()
    names = [seg.GetSegment(i).GetName() for i in added]
    assert names == ["liver", "kidney"]
    liver = seg.GetSegment(added[0])
    assert organs.colorFromFloat(liver.GetColor()) == [221, 130, 101]
    assert "SCT^10200004^Liver" in segmentTerminology(liver)
    assert logic.caseTable()[0]["organs"] == {"liver": "empty", "spleen": "labelled", "kidney": "empty"}
    assert logic.addMissingSegments(0) == []  # empty segments exist now: nothing more to add


# --------------------------------------------------------------------------------------- export
def test_export_writes_a_manifest_the_backend_accepts_and_leaves_nodes_untouched(scene, logic, tmp_path):
    cases = [synthetic.addSyntheticCase(scene, "ras", ORGANS, ["liver", "kidney"], seed=7),
             synthetic.addSyntheticCase(scene, "lps", ORGANS, ["spleen"], flip=True, seed=8),
             synthetic.addSyntheticCase(scene, "ras", ORGANS, ["kidney"], seed=9, segmentNames={"kidney": "Kidney_R"})]
    logic.addCasesFromNodes(cases)
    before = [snapshot(v, s) for v, s in cases]
    manifestPath = logic.exportTrainingData(str(tmp_path / "export"))
    assert [snapshot(v, s) for v, s in cases] == before
    doc = json.loads(Path(manifestPath).read_text(encoding="utf-8"))
    assert doc["schema"] == "ltuda-dataset" and doc["version"] == 1
    assert [(c["name"], c["value"]) for c in doc["classes"]] == [("liver", 1), ("spleen", 2), ("kidney", 3)]
    assert doc["classes"][0]["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    assert [c["id"] for c in doc["cases"]] == ["ras", "lps", "ras_2"]
    assert doc["cases"][0]["labels"] == {"1": "liver", "3": "kidney"}
    assert doc["cases"][0]["labeled"] == ["liver", "kidney"]
    assert doc["cases"][2]["labeled"] == ["kidney"] and doc["cases"][0]["image"] == "images/ras.nrrd"
    # the exported label map holds the class values, voxel for voxel, on the volume's grid
    for (volume, segmentation), entry in zip(cases, doc["cases"]):
        exported = slicer.util.arrayFromVolume(readLabelFile(scene, Path(manifestPath).parent / entry["label"]))
        seg = segmentation.GetSegmentation()
        expected = np.zeros_like(exported)
        for i in range(seg.GetNumberOfSegments()):
            organ = organs.matchOrgan(logic.organs, seg.GetNthSegment(i).GetName(), "")
            expected[labelArrayOnVolume(volume, segmentation, {seg.GetNthSegmentID(i): 1}) > 0] = organ["value"]
        assert np.array_equal(exported, expected) and exported.any()
    result = ltuda("dataset", "check", manifestPath)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "liver 1, spleen 1, kidney 2" in result.stdout


def test_export_refuses_when_the_disk_is_full(scene, logic, tmp_path, monkeypatch):
    logic.setOrgans(["liver"])
    logic.addCase(*synthetic.addSyntheticCase(scene, "ct", ORGANS, ["liver"], seed=10))

    class Usage:
        free = 1000

    monkeypatch.setattr(exportModule.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(LTUDAError, match="Not enough free disk space in the work folder"):
        logic.exportTrainingData(str(tmp_path / "full"))


def test_export_refuses_overlapping_organs_that_hide_one(scene, logic, tmp_path):
    logic.setOrgans(["liver", "spleen"])
    volume, segmentation = synthetic.addSyntheticCase(scene, "ct", ORGANS, ["liver"], seed=11)
    liverId = segmentation.GetSegmentation().GetNthSegmentID(0)
    spleen = addSegmentForOrgan(segmentation, organs.organClass("spleen", 2))
    liverMask = labelArrayOnVolume(volume, segmentation, {liverId: 1}) > 0
    # spleen drawn first in display order hides nothing, but the liver painted over all of it does
    setSegmentFromMask(segmentation, spleen, liverMask, _matrix(volume))
    segmentation.GetSegmentation().SetSegmentIndex(spleen, 0)
    logic.addCase(volume, segmentation)
    with pytest.raises(LTUDAError, match="hidden by other segments"):
        logic.exportTrainingData(str(tmp_path / "overlap"))


# ---------------------------------------------------------------------------------- folder import
def _writeFileDataset(scene, folder, layout):
    """A small dataset on disk: MSD layout (imagesTr/labelsTr) or LiTS flat names."""
    folder = Path(folder)
    paths = []
    for i in range(2):
        volume, segmentation = synthetic.addSyntheticCase(scene, f"src{i}", ORGANS, ["liver"], seed=20 + i)
        labels = labelArrayOnVolume(volume, segmentation, {segmentation.GetSegmentation().GetNthSegmentID(0): 1})
        labels[(labels == 1) & (np.arange(labels.shape[2]) % 3 == 0)] = 2  # "tumour" inside the liver
        if layout == "msd":
            image, label = folder / "imagesTr" / f"liver_{i}.nii.gz", folder / "labelsTr" / f"liver_{i}.nii.gz"
        else:
            image, label = folder / f"volume-{i}.nii", folder / f"segmentation-{i}.nii"
        image.parent.mkdir(parents=True, exist_ok=True)
        label.parent.mkdir(parents=True, exist_ok=True)
        writeVolumeFile(volume, image, compress=True)
        writeLabelFile(labels, volume, label)
        paths.append((image, label))
        scene.RemoveNode(volume)
        scene.RemoveNode(segmentation)
    if layout == "msd":
        (folder / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"macOS junk")
    return paths


@pytest.mark.parametrize("layout", ["msd", "lits"])
def test_import_folder_with_a_value_map(scene, logic, tmp_path, layout):
    data = tmp_path / "dataset"
    written = _writeFileDataset(scene, data, layout)
    pairs = findImageLabelPairs(data)
    assert [(Path(i), Path(lab)) for _n, i, lab in pairs] == written
    with pytest.raises(LTUDAError, match="'tumor' \\(label 2\\) is not one of the organs"):
        logic.importCaseFolder(data, "1=liver, 2=tumor")
    with pytest.raises(LTUDAError, match="not of the form"):
        parseValueMap("liver", logic.organs)
    added = logic.importCaseFolder(data, "1=liver; 2=liver")
    assert len(added) == 2 and logic.caseTable()[0]["organs"]["liver"] == "labelled"
    assert logic.caseTable()[0]["kind"] == "files"
    # a file case needs the other organs from somewhere: one scene case labels spleen and kidney
    logic.addCase(*synthetic.addSyntheticCase(scene, "scene", ORGANS, ["spleen", "kidney"], seed=30))
    manifestPath, outside = exportModule.exportTrainingData(logic.cases, logic.organs, tmp_path / "work")
    assert outside
    doc = json.loads(Path(manifestPath).read_text(encoding="utf-8"))
    assert doc["cases"][0]["labels"] == {"1": "liver", "2": "liver"} and doc["cases"][0]["labeled"] == ["liver"]
    result = ltuda("dataset", "check", manifestPath, "--allow-outside-paths")
    assert result.returncode == 0, result.stdout + result.stderr
    # "Add missing labels" on a file case loads it into the scene first
    segmentIds = logic.addMissingSegments(0)
    case = logic.cases[0]
    assert case.isScene and len(segmentIds) == 2
    assert logic.caseTable()[0]["organs"] == {"liver": "labelled", "spleen": "empty", "kidney": "empty"}
    liverId = case.segmentationNode.GetSegmentation().GetSegmentIdBySegmentName("liver")
    merged = labelArrayOnVolume(case.volumeNode, case.segmentationNode, {liverId: 1})
    original = slicer.util.arrayFromVolume(readLabelFile(scene, written[0][1]))
    assert np.array_equal(merged > 0, original > 0)


# ---------------------------------------------------------------------------------------- models
def _fakeModel(folder, version=1, weights=True):
    folder = Path(folder)
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps({
        "schema": "ltuda-model", "version": version, "ltuda_version": "9.9", "weights": "model.pt",
        "classes": organs.defaultOrgans(["liver"]), "default_head": "linear",
        "training": {"method": "ltuda", "preset": "fast", "completed": True},
        "validation": {"mean_dice": 0.8}}), encoding="utf-8")
    if weights:
        (folder / "model.pt").write_bytes(b"")
    return folder


def test_model_folders_are_checked_and_remembered(tmp_path):
    settings = JsonSettings(tmp_path / "settings.json")
    registry = ModelRegistry(settings)
    good = _fakeModel(tmp_path / "good")
    info = registry.add(good)
    assert info.organNames == ["liver"] and "Dice 0.80" in info.title()
    assert [m.path for m in ModelRegistry(JsonSettings(tmp_path / "settings.json")).models()] == [str(good)]
    with pytest.raises(LTUDAError, match="made by another version of LTUDA"):
        registry.add(_fakeModel(tmp_path / "future", version=2))
    with pytest.raises(LTUDAError, match="not an LTUDA model folder"):
        readModel(tmp_path)
    with pytest.raises(LTUDAError, match="no weights file"):
        readModel(_fakeModel(tmp_path / "noweights", weights=False))
    (good / "model.json").unlink()
    assert registry.models() == [] and registry.paths() == [str(good)]  # kept, but not offered


# -------------------------------------------------------------------------------- result import
@pytest.mark.parametrize("flip", [False, True], ids=["RAS", "LPS"])
def test_imported_prediction_is_a_new_named_coloured_segmentation(scene, tmp_path, flip):
    volume, truth = synthetic.addSyntheticCase(scene, "patient", ORGANS, ORGANS, flip=flip, seed=40)
    path = tmp_path / "prediction.seg.nrrd"
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(truth)
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "patient segmentation")
    first = importPrediction(scene, path, volume)
    second = importPrediction(scene, path, volume)
    assert (first.GetName(), second.GetName()) == ("patient segmentation 2", "patient segmentation 3")
    assert existing.GetSegmentation().GetNumberOfSegments() == 0
    seg = first.GetSegmentation()
    assert [seg.GetNthSegment(i).GetName() for i in range(3)] == ORGANS
    assert organs.colorFromFloat(seg.GetNthSegment(0).GetColor()) == [221, 130, 101]
    assert "SCT^64033007^Kidney" in segmentTerminology(seg.GetNthSegment(2))
    assert first.GetNodeReference(first.GetReferenceImageGeometryReferenceRole()) is volume
    for i in range(3):
        ours = labelArrayOnVolume(volume, first, {seg.GetNthSegmentID(i): 1})
        theirs = labelArrayOnVolume(volume, truth, {truth.GetSegmentation().GetNthSegmentID(i): 1})
        assert np.array_equal(ours, theirs) and ours.any()


def test_training_plot_nodes(scene, logic):
    progress = ProgressState()
    for e in ({"event": "start", "command": "train", "stages": [1, 2], "epochs": {"1": 2, "2": 2}},
              {"event": "epoch", "stage": 1, "epoch": 1, "epochs": 2, "loss": 1.5},
              {"event": "epoch", "stage": 2, "epoch": 1, "epochs": 2, "loss": 0.5},
              {"event": "validation", "stage": 2, "epoch": 1, "mean_dice": 0.7}):
        progress.feed(json.dumps(e))
    chart = logic.updateTrainingPlot(progress)
    assert logic.updateTrainingPlot(progress) is chart
    lossTable = scene.GetFirstNodeByName("LTUDA training loss").GetTable()
    assert lossTable.GetNumberOfRows() == 2 and lossTable.GetValue(1, 0).ToDouble() == 3.0
    assert scene.GetFirstNodeByName("LTUDA validation Dice").GetTable().GetValue(0, 1).ToDouble() == pytest.approx(0.7)
    assert chart.GetNumberOfPlotSeriesNodes() == 2


# --------------------------------------------------------------------------------------- backend
def test_backend_probe_and_environment(logic, tmp_path):
    result = logic.probeBackend()
    assert result.packages["torch"] and result.packages["ltuda"]
    assert result.ready() and result.missingMessage() == ""
    assert result.deviceText().startswith(("GPU:", "CPU only"))
    env = logic.backend().environment()
    assert env["PYTHONPATH"].split(os.pathsep)[0].endswith("LTUDATrainer")
    assert env["PYTHONIOENCODING"] == "utf-8"
    with pytest.raises(LTUDAError, match="is not a file"):
        logic.setBackendPython(str(tmp_path / "nope" / "python"))
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'ImportError: broken env' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(LTUDAError, match="could not run the package check .*broken env"):
        Backend(str(broken)).probe()


def test_missing_packages_are_explained():
    from LTUDASegmentationLib.backend import ProbeResult

    probe = ProbeResult({"python": "3.12", "packages": {"torch": None, "monai": "1.2.0", "SimpleITK": "2.4",
                                                        "numpy": "2.0", "pynrrd": "1.1", "ltuda": "0.1"},
                         "errors": {"torch": "ModuleNotFoundError: No module named 'torch'"}}, Backend())
    assert probe.missing() == ["torch", "monai"]
    assert "lacks torch, monai" in probe.missingMessage() and "Install missing packages" in probe.missingMessage()
    lines = dict(probe.lines())
    assert lines["torch: not installed"] is False and lines["monai 1.2.0: too old, 1.3 or newer is needed"] is False


# ------------------------------------------------------------------------ training and prediction
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real tiny training through the logic (seconds), shared by the tests below."""
    folder = tmp_path_factory.mktemp("trained")
    scene = new_scene()
    logic = new_logic(scene, folder, ORGANS)
    cases = [synthetic.addSyntheticCase(scene, "liverOnly", ORGANS, ["liver"], seed=50),
             synthetic.addSyntheticCase(scene, "spleenOnly", ORGANS, ["spleen"], flip=True, seed=51),
             synthetic.addSyntheticCase(scene, "kidneyOnly", ORGANS, ["kidney"], seed=52),
             synthetic.addSyntheticCase(scene, "all", ORGANS, ORGANS, flip=True, seed=53)]
    logic.addCasesFromNodes(cases)
    before = [snapshot(v, s) for v, s in cases]
    updates = []
    job = logic.train(preset="fast", epochsStage1=1, epochsStage2=1, device="cpu", extraArgs=TINY,
                      onUpdate=lambda j: updates.append(j.status))
    # the console API returns at once: the cases are exported in steps by job.process(), then the backend runs
    assert job.status == jobs.EXPORTING and not job.finished and job.runner is None
    status = job.wait(timeout=600)
    return {"logic": logic, "scene": scene, "job": job, "status": status, "cases": cases, "before": before,
            "updates": updates}


def test_real_training_subprocess(trained):
    job, logic = trained["job"], trained["logic"]
    assert trained["status"] == jobs.COMPLETED, job.message + "\n" + job.details
    assert job.progress.command == "train" and job.progress.lossHistory
    assert job.progress.stages == [1, 2] and job.fraction() == 1.0
    assert jobs.RUNNING in trained["updates"]
    assert [m.path for m in logic.models()] == [job.modelDir]
    assert readModel(job.modelDir).organNames == ORGANS
    assert not os.path.exists(job.workDir)  # exported files are removed after a successful training
    assert [snapshot(v, s) for v, s in trained["cases"]] == trained["before"]
    with pytest.raises(LTUDAError, match="already holds a model"):
        logic.train(job.modelDir, extraArgs=TINY)


@pytest.mark.parametrize("caseIndex", [0, 1], ids=["RAS", "LPS"])
def test_real_prediction_matches_backend_output_voxel_for_voxel(trained, caseIndex):
    logic, scene = trained["logic"], trained["scene"]
    assert trained["status"] == jobs.COMPLETED
    volume, segmentation = trained["cases"][caseIndex]
    before = snapshot(volume, segmentation)
    job = logic.predict(volume, device="cpu", keepLabelMap=True)
    assert job.status == jobs.COMPLETED, job.message
    node = job.segmentationNode
    assert node.GetName() == f"{volume.GetName()} segmentation" and node is not segmentation
    seg = node.GetSegmentation()
    model = readModel(logic.models()[0].path)
    assert [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())] == model.organNames
    for i, cls in enumerate(model.classes):
        assert organs.colorFromFloat(seg.GetNthSegment(i).GetColor()) == cls["color"]
        assert cls["terminology"]["type"][1] in segmentTerminology(seg.GetNthSegment(i))
    expected = slicer.util.arrayFromVolume(readLabelFile(scene, job.labelMapPath))
    values = {seg.GetNthSegmentID(i): model.classes[i]["value"] for i in range(seg.GetNumberOfSegments())}
    imported = labelArrayOnVolume(volume, node, values)
    assert imported.shape == expected.shape
    assert np.array_equal(imported, expected)
    assert snapshot(volume, segmentation) == before
    if caseIndex == 0:  # again: a second, new node; the first one is not overwritten
        again = logic.predict(volume, device="cpu").segmentationNode
        assert again.GetName() == f"{volume.GetName()} segmentation 2"
        assert np.array_equal(labelArrayOnVolume(volume, node, values), expected)


def test_backend_failure_reaches_the_console_with_the_log_path(trained, tmp_path):
    logic = trained["logic"]
    with pytest.raises(LTUDAError) as caught:
        logic.train(str(tmp_path / "model"), device="cpu", extraArgs=["--image-size", "30"], waitForCompletion=True)
    message = str(caught.value)
    assert "Training failed" in message and "multiple of 16" in message and "ltuda-train.log" in message
    assert logic.trainingJob.status == jobs.FAILED and logic.trainingJob.message == message
    with pytest.raises(LTUDAError, match="another version of LTUDA"):
        logic.predict(trained["cases"][0][0], model=str(_fakeModel(tmp_path / "v2", version=2)))


def test_cancel_training_keeps_a_usable_state(trained, tmp_path):
    logic = trained["logic"]
    job = logic.train(str(tmp_path / "long"), device="cpu", epochsStage1=50, epochsStage2=50,
                      extraArgs=["--iterations-per-epoch", "4", "--image-size", "32", "--batch-size", "2"])
    deadline = time.monotonic() + 300
    while job.progress.epoch is None and not job.finished and time.monotonic() < deadline:
        job.process()
        time.sleep(0.1)
    assert job.progress.epoch is not None, job.message
    job.cancel()
    assert job.wait(timeout=120) == jobs.CANCELLED
    assert job.message.startswith("Training cancelled")
    assert job.returncode == 130  # the trainer stopped on SIGTERM by itself, no kill was needed
    assert not job.runner.killed
    if os.path.isfile(os.path.join(job.modelDir, "model.json")):
        assert "usable" in job.message and job.modelDir in [m.path for m in logic.models()]
    else:
        assert "no model was saved" in job.message



# ------------------------------------------------------------------------------ scene untouched
def nodeCounts(scene):
    """{class name: number of nodes} of the scene."""
    counts = {}
    for i in range(scene.GetNumberOfNodes()):
        name = scene.GetNthNode(i).GetClassName()
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_export_train_and_predict_leave_the_scene_untouched(scene, logic, tmp_path):
    """User nodes are only read: exporting, training and predicting add no node to the user's scene
    (no colour table, no label map), apart from the one new result segmentation and its display node."""
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)  # the application always has one
    cases = [synthetic.addSyntheticCase(scene, "liverSpleen", ORGANS, ["liver", "spleen"], seed=60),
             synthetic.addSyntheticCase(scene, "kidneyLiver", ORGANS, ["kidney", "liver"], flip=True, seed=61)]
    logic.addCasesFromNodes(cases)
    before = nodeCounts(scene)
    logic.exportTrainingData(str(tmp_path / "export"))
    assert nodeCounts(scene) == before
    job = logic.train(str(tmp_path / "model"), device="cpu", epochsStage1=1, epochsStage2=1, extraArgs=TINY,
                      waitForCompletion=True)
    assert job.status == jobs.COMPLETED, job.message
    assert nodeCounts(scene) == before
    result = logic.predict(cases[0][0], model=job.modelDir, device="cpu").segmentationNode
    after = nodeCounts(scene)
    added = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
    assert {k: v for k, v in added.items() if v} == {"vtkMRMLSegmentationNode": 1,
                                                     "vtkMRMLSegmentationDisplayNode": 1}
    assert result.GetSegmentation().GetNumberOfSegments() == len(ORGANS)


# ------------------------------------------------------------------------------------ transforms
TRANSFORMS = {
    "translated": (0.0, (30.0, -12.0, 7.5)),
    "rotated": (30.0, (0.0, 0.0, 0.0)),
    "rotated+translated": (-50.0, (25.0, 40.0, -10.0)),
}


def _transformNode(scene, kind):
    angle, shift = TRANSFORMS[kind]
    transform = vtk.vtkTransform()
    transform.Translate(*shift)
    transform.RotateWXYZ(angle, 0.3, 0.2, 1.0)  # an oblique axis: not a permutation of voxel axes
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", kind)
    node.SetMatrixTransformToParent(transform.GetMatrix())
    return node


def _toClosedSurface(segmentation):
    segmentation.CreateClosedSurfaceRepresentation()
    seg = segmentation.GetSegmentation()
    closedSurface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    (getattr(seg, "SetSourceRepresentationName", None) or seg.SetMasterRepresentationName)(closedSurface)
    seg.RemoveRepresentation(slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName())


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.parametrize("source", ["labelmap", "closedSurface"])
@pytest.mark.parametrize("kind", list(TRANSFORMS))
def test_export_under_a_parent_transform_matches_the_untransformed_labels(scene, logic, tmp_path, kind, source):
    """Volume and segmentation under the same transform (translated, rotated, both): the exported
    labels equal those without the transform. And with the segmentation's transform hardened
    (segmentation in world coordinates, volume still under the transform) they still match."""
    logic.setOrgans(["liver", "spleen"])
    volume, segmentation = synthetic.addSyntheticCase(scene, "ct", ORGANS, ["liver", "spleen"], seed=70)
    seg = segmentation.GetSegmentation()
    values = {seg.GetNthSegmentID(0): 1, seg.GetNthSegmentID(1): 2}
    original = labelArrayOnVolume(volume, segmentation, values)
    if source == "closedSurface":
        _toClosedSurface(segmentation)
    reference = labelArrayOnVolume(volume, segmentation, values)  # no transform yet
    assert _dice(reference == 1, original == 1) > 0.9 and _dice(reference == 2, original == 2) > 0.8
    if source == "labelmap":
        assert np.array_equal(reference, original)

    transform = _transformNode(scene, kind)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    segmentation.SetAndObserveTransformNodeID(transform.GetID())
    assert np.array_equal(labelArrayOnVolume(volume, segmentation, values), reference)
    # through the logic, as Start does: the label file written for training holds the same labels
    logic.addCase(volume, segmentation)
    manifestPath = logic.exportTrainingData(str(tmp_path / "export"))
    entry = json.loads(Path(manifestPath).read_text(encoding="utf-8"))["cases"][0]
    exported = slicer.util.arrayFromVolume(readLabelFile(scene, Path(manifestPath).parent / entry["label"]))
    assert np.array_equal(exported, reference)

    # the segmentation hardened into world coordinates, the volume still under the transform
    segmentation.HardenTransform()
    assert segmentation.GetParentTransformNode() is None
    hardened = labelArrayOnVolume(volume, segmentation, values, checkFit=source == "closedSurface")
    for value in (1, 2):
        assert _dice(hardened == value, reference == value) > (0.999 if kind == "translated" else 0.9)


def test_closed_surface_outside_the_volume_is_reported_as_such(scene):
    volume, segmentation = synthetic.addSyntheticCase(scene, "ct", ORGANS, ["liver"], seed=71)
    _toClosedSurface(segmentation)
    away = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "away")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 500.0)
    away.SetMatrixTransformToParent(matrix)
    segmentation.SetAndObserveTransformNodeID(away.GetID())
    with pytest.raises(LTUDAError, match="'liver' of 'ct labels' lies outside the volume 'ct'"):
        labelArrayOnVolume(volume, segmentation, {segmentation.GetSegmentation().GetNthSegmentID(0): 1})


def _referenceGeometryToWorld(segmentationNode):
    """IJK->world matrix (4x4 array) of the segmentation's reference image geometry."""
    geometry = slicer.vtkOrientedImageData()
    text = segmentationNode.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, geometry)
    local = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(local)
    toWorld = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(segmentationNode.GetParentTransformNode(), None, toWorld)
    return _matrixToArray(toWorld) @ _matrixToArray(local), geometry.GetExtent()


def _matrixToArray(matrix):
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


@pytest.mark.parametrize("kind", ["translated", "rotated+translated"])
def test_imported_prediction_overlays_a_transformed_volume_in_world_coordinates(scene, tmp_path, kind):
    volume, truth = synthetic.addSyntheticCase(scene, "patient", ORGANS, ["liver", "spleen"], seed=72)
    path = tmp_path / "prediction.seg.nrrd"  # what the backend writes: the volume's own (local) geometry
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(truth)
    truthIds = [truth.GetSegmentation().GetNthSegmentID(i) for i in range(2)]
    expected = [labelArrayOnVolume(volume, truth, {i: 1}) for i in truthIds]
    transform = _transformNode(scene, kind)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    node = importPrediction(scene, path, volume, show3D=False)
    assert node.GetParentTransformNode() is transform
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume
    volumeToWorld = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(transform, None, volumeToWorld)
    volumeGrid = _matrixToArray(volumeToWorld) @ _matrix_array(volume)
    segmentationGrid, extent = _referenceGeometryToWorld(node)
    assert np.allclose(segmentationGrid, volumeGrid, atol=1e-4), (segmentationGrid, volumeGrid)
    assert extent == volume.GetImageData().GetExtent()
    # the segments themselves lie on the volume's voxels
    seg = node.GetSegmentation()
    for i in range(2):
        ours = labelArrayOnVolume(volume, node, {seg.GetNthSegmentID(i): 1})
        assert np.array_equal(ours, expected[i]) and ours.any()


def _matrix_array(volume):
    return _matrixToArray(_matrix(volume))


# ------------------------------------------------------------------------------------ scan cache
def test_case_scan_is_cached_until_a_node_changes(scene, logic, monkeypatch):
    """updateButtonStates asks for the case table on every parameter change and progress tick: a
    case is scanned again only when its volume, segmentation, a segment, a transform or the organs change."""
    from LTUDASegmentationLib import logic as logicModule

    scans = []
    realScan = logicModule.scanCase

    def countingScan(case, organs, *args, **kwargs):
        scans.append(case.name)
        return realScan(case, organs, *args, **kwargs)

    monkeypatch.setattr(logicModule, "scanCase", countingScan)
    volume, segmentation = synthetic.addSyntheticCase(scene, "ct", ORGANS, ["liver"], seed=90)
    other = synthetic.addSyntheticCase(scene, "other", ORGANS, ["spleen", "kidney"], seed=91)
    logic.addCase(volume, segmentation)
    logic.addCase(*other)
    scans.clear()
    for _ in range(3):
        logic.checkCanTrain()
        logic.caseTable()
    assert sorted(scans) == ["ct", "other"]

    def rescanned(change):
        scans.clear()
        change()
        table = logic.caseTable()
        logic.checkCanTrain()
        assert scans == ["ct"], scans  # only the changed case, once
        return table[0]

    seg = segmentation.GetSegmentation()
    spleen = rescanned(lambda: addSegmentForOrgan(segmentation, organs.organClass("spleen", 2)))
    assert spleen["organs"]["spleen"] == "empty"
    spleenId = seg.GetSegmentIdBySegmentName("spleen")
    mask = labelArrayOnVolume(volume, segmentation, {seg.GetNthSegmentID(0): 1}) > 0
    painted = rescanned(lambda: setSegmentFromMask(segmentation, spleenId, mask, _matrix(volume)))
    assert painted["organs"]["spleen"] == "labelled"
    seg.GetSegment(spleenId).SetTerminology("")  # matched by name from now on
    renamed = rescanned(lambda: seg.GetSegment(spleenId).SetName("tumour"))
    assert renamed["unmatched"] == ["tumour"] and renamed["organs"]["spleen"] == "missing"
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    moved = rescanned(lambda: volume.SetAndObserveTransformNodeID(transform.GetID()))
    assert any("different transforms" in p for p in moved["problems"])
    scans.clear()
    logic.removeOrgan("kidney")
    logic.caseTable()
    assert sorted(scans) == ["ct", "other"]  # another organ list: every case again
