"""benchmarks/gpu_check.sh's argument and wheel-folder checks, and its plan and report (issue 16).

The whole dry run (a CPU rehearsal of every step, ~2 minutes) is run by hand, not here: see the script.
"""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check_report  # noqa: E402


def _check(*args):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, message", [
    (["--frobnicate"], "unknown argument: --frobnicate"),
    (["--budget-s", "soon", "--dry-run"], "--budget-s and --accuracy-s take whole seconds, got 'soon'"),
    (["--python", "no-such-python-3", "--dry-run"], "no Python interpreter 'no-such-python-3'"),
])
def test_bad_arguments_are_named_and_exit_1(args, message):
    result = _check(*args)
    assert result.returncode == 1 and f"gpu_check: {message}" in result.stderr


def test_a_wheel_folder_without_simpleitk_or_with_a_damaged_wheel_is_refused(tmp_path):
    assert "is not a folder" in _check("--wheels", tmp_path / "missing", "--dry-run", "--work", tmp_path / "w").stderr
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("monai-1.6.1-py3-none-any.whl", "pynrrd-1.1.3-py3-none-any.whl"):
        with zipfile.ZipFile(wheels / name, "w") as archive:
            archive.writestr("x/METADATA", "Name: x\n")
    result = _check("--wheels", wheels, "--dry-run", "--work", tmp_path / "w")
    assert result.returncode == 1 and f"{wheels} has no SimpleITK wheel" in result.stderr
    (wheels / "simpleitk-2.5.7-cp311-abi3-manylinux2014_x86_64.whl").write_bytes(b"not a zip")
    result = _check("--wheels", wheels, "--dry-run", "--work", tmp_path / "w")
    assert result.returncode == 1 and "is damaged" in result.stderr


def test_the_accuracy_plan_follows_the_measured_speed(tmp_path):
    speed = tmp_path / "speed.json"
    speed.write_text(json.dumps({"train_img_s_ours_paper_stage1_gpu": 200.0, "train_img_s_ours_paper_stage2_gpu": 100.0}))
    epochs, iterations = gpu_check_report.plan(speed, 270)
    # 50 and 25 steps/s alone, halved when the two methods share the GPU: 0.12 s per pair of iterations
    assert (epochs, iterations) == (4, int(0.6 * 270 / (4 * 0.12)))
    assert gpu_check_report.plan(speed, 1) == (4, 5)  # never less than a few iterations
    assert gpu_check_report.plan(tmp_path / "absent.json", 270) == (4, 50)


def test_the_report_states_each_target_and_each_step(tmp_path):
    (tmp_path / "speed.json").write_text(json.dumps({
        "gpu_name": "NVIDIA H200", "machine": {"torch": "2.11.0+cu130"},
        "train_speedup_paper_stage2_gpu": 6.2, "train_speedup_fast_stage2_gpu": 4.1,
        "infer_s_512x512x200_gpu_fast": 2.4, "train_img_s_ours_fast_stage1_cpu": 9.0}))
    steps = tmp_path / "steps.tsv"
    steps.write_text("install\t0\t20\t120\nspeed\t0\t150\t200\naccuracy\t124\t360\t360\nddp\t0\t40\t150\n")
    (tmp_path / "ddp_smoke.jsonl").write_text(
        '{"event": "start", "processes": 2, "device_name": "NVIDIA H200 (140 GiB)"}\n'
        '{"event": "epoch", "images_per_s": 80.0}\n{"event": "done", "status": "completed"}\n')
    report = gpu_check_report.summarise(tmp_path, steps, "gloo", 575.0, "bash benchmarks/gpu_check.sh", False)
    assert report["targets"]["stage-2 training (paper) >= 5x the reference-style step"] == {"value": 6.2, "met": True}
    assert report["targets"]["stage-2 training (fast) >= 5x the reference-style step"]["met"] is False
    assert report["targets"]["predict 512x512x200 (fast) < 3 s"]["met"] is True
    assert "train_img_s_ours_fast_stage1_cpu" not in report["speed"]  # GPU rows only
    assert report["ddp_smoke"]["status"] == "completed" and report["ddp_smoke"]["processes"] == 2
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| accuracy | 124 | 360 | 360 |" in md and "| NO |" in md and "NVIDIA H200" in md
