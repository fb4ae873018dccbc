"""Shared batch inference: concurrent `ltuda predict` workers on one folder, claims, --shard, and the
GPU out-of-memory fallback. Workers are real `python -m ltuda predict` subprocesses."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import run_ltuda
from ltuda.claims import CLAIMS_DIR, ClaimBox
from ltuda.io.volumes import read_image, read_segmentation
from ltuda.manifest import load_manifest

# Each worker on one thread: three of them share the test machine's cores.
WORKER_ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _events(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _volumes(tiny_dataset, folder: Path, count: int, repeat: int = 1, prefix: str = "case") -> list:
    """`count` phantom CTs (the tiny dataset's images, stacked `repeat` times along z for longer cases)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = sorted((Path(tiny_dataset).parent / "images").glob("*.nii.gz"))
    paths = []
    for i in range(count):
        image = read_image(images[i % len(images)])
        array = np.concatenate([sitk.GetArrayFromImage(image)] * repeat, axis=0)
        stacked = sitk.GetImageFromArray(array)
        stacked.SetSpacing(image.GetSpacing())
        stacked.SetOrigin(image.GetOrigin())
        stacked.SetDirection(image.GetDirection())
        path = folder / f"{prefix}_{i:02d}.nrrd"
        sitk.WriteImage(stacked, str(path))
        paths.append(path)
    return paths


def _worker(tiny_model, source, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "ltuda", "predict", "--model", str(tiny_model), "--input",
                             str(source), "--output", str(out), "--progress", "jsonl", *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=WORKER_ENV)


def _assert_complete_outputs(out: Path, names):
    assert sorted(p.name for p in out.glob("*.seg.nrrd")) == sorted(f"{n}.seg.nrrd" for n in names)
    for name in names:
        labels, segments = read_segmentation(out / f"{name}.seg.nrrd")  # every output reads back whole
        assert len(segments) == 4
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert not (out / CLAIMS_DIR).exists(), "claims are removed when their cases are done"


def test_three_concurrent_workers_do_each_case_exactly_once(tiny_model, tiny_dataset, tmp_path):
    inputs = _volumes(tiny_dataset, tmp_path / "in", 6, repeat=3)
    out = tmp_path / "out"
    workers = [_worker(tiny_model, tmp_path / "in", out, "--batch-size", "1") for _ in range(3)]
    results = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], [r[1][-2000:] for r in results]
    streams = [_events(stdout) for stdout, _ in results]
    cases = [e["output"] for events in streams for e in events if e["event"] == "case"]
    names = [p.name[:-len(".nrrd")] for p in inputs]
    # every case written by exactly one worker: no case twice, none missing
    assert Counter(cases) == Counter(str(out / f"{n}.seg.nrrd") for n in names)
    assert sum(events[-1]["done"] for events in streams) == 6
    for events in streams:  # each worker accounts for every case: its own, done before, or on at its end
        summary = events[-1]
        assert summary["event"] == "done" and summary["done"] + summary["skipped"] + summary["busy"] == 6
    assert sum(1 for events in streams if events[-1]["done"]) >= 2, "the workers shared the folder"
    _assert_complete_outputs(out, names)


def test_a_killed_worker_leaves_no_partial_output_and_a_rerun_finishes_its_case(tiny_model, tiny_dataset, tmp_path):
    source = tmp_path / "in"
    _volumes(tiny_dataset, source, 1, repeat=8, prefix="a_long")  # sorted first: the case it dies in
    _volumes(tiny_dataset, source, 1, prefix="b_short")
    out = tmp_path / "out"
    worker = _worker(tiny_model, source, out, "--batch-size", "1")
    try:
        for line in worker.stdout:  # wait until it is inside the long case, then kill -9
            event = json.loads(line)
            if event["event"] == "progress" and event.get("stage") == "segmenting" and "a_long" in event["case"]:
                break
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.wait(timeout=60)
        worker.stdout.close()
        worker.stderr.close()
    assert worker.returncode == -signal.SIGKILL
    claim = out / CLAIMS_DIR / "a_long_00.lock"
    assert json.loads(claim.read_text())["pid"] == worker.pid  # it died holding the case
    assert not (out / "a_long_00.seg.nrrd").exists()
    assert not [p for p in out.glob("*.seg.nrrd")]  # no partial output, and the short case was not reached

    rerun = run_ltuda("predict", "--model", tiny_model, "--input", source, "--output", out, "--progress", "jsonl",
                      env=WORKER_ENV)
    done = [e["output"] for e in _events(rerun.stdout) if e["event"] == "case"]
    assert done == [str(out / "a_long_00.seg.nrrd"), str(out / "b_short_00.seg.nrrd")]
    assert "taking over the claim on a_long_00" in rerun.stderr
    _assert_complete_outputs(out, ["a_long_00", "b_short_00"])


