"""Issue 13, defect 6: export and import without freezing Slicer's GUI thread (real MRML, slicer-core).

The training export reads one case per job.process() call through VTK/MRML and hands numpy arrays
to a writer thread (nrrdfile.py). These tests check that the files it writes hold exactly what
Slicer's own writer wrote before (voxels, type, geometry, as read back by Slicer and by SimpleITK,
which the backend uses), that Cancel during the export leaves no file and an untouched scene, that
train() returns before any case is read, and that an imported prediction gets its 3D surfaces one
organ per step. How long the GUI thread is blocked is measured by benchmarks/slicer_main_thread.py.
"""

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

import vtk  # noqa: E402

from LTUDASegmentationLib import export as exportModule  # noqa: E402
from LTUDASegmentationLib import jobs, nrrdfile, synthetic  # noqa: E402
from LTUDASegmentationLib.runner import ProcessRunner  # noqa: E402
from LTUDASegmentationLib.segments import (labelArrayOnVolume,  # noqa: E402
                                           volumeIjkToRas, writeLabelFile, writeVolumeFile)

ORGANS = ["liver", "spleen", "kidney"]


def nodeCounts(scene):
    counts = {}
    for i in range(scene.GetNumberOfNodes()):
        name = scene.GetNthNode(i).GetClassName()
        counts[name] = counts.get(name, 0) + 1
    return counts


def userState(cases):
    return [(v.GetMTime(), s.GetMTime(), slicer.util.arrayFromVolume(v).tobytes(),
             s.GetSegmentation().GetNumberOfSegments()) for v, s in cases]


def _oblique(volume):
    """Give a volume an oblique, anisotropic, off-origin grid (not a permutation of RAS axes)."""
    transform = vtk.vtkTransform()
    transform.Translate(-120.5, 33.25, 410.0)
    transform.RotateWXYZ(23.0, 0.4, -0.3, 1.0)
    transform.Scale(0.7, 0.9, 3.0)
    volume.SetIJKToRASMatrix(transform.GetMatrix())


def _readWithSlicer(path):
    scratch = slicer.vtkMRMLScene()
    node = scratch.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "read")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node), path
    array = slicer.util.arrayFromVolume(node).copy()
    matrix = volumeIjkToRas(node)
    scratch.Clear(1)
    return array, matrix


def _readWithSimpleITK(path):
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return (sitk.GetArrayFromImage(image), image.GetPixelIDTypeAsString(), np.array(image.GetOrigin()),
            np.array(image.GetSpacing()), np.array(image.GetDirection()))


def _sameFile(ours, slicers):
    a, matrixA = _readWithSlicer(ours)
    b, matrixB = _readWithSlicer(slicers)
    assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), ours
    np.testing.assert_allclose(matrixA, matrixB, rtol=0, atol=1e-9)
    sa, sb = _readWithSimpleITK(ours), _readWithSimpleITK(slicers)
    assert np.array_equal(sa[0], sb[0]) and sa[1] == sb[1], ours
    for x, y in zip(sa[2:], sb[2:]):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-9)


