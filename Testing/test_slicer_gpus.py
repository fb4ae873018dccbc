"""The Train section's GPUs choice (1 / all / N) in the module's logic, against real MRML and real
subprocesses: one process keeps today's exact `python -m ltuda train` argument list; more than one
runs the same arguments under `python -m torch.distributed.run` (torchrun); "all" is the probe's GPU
count; bad values give one message. End to end, a 2-process training on the CPU (gloo, allowed
because the number was asked for explicitly) through logic.train is cancelled after its first epoch:
it ends "cancelled" (torchrun exits 1 when its ranks exit 130) with a usable model and every process
of the tree gone. (A 2-process run to completion is tested on the command line in test_distributed.py;
through the logic it would add ~25 s, over this file's time budget.)
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
psutil = pytest.importorskip("psutil")

from LTUDASegmentationLib import jobs  # noqa: E402
from LTUDASegmentationLib.backend import ProbeResult  # noqa: E402
from LTUDASegmentationLib.errors import LTUDAError  # noqa: E402
from LTUDASegmentationLib.gpus import choiceFromSpinBox, parseGpus, spinBoxValue  # noqa: E402
from LTUDASegmentationLib.logic import LTUDALogicCore  # noqa: E402
from LTUDASegmentationLib.models import readModel  # noqa: E402
from LTUDASegmentationLib.settings import JsonSettings  # noqa: E402
from slicer_scene import new_logic  # noqa: E402

TINY = ["--iterations-per-epoch", "2", "--image-size", "32", "--batch-size", "2", "--val-fraction", "0.5"]


@pytest.fixture
def logic(scene, tmp_path):
    logic = new_logic(scene, tmp_path)
    yield logic
    logic.stopAll()


def addPhantomCases(logic, dataset):
    """The conftest phantoms' training cases as file cases (image + label files with a value map)."""
    folder = Path(dataset).parent
    manifest = json.loads(Path(dataset).read_text())
    logic.setOrgans([c["name"] for c in manifest["classes"]])
    for case in manifest["cases"]:
        if case.get("split", "train") == "train":
            logic.addFileCase(folder / case["image"], folder / case["label"],
                              {int(k): v for k, v in case["labels"].items()}, name=case["id"])


def probeWith(logic, gpu):
    """A probe report of the logic's own backend Python, with the GPUs given (None: CPU only)."""
    report = {"python": "3", "executable": sys.executable, "gpu": gpu, "errors": {},
              "packages": {"torch": "2.13.0", "monai": "1.6", "SimpleITK": "2.5", "numpy": "2.0", "pynrrd": "1.1",
                           "ltuda": "0.1"}}
    return ProbeResult(report, logic.backend())


def preparedRunner(job):
    """The runner a training job starts once its cases are exported (built, not started)."""
    while not job.preparation.step():
        pass
    return job.makeRunner(job.preparation.result)


# ------------------------------------------------------------------------------- the choice
@pytest.mark.parametrize("value, expected", [(1, 1), ("all", "all"), (" ALL ", "all"), (2, 2), ("3", 3), (64, 64)])
def test_gpus_choices(value, expected):
    assert parseGpus(value) == expected


@pytest.mark.parametrize("value", [0, -1, 65, 1.5, 2.0, True, None, "", "two", "1.5", "-2", [2]])
def test_a_bad_gpus_value_gives_one_clear_message(value, logic, tmp_path):
    with pytest.raises(LTUDAError) as caught:
        parseGpus(value)
    assert str(caught.value) == (f"GPUs must be 1, 'all' or a whole number of training processes from 2 to 64, "
                                 f"not {value!r}.")
    # refused by train() before anything is exported or started, and never remembered
    with pytest.raises(LTUDAError, match="^GPUs must be"):
        logic.train(str(tmp_path / "model"), gpus=value, checkBackend=False)
    with pytest.raises(LTUDAError, match="^GPUs must be"):
        logic.setTrainGpus(value)
    assert logic.trainingJob is None and not (tmp_path / "work").exists() and logic.trainGpus() == 1


def test_the_choice_is_remembered_per_computer_and_maps_to_the_spin_box(logic, tmp_path):
    assert logic.trainGpus() == 1  # default: one process, as before
    logic.setTrainGpus("all")
    assert JsonSettings(tmp_path / "settings.json").value("TrainGpus") == "all"
    again = LTUDALogicCore(logic.scene, JsonSettings(tmp_path / "settings.json"))
    assert again.trainGpus() == "all"
    again.setTrainGpus(4)
    assert LTUDALogicCore(logic.scene, JsonSettings(tmp_path / "settings.json")).trainGpus() == 4
    again.settings.setValue("TrainGpus", "garbage")  # e.g. written by hand: read as the default
    assert again.trainGpus() == 1
    assert [spinBoxValue(c) for c in (1, "all", 3)] == [1, 0, 3]
    assert [choiceFromSpinBox(v) for v in (1, 0, 3)] == [1, "all", 3]


