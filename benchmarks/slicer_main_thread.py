"""How long the Slicer module blocks its GUI (main) thread while exporting training cases and
importing a result (issue 13, defect 6). Real MRML through slicer-core; no Slicer application.

    python benchmarks/slicer_main_thread.py [--cases 40] [--shape 100 512 512] [--out benchmarks/results]

In Slicer a 100 ms QTimer calls job.process() on the main thread; everything a call does blocks
the GUI. This script plays that timer: it calls process() every 100 ms and records how long each
call takes, and how much later than due each tick comes (a worker thread that held Python's lock,
or a busy CPU, would show up there). Measured:

- export now: logic.train's checks (TrainingExport.begin) and every process() call until all files
  and dataset.json are written (the writer thread writes the files meanwhile);
- export before: the previous code path, Slicer's writers on the main thread for every case, which
  ran inside the Start button's click handler (one block);
- import now: reading the prediction's .seg.nrrd into a new segmentation, then the 3D surface of
  one organ per process() call; import before: the same with every surface built in that one call.

Synthetic CT-like cases (4 organs in the image, 2 labelled per case) of the given shape (numpy
order k, j, i). Writes slicer_main_thread.json and slicer_main_thread.md.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "LTUDASegmentation"))

import slicer  # noqa: E402
import vtk  # noqa: E402

from LTUDASegmentationLib import jobs, synthetic  # noqa: E402
from LTUDASegmentationLib.cases import Case, scanCase  # noqa: E402
from LTUDASegmentationLib.export import TrainingExport  # noqa: E402
from LTUDASegmentationLib.organs import organClass  # noqa: E402
from LTUDASegmentationLib.results import ClosedSurfaceSteps, importPrediction  # noqa: E402
from LTUDASegmentationLib.runner import ProcessRunner  # noqa: E402
from LTUDASegmentationLib.segments import (addSegmentForOrgan, ensureSegmentationConverters,  # noqa: E402
                                           labelArrayOnVolume, setSegmentFromMask, writeLabelFile,
                                           writeVolumeFile)

ORGANS = ["liver", "spleen", "kidney", "pancreas"]
TICK = 0.1  # the module's QTimer interval (s)
DONE = '{"event": "done", "status": "completed"}'


def _matrix(array):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def makeCases(scene, count, shape):
    """`count` cases of `shape`: one image and its organ masks computed once, copied per case."""
    masks = synthetic.organMasks(shape, ORGANS, seed=0)
    rng = np.random.default_rng(1)
    image = np.full(shape, -1000, dtype=np.int16)
    image[:, shape[1] // 10:-shape[1] // 10, shape[2] // 10:-shape[2] // 10] = 20
    for value, name in zip((60, 110, 160, 30), ORGANS):
        image[masks[name]] = value
    image += rng.normal(0, 5, shape).astype(np.int16)
    ijkToRas = _matrix(synthetic.ijkToRas(spacing=(0.8, 0.8, 2.5)))
    cases = []
    for i in range(count):
        volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"case{i:02d}")
        volume.SetIJKToRASMatrix(ijkToRas)
        synthetic._setArray(volume, image)
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"case{i:02d} labels")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        for index, name in enumerate((ORGANS[i % 4], ORGANS[(i + 1) % 4])):  # partially labelled: 2 of 4
            segmentId = addSegmentForOrgan(segmentation, organClass(name, index + 1))
            setSegmentFromMask(segmentation, segmentId, masks[name], ijkToRas)
        cases.append((volume, segmentation))
    return cases, masks, ijkToRas


def pumpLikeQTimer(job):
    """Call job.process() every TICK s until it ends: (durations of the calls, lateness of the ticks)."""
    calls, late = [], []
    nextTick = time.perf_counter()
    while not job.finished:
        now = time.perf_counter()
        if now < nextTick:
            time.sleep(nextTick - now)
        started = time.perf_counter()
        late.append(max(0.0, started - nextTick))
        job.process()
        ended = time.perf_counter()
        calls.append(ended - started)
        nextTick = max(started + TICK, ended)  # a QTimer that overran fires again when the call returns
    return calls, late


def exportNow(cases, organs, folder):
    # the panel scans each case when it is added or changes (one case per block), and the scans are
    # cached: logic.train hands them to the export, whose begin() then only checks them
    caseList, statuses, scans = [Case(v, s) for v, s in cases], [], []
    for case in caseList:
        t = time.perf_counter()
        statuses.append(scanCase(case, organs))
        scans.append(time.perf_counter() - t)
    started = time.perf_counter()
    export = TrainingExport(caseList, organs, folder, statuses=statuses)
    export.begin()
    begin = time.perf_counter() - started
    job = jobs.TrainingJob(None, folder / "model", workDir=None, preparation=export,
                           makeRunner=lambda result: ProcessRunner([sys.executable, "-c", f"print('{DONE}')"]))
    job.start()
    wallStart = time.perf_counter()
    calls, late = pumpLikeQTimer(job)
    assert job.status == jobs.COMPLETED, job.message
    return {"longest_case_scan_s": max(scans), "begin_s": begin, "longest_call_s": max(calls), "calls": len(calls),
            "median_call_s": float(np.median(calls)), "longest_tick_delay_s": max(late),
            "wall_s": time.perf_counter() - wallStart + begin}


def exportBefore(cases, organs, folder):
    """The previous export: Slicer's writers for each case, all on the main thread in one call."""
    values = {o["name"]: o["value"] for o in organs}
    started = time.perf_counter()
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for i, (volume, segmentation) in enumerate(cases):
        writeVolumeFile(volume, folder / "images" / f"{i}.nrrd", compress=False)
        seg = segmentation.GetSegmentation()
        segmentValues = {seg.GetNthSegmentID(k): values[seg.GetNthSegment(k).GetName()]
                         for k in range(seg.GetNumberOfSegments())}
        labels = labelArrayOnVolume(volume, segmentation, segmentValues)
        writeLabelFile(labels, volume, folder / "labels" / f"{i}.nrrd", compress=True)
    return {"longest_call_s": time.perf_counter() - started, "calls": 1}