def test_live_and_fresh_claims_are_honoured_and_a_silent_one_is_taken_over(tiny_model, tiny_dataset, tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    _volumes(tiny_dataset, source, 4)
    box = ClaimBox(out)
    held = box.claim("case_00")  # a live worker on this host: this test process
    assert held is not None and box.claim("case_00") is None
    for name, age in (("case_01", 10), ("case_02", 1000)):  # claims of a worker on another machine
        path = box.path_for(name)
        path.write_text(json.dumps({"host": "some-other-node", "pid": 1, "started": "?", "case": name}))
        os.utime(str(path), (time.time() - age, time.time() - age))
    try:
        result = run_ltuda("predict", "--model", tiny_model, "--input", source, "--output", out, "--progress",
                           "jsonl", "--claim-timeout", "100", env=WORKER_ENV)
    finally:
        held.release()
    summary = _events(result.stdout)[-1]
    assert summary["done"] == 2 and summary["busy"] == 2 and summary["failed"] == []
    assert sorted(p.name for p in out.glob("*.seg.nrrd")) == ["case_02.seg.nrrd", "case_03.seg.nrrd"]
    assert "taking over the claim on case_02" in result.stderr and "2 being done by other workers" in result.stderr
    assert not box.path_for("case_00").exists() and box.path_for("case_01").exists()
    assert not box.path_for("case_02").exists()


def test_shards_split_a_folder_into_disjoint_complete_parts(tiny_model, tiny_dataset, tmp_path):
    inputs = _volumes(tiny_dataset, tmp_path / "in", 7)
    parts = []
    for i in range(3):
        result = run_ltuda("predict", "--model", tiny_model, "--input", tmp_path / "in", "--output",
                           tmp_path / f"out{i}", "--shard", f"{i}/3", "--progress", "jsonl", env=WORKER_ENV)
        parts.append({Path(e["input"]).name for e in _events(result.stdout) if e["event"] == "case"})
        assert parts[-1] == {p.name for k, p in enumerate(inputs) if k % 3 == i}  # 0-based: index mod 3 == i
    assert set.union(*parts) == {p.name for p in inputs} and sum(map(len, parts)) == len(inputs)


@pytest.mark.parametrize("shard", ["3/2", "2/2", "x", "1/0", "-1/3", "1/2/3"])
def test_bad_shards_are_refused_with_one_message(shard, tmp_path):
    result = run_ltuda("predict", "--model", tmp_path, "--input", tmp_path, "--output", tmp_path / "o",
                       f"--shard={shard}", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"argument --shard: '{shard}'" in result.stderr.splitlines()[-1]


def test_shard_of_one_volume_and_bad_claim_timeout_exit_1(tiny_model, tiny_dataset, tmp_path):
    image = _volumes(tiny_dataset, tmp_path / "in", 1)[0]
    one = run_ltuda("predict", "--model", tiny_model, "--input", image, "--output", tmp_path / "o.seg.nrrd",
                    "--shard", "0/2", check=False)
    assert one.returncode == 1 and "--shard needs a folder" in one.stderr and "Traceback" not in one.stderr
    bad = run_ltuda("predict", "--model", tiny_model, "--input", tmp_path / "in", "--output", tmp_path / "o",
                    "--claim-timeout", "0", check=False)
    assert bad.returncode == 1 and "--claim-timeout 0" in bad.stderr and "Traceback" not in bad.stderr


def test_out_of_memory_halves_the_slice_batch_and_gives_the_same_labels(tiny_model, tiny_dataset):
    from ltuda.predict import Predictor

    image = read_image(load_manifest(tiny_dataset).split("test")[0].image)
    assert image.GetSize()[2] > 8  # several batches of 8 slices
    expected = Predictor(tiny_model, device="cpu", batch_size=8).segment(image)

    notices = []

    class Notes:
        def log(self, text):
            notices.append(text)

    predictor = Predictor(tiny_model, device="cpu", batch_size=8, report=Notes())
    forward, calls = predictor.net.forward, []

    def flaky_forward(x, *args, **kwargs):
        calls.append(x.shape[0])
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return forward(x, *args, **kwargs)

    predictor.net.forward = flaky_forward
    labels = predictor.segment(image)
    assert calls[0] == 8 and set(calls[1:]) <= {4} and len(calls) > 2
    assert predictor.batch_size == 4 and "out of GPU memory with 8 slices per batch; retrying with 4" in notices[0]
    assert np.array_equal(labels, expected)


def test_out_of_memory_at_one_slice_still_fails(tiny_model, tiny_dataset):
    from ltuda.predict import Predictor

    image = read_image(load_manifest(tiny_dataset).split("test")[0].image)
    predictor = Predictor(tiny_model, device="cpu", batch_size=2)

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    predictor.net.forward = no_memory
    with pytest.raises(torch.OutOfMemoryError):
        predictor.segment(image)
    assert predictor.batch_size == 1


def test_a_dead_workers_claim_is_taken_over_with_its_temporary_files(tmp_path):
    out = tmp_path / "out"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    box, notices = ClaimBox(out), []
    box.report = type("Notes", (), {"log": lambda self, text: notices.append(text)})()
    box.folder.mkdir(parents=True)
    box.path_for("ct_7").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "started": "?",
                                                "case": "ct_7"}))
    leftover = out / f".ct_7.seg.nrrd.{gone.pid}.1a2b3c4d.tmp.seg.nrrd"
    other = out / f".ct_7.seg.nrrd.{os.getpid()}.1a2b3c4d.tmp.seg.nrrd"  # not the dead worker's
    leftover.write_bytes(b"half")
    other.write_bytes(b"half")
    claim = box.claim("ct_7")
    assert claim is not None and json.loads(box.path_for("ct_7").read_text())["pid"] == os.getpid()
    assert not leftover.exists() and other.exists()
    assert notices and f"PID {gone.pid}" in notices[0]
    claim.release()
    box.tidy()
    assert not box.folder.exists()
