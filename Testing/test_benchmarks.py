"""The benchmarks' smallest configurations run end to end, so they cannot rot."""

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(tmp_path, *args, timeout=900):
    return subprocess.run([sys.executable, str(BENCHMARKS / "accuracy.py"), "--smoke", "--out", str(tmp_path / "results"),
                           "--work", str(tmp_path / "work"), *args], capture_output=True, text=True, timeout=timeout)


def test_accuracy_benchmark_smoke(tmp_path):
    result = _run(tmp_path, "--seeds", "2", "--jobs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "accuracy.json").read_text())
    toy = results["protocols"]["toy"]
    assert toy["seeds"] == [43, 44] and toy["complete"] is True and toy["equal_iterations"] is True
    markdown = (tmp_path / "results" / "accuracy.md").read_text()
    for key in ("fully-supervised", "labeled-only", "naive", "marginal-exclusion", "cda", "ltuda", "oracle"):
        method = toy["methods"][key]
        assert 0.0 <= method["mean_dice"] <= 1.0 and len(method["per_seed"]) == 2
        assert set(method["per_organ_dice"]) == {"liver", "spleen", "kidney", "pancreas"}
        assert method["iterations"] == 4  # smoke: 1 + 1 epochs of 2 iterations, one-stage methods as many
        assert f"| {key} |" in markdown
    test = toy["paired_tests"]["ltuda_vs_labeled-only"]
    expected_gain = sum(toy["methods"]["ltuda"]["per_seed"]) / 2 - sum(toy["methods"]["labeled-only"]["per_seed"]) / 2
    assert test["seeds"] == 2 and abs(test["mean_gain"] - expected_gain) < 1e-9
    # the teacher diagnostics of LTUDA's run travel into the results (the phantoms record full labels)
    quality = toy["methods"]["ltuda"]["pseudo_label_quality"][0]
    assert set(quality[-1]["per_organ"]["pancreas"]) == {"precision", "recall", "dice"}
    assert "INCOMPLETE" not in markdown


def _process_group_ends(group: int, within_s: float) -> bool:
    """Whether every process of the group has gone (exited children take a moment to be reaped)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_stop_signal_stops_the_whole_benchmark_and_leaves_the_runs_resumable(tmp_path, jobs):
    # long runs (400 epochs of 2 iterations), so every one of them is still training when the stop comes
    command = [sys.executable, str(BENCHMARKS / "accuracy.py"), "--smoke", "--out", str(tmp_path / "results"),
               "--work", str(tmp_path / "work"), "--methods", "labeled-only", "--seeds", "3", "--jobs", jobs,
               "--set", "epochs_stage1=400"]
    benchmark = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "work").glob("toy/main/labeled-only/seed*/model/checkpoints/last.pt")):
            assert benchmark.poll() is None and time.monotonic() < deadline, benchmark.communicate()[1][-3000:]
            time.sleep(0.2)
        benchmark.send_signal(signal.SIGTERM)  # as `kill PID` does: the benchmark's own process only
        _, stderr = benchmark.communicate(timeout=120)
        assert benchmark.returncode == 130, stderr[-3000:]
        assert "run the same command again to resume" in stderr and "Traceback" not in stderr
        assert _process_group_ends(benchmark.pid, within_s=15)  # no worker was left behind, training on
    finally:  # a failing run must not leave its workers training for the rest of the suite
        with contextlib.suppress(ProcessLookupError):
            os.killpg(benchmark.pid, signal.SIGKILL)
    runs = sorted((tmp_path / "work").glob("toy/main/labeled-only/seed*/model"))
    # the running trainings saved a checkpoint and did not finish; the third seed never started
    assert 1 <= len(runs) <= int(jobs)
    for run in runs:  # the best model so far is saved beside the checkpoint, marked as not completed
        assert json.loads((run / "model.json").read_text())["training"]["completed"] is False
        assert (run / "checkpoints" / "last.pt").exists()
    assert not list((tmp_path / "work").rglob("STOP"))


def test_a_stop_while_a_training_loads_its_data_still_stops_that_training(tmp_path, monkeypatch):
    # Trainer.run() loads the data before its own handler listens: a stop in that window must not be lost
    # (it was: the worker noted it and the training ran to its end, hours at 8x)
    accuracy = _benchmark_module()
    from ltuda.train.trainer import Trainer

    phantoms = accuracy.make_phantoms(tmp_path / "work", "toy", smoke=True)
    load = Trainer._load_data

    def load_then_stop(self):
        load(self)
        os.kill(os.getpid(), signal.SIGTERM)  # as the benchmark forwards a `kill` to its workers

    monkeypatch.setattr(Trainer, "_load_data", load_then_stop)
    monkeypatch.setattr(accuracy, "_stop_asked", False)
    previous = signal.signal(signal.SIGTERM, accuracy._note_stop)  # a worker's handler (_worker_init)
    try:
        settings = {"epochs_stage1": 400, "iterations_per_epoch": 2, "image_size": 32, "batch_size": 2}
        with pytest.raises(accuracy.BenchmarkStopped):
            accuracy.run_one(phantoms["partial"], "labeled-only", 43, "fast", settings, tmp_path / "run",
                             tmp_path / "cache")
    finally:
        signal.signal(signal.SIGTERM, previous)
    model = tmp_path / "run" / "model"
    assert json.loads((model / "model.json").read_text())["training"]["completed"] is False
    assert (model / "checkpoints" / "last.pt").exists()  # the same command resumes it


def test_accuracy_benchmark_learning_curve_and_settings(tmp_path):
    work = tmp_path / "work"
    result = _run(tmp_path, "--seeds", "1", "--learning-curve", "1,2", "--set", "epochs_stage2=2")
    assert result.returncode == 0, result.stderr[-3000:]
    curve = json.loads((tmp_path / "results" / "accuracy.json").read_text())["learning_curve"]["toy"]
    assert set(curve) == {"1", "2", "commands", "preset", "settings"} and curve["settings"]["epochs_stage2"] == 2
    assert curve["2"]["commands"]["ltuda"] == curve["commands"][0]
    assert set(curve["2"]) >= {"ltuda", "labeled-only", "ltuda_vs_labeled-only"}
    assert curve["2"]["per_seed"]["ltuda"]["43"] == curve["2"]["ltuda"]  # one seed: its mean is that seed's

    def epochs(factor, key):
        return json.loads((work / "toy" / factor / key / "seed43" / "model" / "model.json").read_text())["training"]["epochs"]
    # smoke schedule 1 + 2 epochs (the --set); x2 doubles both; labelled-only gets both stages' epochs
    # 1x is the main benchmark's folder: the same run, trained once
    assert epochs("main", "ltuda") == {"1": 1, "2": 2} and epochs("main", "labeled-only") == {"0": 3}
    assert epochs("x2", "ltuda") == {"1": 2, "2": 4} and epochs("x2", "labeled-only") == {"0": 6}

    # run again: finished runs with the same settings are scored again, not trained again
    weights = sorted(work.glob("toy/*/*/seed43/model/model.pt"))
    stamps = [w.stat().st_mtime_ns for w in weights]
    again = _run(tmp_path, "--seeds", "1", "--learning-curve", "1,2", "--set", "epochs_stage2=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(weights) == 4 and [w.stat().st_mtime_ns for w in weights] == stamps
    point = json.loads((tmp_path / "results" / "accuracy.json").read_text())["learning_curve"]["toy"]["2"]
    assert (point["ltuda"], point["labeled-only"], point["per_seed"]) == (curve["2"]["ltuda"],
                                                                         curve["2"]["labeled-only"], curve["2"]["per_seed"])
    # another recipe joins the curve's points beside LTUDA's, which stay as they were
    other = _run(tmp_path, "--seeds", "1", "--learning-curve", "2", "--methods", "ltuda-rampup", "--set", "epochs_stage2=2")
    assert other.returncode == 0, other.stderr[-3000:]
    joined = json.loads((tmp_path / "results" / "accuracy.json").read_text())["learning_curve"]["toy"]
    assert joined["2"]["ltuda"] == curve["2"]["ltuda"] and joined["1"] == curve["1"]
    assert "ltuda-rampup_vs_labeled-only" in joined["2"] and len(joined["commands"]) == 2
    assert "| x2 | ltuda-rampup |" in (tmp_path / "results" / "accuracy.md").read_text()
    # labelled-only's run was only scored again for the comparison: it keeps the command that trained it
    assert joined["2"]["commands"]["labeled-only"] == curve["2"]["commands"]["labeled-only"] == curve["commands"][0]
    # a different setting is a different run: trained again
    changed = _run(tmp_path, "--seeds", "1", "--learning-curve", "2", "--set", "epochs_stage2=1")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert weights[-1].stat().st_mtime_ns != stamps[-1] or weights[-2].stat().st_mtime_ns != stamps[-2]


def test_accuracy_benchmark_development_data_is_other_phantoms_and_seeds(tmp_path):
    result = _run(tmp_path, "--dev", "--seeds", "1", "--methods", "labeled-only")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "results" / "accuracy.json").read_text())["protocols"]["toy"]["seeds"] == [100]
    dev = (tmp_path / "work" / "phantoms-toy" / "images" / "liver_000.nii.gz").read_bytes()
    reported = _run(tmp_path / "reported", "--seeds", "1", "--methods", "labeled-only")
    assert reported.returncode == 0, reported.stderr[-3000:]
    assert (tmp_path / "reported" / "work" / "phantoms-toy" / "images" / "liver_000.nii.gz").read_bytes() != dev
    # a row only scored again by a later invocation keeps the command that trained it; a new row gets its own
    again = _run(tmp_path, "--dev", "--seeds", "1", "--methods", "labeled-only,naive")
    assert again.returncode == 0, again.stderr[-3000:]
    rows = json.loads((tmp_path / "results" / "accuracy.json").read_text())["protocols"]["toy"]["methods"]
    assert rows["labeled-only"]["command"].endswith("--methods labeled-only")
    assert "--methods labeled-only,naive" in rows["naive"]["command"]
    # fresh development seeds for a new candidate, once the first ones have judged several
    fresh = _run(tmp_path / "fresh", "--dev", "--first-seed", "103", "--seeds", "1", "--methods", "labeled-only")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    entry = json.loads((tmp_path / "fresh" / "results" / "accuracy.json").read_text())["protocols"]["toy"]
    assert entry["seeds"] == [103] and entry["methods"]["labeled-only"]["seeds_done"] == [103]


def test_accuracy_benchmark_with_scarce_labels_keeps_its_own_phantoms_runs_and_entry(tmp_path):
    result = _run(tmp_path, "--seeds", "1", "--methods", "labeled-only,ltuda", "--cases-per-site", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "work" / "phantoms-toy-3cases" / "dataset.json").read_text())
    training = [c for c in manifest["cases"] if c.get("split", "train") == "train"]
    assert len(training) == 4 * 3 and all(c["id"].endswith(("_000", "_001", "_002")) for c in training)
    assert {p.name for p in (tmp_path / "work").iterdir() if not p.name.startswith(("phantoms", "cache"))} == {"toy-3cases"}
    results = json.loads((tmp_path / "results" / "accuracy.json").read_text())
    assert set(results["protocols"]) == {"toy-3cases"}  # never in the place of the protocol's own entry
    entry = results["protocols"]["toy-3cases"]
    assert entry["cases_per_site"] == 3 and set(entry["methods"]) == {"labeled-only", "ltuda"}
    assert "the first 3 cases of each site" in (tmp_path / "results" / "accuracy.md").read_text()
    # too few cases for a validation case per organ, or mixed with a learning curve: refused
    for bad in (["--cases-per-site", "2"], ["--cases-per-site", "3", "--learning-curve", "2"]):
        refused = _run(tmp_path / "bad", "--seeds", "1", "--methods", "labeled-only", *bad)
        assert refused.returncode == 2 and "--cases-per-site" in refused.stderr and "Traceback" not in refused.stderr


def test_accuracy_benchmark_rejects_unknown_methods_and_settings(tmp_path):
    for args, message in ((["--methods", "labeled-only,magic"], "unknown magic"),
                          (["--set", "seed=3"], "expected KEY=VALUE"), (["--set", "lr"], "expected KEY=VALUE"),
                          (["--learning-curve", "1,x"], "expected numbers")):
        result = subprocess.run([sys.executable, str(BENCHMARKS / "accuracy.py"), *args, "--out", str(tmp_path)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_accuracy_benchmark_measures_the_multi_site_gap(tmp_path):
    # labelled-only gives the gap; a method asked for beside it is run too (not silently dropped)
    result = _run(tmp_path, "--seeds", "1", "--protocol", "multi-site", "--site-gap", "--methods", "cda")
    assert result.returncode == 0, result.stderr[-3000:]
    entry = json.loads((tmp_path / "results" / "accuracy.json").read_text())["protocols"]["multi-site"]
    gap = entry["site_gap"]
    assert set(gap["per_organ"]) == {"liver", "spleen", "kidney", "pancreas"}
    for organ, value in gap["per_organ"].items():
        assert abs(value - (gap["own_site"][organ] - gap["other_sites"][organ])) < 1e-9
    assert entry["site_gap_labeled_only"] == gap["gap"] and set(entry["methods"]) == {"labeled-only", "cda"}
    # the shift measured is labelled sites -> the unlabelled local site, whose scanner the test cases share
    assert gap["against"] == "unlabelled site"
    assert gap["other_sites"] == pytest.approx(entry["methods"]["labeled-only"]["per_organ_dice"])
    assert set(gap["between_labelled_sites_per_organ"]) == set(gap["per_organ"])
    # the phantoms of this generator version have their own folder, so older versions' models are never reused
    from ltuda.data.phantoms import LAYOUT_VERSIONS

    model = json.loads((tmp_path / "work" / "multi-site" / "main" / "labeled-only" / "seed43" / "model" / "model.json")
                       .read_text())
    folder = Path(model["training"]["dataset"]).parent.name
    assert LAYOUT_VERSIONS["multi-site"] > 1 and folder == f"phantoms-multi-site-v{LAYOUT_VERSIONS['multi-site']}"
    assert entry["phantoms_version"] == LAYOUT_VERSIONS["multi-site"]
    # by site and contrast phase: the smoke set's held-out kidney case is arterial (KiTS-like), its test case portal venous
    by_phase = gap["by_site_and_phase"]
    assert {"kidney arterial", "spleen contrast", "test contrast"} <= set(by_phase)
    assert all(0.0 <= d <= 1.0 for row in by_phase.values() for d in row.values() if d == d)
    # the unlabelled scans are in the data set, and labelled-only, which cannot learn from them, left them out
    dataset = json.loads(Path(model["training"]["dataset"]).read_text())
    assert [c["id"] for c in dataset["cases"] if not c["labeled"]] == ["local_000", "local_001"]
    assert model["training"]["cases"]["unlabelled"] == 0
    # CDA's teacher is scored on the unlabelled scans by phase, apart from the labelled sites' cases
    cda_last = entry["methods"]["cda"]["pseudo_label_quality"][0][-1]
    assert {"local contrast", "local native", "kidney arterial"} <= set(cda_last["by_group"])
    report = (tmp_path / "results" / "accuracy.md").read_text()
    assert "| end of training, local native cases |" in report


def _benchmark_module(name="accuracy"):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_rows_keep_their_recipe_and_a_learning_curve_scales_all_of_its_schedule():
    accuracy = _benchmark_module()

    from ltuda.train.config import make_config

    def settings(key, factor=1, overrides=None):  # resolved: the preset under the row's settings
        return make_config("fast", **accuracy.method_settings(key, "fast", overrides or {}, factor)[2]).to_json()
    # the shipped recipe, at twice the schedule: its warm-up stays half of stage 1
    assert {k: settings("ltuda", 2)[k] for k in ("epochs_stage1", "epochs_stage2", "warmup_epochs", "lr_schedule")} == \
        {"epochs_stage1": 32, "epochs_stage2": 12, "warmup_epochs": 16, "lr_schedule": "whole-run"}
    # a row measured with the ramp-up recipe keeps it, scaled the way its finished runs were
    assert {k: settings("ltuda-rampup", 2)[k] for k in ("warmup_epochs", "pseudo_rampup_epochs", "lr_schedule")} == \
        {"warmup_epochs": 0, "pseudo_rampup_epochs": 24, "lr_schedule": "per-stage"}
    assert settings("oracle")["pseudo_rampup_epochs"] == 12 and settings("cda-rampup")["lr_schedule"] == "per-stage"
    # a row that moves epochs between the stages trains as many iterations, with the fast preset's warm-up
    equal = settings("ltuda-equal-stages")
    assert (equal["epochs_stage1"], equal["epochs_stage2"], equal["warmup_epochs"]) == (11, 11, 8)
    assert equal["epochs_stage1"] + equal["epochs_stage2"] == settings("labeled-only")["epochs_stage1"] == 22
    # a method without pseudo-labels ignores the recipe, so it records the values its finished runs have ...
    assert accuracy.method_settings("labeled-only", "fast", {})[2] == {**accuracy.RAMPUP_RECIPE, "epochs_stage1": 22}
    # ... unless the benchmark is told otherwise
    assert settings("labeled-only", overrides={"warmup_epochs": 4})["warmup_epochs"] == 4


def test_a_learning_curve_point_gathers_seeds_and_recipes_over_invocations():
    stats = _benchmark_module("accuracy_stats")
    report = _benchmark_module("accuracy_report")

    def runs(**dice):
        return {int(seed[1:]): {"mean_dice": d, "iterations": 3520} for seed, d in dice.items()}
    point = stats.add_to_curve({}, {"labeled-only": runs(s43=0.70, s44=0.72, s45=0.74),
                                       "ltuda-rampup": runs(s43=0.71, s44=0.74, s45=0.75)}, "first")
    # a later, partial invocation with another recipe: labelled-only keeps its three seeds
    stats.add_to_curve(point, {"labeled-only": runs(s43=0.70), "ltuda": runs(s43=0.69)}, "second")
    assert {key: len(dice) for key, dice in point["per_seed"].items()} == {"labeled-only": 3, "ltuda-rampup": 3, "ltuda": 1}
    assert point["labeled-only"] == pytest.approx(0.72) and point["ltuda-rampup"] == pytest.approx(2.2 / 3)
    old = point["ltuda-rampup_vs_labeled-only"]
    assert (old["seeds"], old["mean_gain"], old["labeled_only"]) == (3, pytest.approx(0.04 / 3), pytest.approx(0.72))
    new = point["ltuda_vs_labeled-only"]  # over the one seed both have
    assert (new["seeds"], new["mean_gain"], new["labeled_only"]) == (1, pytest.approx(-0.01), pytest.approx(0.70))
    assert point["commands"] == {"labeled-only": "second", "ltuda-rampup": "first", "ltuda": "second"}
    markdown = report.render_markdown({"learning_curve": {"toy": {"commands": ["first", "second"], "4": point}}})
    assert "| x4 | ltuda | 0.700 | 0.690 | -0.010 |" in markdown and "| x4 | ltuda-rampup | 0.720 | 0.733 |" in markdown


def test_a_learning_curve_point_compares_ltuda_with_cda_alone_where_it_has_both():
    stats = _benchmark_module("accuracy_stats")
    report = _benchmark_module("accuracy_report")

    def runs(**dice):
        return {int(seed[1:]): {"mean_dice": d, "iterations": 7040} for seed, d in dice.items()}
    point = stats.add_to_curve({}, {"labeled-only": runs(s43=0.70, s44=0.72), "ltuda": runs(s43=0.75, s44=0.76)},
                                  "first", "torch 1")
    assert "ltuda_vs_cda" not in point
    stats.add_to_curve(point, {"labeled-only": runs(s43=0.70), "cda": runs(s43=0.73, s44=0.73)}, "second", "torch 1")
    test = point["ltuda_vs_cda"]
    assert (test["seeds"], test["mean_gain"], test["cda"]) == (2, pytest.approx(0.025), pytest.approx(0.73))
    assert point["cda_vs_labeled-only"]["mean_gain"] == pytest.approx(0.02)
    markdown = report.render_markdown({"learning_curve": {"toy": {"commands": ["first", "second"], "8": point}}})
    assert "x8, ltuda against cda: CDA 0.730, mean gain 0.025 over 2 paired seeds" in markdown


def test_a_learning_curve_without_a_1x_point_takes_it_from_the_protocols_own_rows():
    """The multi-site curve runs 2x and 4x only: its 1x point is the protocol's rows, where they are the same
    preset and settings, and is shown as such."""
    report = _benchmark_module("accuracy_report")
    def row(dice):
        return {"mean_dice": dice, "iterations": 880, "dice_std": 0.01, "seeds": 5, "seeds_done": [43, 44, 45, 46, 47],
                "per_seed": [dice] * 5, "per_organ_dice": {"liver": dice}, "mean_hd95_mm": 9.0, "train_seconds": 100}
    test = {"seeds": 5, "mean_gain": 0.002, "t": 0.3, "p_one_sided": 0.4}
    protocol = {"preset": "fast", "settings": {}, "seeds": [43, 44, 45, 46, 47], "commands": ["rows"], "machine": "cpu",
                "methods": {"labeled-only": row(0.594), "ltuda": row(0.596)},
                "paired_tests": {"ltuda_vs_labeled-only": test}}
    point = {"labeled-only": 0.606, "ltuda": 0.611, "iterations": {"labeled-only": 1760, "ltuda": 1760},
             "ltuda_vs_labeled-only": {"seeds": 5, "mean_gain": 0.005, "p_one_sided": 0.26, "labeled_only": 0.606}}
    curve = {"preset": "fast", "settings": {}, "commands": ["curve"], "2": point}
    markdown = report.render_markdown({"protocols": {"multi-site": protocol}, "learning_curve": {"multi-site": curve}})
    assert "| x1 | ltuda | 0.594 | 0.596 | 0.002 | 0.400 | 5 | 880 |" in markdown
    assert "x1 is the protocol's own rows (the same preset and settings; seeds 43, 44, 45, 46, 47)" in markdown
    assert markdown.index("| x1 |") < markdown.index("| x2 |")
    # rows of other settings are another training: no x1 point from them
    other = {**protocol, "settings": {"image_size": 96}}
    markdown = report.render_markdown({"protocols": {"multi-site": other}, "learning_curve": {"multi-site": curve}})
    assert "| x1 |" not in markdown and "| x2 | ltuda | 0.606 | 0.611 |" in markdown


def test_a_protocol_tests_the_pseudo_labels_and_stage_2_against_the_rows_that_leave_them_out():
    stats = _benchmark_module("accuracy_stats")

    def row(packages, **dice):
        return {"seeds_done": [int(s[1:]) for s in dice], "per_seed": list(dice.values()), "packages": packages}
    methods = {"labeled-only": row("torch 1", s43=0.60, s44=0.58, s45=0.62),
               "ltuda": row("torch 1", s43=0.63, s44=0.62, s45=0.64),
               "ltuda-pseudo-labels-off": row("torch 1", s43=0.64, s44=0.61, s45=0.65),
               "cda-pseudo-labels-off": row("torch 2", s43=0.62, s44=0.60)}  # another install: pairs with none
    tests = stats.protocol_paired_tests(methods)
    assert set(tests) == {"ltuda_vs_labeled-only", "ltuda_vs_ltuda-pseudo-labels-off",
                          "ltuda-pseudo-labels-off_vs_labeled-only"}
    assert tests["ltuda_vs_ltuda-pseudo-labels-off"]["mean_gain"] == pytest.approx(-0.01 / 3)
    assert tests["ltuda_vs_labeled-only"]["seeds"] == 3 and tests["ltuda_vs_labeled-only"]["p_one_sided"] < 0.05
    assert "per_organ" not in tests["ltuda_vs_labeled-only"]  # rows saved without each seed's organs


def test_rerender_adds_the_tests_of_pairs_added_after_the_rows_were_run(tmp_path):
    stats = _benchmark_module("accuracy_stats")
    runs = lambda *dice: [{"mean_dice": d, "per_organ_dice": {"liver": d}, "mean_hd95_mm": 5.0,  # noqa: E731
                           "per_organ_hd95_mm": {"liver": 4.0}, "train_seconds": 1.0, "iterations": 880} for d in dice]
    methods = {"labeled-only": stats.summarise_seeds(runs(0.60, 0.58, 0.62)),
               "ltuda-in-batch": stats.summarise_seeds(runs(0.63, 0.62, 0.64))}
    for row in methods.values():
        row.update(seeds_done=[43, 44, 45], packages="torch 1", command="c")
    entry = {"preset": "fast", "seeds": [43, 44, 45], "settings": {}, "methods": methods, "commands": ["c"],
             "machine": {}, "complete": True, "paired_tests": {"stale_vs_labeled-only": {}}}
    out = tmp_path / "results"
    out.mkdir()
    (out / "accuracy.json").write_text(json.dumps({"protocols": {"multi-site": entry}}))
    done = subprocess.run([sys.executable, str(BENCHMARKS / "accuracy.py"), "--rerender", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    saved = json.loads((out / "accuracy.json").read_text())["protocols"]["multi-site"]
    assert set(saved["paired_tests"]) == {"ltuda-in-batch_vs_labeled-only"}  # the stale one is gone
    assert saved["paired_tests"]["ltuda-in-batch_vs_labeled-only"]["mean_gain"] == pytest.approx(0.03)
    assert saved["methods"] == json.loads(json.dumps(methods))  # the rows themselves are untouched
    assert "ltuda-in-batch vs labeled-only: mean gain 0.030" in (out / "accuracy.md").read_text()
    missing = subprocess.run([sys.executable, str(BENCHMARKS / "accuracy.py"), "--rerender", "--out",
                              str(tmp_path / "none")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no results in" in missing.stderr and "Traceback" not in missing.stderr


def test_a_protocol_tests_each_organ_over_the_seeds_both_rows_have():
    stats = _benchmark_module("accuracy_stats")
    report = _benchmark_module("accuracy_report")

    def runs(*pancreas):  # seed 43 onwards; the liver is level, the pancreas differs
        return [{"mean_dice": 0.7, "per_organ_dice": {"liver": 0.9, "pancreas": d}, "mean_hd95_mm": 5.0,
                 "per_organ_hd95_mm": {"liver": 4.0, "pancreas": 6.0}, "train_seconds": 1.0, "iterations": 880}
                for d in pancreas]
    methods = {}
    for key, pancreas in (("labeled-only", (0.40, 0.35, 0.42)), ("ltuda", (0.36, 0.30, 0.39, 0.50))):
        methods[key] = stats.summarise_seeds(runs(*pancreas))
        methods[key].update(seeds_done=[43 + i for i in range(len(pancreas))], packages="torch 1")
    test = stats.protocol_paired_tests(methods)["ltuda_vs_labeled-only"]
    assert test["per_organ"]["pancreas"]["seeds"] == 3  # seed 46 is LTUDA's alone
    assert test["per_organ"]["pancreas"]["mean_gain"] == pytest.approx(-0.04)
    assert test["per_organ"]["pancreas"]["p_one_sided"] > 0.95 and test["per_organ"]["liver"]["mean_gain"] == 0
    entry = {"preset": "fast", "seeds": [43, 44, 45, 46], "settings": {}, "methods": methods,
             "paired_tests": {"ltuda_vs_labeled-only": test}, "commands": ["c"], "machine": {}, "complete": True}
    markdown = report.render_markdown({"protocols": {"toy": entry}})
    assert "per organ liver 0.000 (p = n/a), pancreas -0.040 (p = 0.9" in markdown


def test_a_learning_curve_point_keeps_each_seeds_organs():
    stats = _benchmark_module("accuracy_stats")
    report = _benchmark_module("accuracy_report")

    def run(dice, pancreas):
        return {"mean_dice": dice, "iterations": 7040, "per_organ_dice": {"liver": 0.9, "pancreas": pancreas}}
    point = stats.add_to_curve({}, {"ltuda": {43: run(0.75, 0.40)}}, "first")
    stats.add_to_curve(point, {"ltuda": {44: run(0.77, 0.50)}, "labeled-only": {44: run(0.7, 0.3)}}, "second")
    assert point["per_organ_dice"]["ltuda"] == {"liver": pytest.approx(0.9), "pancreas": pytest.approx(0.45)}
    markdown = report.render_markdown({"learning_curve": {"toy": {"commands": ["first"], "8": point}}})
    assert "| x8 | ltuda | 0.900 | 0.450 | 2 |" in markdown and "| x8 | labeled-only | 0.900 | 0.300 | 1 |" in markdown


def test_a_learning_curve_pairs_only_runs_made_on_the_same_package_versions():
    accuracy = _benchmark_module()
    stats = _benchmark_module("accuracy_stats")
    versions = accuracy.package_versions()
    assert versions.startswith("CPU ") and "torch " in versions and "monai " in versions and "SimpleITK " in versions

    def runs(**dice):
        return {int(seed[1:]): {"mean_dice": d, "iterations": 7040} for seed, d in dice.items()}
    point = stats.add_to_curve({}, {"labeled-only": runs(s43=0.70, s44=0.72)}, "first", "torch 1")
    # a later session, after a fresh install: seed 44's labelled-only run was made on other versions
    stats.add_to_curve(point, {"labeled-only": runs(s45=0.74), "ltuda": runs(s44=0.80, s45=0.75)}, "second",
                          "torch 2")
    test = point["ltuda_vs_labeled-only"]
    assert (test["seeds"], test["mean_gain"]) == (1, pytest.approx(0.01))  # seed 45 alone
    assert point["packages"]["labeled-only"] == {"43": "torch 1", "44": "torch 1", "45": "torch 2"}


def test_a_run_scored_again_keeps_the_command_and_packages_it_was_trained_with():
    stats = _benchmark_module("accuracy_stats")

    def runs(trained_here, **dice):
        return {int(seed[1:]): {"mean_dice": d, "iterations": 7040, "trained_here": trained_here}
                for seed, d in dice.items()}
    point = stats.add_to_curve({}, {"labeled-only": runs(True, s43=0.70)}, "first", "torch 1")
    # a later invocation for another recipe scores labelled-only's finished run again, then trains a new seed
    stats.add_to_curve(point, {"labeled-only": runs(False, s43=0.70), "cda": runs(True, s43=0.71)}, "cda run",
                          "torch 2")
    assert point["commands"] == {"labeled-only": "first", "cda": "cda run"}
    assert point["packages"]["labeled-only"] == {"43": "torch 1"}
    stats.add_to_curve(point, {"labeled-only": runs(True, s44=0.72)}, "more seeds", "torch 2")
    assert point["commands"]["labeled-only"] == "more seeds"
    assert point["packages"]["labeled-only"] == {"43": "torch 1", "44": "torch 2"}


def test_the_teacher_table_says_when_the_organ_gate_let_each_organ_in():
    report = _benchmark_module("accuracy_report")

    def entry(stage, epoch, dice_on):
        quality = {o: {"precision": 0.5, "recall": 0.5, "dice": 0.5} for o in ("liver", "pancreas")}
        return {"stage": stage, "epoch": epoch, "per_organ": quality, "pseudo_labels_on": ["liver", "pancreas"],
                "pseudo_dice_on": dice_on}
    seed43 = [entry(1, 9, []), entry(1, 10, ["liver"]), entry(2, 1, ["liver"])]
    seed44 = [entry(1, 9, ["liver"]), entry(1, 10, ["liver"]), entry(2, 1, ["liver", "pancreas"])]
    lines = report._quality_lines({"ltuda-pseudo-dice-gate": {"pseudo_label_quality": [seed43, seed44]}})
    assert "| Dice term on pseudo-targets from (stage.epoch, per seed) | 1.10 1.9 | never 2.1 |" in lines
    assert not any(line.startswith("| pseudo-labels used from") for line in lines)  # that gate never closed


def test_a_setting_added_later_at_its_default_keeps_finished_runs(tmp_path):
    accuracy = _benchmark_module()
    from ltuda.train.config import make_config

    config = make_config("fast", method="ltuda", seed=43)
    recorded = json.loads(json.dumps(config.to_json()))
    del recorded["pseudo_gate"]  # a model.json written before the setting existed
    assert accuracy._with_new_fields(recorded, config) == recorded
    # set away from its default, the new setting makes it a different run
    changed = make_config("fast", method="ltuda", seed=43, pseudo_gate=0.7)
    assert accuracy._with_new_fields(recorded, changed) != recorded
    # a setting whose default moved after it was added: a run that lacks it was trained the earlier way
    del recorded["unlabelled_slices"]
    assert accuracy._with_new_fields(recorded, make_config("fast", method="ltuda", seed=43,
                                                           unlabelled_slices="in-batch")) == recorded
    assert accuracy._with_new_fields(recorded, make_config("fast", method="ltuda", seed=43)) != recorded


def test_a_run_stopped_part_way_resumes_and_ends_as_if_never_stopped(tiny_dataset, tmp_path, monkeypatch):
    """A session that ends mid-run leaves a checkpoint: the next session's benchmark goes on from it, with
    its saved random state, instead of training again from the start."""
    import torch
    from ltuda.manifest import load_manifest
    from ltuda.progress import SilentReporter
    from ltuda.train.config import make_config
    from ltuda.train.trainer import Trainer

    accuracy = _benchmark_module()
    settings = dict(epochs_stage1=2, epochs_stage2=1, iterations_per_epoch=2, image_size=32, batch_size=2,
                    val_fraction=0.5)
    whole = accuracy.run_one(tiny_dataset, "ltuda", 43, "fast", settings, tmp_path / "whole", tmp_path / "cache")

    class StopAfterFirstEpoch(SilentReporter):
        def emit(self, event, **fields):
            if event == "epoch":
                trainer.stop_requested = True

    stopped = tmp_path / "stopped"
    trainer = Trainer(load_manifest(tiny_dataset), stopped / "model", make_config("fast", method="ltuda", seed=43,
                      **settings), StopAfterFirstEpoch(), cache_dir=tmp_path / "cache")
    assert trainer.run()["status"] == "cancelled"
    other_seed = make_config("fast", method="ltuda", seed=44, **settings)
    assert not accuracy.interrupted_training(stopped / "model", other_seed, tiny_dataset)

    starts = []
    plain_run = Trainer.run
    monkeypatch.setattr(Trainer, "run", lambda self: starts.append(self.resume) or plain_run(self))
    resumed = accuracy.run_one(tiny_dataset, "ltuda", 43, "fast", settings, stopped, tmp_path / "cache")
    assert starts == [True] and resumed["iterations"] == whole["iterations"] == 6
    weights = [torch.load(run / "model" / "model.pt", weights_only=True) for run in (tmp_path / "whole", stopped)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert resumed["mean_dice"] == whole["mean_dice"]


def test_organ_errors_pools_voxel_precision_and_recall_over_cases_and_seeds(tmp_path):
    """Two seeds' segmentations of one case against its truth: 3 of 4 liver voxels found plus 1 false one,
    and 2 of 2 kidney voxels plus 2 false ones, pooled over both seeds."""
    import types

    import numpy as np
    import SimpleITK as sitk
    from ltuda.io.segnrrd import write_seg_nrrd
    from ltuda.terminology import organ_class

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from organ_errors import pooled_errors
    finally:
        sys.path.remove(str(BENCHMARKS))
    classes = [organ_class("liver", 1), organ_class("kidney", 3)]
    truth = np.zeros((1, 4, 4), np.uint8)
    truth[0, 0, :] = 1
    truth[0, 3, :2] = 3
    image = sitk.GetImageFromArray(truth.astype(np.int16))
    sitk.WriteImage(sitk.GetImageFromArray(truth), str(tmp_path / "case_labels.nii.gz"))
    pred = np.zeros_like(truth)
    pred[0, 0, :3] = 1
    pred[0, 1, 0] = 1
    pred[0, 3, :] = 3
    for seed in ("seed43", "seed44"):
        (tmp_path / seed).mkdir()
        write_seg_nrrd(tmp_path / seed / "case.seg.nrrd", pred, image, classes)
    case = types.SimpleNamespace(id="case", label=tmp_path / "case_labels.nii.gz", value_map=None)
    seen, errors = pooled_errors([tmp_path / "seed43", tmp_path / "seed44", tmp_path / "still-training"], [case],
                                 classes)
    assert seen == 2 and errors == {
        # the liver voxel missed went to the background; the kidney lost none
        "liver": {"precision": 0.75, "recall": 0.75, "missed_as": {"background": 0.25, "kidney": 0.0}},
        "kidney": {"precision": 0.5, "recall": 1.0, "missed_as": {"background": 0.0, "liver": 0.0}}}


def _gpu_accuracy(tmp_path, deadline_s, *args):
    return subprocess.run(["bash", str(BENCHMARKS / "gpu_accuracy.sh"), "--python", sys.executable,
                           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                           "--deadline-s", str(deadline_s), "--", *args],
                          capture_output=True, text=True, timeout=600)


def test_the_gpu_accuracy_script_saves_finished_runs_and_the_progress_of_the_others(tmp_path):
    # on a CPU machine it runs the same way (the dry run of a device call)
    result = _gpu_accuracy(tmp_path, 400, "--smoke", "--protocol", "toy", "--learning-curve", "2", "--seeds", "1", "--jobs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    point = json.loads((tmp_path / "out" / "accuracy.json").read_text())["learning_curve"]["toy"]["2"]
    assert set(point["per_seed"]) == {"labeled-only", "ltuda"}
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())["runs"]
    assert set(progress) == {"toy/x2/labeled-only/seed43", "toy/x2/ltuda/seed43"}
    assert all(run["completed"] for run in progress.values())
    assert progress["toy/x2/ltuda/seed43"]["stage_index"] == 1  # it ended in stage 2
    assert "toy x2 ltuda" in result.stdout  # the benchmark's own log is shown


def test_the_gpu_accuracy_script_stops_the_benchmark_at_its_deadline(tmp_path):
    result = _gpu_accuracy(tmp_path, 1, "--smoke", "--protocol", "toy", "--seeds", "2", "--jobs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deadline of 1s reached" in (tmp_path / "out" / "accuracy.log").read_text()
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert not any(run["completed"] for run in progress["runs"].values())
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "work")], capture_output=True, text=True)
    assert leftover.stdout == ""  # the benchmark was stopped, not left running
    bad = _gpu_accuracy(tmp_path, 1)  # no accuracy.py arguments: one clear line, no run
    assert bad.returncode == 1 and "no accuracy.py arguments" in bad.stderr
