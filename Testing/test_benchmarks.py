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
