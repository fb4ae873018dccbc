"""Issue 13, defect 5 (module side): Cancel when the backend runs on Slicer's own Python.

Slicer's `PythonSlicer` is a launcher (CTKAppLauncher): it runs `python-real` as its own child and
forwards no signal. These tests put a launcher-like wrapper of that kind between the module's
runner and a real `python -m ltuda train` subprocess (POSIX only: the wrappers are scripts).
"""

import os
import signal
import stat
import sys
import textwrap
import time

import pytest

slicer = pytest.importorskip("slicer")

from LTUDASegmentationLib import backend as backendModule  # noqa: E402
from LTUDASegmentationLib import jobs, synthetic  # noqa: E402
from LTUDASegmentationLib.logic import LTUDALogicCore  # noqa: E402
from LTUDASegmentationLib.runner import EXIT, ProcessRunner  # noqa: E402
from LTUDASegmentationLib.settings import JsonSettings  # noqa: E402

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the launcher stand-ins are POSIX scripts")

ORGANS = ["liver", "spleen"]


def _script(path, text):
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fakeSlicerBin(folder, withPythonReal=True):
    """bin/PythonSlicer: like CTKAppLauncher, runs bin/python-real as a child, installs no signal
    handler (SIGTERM ends it at once) and leaves its child running; bin/python-real: this Python."""
    folder.mkdir(parents=True, exist_ok=True)
    launcher = _script(folder / "PythonSlicer", f"""
        #!{sys.executable}
        import os, subprocess, sys
        here = os.path.dirname(os.path.abspath(__file__))
        child = subprocess.Popen([os.path.join(here, "python-real")] + sys.argv[1:])
        sys.exit(child.wait())
        """)
    if withPythonReal:
        _script(folder / "python-real", f"""
            #!/bin/sh
            exec "{sys.executable}" "$@"
            """)
    return launcher


def test_slicers_python_starts_python_real_not_the_launcher(tmp_path, monkeypatch):
    launcher = fakeSlicerBin(tmp_path / "bin")
    monkeypatch.setattr(backendModule, "slicerPythonExecutable", lambda: str(launcher))
    backend = backendModule.Backend(None, startupEnvironment=lambda: {"STARTUP_ONLY": "1"})
    assert backend.executable() == str(tmp_path / "bin" / "python-real")
    assert backend.command("train")[:3] == [str(tmp_path / "bin" / "python-real"), "-m", "ltuda"]
    env = backend.environment()  # Slicer's own environment, not the one Slicer was started from
    assert "STARTUP_ONLY" not in env and env["PYTHONPATH"].startswith(backend.backendPath)
    # no python-real next to it: the launcher itself, with the startup environment
    (tmp_path / "bin" / "python-real").unlink()
    assert backend.executable() == str(launcher) and backend.environment()["STARTUP_ONLY"] == "1"


def test_a_backend_behind_a_launcher_gets_the_whole_grace_period(tmp_path):
    """The launcher ends at once on SIGTERM; the real process it started must still get the grace
    period to save, not be killed 5 s after its launcher ended."""
    marker = tmp_path / "saved"
    child = _script(tmp_path / "python-real", f"""
        #!{sys.executable}
        import signal, sys, time
        def stop(*args):
            time.sleep(7)  # a checkpoint that takes a while to write
            open({str(marker)!r}, "w").write("saved")
            sys.exit(130)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        while True:
            time.sleep(0.1)
        """)
    launcher = fakeSlicerBin(tmp_path, withPythonReal=False)
    assert child.exists()
    runner = ProcessRunner([str(launcher)]).start()
    deadline = time.monotonic() + 60
    lines = []
    while "ready" not in lines and time.monotonic() < deadline:
        lines += [v for k, v in runner.poll() if k != EXIT]
        time.sleep(0.05)
    runner.stop(grace=30)
    assert runner.wait(timeout=45) == -signal.SIGTERM  # the launcher's own exit
    assert marker.read_text() == "saved", "the real process was killed before it had saved"


def test_cancel_through_the_launcher_saves_a_checkpoint_and_exits_130(scene, tmp_path, monkeypatch):
    launcher = fakeSlicerBin(tmp_path / "slicer" / "bin")
    monkeypatch.setattr(backendModule, "slicerPythonExecutable", lambda: str(launcher))
    settings = JsonSettings(tmp_path / "settings.json")
    settings.setValue("WorkFolder", str(tmp_path / "work"))
    settings.setValue("ModelsFolder", str(tmp_path / "models"))
    settings.setValue("BackendPython", "")  # Slicer's own Python
    logic = LTUDALogicCore(scene, settings)
    logic.setOrgans(ORGANS)
    logic.addCasesFromNodes([synthetic.addSyntheticCase(scene, "a", ORGANS, ["liver"], seed=1),
                             synthetic.addSyntheticCase(scene, "b", ORGANS, ["spleen"], flip=True, seed=2),
                             synthetic.addSyntheticCase(scene, "c", ORGANS, ORGANS, seed=3)])
    job = logic.train(str(tmp_path / "model"), device="cpu", epochsStage1=50, epochsStage2=50, checkBackend=False,
                      extraArgs=["--iterations-per-epoch", "4", "--image-size", "32", "--batch-size", "2"])
    job.stopFileGrace = 150.0  # SIGTERM only after this: the trainer must stop on the STOP file itself
    try:
        deadline = time.monotonic() + 300
        while (job.progress.epoch is None or job.status != jobs.RUNNING) and not job.finished \
                and time.monotonic() < deadline:
            job.process()
            time.sleep(0.1)
        assert job.status == jobs.RUNNING and job.progress.epoch is not None, job.message
        assert os.path.basename(job.runner.args[0]) == "python-real"  # not the launcher
        # An epoch event comes just before that epoch's validation and checkpoint writes: the cancel
        # lands while they run, and the trainer acts on it at its next step.
        job.cancel()
        cancelled = time.monotonic()
        assert os.path.isfile(os.path.join(job.modelDir, "STOP")), "Cancel asks with the stop file first"
        assert job.wait(timeout=180) == jobs.CANCELLED, job.message
        assert time.monotonic() - cancelled < 100, "stopped by the SIGTERM fallback, not by the STOP file"
    finally:
        logic.stopAll()
    assert job.returncode == 130, job.returncode  # the trainer's own exit, not a launcher's
    assert not job.runner.killed
    assert os.path.isfile(os.path.join(job.modelDir, "checkpoints", "last.pt"))
    assert not os.path.exists(os.path.join(job.modelDir, "STOP"))  # a resume would stop at once
    assert job.message.startswith("Training cancelled")