def test_export_through_the_writer_thread_writes_what_slicers_writer_wrote(scene, logic, tmp_path):
    cases = [synthetic.addSyntheticCase(scene, "ras", ORGANS, ["liver", "spleen"], seed=1),
             synthetic.addSyntheticCase(scene, "lps", ORGANS, ["kidney"], flip=True, seed=2),
             synthetic.addSyntheticCase(scene, "oblique", ORGANS, ORGANS, seed=3)]
    _oblique(cases[2][0])
    cases[2][1].SetReferenceImageGeometryParameterFromVolumeNode(cases[2][0])
    shifted = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 30.0)
    shifted.SetMatrixTransformToParent(matrix)
    for node in cases[1]:
        node.SetAndObserveTransformNodeID(shifted.GetID())
    # the oblique case's segments were painted on the old grid: paint them again on the new one
    seg = cases[2][1]
    for i in range(seg.GetSegmentation().GetNumberOfSegments()):
        segmentId = seg.GetSegmentation().GetNthSegmentID(i)
        mask = synthetic.organMasks((12, 40, 40), ORGANS, 3)[seg.GetSegmentation().GetSegment(segmentId).GetName()]
        synthetic.setSegmentFromMask(seg, segmentId, mask, _ijk(cases[2][0]))
    logic.addCasesFromNodes(cases)
    manifest = logic.exportTrainingData(str(tmp_path / "export"))
    folder = Path(manifest).parent
    assert not list(folder.rglob("*.part"))
    values = {o["name"]: o["value"] for o in logic.organs}
    for (volume, segmentation), caseId in zip(cases, ["ras", "lps", "oblique"]):
        writeVolumeFile(volume, tmp_path / f"{caseId}-slicer.nrrd", compress=False)
        _sameFile(folder / "images" / f"{caseId}.nrrd", tmp_path / f"{caseId}-slicer.nrrd")
        segs = segmentation.GetSegmentation()
        segmentValues = {segs.GetNthSegmentID(i): values[segs.GetNthSegment(i).GetName()]
                         for i in range(segs.GetNumberOfSegments())}
        labels = labelArrayOnVolume(volume, segmentation, segmentValues)
        writeLabelFile(labels, volume, tmp_path / f"{caseId}-labels-slicer.nrrd", compress=True)
        _sameFile(folder / "labels" / f"{caseId}.nrrd", tmp_path / f"{caseId}-labels-slicer.nrrd")
        assert set(np.unique(labels)) - {0} == set(segmentValues.values())
    header = (folder / "labels" / "ras.nrrd").read_bytes().split(b"\n\n", 1)[0].decode()
    assert "encoding: gzip" in header and "type: unsigned char" in header  # labels compressed, as before
    assert "encoding: raw" in (folder / "images" / "ras.nrrd").read_bytes()[:600].decode(errors="replace")


def _ijk(volume):
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return matrix


def test_train_returns_before_reading_any_case_and_reads_one_case_per_step(scene, logic, monkeypatch):
    cases = [synthetic.addSyntheticCase(scene, f"c{i}", ORGANS, [ORGANS[i % 3]], seed=10 + i) for i in range(4)]
    logic.addCasesFromNodes(cases)
    reads = []
    realRead = exportModule._readSceneCase
    monkeypatch.setattr(exportModule, "_readSceneCase", lambda *a: reads.append(a[0]) or realRead(*a))
    job = logic.train(device="cpu", epochsStage1=1, epochsStage2=1, checkBackend=False,
                      extraArgs=["--iterations-per-epoch", "1", "--image-size", "32", "--batch-size", "2"])
    try:
        assert job.status == jobs.EXPORTING and reads == [] and job.runner is None
        assert not list(Path(job.workDir).rglob("*.nrrd"))
        perCall = []
        while job.status == jobs.EXPORTING:
            count = len(reads)
            job.process()
            perCall.append(len(reads) - count)
            time.sleep(0.01)
        assert max(perCall) == 1 and sum(perCall) == 4, perCall
        assert job.status in (jobs.RUNNING, jobs.COMPLETED, jobs.FAILED) and job.runner is not None
        assert os.path.isfile(os.path.join(job.workDir, "dataset.json"))
    finally:
        logic.stopAll()


def test_cancel_during_the_export_leaves_no_file_and_the_scene_untouched(scene, logic, monkeypatch):
    cases = [synthetic.addSyntheticCase(scene, f"c{i}", ORGANS, ORGANS[: 1 + i % 3], shape=(30, 80, 80),
                                        seed=20 + i) for i in range(4)]
    logic.addCasesFromNodes(cases)
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    counts, state = nodeCounts(scene), userState(cases)
    writing = threading.Event()
    realWrite = nrrdfile.writeNrrd

    def slowWrite(path, array, ijkToRas, compress=False, cancelled=None):
        def slowCancelled():  # a slow disk: each chunk takes a while
            writing.set()
            time.sleep(0.005)
            return cancelled()

        return realWrite(path, array, ijkToRas, compress=compress, cancelled=slowCancelled)

    monkeypatch.setattr(nrrdfile, "writeNrrd", slowWrite)
    monkeypatch.setattr(nrrdfile, "CHUNK_BYTES", 8192)
    job = logic.train(device="cpu", checkBackend=False)
    workDir = Path(job.workDir)
    while not writing.is_set():
        job.process()
        time.sleep(0.01)
    assert job.status == jobs.EXPORTING
    assert list(workDir.rglob("*.part")), "cancel must hit a file being written"
    job.cancel()
    assert job.status == jobs.CANCELLED and job.runner is None, job.status
    assert "exporting" in job.message and "no file" in job.message
    assert not workDir.exists(), list(workDir.rglob("*"))
    assert not [p for p in Path(logic.workFolder()).rglob("*") if p.is_file()]
    assert nodeCounts(scene) == counts and userState(cases) == state
    # the cases can be exported again after a cancel
    assert logic.exportTrainingData() and nodeCounts(scene) == counts


