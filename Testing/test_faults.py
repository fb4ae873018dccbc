"""Faults (issue 14): a folder in use, stop requests, unfinished and damaged model folders, full disks,
damaged caches. Real files, real `python -m ltuda` subprocesses, real tiny trainings."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_TRAIN_ARGS, run_ltuda
from ltuda.manifest import load_manifest


def _events(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _no_traceback(result):
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout


def _start_long_training(dataset, out, *extra):
    """A training that runs until it is told to stop; returns once it is past its first epoch."""
    args = [sys.executable, "-m", "ltuda", "train", "--dataset", str(dataset), "--out", str(out),
            "--preset", "fast", "--method", "labeled-only", "--epochs-stage1", "2000", "--iterations-per-epoch", "2",
            "--image-size", "32", "--batch-size", "2", "--progress", "jsonl", *extra]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(json.loads(line))
        if seen[-1]["event"] == "epoch":
            break
    assert seen and seen[-1]["event"] == "epoch", proc.stderr.read()
    return proc, seen


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_training_into_a_folder_in_use_is_refused_and_stop_file_stops_the_first(tiny_dataset, tmp_path):
    out = tmp_path / "busy"
    proc, seen = _start_long_training(tiny_dataset, out)
    try:
        lock = json.loads((out / "train.lock").read_text())
        assert lock["pid"] == proc.pid and lock["host"] == socket.gethostname() and lock["started"]
        for extra in (["--overwrite"], ["--resume"], []):
            second = run_ltuda("train", "--dataset", tiny_dataset, "--out", out, *TINY_TRAIN_ARGS, *extra,
                               check=False)
            assert second.returncode == 1, second.stderr
            _no_traceback(second)
            assert f"{out} is in use by PID {proc.pid} on {socket.gethostname()} since {lock['started']}" \
                in second.stderr
            assert "STOP" in second.stderr  # the fix says how to stop the first one
        assert (out / "checkpoints" / "last.pt").is_file()  # --overwrite deleted nothing of the running one
        assert proc.poll() is None
        (out / "STOP").write_text("")  # the cross-platform stop request
        rest, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = seen + _events(rest)
    assert proc.returncode == 130, err
    assert events[-1]["event"] == "done" and events[-1]["status"] == "cancelled"
    assert "STOP" in err
    assert not (out / "train.lock").exists() and not (out / "STOP").exists()
    assert (out / "checkpoints" / "last.pt").is_file()
    # the first run's history is its own: one start event, nothing from the refused runs
    history = _events((out / "progress.jsonl").read_text())
    assert [e["event"] for e in history].count("start") == 1


def test_a_stale_lock_is_taken_over_and_removed_after_a_normal_run(tiny_dataset, tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    pid = _dead_pid()
    (out / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": "yesterday"}))
    result = run_ltuda("train", "--dataset", tiny_dataset, "--out", out, *TINY_TRAIN_ARGS, "--method", "labeled-only")
    assert f"taking over the lock of {out}: it was left by PID {pid}" in result.stderr
    assert "taking over the lock" in (out / "train.log").read_text()
    assert not (out / "train.lock").exists()
    assert (out / "model.json").is_file()


def test_a_lock_from_another_host_is_honoured(tmp_path):
    from ltuda.errors import LtudaError
    from ltuda.train.lock import FolderLock

    (tmp_path / "train.lock").write_text(json.dumps({"host": "other-host.example", "pid": os.getpid(),
                                                     "started": "2026-01-01T00:00:00"}))
    with pytest.raises(LtudaError) as info:
        FolderLock(tmp_path).acquire()
    message = str(info.value)
    assert f"{tmp_path} is in use by PID {os.getpid()} on other-host.example since 2026-01-01T00:00:00" in message
    assert f"delete {tmp_path / 'train.lock'}" in message
    with FolderLock(tmp_path / "new") as lock:  # and an ordinary lock comes and goes
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "new").exists()  # the folder it had to create, empty again, is gone too
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "STOP").write_text("")  # a stop request nobody was there to read
    with FolderLock(tmp_path / "old") as lock:
        assert not (tmp_path / "old" / "STOP").exists()
        assert any("removed a leftover" in notice for notice in lock.notices)
    assert list((tmp_path / "old").iterdir()) == []


RACER = """
import sys, time
from ltuda.errors import LtudaError
from ltuda.train.lock import FolderLock
time.sleep(float(sys.argv[2]) - time.time())  # all racers start at the same moment
try:
    with FolderLock(sys.argv[1]):
        print("won", flush=True)
        time.sleep(3)