def makeResult(scene, masks, ijkToRas, shape, path):
    """A prediction-like .seg.nrrd with all four organs on the volume's grid."""
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "input")
    volume.SetIJKToRASMatrix(ijkToRas)
    synthetic._setArray(volume, np.zeros(shape, dtype=np.int16))
    result = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "prediction")
    result.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for index, name in enumerate(ORGANS):
        segmentId = addSegmentForOrgan(result, organClass(name, index + 1))
        setSegmentFromMask(result, segmentId, masks[name], ijkToRas)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(result)
    scene.RemoveNode(result)
    return volume


def importNow(scene, path, volume):
    def onSuccess(job):
        job.segmentationNode = importPrediction(scene, path, volume, show3D=False)
        return ClosedSurfaceSteps(job.segmentationNode)

    job = jobs.PredictionJob(ProcessRunner([sys.executable, "-c", f"print('{DONE}')"]), volume, str(path),
                             onSuccess=onSuccess).start()
    calls, late = pumpLikeQTimer(job)
    assert job.status == jobs.COMPLETED, job.message
    scene.RemoveNode(job.segmentationNode)
    return {"longest_call_s": max(calls), "calls": len(calls), "longest_tick_delay_s": max(late)}


def importBefore(scene, path, volume):
    started = time.perf_counter()
    node = importPrediction(scene, path, volume, show3D=True)
    took = time.perf_counter() - started
    scene.RemoveNode(node)
    return {"longest_call_s": took, "calls": 1}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--shape", type=int, nargs=3, default=[100, 512, 512], metavar=("K", "J", "I"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--work", default=None, help="folder for the exported files (default: a temporary one)")
    args = parser.parse_args()
    shape = tuple(args.shape)
    ensureSegmentationConverters()
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    work = Path(tempfile.mkdtemp(prefix="ltuda-main-thread-", dir=args.work))
    started = time.time()
    try:
        t = time.perf_counter()
        cases, masks, ijkToRas = makeCases(scene, args.cases, shape)
        print(f"{args.cases} cases of {shape} made in {time.perf_counter() - t:.0f} s", flush=True)
        organs = [organClass(name, i + 1) for i, name in enumerate(ORGANS)]
        now = exportNow(cases, organs, work / "now")
        print("export now:", json.dumps(now), flush=True)
        shutil.rmtree(work / "now")
        before = exportBefore(cases, organs, work / "before")
        print("export before:", json.dumps(before), flush=True)
        shutil.rmtree(work / "before")
        for volume, segmentation in cases:
            scene.RemoveNode(segmentation)
            scene.RemoveNode(volume)
        volume = makeResult(scene, masks, ijkToRas, shape, work / "result.seg.nrrd")
        importedNow = importNow(scene, work / "result.seg.nrrd", volume)
        print("import now:", json.dumps(importedNow), flush=True)
        importedBefore = importBefore(scene, work / "result.seg.nrrd", volume)
        print("import before:", json.dumps(importedBefore), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        scene.Clear(1)
    command = "python benchmarks/slicer_main_thread.py" + (f" --cases {args.cases}" if args.cases != 40 else "") + (
        f" --shape {' '.join(map(str, shape))}" if shape != (100, 512, 512) else "")
    report = {"command": command, "cases": args.cases, "shape_kji": list(shape), "organs_in_result": len(ORGANS),
              "machine": {"cpu": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
              "duration_s": round(time.time() - started, 1),
              "export": {"now": now, "before": before}, "import": {"now": importedNow, "before": importedBefore}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "slicer_main_thread.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    size = "x".join(map(str, reversed(shape)))
    lines = [
        "# Main-thread blocking in the Slicer module (export and import)", "",
        f"Command: `{command}`  ",
        f"Machine: {report['machine']}, run together with other jobs  ",
        f"Data: {args.cases} cases of {size} voxels (int16; 2 of 4 organs labelled per case); a result with "
        f"{len(ORGANS)} organs on one {size} volume  ",
        f"Duration: {report['duration_s']} s", "",
        "Longest time the GUI thread is blocked in one go (Slicer's event loop cannot run meanwhile). "
        "'now': a 100 ms timer calls job.process(), one case read (or one organ's 3D surface built) per call, "
        "the files written by a worker thread; 'before': the previous code, everything in the click handler.", "",
        "| step | before | now | now: calls | now: longest tick delay |",
        "|---|---|---|---|---|",
        f"| export {args.cases} cases | {before['longest_call_s']:.2f} s | {max(now['longest_call_s'], now['begin_s']):.2f} s "
        f"(checks before the first step {now['begin_s']:.2f} s) | {now['calls']} (median {now['median_call_s']:.3f} s) "
        f"| {now['longest_tick_delay_s']:.3f} s |",
        f"| import result + 3D surfaces | {importedBefore['longest_call_s']:.2f} s | "
        f"{importedNow['longest_call_s']:.2f} s | {importedNow['calls']} | {importedNow['longest_tick_delay_s']:.3f} s |",
        "", f"Export wall time now: {now['wall_s']:.1f} s (the GUI stays responsive meanwhile). Scanning one case "
        f"(done when it is added or edited, cached after): {now['longest_case_scan_s']:.2f} s at most.", ""]
    (out / "slicer_main_thread.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