def test_all_resolves_from_the_probe_and_falls_back_to_one_process_with_a_note(logic):
    # (reports as probe.py writes them; running the real probe costs seconds and is tested elsewhere)
    logic.lastProbe = probeWith(logic, None)  # CPU only: "all" is one process, with a note
    assert logic.planTrainingProcesses("all", "auto") == (
        1, "GPUs 'all': the backend sees no CUDA GPU, so training runs as one process on the CPU.")
    logic.lastProbe = probeWith(logic, {"name": "H200", "memory_gb": 139.8, "count": 4})
    assert logic.planTrainingProcesses("all", "auto")[0] == 4
    assert logic.planTrainingProcesses("all", "cuda") == (4, "Training on all 4 GPUs the backend sees: 4 processes "
                                                             "(torchrun, NCCL).")
    assert logic.planTrainingProcesses(2, "auto")[0] == 2
    assert logic.planTrainingProcesses(1, "auto") == (1, "")
    assert logic.planTrainingProcesses("all", "cpu") == (1, "GPUs 'all' with the device 'cpu': training runs as one "
                                                            "process on the CPU.")
    with pytest.raises(LTUDAError, match=r"^GPUs 8: the backend sees 4 GPUs \(H200\). Choose at most 4 \(or 'all'\)"):
        logic.planTrainingProcesses(8, "auto")
    logic.lastProbe = probeWith(logic, {"name": "RTX 4090", "memory_gb": 24.0, "count": 1})
    processes, note = logic.planTrainingProcesses("all", "auto")
    assert processes == 1 and "one GPU (RTX 4090)" in note and "one process" in note
    with pytest.raises(LTUDAError, match="sees one GPU"):
        logic.planTrainingProcesses(2, "auto")
    logic.lastProbe = probeWith(logic, None)
    assert logic.planTrainingProcesses("all", "auto")[0] == 1
    with pytest.raises(LTUDAError, match="No CUDA GPU is visible"):
        logic.planTrainingProcesses(2, "cuda")
    processes, note = logic.planTrainingProcesses(3, "auto")  # explicitly asked for on a CPU-only machine
    assert processes == 3 and "CPU" in note and "gloo" in note


# ------------------------------------------------------------------------ the argument lists
def test_one_process_keeps_todays_arguments_and_two_run_them_under_torchrun(logic, tiny_dataset, tmp_path):
    addPhantomCases(logic, tiny_dataset)
    model = str(tmp_path / "model")
    job = logic.train(model, device="cpu", epochsStage1=1, epochsStage2=2, extraArgs=TINY, checkBackend=False)
    runner = preparedRunner(job)
    manifest = os.path.join(job.workDir, "dataset.json")
    today = ["train", "--dataset", manifest, "--out", model, "--preset", "fast", "--device", "cpu", "--progress",
             "jsonl", "--epochs-stage1", "1", "--epochs-stage2", "2", "--allow-outside-paths", *TINY]
    assert runner.args == [sys.executable, "-m", "ltuda", *today]
    assert runner.env == logic.backend().environment() and job.processes == 1 and not job.logLines
    job.cancel()
    assert job.status == jobs.CANCELLED

    job = logic.train(model, device="cpu", epochsStage1=1, epochsStage2=2, extraArgs=TINY, checkBackend=False,
                      gpus=2)
    runner = preparedRunner(job)
    manifest = os.path.join(job.workDir, "dataset.json")
    today[2] = manifest
    assert runner.args == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ltuda", *today]
    assert runner.env["PYTHONPATH"] == logic.backend().environment()["PYTHONPATH"]
    assert runner.env["OMP_NUM_THREADS"] == os.environ["OMP_NUM_THREADS"]  # the user's setting is kept
    assert job.processes == 2 and list(job.logLines) == [job.processesNote]
    assert job.processesNote.startswith("2 training processes on the CPU (the device is 'cpu'; torchrun with gloo)")
    job.cancel()


# ------------------------------------------------------------------------------ end to end
def test_cancel_of_a_two_process_training_ends_cancelled_with_every_process_gone(logic, tiny_dataset, tmp_path):
    addPhantomCases(logic, tiny_dataset)
    job = logic.train(str(tmp_path / "ddp-cancel"), device="cpu", epochsStage1=50, epochsStage2=50,
                      extraArgs=["--iterations-per-epoch", "4", "--image-size", "32", "--batch-size", "2",
                                 "--val-fraction", "0"], checkBackend=False, gpus=2)
    deadline = time.monotonic() + 180
    while job.progress.epoch is None and not job.finished and time.monotonic() < deadline:
        job.process()
        time.sleep(0.05)
    assert job.progress.epoch is not None, job.message + "\n" + "\n".join(job.logLines)
    tree = [psutil.Process(job.runner.pid)] + psutil.Process(job.runner.pid).children(recursive=True)
    assert "torch.distributed.run" in tree[0].cmdline()
    assert len([p for p in tree[1:] if "ltuda" in p.cmdline()]) == 2  # torchrun's 2 ranks
    job.cancel()
    assert job.wait(timeout=90) == jobs.CANCELLED, job.message + "\n" + job.details
    # the ranks agreed on the STOP file and saved; torchrun exits 1 when its ranks exit 130: still "cancelled"
    assert job.returncode == 1 and not job.runner.killed
    assert job.progress.done["status"] == "cancelled"
    assert "usable" in job.message and job.modelDir in [m.path for m in logic.models()]
    assert readModel(job.modelDir).organNames == [o["name"] for o in logic.organs]  # rank 0 saved a model
    gone = time.monotonic() + 10
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree) and time.monotonic() < gone:
        time.sleep(0.1)
    assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    model = tmp_path / "ddp-cancel"
    assert not (model / "STOP").exists() and not (model / "train.lock").exists()
