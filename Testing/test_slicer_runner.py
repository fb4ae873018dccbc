"""The Slicer module's process runner and progress reader, with real child processes (no Slicer, no Qt).

Covers: the JSON-lines progress stream -> panel state, cancel that kills the whole process tree
(polite stop first, then kill after the grace period; also a grandchild in a session of its own, as
torchrun starts its ranks, with or without psutil), a crash reported with its message and the
log path, and output that is not valid UTF-8.
"""

import json
import os
import signal
import sys
import textwrap
import time

import pytest


from LTUDASegmentationLib import jobs  # noqa: E402
from LTUDASegmentationLib.errors import LTUDAError  # noqa: E402
from LTUDASegmentationLib.progress import ProgressState, formatSeconds, parseLine  # noqa: E402
from LTUDASegmentationLib.runner import EXIT, STDERR, STDOUT, ProcessRunner  # noqa: E402

posixOnly = pytest.mark.skipif(os.name == "nt", reason="process-group signals are POSIX here")


def script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return [sys.executable, "-u", str(path)]


def pidAlive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def waitFor(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


TRAIN_STREAM = """
import json, sys, time
def emit(**e):
    print(json.dumps(e), flush=True)
print("loading data", file=sys.stderr, flush=True)
emit(event="start", command="train", method="ltuda", device="cpu", device_name="CPU", stages=[1, 2],
     epochs={"1": 2, "2": 1}, iterations_per_epoch=2, cases={"train": 3, "val": 1}, time=0.1)
emit(event="stage", stage=1, name="CDA")
emit(event="epoch", stage=1, epoch=1, epochs=2, loss=0.9, lr=0.01, images_per_s=12.5, eta_s=130)
emit(event="validation", stage=1, epoch=1, mean_dice=0.4, per_organ={"liver": 0.5, "spleen": 0.3},
     model="teacher", head="linear")
emit(event="epoch", stage=1, epoch=2, epochs=2, loss=0.7, lr=0.01, images_per_s=13.0, eta_s=65)
print("not json on stdout", flush=True)
emit(event="stage", stage=2, name="PDA")
emit(event="epoch", stage=2, epoch=1, epochs=1, loss=0.5, lr=0.005, images_per_s=11.0, eta_s=0)
emit(event="validation", stage=2, epoch=1, mean_dice=0.6, per_organ={"liver": 0.7, "spleen": 0.5},
     model="teacher", head="linear")
emit(event="checkpoint", kind="last", path="/tmp/x/checkpoints/last.pt")
emit(event="done", status="completed", model_dir="/tmp/x", mean_dice=0.6)
"""


def test_progress_stream_drives_the_panel_state(tmp_path):
    log = tmp_path / "run.log"
    updates = []
    finished = []
    job = jobs.TrainingJob(ProcessRunner(script(tmp_path, "train.py", TRAIN_STREAM), logPath=log), tmp_path / "model",
                           onUpdate=lambda j: updates.append(j.progress.statusText()),
                           onFinished=lambda j: finished.append(j.status))
    job.start()
    assert job.wait(timeout=60) == jobs.COMPLETED
    p = job.progress
    assert (p.command, p.device, p.stages, p.epochs) == ("train", "cpu", [1, 2], {1: 2, 2: 1})
    assert (p.stage, p.stageName, p.epoch, p.epochsInStage) == (2, "PDA", 1, 1)
    assert p.loss == pytest.approx(0.5) and p.meanDice == pytest.approx(0.6)
    assert p.lossHistory == [(1, 0.9), (2, 0.7), (3, 0.5)]
    assert p.diceHistory == [(1, 0.4), (3, 0.6)]
    assert p.checkpoints == {"last": "/tmp/x/checkpoints/last.pt"}
    assert job.fraction() == 1.0
    assert finished == [jobs.COMPLETED]
    assert "Validation mean Dice 0.600" in job.message
    assert updates  # at least one batch of events reached the panel
    # what the panel shows mid-run, after the first epoch and its validation
    midRun = ProgressState()
    for event in ({"event": "start", "command": "train", "stages": [1, 2], "epochs": {"1": 2, "2": 1}},
                  {"event": "stage", "stage": 1, "name": "CDA"},
                  {"event": "epoch", "stage": 1, "epoch": 1, "epochs": 2, "loss": 0.9, "images_per_s": 12.5,
                   "eta_s": 130},
                  {"event": "validation", "stage": 1, "epoch": 1, "mean_dice": 0.4}):
        midRun.feed(json.dumps(event))
    assert midRun.statusText() == "Stage 1 (CDA): epoch 1/2 | loss 0.9000 | Dice 0.400 | 12.5 img/s | 2m10s left"
    assert midRun.fraction() == pytest.approx(1 / 3)
    # human log and stray stdout lines reach the log (panel and file), events do not
    # (stdout and stderr are two pipes read by two threads: their relative order is not defined)
    assert sorted(job.logLines) == ["loading data", "not json on stdout"]
    text = log.read_text(encoding="utf-8")
    assert "loading data" in text and '"event": "epoch"' in text and "[exit code 0]" in text


def test_progress_parser_is_tolerant():
    assert parseLine("") is None and parseLine("epoch 3") is None and parseLine("{not json") is None
    assert parseLine('{"no_event": 1}') is None and parseLine("[1, 2]") is None
    state = ProgressState()
    assert state.feed('{"event": "some_future_event", "x": 1}')["event"] == "some_future_event"
    assert state.feed('{"event": "epoch", "stage": 1, "epoch": "x", "loss": null}') is not None
    assert state.loss is None and state.fraction() is None and state.statusText().startswith("Starting")
    predict = ProgressState()
    predict.feed(json.dumps({"event": "start", "command": "predict", "cases": 1}))
    predict.feed(json.dumps({"event": "progress", "fraction": 0.25, "case": "a.nrrd", "stage": "segmenting"}))
    assert predict.fraction() == 0.25 and predict.statusText() == "Segmenting (segmenting): 25%"
    predict.feed(json.dumps({"event": "error", "message": "out of memory", "log": None}))
    assert predict.statusText() == "Error: out of memory"
    assert formatSeconds(3725) == "1h02m" and formatSeconds(65) == "1m05s" and formatSeconds(None) == ""


GRACEFUL = """
import json, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "w").write(str(child.pid))
def stop(signum, frame):
    print(json.dumps({"event": "checkpoint", "kind": "last", "path": "last.pt"}), flush=True)
    print(json.dumps({"event": "done", "status": "cancelled", "model_dir": ".", "mean_dice": None}), flush=True)
    sys.exit(130)
signal.signal(signal.SIGTERM, signal.SIG_IGN if len(sys.argv) > 2 else stop)
print(json.dumps({"event": "start", "command": "train", "stages": [1], "epochs": {"1": 5}}), flush=True)
print(json.dumps({"event": "epoch", "stage": 1, "epoch": 1, "epochs": 5, "loss": 1.0}), flush=True)
while True:
    time.sleep(0.1)
"""


@posixOnly
@pytest.mark.parametrize("ignoresTerm", [False, True], ids=["stops-politely", "killed-after-grace"])
def test_cancel_stops_the_whole_process_tree(tmp_path, ignoresTerm):
    pidFile = tmp_path / "grandchild.pid"
    args = script(tmp_path, "run.py", GRACEFUL) + [str(pidFile)] + (["ignore"] if ignoresTerm else [])
    job = jobs.TrainingJob(ProcessRunner(args, logPath=tmp_path / "run.log"), tmp_path / "model")
    job.cancelGrace = 1.5
    job.stopFileGrace = 0.0  # this stand-in ignores the STOP file: the signal at once
    job.start()
    assert waitFor(lambda: job.process() or job.progress.epoch == 1, 30)
    assert waitFor(pidFile.exists)
    grandchild = int(pidFile.read_text())
    assert pidAlive(grandchild)
    started = time.monotonic()
    job.cancel()
    assert job.status == jobs.CANCELLING
    assert job.wait(timeout=30) == jobs.CANCELLED
    elapsed = time.monotonic() - started
    assert job.message.startswith("Training cancelled")
    assert waitFor(lambda: not pidAlive(grandchild), 10), "the grandchild survived the cancel"
    if ignoresTerm:
        assert elapsed >= 1.4 and job.runner.killed and job.returncode == -signal.SIGKILL
    else:
        assert elapsed < 1.4 and not job.runner.killed and job.returncode == 130
        assert job.progress.done["status"] == "cancelled"


OWN_SESSION_CHILD = """
import subprocess, sys, time
# like torchrun, which starts each rank in a session of its own (out of reach of a process-group signal)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(120)
"""


@posixOnly
@pytest.mark.parametrize("withPsutil", [True, False], ids=["psutil", "ps"])
def test_kill_reaches_a_grandchild_in_a_session_of_its_own(tmp_path, withPsutil, monkeypatch):
    if withPsutil:
        pytest.importorskip("psutil")
    else:  # Slicer's Python may lack psutil: the parent links `ps` lists are used instead
        monkeypatch.setitem(sys.modules, "psutil", None)
    pidFile = tmp_path / "grandchild.pid"
    runner = ProcessRunner(script(tmp_path, "run.py", OWN_SESSION_CHILD) + [str(pidFile)]).start()
    assert waitFor(lambda: pidFile.exists() and pidFile.read_text(), 30)
    grandchild = int(pidFile.read_text())
    assert os.getsid(grandchild) != os.getsid(runner.pid)
    runner.stop(grace=0)
    assert runner.wait(timeout=30) == -signal.SIGKILL
    assert waitFor(lambda: not pidAlive(grandchild), 10), "the grandchild in its own session survived the kill"


WATCHES_STOP_FILE = """
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only the stop file can stop this one
stop = os.path.join(sys.argv[1], "STOP")
print(json.dumps({"event": "start", "command": "train", "stages": [1], "epochs": {"1": 5}}), flush=True)
print(json.dumps({"event": "epoch", "stage": 1, "epoch": 1, "epochs": 5, "loss": 1.0}), flush=True)
while not os.path.exists(stop):
    time.sleep(0.05)
print(json.dumps({"event": "done", "status": "cancelled", "model_dir": ".", "mean_dice": None}), flush=True)
sys.exit(130)
"""


def test_cancel_asks_with_a_stop_file_in_the_model_folder_first(tmp_path):
    """A cross-platform stop request (a console signal does not reach a process started without a
    console on Windows): the trainer stops when STOP appears in its model folder, before any signal."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "STOP").write_text("left over from an earlier run")
    job = jobs.TrainingJob(ProcessRunner(script(tmp_path, "run.py", WATCHES_STOP_FILE) + [str(model)]), model)
    job.stopFileGrace = 30.0
    job.start()
    assert not (model / "STOP").exists(), "a stale stop file would stop the new training at once"
    assert waitFor(lambda: job.process() or job.progress.epoch == 1, 30)
    started = time.monotonic()
    job.cancel()
    assert (model / "STOP").is_file() and job.status == jobs.CANCELLING
    assert job.wait(timeout=30) == jobs.CANCELLED
    assert time.monotonic() - started < 10 and job.returncode == 130 and not job.runner.killed
    assert not (model / "STOP").exists(), "removed when the job ends, so a resume is not stopped"


CRASH = """
import json, sys
print("reading the data", file=sys.stderr, flush=True)
print(json.dumps({"event": "start", "command": "train", "stages": [1], "epochs": {"1": 5}}), flush=True)
print("Traceback (most recent call last):", file=sys.stderr)
print("RuntimeError: CUDA error: device-side assert triggered", file=sys.stderr, flush=True)
sys.exit(3)
"""


def test_crash_reports_last_error_line_and_log_path(tmp_path):
    log = tmp_path / "logs" / "train.log"
    job = jobs.TrainingJob(ProcessRunner(script(tmp_path, "crash.py", CRASH), logPath=log), tmp_path / "model")
    job.start()
    with pytest.raises(LTUDAError) as caught:
        job.wait(timeout=60)
    assert job.status == jobs.FAILED and job.returncode == 3
    assert "Training failed: RuntimeError: CUDA error: device-side assert triggered" in job.message
    assert str(log) in job.message and str(caught.value) == job.message
    assert f"Log: {log}" in caught.value.details and "reading the data" in caught.value.details
    assert "CUDA error" in log.read_text(encoding="utf-8")


def test_error_event_message_wins_over_stderr(tmp_path):
    body = """
    import json, sys
    print("some warning", file=sys.stderr, flush=True)
    print(json.dumps({"event": "error", "message": "dataset.json: class 'liver' is labelled by no case", "log": None}))
    sys.exit(1)
    """
    job = jobs.BackendJob(ProcessRunner(script(tmp_path, "err.py", body)), title="Training")
    job.start()
    assert job.wait(timeout=60, raiseOnError=False) == jobs.FAILED
    assert job.message == "Training failed: dataset.json: class 'liver' is labelled by no case"


@posixOnly
def test_killed_by_the_system_suggests_memory(tmp_path):
    body = """
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
    """
    job = jobs.BackendJob(ProcessRunner(script(tmp_path, "oom.py", body)), title="Training")
    job.start()
    assert job.wait(timeout=60, raiseOnError=False) == jobs.FAILED
    assert "killed (signal 9)" in job.message and "memory" in job.message


def test_non_utf8_output_is_decoded_with_replacement(tmp_path):
    body = """
    import sys
    sys.stdout.buffer.write(b'caf\\xe9 \\xff\\xfe broken\\n')
    sys.stdout.buffer.write(b'{"event": "done", "status": "completed"}\\n')
    sys.stdout.flush()
    sys.stderr.buffer.write(b'\\x80\\x81 latin-1 stderr \\xe9t\\xe9\\r\\n')
    sys.stderr.flush()
    """
    log = tmp_path / "run.log"
    runner = ProcessRunner(script(tmp_path, "bytes.py", body), logPath=log).start()
    items = []
    assert runner.wait(timeout=60, onItems=items.extend) == 0
    stdout = [v for k, v in items if k == STDOUT]
    stderr = [v for k, v in items if k == STDERR]
    assert stdout[0] == "caf\ufffd \ufffd\ufffd broken"
    assert parseLine(stdout[1])["status"] == "completed"
    assert stderr == ["\ufffd\ufffd latin-1 stderr \ufffdt\ufffd"]
    assert items[-1] == (EXIT, 0)
    assert "\ufffd" in log.read_text(encoding="utf-8")


def test_missing_executable_fails_with_a_message(tmp_path):
    job = jobs.BackendJob(ProcessRunner([str(tmp_path / "no-such-python"), "-m", "ltuda"]), title="Training")
    job.start()
    assert job.status == jobs.FAILED
    assert "Could not start the backend" in job.message and "no-such-python" in job.message


def test_wait_times_out_and_poll_never_blocks(tmp_path):
    body = """
    import time
    time.sleep(30)
    """
    runner = ProcessRunner(script(tmp_path, "sleep.py", body)).start()
    try:
        started = time.monotonic()
        assert runner.poll() == []
        assert runner.wait(timeout=0.3) is None
        assert time.monotonic() - started < 5
    finally:
        runner.stop(grace=0)
        assert runner.wait(timeout=30) is not None
