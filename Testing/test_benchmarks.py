"""The benchmarks' smallest configurations run end to end, so they cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_accuracy_benchmark_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "accuracy.py"), "--smoke", "--out", str(tmp_path / "results"),
                             "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "accuracy.json").read_text())
    for key in ("fully-supervised", "naive", "labeled-only", "marginal-exclusion", "cda", "ltuda"):
        assert 0.0 <= results[key]["mean_dice"] <= 1.0
        assert set(results[key]) >= {"mean_dice", "dice_std", "per_organ_dice", "mean_hd95_mm"}
        assert f"| {key} |" in (tmp_path / "results" / "accuracy.md").read_text()
    heads = results["heads"]
    assert set(heads) == {"auto", "linear", "proto-labeled", "proto-unlabeled"}
    # "auto" is the best-validating named head, scored once and shared, not a fifth prediction
    assert any(heads["auto"]["per_seed_mean_dice"] == heads[h]["per_seed_mean_dice"] for h in heads if h != "auto")
    assert results["complete"] is True and "INCOMPLETE" not in (tmp_path / "results" / "accuracy.md").read_text()


def test_accuracy_benchmark_method_subset_settings_and_equal_iterations(tmp_path):
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "accuracy.py"), "--smoke", "--methods", "labeled-only,ltuda",
                             "--equal-iterations", "--set", "epochs_stage2=2", "--out", str(tmp_path / "results"),
                             "--work", str(work)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "accuracy.json").read_text())
    assert set(results["methods"]) == {"labeled-only", "ltuda"}
    assert results["settings"] == {"epochs_stage2": 2} and results["equal_iterations"] is True

    def epochs(key):
        return json.loads((work / key / "seed0" / "model" / "model.json").read_text())["training"]["epochs"]
    # the smoke schedule is 1 + 2 epochs: LTUDA runs both stages, labelled-only one stage as long as both
    assert epochs("ltuda") == {"1": 1, "2": 2}
    assert epochs("labeled-only") == {"0": 3}


def test_accuracy_benchmark_rejects_unknown_methods_and_settings(tmp_path):
    for args, message in ((["--methods", "labeled-only,magic"], "unknown magic"),
                          (["--set", "seed=3"], "expected KEY=VALUE"), (["--set", "lr"], "expected KEY=VALUE")):
        result = subprocess.run([sys.executable, str(BENCHMARKS / "accuracy.py"), *args, "--out", str(tmp_path)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