except LtudaError as exc:
    print("refused:", exc, flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="flock-based takeover; Windows checks the pid")
def test_racing_takeovers_of_a_stale_lock_have_one_winner(tmp_path):
    (tmp_path / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(),
                                                     "started": "yesterday"}))
    start = time.time() + 2.0
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=60) for p in racers]
    results = [out.strip() for out, _ in outputs]
    assert sum(r == "won" for r in results) == 1, outputs
    assert all(r == "won" or (r.startswith("refused:") and "is in use" in r) for r in results), outputs
    assert not (tmp_path / "train.lock").exists()


def test_an_unfinished_training_says_how_to_resume(tiny_dataset, tmp_path):
    """kill -9 before a model exists (no validation cases: the model comes at the end): checkpoints only."""
    out = tmp_path / "unfinished"
    proc, _ = _start_long_training(tiny_dataset, out, "--val-fraction", "0")
    deadline = time.time() + 120
    while not (out / "checkpoints" / "last.pt").is_file() and time.time() < deadline:
        time.sleep(0.2)
    image = sorted((Path(tiny_dataset).parent / "images").glob("*.nii.gz"))[0]
    running = run_ltuda("predict", "--model", out, "--input", image, "--output", tmp_path / "x.seg.nrrd", check=False)
    assert running.returncode == 1 and f"has no model yet: {out} is in use by PID {proc.pid}" in running.stderr
    proc.kill()
    proc.communicate()
    assert not (out / "model.json").exists()
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "train.lock").is_file()  # kill -9 leaves both
    result = run_ltuda("predict", "--model", out, "--input", image, "--output", tmp_path / "x.seg.nrrd", check=False)
    assert result.returncode == 1
    _no_traceback(result)
    assert (f"training did not finish: run `ltuda train --resume --dataset {tiny_dataset} --out {out}`"
            in result.stderr), result.stderr
    assert "model.json is missing" not in result.stderr