def test_imported_prediction_gets_its_3d_surfaces_one_organ_per_step(scene, logic, tmp_path):
    volume, truth = synthetic.addSyntheticCase(scene, "ct", ORGANS, ORGANS, shape=(20, 60, 60), seed=30)
    segPath = tmp_path / "result.seg.nrrd"
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(segPath))
    assert storage.WriteData(truth)
    reference = truth.GetSegmentation()
    closed = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    truth.CreateClosedSurfaceRepresentation()
    from LTUDASegmentationLib.results import ClosedSurfaceSteps, importPrediction

    def onSuccess(job):
        job.segmentationNode = importPrediction(scene, segPath, volume, show3D=False)
        return ClosedSurfaceSteps(job.segmentationNode)

    done = '{"event": "done", "status": "completed"}'
    job = jobs.PredictionJob(ProcessRunner([sys.executable, "-c", f"print('{done}')"]), volume, str(segPath),
                             onSuccess=onSuccess).start()
    surfaces = []
    while not job.finished:
        job.process()
        node = job.segmentationNode
        if node is not None:
            seg = node.GetSegmentation()
            surfaces.append(sum(seg.GetNthSegment(i).GetRepresentation(closed) is not None
                                for i in range(seg.GetNumberOfSegments())))
            if not job.finished:
                assert job.status == jobs.IMPORTING and "3D view" in job.statusText()
        time.sleep(0.01)
    assert job.status == jobs.COMPLETED, job.message
    assert surfaces[:3] == [0, 1, 2] and surfaces[-1] == 3, surfaces  # one organ per call
    seg = job.segmentationNode.GetSegmentation()
    assert seg.ContainsRepresentation(closed)
    for i in range(seg.GetNumberOfSegments()):
        ours = seg.GetNthSegment(i).GetRepresentation(closed)
        theirs = reference.GetSegment(seg.GetNthSegmentID(i)).GetRepresentation(closed)
        assert (ours.GetNumberOfPoints(), ours.GetNumberOfPolys()) == (theirs.GetNumberOfPoints(),
                                                                       theirs.GetNumberOfPolys())


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 256 KB tmpfs (root only), or skip."""
    import subprocess

    target = tmp_path / "disk"
    target.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(target)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()[:100]})")
    yield target
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_an_export_into_a_full_or_read_only_disk_is_one_message_and_leaves_nothing(scene, logic, tiny_disk, fault):
    """The disk fills while the writer writes (the up-front free-space check passed, e.g. another program
    took the space meanwhile): one message, and every file of the export removed again."""
    import subprocess

    cases = [synthetic.addSyntheticCase(scene, f"c{i}", ORGANS, ORGANS, shape=(20, 60, 60), seed=40 + i)
             for i in range(2)]
    logic.addCasesFromNodes(cases)
    export = tiny_disk / "export"
    if fault == "read-only":
        export.mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    with pytest.raises(exportModule.LTUDAError) as info:
        exportModule.exportTrainingData(logic.cases, logic.organs, str(export), freeSpaceCheck=lambda *_: None)
    message = str(info.value)
    assert message.startswith(f"Could not write {export}")
    if fault == "full":
        assert "the disk is full (" in message and "needed" in message and "free)" in message
    else:
        assert "read-only" in message
    assert "Nothing of this export was kept." in message
    assert not [p for p in tiny_disk.rglob("*") if p.is_file()]