def test_a_truncated_model_pt_is_damaged_or_incomplete(tiny_model, tiny_dataset, tmp_path):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    data = (model / "model.pt").read_bytes()
    image = sorted((Path(tiny_dataset).parent / "images").glob("*.nii.gz"))[0]
    for damaged in (data[: len(data) // 2], data[:-10] + b"0123456789"):
        (model / "model.pt").write_bytes(damaged)
        result = run_ltuda("predict", "--model", model, "--input", image, "--output", tmp_path / "x.seg.nrrd",
                           check=False)
        assert result.returncode == 1
        _no_traceback(result)
        assert f"{model / 'model.pt'}: is damaged or incomplete" in result.stderr, result.stderr
        assert "Restore it from a backup" in result.stderr
        for internal in ("miniz", "PytorchStreamReader", "central directory", "unexpected"):
            assert internal not in result.stderr


def test_a_truncated_checkpoint_refuses_resume_in_our_words(tiny_model, tiny_dataset, tmp_path):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    last = model / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    result = run_ltuda("train", "--dataset", tiny_dataset, "--out", model, "--resume", check=False)
    assert result.returncode == 1
    _no_traceback(result)
    assert f"{last}: is damaged or incomplete" in result.stderr and "--overwrite" in result.stderr
    assert not (model / "train.lock").exists()


# ----- full and read-only disks -----

@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of the requested size (root only); skipped where mounting is not permitted."""
    mounts = []

    def make(size_bytes):
        target = tmp_path / f"disk{len(mounts)}"
        target.mkdir()
        kib = max(64, int(size_bytes) // 1024)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(target)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()[:100]})")
        mounts.append(target)
        return target

    yield make
    for target in mounts:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _state(megabytes, fill=1.0):
    import torch
    return {"w": torch.full((int(megabytes * 2**20 / 4),), fill)}


def _check_full_disk_message(message, path, what):
    assert message.startswith(f"{path}: could not write the {what}: the disk is full ("), message
    assert "needed" in message and "free)" in message and "Free space on that disk" in message


@pytest.mark.parametrize("precheck", [True, False], ids=["free-space-check", "write-fails"])
def test_a_full_disk_keeps_the_previous_checkpoint(small_disk, monkeypatch, precheck):
    import torch
    from ltuda.errors import LtudaError
    from ltuda.model import store

    disk = small_disk(2 * 2**20)
    path = disk / "checkpoints" / "last.pt"
    store.atomic_torch_save(_state(0.5, 1.0), path)
    if not precheck:  # let the write itself hit ENOSPC on the real filesystem
        monkeypatch.setattr(store, "free_bytes", lambda _: None)
    with pytest.raises(LtudaError) as info:
        store.atomic_torch_save(_state(1.8, 2.0), path)
    _check_full_disk_message(str(info.value), path, "training checkpoint")
    assert torch.equal(store.safe_torch_load(path)["w"], _state(0.5, 1.0)["w"])  # the previous one, intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left
    with pytest.raises(LtudaError) as info:
        store.atomic_write_json({"x": "y" * 3 * 2**20}, disk / "model.json")
    _check_full_disk_message(str(info.value), disk / "model.json", "model description")
    assert not (disk / "model.json").exists() and not (disk / "model.json.tmp").exists()


def test_an_injected_enospc_is_one_clear_message(tmp_path, monkeypatch):
    """The same on any machine: ENOSPC raised by the write call itself."""
    import errno
    import torch
    from ltuda.errors import LtudaError
    from ltuda.model import store

    path = tmp_path / "model.pt"
    store.atomic_torch_save(_state(0.01, 1.0), path)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store.os, "fsync", full)
    with pytest.raises(LtudaError) as info:
        store.atomic_torch_save(_state(0.02, 2.0), path)
    _check_full_disk_message(str(info.value), path, "model weights")
    monkeypatch.undo()
    assert torch.equal(store.safe_torch_load(path)["w"], _state(0.01, 1.0)["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_read_only_folder_is_named(small_disk):
    from ltuda.errors import LtudaError
    from ltuda.model import store

    disk = small_disk(2**20)
    store.atomic_write_json({"a": 1}, disk / "model.json")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    with pytest.raises(LtudaError) as info:
        store.atomic_write_json({"a": 2}, disk / "model.json")
    assert str(info.value).startswith(f"{disk / 'model.json'}: could not write the model description: "
                                      "the folder is read-only.")
    assert json.loads((disk / "model.json").read_text()) == {"a": 1}


def test_training_into_a_full_disk_stops_with_one_message(tiny_model, tiny_dataset, small_disk):
    """A real training on a filesystem with room for one checkpoint and one model, not for a second checkpoint."""
    sizes = {name: (tiny_model / name).stat().st_size for name in ("model.pt", "checkpoints/last.pt")}
    disk = small_disk(sizes["model.pt"] * 2 + sizes["checkpoints/last.pt"] + 256 * 1024)
    out = disk / "model"
    result = run_ltuda("train", "--dataset", tiny_dataset, "--out", out, "--preset", "fast", "--method",
                       "labeled-only", "--epochs-stage1", "4", "--iterations-per-epoch", "2", "--image-size", "32",
                       "--batch-size", "2", "--val-fraction", "0.5", "--progress", "jsonl", check=False)
    assert result.returncode == 1, result.stderr
    _no_traceback(result)
    error = _events(result.stdout)[-1]
    assert error["event"] == "error"
    assert "could not write the " in error["message"] and "the disk is full (" in error["message"]
    assert "--resume" in error["message"]
    assert f"error: {error['message']}" in result.stderr
    assert not list(out.rglob("*.tmp")) and not (out / "train.lock").exists()
    from ltuda.model.store import load_model, safe_torch_load
    assert int(safe_torch_load(out / "checkpoints" / "last.pt")["epoch"]) >= 1  # the previous checkpoint loads
    load_model(out)  # and so does the model written before the disk filled up


# ----- damaged slice caches -----

def _damage_cases():
    import numpy as np

    def truncate(path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def foreign_same_shape(path):  # a valid .npy of the same shape and type, other values
        array = np.load(path)
        np.save(path, np.zeros_like(array) + 1)

    def garbage(path):
        path.write_bytes(os.urandom(path.stat().st_size))

    def flip_one_byte(path):
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))

    return {"truncate": truncate, "foreign": foreign_same_shape, "garbage": garbage, "flip": flip_one_byte}


@pytest.mark.parametrize("name,damage", [(n, d) for n in ("image.npy", "labels.npy", "meta.json")
                                         for d in sorted(_damage_cases()) if (n, d) != ("meta.json", "foreign")])
def test_a_damaged_cache_entry_is_rebuilt_and_equals_the_original(tiny_dataset, tmp_path, name, damage):
    import numpy as np
    from ltuda.data.cache import SliceCache
    from ltuda.data.preprocess import Preprocessing
    from ltuda.manifest import load_manifest

    manifest = load_manifest(tiny_dataset)
    case, prep = manifest.split("train")[0], Preprocessing((-325, 325), 32)
    notices = []
    cache = SliceCache(tmp_path / "cache", notify=notices.append)
    first = cache.load(case, manifest.classes, prep)
    original = (np.array(first.image), np.array(first.labels), list(first.labeled))
    (entry,) = [p for p in (tmp_path / "cache").iterdir()]
    _damage_cases()[damage](entry / name)
    healed = cache.load(case, manifest.classes, prep)
    assert len(notices) == 1 and f"case {case.id}" in notices[0] and "is damaged" in notices[0], notices
    for got, want in zip((np.array(healed.image), np.array(healed.labels), list(healed.labeled)), original):
        assert np.array_equal(got, want)
    again = cache.load(case, manifest.classes, prep)  # the entry on disk is whole again: no second notice
    assert len(notices) == 1 and np.array_equal(np.array(again.image), original[0])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [entry.name]  # nothing left aside


def test_training_heals_a_truncated_cache_with_a_notice(tiny_dataset, tmp_path):
    cache = tmp_path / "cache"
    common = ["--dataset", tiny_dataset, *TINY_TRAIN_ARGS, "--method", "labeled-only", "--cache-dir", cache]
    run_ltuda("train", "--out", tmp_path / "a", *common)
    entry = sorted(cache.iterdir())[0]
    before = (entry / "image.npy").read_bytes()
    (entry / "image.npy").write_bytes(before[:100])
    second = run_ltuda("train", "--out", tmp_path / "b", *common)
    assert f"({entry}) is damaged" in second.stderr
    assert "is damaged" in (tmp_path / "b" / "train.log").read_text()
    assert (entry / "image.npy").read_bytes() == before


def test_predict_reads_only_a_matching_model_while_a_training_replaces_it(tiny_model, tmp_path):
    """Caught between a training's two writes (new model.pt, old model.json), the reader waits for the pair."""
    import shutil
    import threading
    from ltuda.errors import LtudaError
    from ltuda.model.store import load_model

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    good = (model / "model.json").read_text()
    stale = json.loads(good)
    stale["weights_sha256"] = "0" * 64
    # a valid head other than the good one marks the stale description (model.json values are validated)
    stale["default_head"] = next(h for h in ("linear", "proto-labeled") if h != stale.get("default_head"))
    (model / "model.json").write_text(json.dumps(stale))
    with pytest.raises(LtudaError, match="is damaged or incomplete \\(its contents do not match model.json\\)"):
        load_model(model)  # no training holds the folder: a mismatch is damage
    (model / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now"}))
    writer = threading.Timer(1.0, lambda: (model / "model.json").write_text(good))
    writer.start()
    try:
        _, meta = load_model(model)  # a training (this process) holds the folder: wait for the matching json
    finally:
        writer.join()
    assert meta["default_head"] == json.loads(good)["default_head"] != stale["default_head"]


def test_a_model_json_that_cannot_be_written_keeps_the_old_weights(tiny_model, tmp_path, monkeypatch):
    """A full disk between model.pt and model.json: the folder keeps its previous, matching pair."""
    import errno
    import shutil
    import torch
    from ltuda.errors import LtudaError, write_error
    from ltuda.model import store

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    before = {name: (model / name).read_bytes() for name in ("model.pt", "model.json")}
    network, meta = store.load_model(model)
    with torch.no_grad():
        next(network.parameters()).add_(1.0)

    def full(doc, path, what=None):
        raise write_error(OSError(errno.ENOSPC, "No space left on device"), path, "model description", needed=1)

    monkeypatch.setattr(store, "atomic_write_json", full)
    with pytest.raises(LtudaError, match="could not write the model description: the disk is full"):
        store.save_model(model, network, {k: meta[k] for k in ("classes", "preprocessing", "default_head")})
    monkeypatch.undo()
    assert {name: (model / name).read_bytes() for name in before} == before
    assert not list(model.glob("*.prev")) and not list(model.glob("*.tmp"))
    store.load_model(model)


def test_predictions_into_a_full_disk_are_one_message_and_leave_nothing(tiny_model, tiny_dataset, small_disk):
    image = load_manifest(tiny_dataset).split("test")[0].image
    disk = small_disk(64 * 1024)
    (disk / "filler").write_bytes(b"\0" * (60 * 1024))  # a few KB left: less than the labels need
    result = run_ltuda("predict", "--model", tiny_model, "--input", image, "--output", disk / "ct.seg.nrrd",
                       check=False)
    assert result.returncode == 1, result.stderr
    _no_traceback(result)
    _check_full_disk_message(result.stderr.strip().splitlines()[-1].removeprefix("error: "), disk / "ct.seg.nrrd",
                             "segmentation")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no half-written or temporary file


def test_a_label_map_into_a_read_only_folder_is_named(tiny_model, tiny_dataset, small_disk, tmp_path):
    image = load_manifest(tiny_dataset).split("test")[0].image
    disk = small_disk(1024 * 1024)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    result = run_ltuda("predict", "--model", tiny_model, "--input", image, "--output", tmp_path / "ct.seg.nrrd",
                       "--label-map", disk / "ct.nii.gz", check=False)
    assert result.returncode == 1
    _no_traceback(result)
    assert f"{disk / 'ct.nii.gz'}: could not write the label map: the folder is read-only." in result.stderr


def test_phantoms_into_a_full_disk_are_one_message(small_disk):
    disk = small_disk(256 * 1024)
    result = run_ltuda("phantoms", "--out", disk / "data", "--cases-per-site", "2", "--test-cases", "1",
                       "--size", "48", check=False)
    assert result.returncode == 1, result.stderr
    _no_traceback(result)
    message = result.stderr.strip().splitlines()[-1]
    assert "could not write the " in message and ": the disk is full (" in message and "Free space" in message
    assert not [p for p in (disk / "data").rglob("*") if p.is_file() and p.stat().st_size == 0]


def test_a_cache_entry_written_by_another_process_meanwhile_is_kept(tiny_dataset, tmp_path, monkeypatch):
    """Two trainings preparing the same case: the one that renames second keeps the first one's entry."""
    import numpy as np
    from ltuda.data import cache as cache_module
    from ltuda.data.preprocess import Preprocessing
    from ltuda.manifest import load_manifest

    manifest = load_manifest(tiny_dataset)
    case, prep = manifest.split("train")[0], Preprocessing((-325, 325), 32)
    winner = cache_module.SliceCache(tmp_path / "winner").load(case, manifest.classes, prep)
    real_replace = cache_module.os.replace

    def other_process_wins(src, dst):  # the other process renames its entry between our check and rename
        if not Path(dst).exists():
            Path(dst).mkdir()
            (Path(dst) / "other").write_text("x")
        return real_replace(src, dst)

    monkeypatch.setattr(cache_module.os, "replace", other_process_wins)
    loser = cache_module.SliceCache(tmp_path / "cache").load(case, manifest.classes, prep)
    assert np.array_equal(np.array(loser.image), np.array(winner.image))
    (entry,) = list((tmp_path / "cache").iterdir())
    assert (entry / "other").exists()  # the winner's entry stays; no temporary folder is left


def test_an_evaluation_report_into_a_full_disk_is_one_message_and_leaves_nothing(tiny_model, tiny_dataset, small_disk,
                                                                                 tmp_path):
    pred = tmp_path / "case.seg.nrrd"
    test_image = next(c.image for c in load_manifest(tiny_dataset).cases if c.split == "test")
    run_ltuda("predict", "--model", tiny_model, "--input", test_image, "--output", pred, "--device", "cpu")
    disk = small_disk(256 * 1024)
    with open(disk / "filler", "wb") as f:
        try:
            f.write(b"\0" * (512 * 1024))
        except OSError:
            pass
    result = run_ltuda("evaluate", "--pred", pred, "--truth", pred, "--out", disk / "report", check=False)
    assert result.returncode == 1, result.stderr
    _no_traceback(result)
    assert "could not write the evaluation report: the disk is full" in result.stderr
    assert not list((disk / "report").iterdir())


def test_a_training_killed_before_its_first_checkpoint_says_to_start_again(tiny_model, tmp_path):
    import shutil

    model = tmp_path / "unfinished"
    model.mkdir()
    shutil.copy(tiny_model / "progress.jsonl", model / "progress.jsonl")
    (model / "checkpoints").mkdir()
    result = run_ltuda("predict", "--model", model, "--input", tmp_path, "--output", tmp_path / "o", check=False)
    assert result.returncode == 1
    assert f"{model}: training did not finish: it stopped before its first checkpoint" in result.stderr
    assert "ltuda train --overwrite" in result.stderr


def test_resume_of_a_training_killed_before_its_first_checkpoint_starts_it_again_with_its_settings(
        tiny_dataset, tmp_path):
    """The run's settings are saved before its first step; a kill -9 before the first checkpoint leaves
    them (and the log) but no checkpoint: `--resume`, without the settings, starts it again with them."""
    out = tmp_path / "early"
    run_ltuda("train", "--dataset", tiny_dataset, "--out", out, *TINY_TRAIN_ARGS, "--epochs-stage2", "2")
    saved = json.loads((out / "checkpoints" / "config.json").read_text())["config"]
    for path in sorted(out.rglob("*"), reverse=True):  # what a kill -9 before the first checkpoint leaves
        if path.is_file() and path.name not in ("config.json", "progress.jsonl", "train.log"):
            path.unlink()
    image = sorted((Path(tiny_dataset).parent / "images").glob("*.nii.gz"))[0]
    told = run_ltuda("predict", "--model", out, "--input", image, "--output", tmp_path / "x.seg.nrrd", check=False)
    assert told.returncode == 1 and f"run `ltuda train --resume --dataset {tiny_dataset} --out {out}`" in told.stderr
    again = run_ltuda("train", "--dataset", tiny_dataset, "--out", out, "--resume")
    assert "stopped before its first checkpoint; --resume starts it again from the beginning" in again.stderr
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["completed"] and meta["training"]["config"] == saved
    assert meta["training"]["epochs"] == {"1": 1, "2": 2}  # its own settings, not the preset's
