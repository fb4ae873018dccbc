"""Accuracy benchmark: LTUDA against what users would do instead, on partially labelled phantoms.

    python benchmarks/accuracy.py --protocol toy --seeds 5 --jobs 2
    python benchmarks/accuracy.py --protocol toy --learning-curve 1,2,4 --seeds 5 --jobs 2
    python benchmarks/accuracy.py --protocol toy --methods labeled-only,ltuda --set pseudo_gate=0 ...
    python benchmarks/accuracy.py --dev --protocol toy --seeds 3 ...   # choose a recipe here, not on the above

Protocols (phantom seed 1000, fixed before any method was tuned):
- toy: the paper's toy set. Every case comes from one acquisition; four groups of training cases each
  label one organ; the fully labelled test cases come from the same acquisition.
- multi-site: each group is its own scanner (noise, offset, slice thickness, field of view), the test
  cases a fifth one.

Every method trains the same network with the same seeds and the SAME number of iterations: a one-stage
method trains for LTUDA's stage 1 + stage 2 epochs. Methods: fully-supervised (all organs labelled: the
bound), labeled-only, naive, marginal-exclusion, cda (stage 1 only), ltuda, oracle (LTUDA with the true
labels as pseudo-labels: the ceiling of the pseudo-label term), and the lever rows below (LTUDA with
one lever added to the fast recipe). Test: 3D Dice and HD95 (mm) per organ; LTUDA against labelled-only
and CDA by a one-sided paired t-test over seeds.

Results go to OUT/accuracy.json (one entry per protocol, plus the learning curve), accuracy.md and
accuracy.png, saved after every run, so a stopped benchmark keeps what it measured. Training runs
in --jobs worker processes of one thread each. SIGTERM or SIGINT (Ctrl-C) stops the whole benchmark: the
running trainings save a checkpoint, no other run starts, and the same command resumes them. The
statistics are in accuracy_stats.py, the report (markdown and plot) in accuracy_report.py.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import multiprocessing
import os
import platform
import signal
import sys
from pathlib import Path

import numpy as np

from accuracy_report import plot, render_markdown
from accuracy_stats import add_to_curve, nanmean, protocol_paired_tests, summarise_seeds

# The fast preset's recipe until 2026-12-03: no warm-up, a 12-epoch ramp-up of the pseudo-label term and the
# learning rate restarted per stage. The rows measured with it keep it by name, so their finished runs
# stay theirs after the preset moved to the warm-up recipe.
RAMPUP_RECIPE = {"warmup_epochs": 0, "pseudo_rampup_epochs": 12, "lr_schedule": "per-stage"}
# Until 2026-12-04 the cases that label nothing took places in the batch (the multi-site protocol's unlabelled
# scans; no other layout has such cases, so there both draws are the same training). The multi-site rows
# measured so keep it by name (-in-batch).
IN_BATCH = {"unlabelled_slices": "in-batch"}

METHODS = {
    # key: (trainer method, dataset variant, settings on top of the preset)
    "fully-supervised": ("labeled-only", "full", {}),
    "labeled-only": ("labeled-only", "partial", {}),
    "naive": ("naive", "partial", {}),
    "marginal-exclusion": ("marginal-exclusion", "partial", {}),
    "cda": ("cda", "partial", {}),
    "cda-rampup": ("cda", "partial", RAMPUP_RECIPE),
    "ltuda": ("ltuda", "partial", {}),
    "ltuda-rampup": ("ltuda", "partial", RAMPUP_RECIPE),
    # the ceiling: true labels as pseudo-labels (measured with the ramp-up recipe)
    "oracle": ("ltuda", "partial", {**RAMPUP_RECIPE, "oracle_pseudo_labels": True}),
    # the ceiling with the Dice term on pseudo-targets too: what the loss could take from perfect pseudo-labels
    "oracle-pseudo-dice": ("ltuda", "partial", {**RAMPUP_RECIPE, "oracle_pseudo_labels": True, "pseudo_dice": True}),
    # ... and at full weight from the first step: how much of the fully-supervised bound the loss can reach
    "oracle-pseudo-dice-no-rampup": ("ltuda", "partial", {**RAMPUP_RECIPE, "oracle_pseudo_labels": True,
                                                          "pseudo_dice": True, "pseudo_rampup_epochs": 0}),
    # lever rows: the ramp-up recipe with one lever added
    "ltuda-pseudo-dice": ("ltuda", "partial", {**RAMPUP_RECIPE, "pseudo_dice": True}),
    "ltuda-gate": ("ltuda", "partial", {**RAMPUP_RECIPE, "pseudo_gate": 0.7, "pseudo_dice": True,
                                        "pseudo_rampup_epochs": 0}),
    "ltuda-reference-pbce": ("ltuda", "partial", {**RAMPUP_RECIPE, "pbce_scaling": "reference"}),
    "ltuda-best-start": ("ltuda", "partial", {**RAMPUP_RECIPE, "stage2_start": "best"}),
    "ltuda-one-schedule": ("ltuda", "partial", {**RAMPUP_RECIPE, "lr_schedule": "whole-run"}),
    # the shipped recipe with positive pseudo-labels only where the teacher is sure (p >= 0.9, FixMatch's rule;
    # the rest of [0.5, 0.9) ignored): the teacher's pancreas pseudo-labels are 30-38% precise
    "ltuda-confident": ("ltuda", "partial", {"pseudo_confident_above": 0.9}),
    # half of stage 1 on the labels only, then pseudo-labels at full weight (the warm start of
    # findings-small-compute.md, inside one run), alone and with one learning-rate decay: the second
    # became the fast preset's recipe
    "ltuda-warmup": ("ltuda", "partial", {"warmup_epochs": 8, "pseudo_rampup_epochs": 0, "lr_schedule": "per-stage"}),
    "ltuda-warmup-one-schedule": ("ltuda", "partial", {"warmup_epochs": 8, "pseudo_rampup_epochs": 0,
                                                       "lr_schedule": "whole-run"}),
    # the shipped recipe with the Dice term on pseudo-targets, each organ's only once the teacher's running Dice
    # on it reaches 0.7 (the ltuda-gate threshold); unlike ltuda-gate, pBCE keeps every organ's pseudo-labels
    "ltuda-pseudo-dice-gate": ("ltuda", "partial", {"pseudo_dice": True, "pseudo_dice_gate": 0.7}),
    # ... with the gate judging the teacher on the held-out validation cases: on the training cases the spleen
    # passed 0.7 while its pseudo-labels on the cases that get them scored 0.61-0.65
    "ltuda-held-out-dice-gate": ("ltuda", "partial", {"pseudo_dice": True, "pseudo_dice_gate": 0.7,
                                                      "gate_cases": "held-out"}),
    # the shipped recipe with each organ's pseudo-labels (pBCE) only once the teacher's Dice on the held-out cases
    # reaches 0.7 (ltuda-gate's threshold): a closed organ is trained on its labels alone, as by labelled-only
    "ltuda-held-out-gate": ("ltuda", "partial", {"pseudo_gate": 0.7, "gate_cases": "held-out"}),
    # candidate 13: ltuda-held-out-dice-gate with the Dice term only on the teacher's sure pixels (p >= 0.9 or
    # <= 0.1): across the shift that gate gained the kidney and lost the spleen, whose pseudo-labels on the
    # native-phase scans are 0.3-0.4 precise
    "ltuda-confident-dice-gate": ("ltuda", "partial", {"pseudo_dice": True, "pseudo_dice_gate": 0.7,
                                                       "gate_cases": "held-out", "pseudo_dice_confident": 0.9}),
    # diagnostic, not a recipe: LTUDA's training with every organ's pseudo-labels shut out (a held-out gate no
    # teacher reaches), i.e. its strong views, loss and stages on the labels alone
    "ltuda-pseudo-labels-off": ("ltuda", "partial", {"pseudo_gate": 0.999, "gate_cases": "held-out"}),
    # diagnostic: the same with stage 1 alone for all the iterations, i.e. labelled training on the strong
    # (CutMix) views with an EMA teacher and no stage 2: splits what ltuda-pseudo-labels-off gains into parts
    "cda-pseudo-labels-off": ("cda", "partial", {"pseudo_gate": 0.999, "gate_cases": "held-out"}),
    # the fast recipe with its pseudo-labels in stage 1 only: stage 2 trains on the labelled organs alone
    "ltuda-stage1-pseudo-labels": ("ltuda", "partial", {"stage2_pseudo_labels": False}),
    # candidate 10: half of the views only the student sees get a random intensity curve (a contrast phase the
    # labels never show); labelled-only gets it on its one view, so the two compare at equal augmentation
    "ltuda-intensity-remap": ("ltuda", "partial", {"intensity_remap": 0.5}),
    "labeled-only-intensity-remap": ("labeled-only", "partial", {"intensity_remap": 0.5}),
    # candidate 11: the curve on the student's copy of the weak view only (its labelled term, as labelled-only
    # gets it); the strong views, where the pseudo-labels train, stay as scanned
    "ltuda-intensity-remap-weak": ("ltuda", "partial", {"intensity_remap": 0.5, "intensity_remap_views": "weak"}),
    # candidate 14: candidate 11 with the warm-up on the scans as they are, the curve starting with the pseudo-labels
    "ltuda-intensity-remap-after-warmup": ("ltuda", "partial", {"intensity_remap": 0.5, "intensity_remap_views": "weak",
                                                                "intensity_remap_warmup": False}),
    # candidate 15: stage 2 as long as stage 1 (the paper's split) at the same 22 epochs, the warm-up kept at 8:
    # stage 1's pseudo-label epochs (8 -> 3) go to stage 2 (6 -> 11); "cda" is the other end, no stage 2
    "ltuda-equal-stages": ("ltuda", "partial", {"epochs_stage1": 11, "epochs_stage2": 11, "warmup_epochs": 8}),
    # the ceiling of today's recipe: the fast preset with true labels as pseudo-labels (the teacher's rows above,
    # "oracle" and "oracle-pseudo-dice", have the ramp-up recipe), with today's loss and with the Dice term on
    # the pseudo-targets too
    "ltuda-oracle": ("ltuda", "partial", {"oracle_pseudo_labels": True}),
    "ltuda-oracle-pseudo-dice": ("ltuda", "partial", {"oracle_pseudo_labels": True, "pseudo_dice": True}),
}
# the multi-site rows measured with the unlabelled scans in the batch's places (see IN_BATCH)
METHODS.update({f"{key}-in-batch": (METHODS[key][0], METHODS[key][1], {**METHODS[key][2], **IN_BATCH})
                for key in ("ltuda", "cda", "ltuda-pseudo-labels-off", "cda-pseudo-labels-off",
                            "ltuda-stage1-pseudo-labels")})
DEFAULT_METHODS = ("fully-supervised", "labeled-only", "naive", "marginal-exclusion", "cda", "ltuda", "oracle")
PROTOCOLS = ("toy", "multi-site")
PHANTOM_SEED = 1000
FIRST_SEED = 43
# Development data (--dev): other phantoms and seeds, where a candidate recipe is chosen before it is
# run on the reported ones (benchmarks/results/recipe-choice-dev.md)
DEV_PHANTOM_SEED = 7
DEV_FIRST_SEED = 100


def method_settings(key: str, preset: str, overrides: dict, factor: float = 1) -> tuple:
    """(trainer method, dataset variant, settings) of a benchmark row, its schedule (epochs, warm-up and
    ramp-up) times `factor`; one-stage methods get both stages' epochs."""
    from ltuda.train.config import METHOD_STAGES, make_config

    method, variant, extra = METHODS[key]
    # The recipe settings shape only stage 1's pseudo-label term and the stage-2 restart: a method without
    # stage 1 trains the same under any of them, so they stay at the values its finished runs recorded.
    inert = RAMPUP_RECIPE if 1 not in METHOD_STAGES[method] else {}
    settings = {**inert, **overrides, **extra}
    config = make_config(preset, **settings)
    schedule = {name: round(getattr(config, name) * factor)
                for name in ("epochs_stage1", "epochs_stage2", "warmup_epochs", "pseudo_rampup_epochs")}
    if factor != 1:
        settings.update(schedule)
    if len(METHOD_STAGES[method]) < len(METHOD_STAGES["ltuda"]):
        settings["epochs_stage1"] = schedule["epochs_stage1"] + schedule["epochs_stage2"]
    return method, variant, settings


def evaluate_cases(predictor, cases, classes, work: Path) -> list:
    """evaluate_case of the predictor's segmentation of each case (3D Dice and HD95 per organ)."""
    from ltuda.evaluate import evaluate_case
    from ltuda.io.segnrrd import write_seg_nrrd
    from ltuda.io.volumes import read_image

    scores = []
    for case in cases:
        image = read_image(case.image)
        pred = work / f"{case.id}.seg.nrrd"
        write_seg_nrrd(pred, predictor.segment(image), image, classes)
        scores.append(evaluate_case(pred, case.label, classes, truth_value_map=case.value_map))
    return scores


def site_dice(predictor, holdout_path: Path, work: Path) -> tuple:
    """({site: {organ: mean Dice}}, {"site phase": {organ: mean Dice}}) on the held-out, fully labelled cases
    of each training site; the second also by contrast phase, which is what most sites differ in."""
    from ltuda.manifest import parse_manifest

    holdout, _ = parse_manifest(holdout_path)  # evaluation cases only: "no training cases" is expected
    scores = evaluate_cases(predictor, holdout.cases, holdout.classes, work)
    return (_dice_by(holdout.cases, scores, holdout.classes, lambda c: c.extra["site"]),
            _dice_by(holdout.cases, scores, holdout.classes, _site_phase))


def _site_phase(case) -> str:
    return f"{case.extra['site']} {case.extra['phase']}"


def _dice_by(cases, scores, classes, group) -> dict:
    """{group(case): {organ: mean Dice over that group's cases}}."""
    from ltuda.evaluate import summarise

    groups = {}
    for case, result in zip(cases, scores):
        groups.setdefault(group(case), []).append(result)
    return {key: {n: m["dice"] for n, m in summarise(results, classes)["mean"].items()}
            for key, results in groups.items()}


def site_gap(runs: list, unlabelled_site: bool = False) -> dict:
    """Labelled-only's own-site minus other-site Dice, per organ and mean (the site that labels an organ
    is the site of the same name), averaged over seeds.

    With `unlabelled_site` (phantoms with the local site's unlabelled scans), "other site" is that site: the
    gap is own-site Dice minus the Dice on the test cases, which come from the local site's scanner and
    patients (the labelled-to-unlabelled shift); the gap between the labelled sites is kept beside it."""
    organs = list(runs[0]["site_dice"])
    own = {o: float(np.mean([r["site_dice"][o][o] for r in runs])) for o in organs}
    labelled = {o: float(np.mean([np.mean([r["site_dice"][s][o] for s in organs if s != o]) for r in runs]))
                for o in organs}
    between = {o: own[o] - labelled[o] for o in organs}
    other = {o: float(np.mean([r["per_organ_dice"][o] for r in runs])) for o in organs} if unlabelled_site else labelled
    gaps = {o: own[o] - other[o] for o in organs}
    # by site and phase (held-out cases, then the test cases): where the labelled-only models meet their shift
    keys = [k for k in runs[0].get("site_phase_dice", {}) if all(k in r.get("site_phase_dice", {}) for r in runs)]
    by_phase = {k: {o: float(np.mean([r["site_phase_dice"][k][o] for r in runs])) for o in organs} for k in keys}
    gap = {"gap": float(np.mean(list(gaps.values()))), "per_organ": gaps, "own_site": own, "other_sites": other,
           "seeds": len(runs), "by_site_and_phase": by_phase}
    if unlabelled_site:
        gap.update(against="unlabelled site", between_labelled_sites=float(np.mean(list(between.values()))),
                   between_labelled_sites_per_organ=between)
    return gap


def score(model_dir: Path, manifest, work: Path, holdout: Path = None) -> dict:
    """Mean Dice, per-organ Dice and HD95 of the default head on the fully labelled test cases; with
    `holdout`, also the Dice on each training site's held-out cases."""
    from ltuda.evaluate import summarise
    from ltuda.predict import Predictor

    predictor = Predictor(model_dir, head="auto", device="auto")
    test_cases = manifest.split("test")
    cases = evaluate_cases(predictor, test_cases, manifest.classes, work)
    mean = summarise(cases, manifest.classes)["mean"]
    dice = {n: m["dice"] for n, m in mean.items()}
    hd95 = {n: m["hd95_mm"] for n, m in mean.items()}
    result = {"mean_dice": nanmean(list(dice.values())), "per_organ_dice": dice, "per_organ_hd95_mm": hd95,
              "mean_hd95_mm": nanmean(list(hd95.values())), "head": predictor.head}
    if holdout is not None:
        result["site_dice"], by_phase = site_dice(predictor, holdout, work)
        result["site_phase_dice"] = {**by_phase, **_dice_by(test_cases, cases, manifest.classes, _site_phase)}
    return result


def run_one(manifest_path, method, seed, preset, settings, work: Path, cache: Path, holdout: Path = None) -> dict:
    """Train one model and score it; runs in a worker process."""
    global _stop_asked, _starting_trainer
    if _stop_asked:
        raise BenchmarkStopped(work)
    import torch
    from ltuda.manifest import load_manifest
    from ltuda.progress import SilentReporter
    from ltuda.train.config import make_config
    from ltuda.train.trainer import Trainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    manifest = load_manifest(manifest_path)
    config = make_config(preset, method=method, seed=seed, **settings)
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    meta = finished_training(model_dir, config, manifest_path)
    trained_here = meta is None
    if trained_here:
        resume = interrupted_training(model_dir, config, manifest_path)
        trainer = Trainer(manifest, model_dir, config, SilentReporter(), cache_dir=cache, resume=resume)
        _starting_trainer = trainer  # a stop before its own handler listens (it loads the data first) reaches it
        try:
            if _stop_asked:
                raise BenchmarkStopped(model_dir)
            outcome = trainer.run()
        finally:
            _starting_trainer = None
        if outcome["status"] == "cancelled":
            _stop_asked = True  # the trainer's handler took the signal: this worker starts no other run
            raise BenchmarkStopped(model_dir)
        if outcome["status"] != "completed":
            raise RuntimeError(f"training stopped ({outcome['status']})")
        meta = json.loads((model_dir / "model.json").read_text())
    result = score(model_dir, manifest, work, holdout)
    result["train_seconds"] = meta["training"]["seconds"]
    result["trained_here"] = trained_here  # False: an earlier invocation's run, only scored again
    result["iterations"] = sum(meta["training"]["epochs"].values()) * meta["training"]["iterations_per_epoch"]
    if meta.get("pseudo_label_quality"):
        result["pseudo_label_quality"] = meta["pseudo_label_quality"]
    return result


def finished_training(model_dir: Path, config, manifest_path) -> dict:
    """model.json of a completed training in model_dir with exactly this config on this dataset, else None.

    Lets a benchmark stopped part-way (or a learning curve spread over several sessions) go on where it was:
    a finished run is scored again, not trained again."""
    try:
        meta = json.loads((model_dir / "model.json").read_text())
        training = meta["training"]
    except (OSError, ValueError, KeyError):
        return None
    done = training.get("completed") and (model_dir / meta.get("weights", "model.pt")).is_file()
    return meta if done and _same_run(training, config, manifest_path) else None


def interrupted_training(model_dir: Path, config, manifest_path) -> bool:
    """Whether model_dir holds the checkpoint of a run with exactly this config on this dataset that was stopped
    before it finished (a session ended): it resumes from there, with its saved random state, instead of
    starting again."""
    from ltuda.train.trainer import CONFIG, LAST

    try:
        saved = json.loads((model_dir / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return (model_dir / LAST).is_file() and _same_run(saved, config, manifest_path)


def _same_run(recorded: dict, config, manifest_path) -> bool:
    """Whether a run's recorded "config" and "dataset" are this config on this dataset."""
    same_config = recorded.get("config") == _with_new_fields(recorded.get("config"), config)
    return same_config and Path(recorded.get("dataset", "")).resolve() == Path(manifest_path).resolve()


# Settings added with one behaviour and given another default later: a run that does not record one was
# trained with the first, so only a config that asks for it is the same run.
FORMER_DEFAULTS = {"unlabelled_slices": "in-batch"}


def _with_new_fields(recorded, config) -> dict:
    """config as JSON, where a setting added to TrainConfig after `recorded` was written, and left at its
    default, takes the recorded (absent) form: a new option must not make every finished run look different."""
    current = json.loads(json.dumps(config.to_json()))
    if not isinstance(recorded, dict):
        return current
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    defaults = json.loads(json.dumps({**defaults, **FORMER_DEFAULTS}, default=str))
    return {k: v for k, v in current.items()
            if k in recorded or k not in defaults or v != defaults[k]}


def parse_setting(text: str) -> tuple:
    """KEY=VALUE -> (key, value), the value read as JSON (numbers, lists, true/false) or else kept as text."""
    from ltuda.train.config import TrainConfig

    key, sep, value = text.partition("=")
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"method", "seed", "preset"}  # the benchmark's own
    if not sep or key not in known:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def package_versions() -> str:
    """The packages a run's figures depend on, and the CPU instruction set torch's kernels use. Runs repeat
    exactly on one such set only: on another (a fresh install, another machine) a seed's Dice moves by about
    0.01, as much as many method differences."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    found = [f"CPU {torch.backends.cpu.get_cpu_capability()}"]
    if torch.cuda.is_available():  # the runs train there (device "auto"), with its own kernels
        found.append(f"GPU {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
    for name in ("torch", "monai", "numpy", "scipy", "SimpleITK"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} absent")
    return ", ".join(found)


def scarce_suffix(cases_per_site) -> str:
    """"-3cases" for a protocol run with fewer cases per site than its own (None: the protocol as it is)."""
    return f"-{cases_per_site}cases" if cases_per_site else ""


def phantoms_folder(work: Path, protocol: str, cases_per_site=None) -> Path:
    """The folder of the protocol's phantoms of the current generator version. A changed generator writes to a
    new folder: finished runs are matched by their dataset's path, so models trained on older phantoms are not
    reused (version 1 keeps the original folder name and its runs)."""
    from ltuda.data.phantoms import LAYOUT_VERSIONS

    version = LAYOUT_VERSIONS[protocol]
    return work / (f"phantoms-{protocol}" + (f"-v{version}" if version > 1 else "") + scarce_suffix(cases_per_site))


def make_phantoms(work: Path, protocol: str, smoke: bool, seed: int = PHANTOM_SEED, cases_per_site=None) -> dict:
    """The protocol's phantoms; `cases_per_site` keeps only the first N cases of each site (each case is drawn
    from its own seed, site and index, so they and the test cases are the same images as in the full set)."""
    from ltuda.data.phantoms import LAYOUT_VERSIONS, generate_phantoms

    version = LAYOUT_VERSIONS[protocol]
    folder = phantoms_folder(work, protocol, cases_per_site)
    size = dict(cases_per_site=2, test_cases=1, shape=(48, 48), holdout_per_site=1) if smoke else \
        dict(cases_per_site=10, test_cases=6, shape=(96, 96), holdout_per_site=4)
    if cases_per_site:
        size["cases_per_site"] = cases_per_site
    # multi-site: the hospital's own unlabelled scans beside the four labelled sites, as many as one site has
    unlabelled = size["cases_per_site"] if protocol == "multi-site" else 0
    partial = generate_phantoms(folder, seed=seed, layout=protocol, unlabelled_cases=unlabelled, **size)
    return {"partial": partial, "full": partial.with_name("dataset_full.json"),
            "holdout": partial.with_name("dataset_holdout.json"), "version": version,
            "unlabelled_site": unlabelled > 0}


class BenchmarkStopped(Exception):
    """A stop was asked for (SIGTERM, SIGINT): the benchmark ends; the same command resumes it."""


# Set by SIGTERM/SIGINT in this process (main or worker) while no training listens; a training takes the
# signal itself (checkpoint, "cancelled"). Either way no further run starts here.
_stop_asked = False
# The training run_one is starting: until Trainer.run() installs its own handler (after loading the data), a
# stop is noted here and handed to it, so it saves a checkpoint at its first step instead of training on.
_starting_trainer = None


def _note_stop(signum, frame):
    global _stop_asked
    _stop_asked = True
    if _starting_trainer is not None:
        _starting_trainer.stop_requested = True


def _worker_init():
    os.environ["OMP_NUM_THREADS"] = "1"
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _note_stop)


@contextlib.contextmanager
def stop_on_signals(workers: bool):
    """SIGTERM/SIGINT end the benchmark, not just the current training: the workers are told too (a
    `kill` reaches only this process; Ctrl-C reaches them as well, and a second signal is harmless)."""
    def handle(signum, frame):
        _note_stop(signum, frame)
        for child in multiprocessing.active_children() if workers else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_tasks(tasks, jobs: int, on_result) -> list:
    """tasks: (key, args for run_one); on_result(key, result) in the main process as each finishes.

    A run that fails is reported at once and the others go on, so one failure loses no other result;
    returns the failed keys. A stop (SIGTERM, SIGINT) raises BenchmarkStopped once the running trainings
    have saved their checkpoints, with every finished run already passed to on_result."""
    failed = []

    def report(key, exc):
        failed.append(key)
        print(f"FAILED {key}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    with stop_on_signals(workers=jobs > 1):
        if jobs <= 1:
            for key, args in tasks:
                try:
                    result = run_one(*args)
                except BenchmarkStopped:
                    raise
                except Exception as exc:  # noqa: BLE001 - one failed training must not end the benchmark
                    report(key, exc)
                    continue
                on_result(key, result)
            return failed
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init) as pool:
            futures = {pool.submit(run_one, *args): key for key, args in tasks}
            stopped = False
            for future in concurrent.futures.as_completed(futures):
                if future.cancelled():
                    continue
                exc = future.exception()
                if not stopped and (_stop_asked or isinstance(exc, BenchmarkStopped)):
                    stopped = True
                    for waiting in futures:  # the runs not yet started; the running ones end on their own
                        waiting.cancel()
                if exc is None:
                    on_result(futures[future], future.result())
                elif not isinstance(exc, BenchmarkStopped):
                    report(futures[future], exc)
        if stopped:
            raise BenchmarkStopped()
    return failed


def write_results(out: Path, results: dict):
    """accuracy.json (replaced in one step, so a reader never sees half a file) and accuracy.md."""
    tmp = out / "accuracy.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=float) + "\n")
    os.replace(tmp, out / "accuracy.json")
    (out / "accuracy.md").write_text(render_markdown(results))


def rerender(out: Path) -> dict:
    """Every protocol's paired tests computed again from its rows (after PROTOCOL_PAIRS gained a pair), and
    the report written again; trains and scores nothing."""
    with open(out / ".accuracy.lock", "w") as lock:  # a running benchmark may be saving the same file
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads((out / "accuracy.json").read_text())
        for entry in results.get("protocols", {}).values():
            entry.pop("paired_tests", None)
            tests = protocol_paired_tests(entry["methods"])
            if tests:
                entry["paired_tests"] = tests
        write_results(out, results)
    plot(results, out / "accuracy.png")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="toy")
    parser.add_argument("--preset", choices=("fast", "paper"), default="fast")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--set", dest="settings", type=parse_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="a training setting for every method, e.g. --set epochs_stage1=32 (repeatable)")
    parser.add_argument("--learning-curve", default=None, metavar="FACTORS",
                        help="e.g. 1,2,4: train labeled-only and ltuda (or the --methods given) at these multiples "
                             "of the schedule")
    parser.add_argument("--site-gap", action="store_true",
                        help="measure the protocol's site gap: labelled-only's Dice on held-out cases of the site "
                             "that labels each organ minus the other sites' (with the unlabelled site: minus the test "
                             "cases'); runs labelled-only, then the --methods given, scored on the held-out cases too")
    parser.add_argument("--cases-per-site", type=int, default=None, metavar="N",
                        help="scarce labels: only the first N cases of each site (N >= 3, so that each organ keeps a "
                             "validation case); the same test cases; runs and phantoms in their own folders")
    parser.add_argument("--jobs", type=int, default=1, help="training processes at once (one thread each)")
    parser.add_argument("--smoke", action="store_true", help="smallest configuration: a few iterations")
    parser.add_argument("--dev", action="store_true",
                        help=f"development data: phantom seed {DEV_PHANTOM_SEED}, seeds from {DEV_FIRST_SEED}, results "
                             "in results/dev and scratch in work/accuracy-dev, apart from the reported benchmark")
    parser.add_argument("--first-seed", type=int, default=None, metavar="SEED",
                        help=f"the first training seed (default {FIRST_SEED}, or {DEV_FIRST_SEED} with --dev): fresh "
                             "development seeds for a new candidate, once the first ones have judged several")
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results, or results/dev)")
    parser.add_argument("--work", default=None, help="scratch folder (default: benchmarks/work/accuracy[-dev])")
    parser.add_argument("--rerender", action="store_true",
                        help="train nothing: compute the paired tests of the results in --out again and rewrite "
                             "its report (after a pair was added to accuracy_stats.PROTOCOL_PAIRS)")
    args = parser.parse_args(argv)
    here = Path(__file__).resolve().parent
    out = Path(args.out) if args.out else here / "results" / ("dev" if args.dev else "")
    if args.rerender:
        if not (out / "accuracy.json").is_file():
            parser.error(f"--rerender: no results in {out / 'accuracy.json'}; give the folder with --out")
        print(render_markdown(rerender(out)))
        return
    requested = args.methods.split(",")
    unknown = [key for key in requested if key not in METHODS]
    if unknown or not requested:
        parser.error(f"--methods: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(METHODS)}")
    try:
        factors = [float(f) for f in args.learning_curve.split(",")] if args.learning_curve else []
    except ValueError:
        parser.error(f"--learning-curve: expected numbers such as 1,2,4, got {args.learning_curve!r}")
    if factors:  # labelled-only against LTUDA, or against the recipes --methods names
        chosen = requested if args.methods != parser.get_default("methods") else ["ltuda"]
        requested = ["labeled-only"] + [key for key in chosen if key != "labeled-only"]
    if args.site_gap:  # the gap is labelled-only's: it alone, or first beside the methods asked for
        chosen = requested if args.methods != parser.get_default("methods") else []
        requested = ["labeled-only"] + [key for key in chosen if key != "labeled-only"]
    if args.cases_per_site is not None and (args.cases_per_site < 3 or factors or args.site_gap):
        parser.error("--cases-per-site: a whole number of at least 3, without --learning-curve or --site-gap")
    work = Path(args.work) if args.work else here / "work" / ("accuracy-dev" if args.dev else "accuracy")
    out.mkdir(parents=True, exist_ok=True)
    overrides = {}
    if args.smoke:
        overrides = {"epochs_stage1": 1, "epochs_stage2": 1, "iterations_per_epoch": 2, "image_size": 32,
                     "batch_size": 2, "pseudo_rampup_epochs": 0}
    overrides.update(dict(args.settings))
    phantoms = make_phantoms(work, args.protocol, args.smoke, DEV_PHANTOM_SEED if args.dev else PHANTOM_SEED,
                             args.cases_per_site)
    first_seed = args.first_seed if args.first_seed is not None else DEV_FIRST_SEED if args.dev else FIRST_SEED
    seeds = [first_seed + i for i in range(args.seeds)]
    command = "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results_path = out / "accuracy.json"
    protocol_key = args.protocol + scarce_suffix(args.cases_per_site)  # scarce labels: an entry of its own
    packages = package_versions()

    points = factors or [None]
    runs = {(factor, key): {} for factor in points for key in requested}
    tasks = []
    # factors outside, then seeds, methods inside: a stopped run has every method on the same seeds, and the
    # cheaper points of a learning curve finish first
    for factor in points:
        for seed in seeds:
            for key in requested:
                method, variant, settings = method_settings(key, args.preset, overrides, factor or 1)
                # 1x is the main benchmark's run with the same settings: one folder, so it is trained once
                point = f"x{factor:g}" if factor and factor != 1 else "main"
                folder = work / protocol_key / point / key / f"seed{seed}"
                holdout = phantoms["holdout"] if args.site_gap else None
                tasks.append(((factor, key, seed), (phantoms[variant], method, seed, args.preset, settings, folder,
                                                    work / "cache", holdout)))

    def record(task_key, result):
        factor, key, seed = task_key
        runs[(factor, key)][seed] = result
        print(f"{protocol_key} {'x%g ' % factor if factor else ''}{key:<22} seed {seed}: {result['mean_dice']:.3f} "
              f"({result['train_seconds']} s)", flush=True)
        save(complete=False)

    def save(complete: bool):
        """Read the file again and replace only this run's part: other benchmark invocations may run too, so
        the read-modify-write holds a lock."""
        with open(out / ".accuracy.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return save_locked(complete)

    def save_locked(complete: bool):
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        results.setdefault("protocols", {})
        results.setdefault("learning_curve", {})
        done = lambda factor, key: [runs[(factor, key)][s] for s in seeds if s in runs[(factor, key)]]  # noqa: E731
        if factors:
            curve = results["learning_curve"].get(args.protocol, {})
            if (curve.get("preset", "fast"), curve.get("settings", {})) != (args.preset, overrides):
                curve = {}  # a curve under other settings: its seeds must not mix with these
            results["learning_curve"][args.protocol] = curve
            curve.update(preset=args.preset, settings=overrides)
            for factor in factors:
                finished = {key: runs[(factor, key)] for key in requested if runs[(factor, key)]}
                if finished:
                    add_to_curve(curve.setdefault(f"{factor:g}", {}), finished, command.strip(), packages)
            # each point keeps the command that gave it: a later --learning-curve 8 adds to 1,2,4
            curve["commands"] = sorted(set(curve.get("commands", [])) | {command.strip()})
        else:
            previous = results["protocols"].get(protocol_key, {})
            # rows on another version of the phantoms are another experiment (entries before versions: 1)
            same_experiment = (previous.get("preset") == args.preset and previous.get("settings") == overrides
                               and previous.get("phantoms_version", 1) == phantoms["version"]
                               and previous.get("cases_per_site") == args.cases_per_site)
            earlier = previous.get("methods", {}) if same_experiment else {}
            methods = {}
            for key in requested:
                if not done(None, key):
                    continue
                methods[key] = summary = summarise_seeds(done(None, key))
                summary["seeds_done"] = [s for s in seeds if s in runs[(None, key)]]
                summary["command"], summary["packages"] = command.strip(), packages
                if key in earlier and not any(r.get("trained_here", True) for r in done(None, key)):
                    # only scored again: the row keeps the command and package versions that trained it
                    summary["command"] = earlier[key].get("command", summary["command"])
                    summary["packages"] = earlier[key].get("packages")
                quality = [r.get("pseudo_label_quality") for r in done(None, key)]
                if any(quality):  # the teacher diagnostics, per seed, for the plots
                    summary["pseudo_label_quality"] = quality
            if same_experiment:  # methods run by another invocation with the same settings stay
                methods = {**{k: v for k, v in previous.get("methods", {}).items() if k not in methods}, **methods}
            entry = {"preset": args.preset, "phantoms_version": phantoms["version"], "seeds": seeds,
                     **({"cases_per_site": args.cases_per_site} if args.cases_per_site else {}),
                     "settings": overrides, "equal_iterations": True,
                     "methods": methods, "complete": complete and all(m["seeds"] == len(seeds) for m in methods.values()),
                     "commands": sorted({m["command"] for m in methods.values()}),
                     "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                 "jobs": args.jobs, "packages": packages}}
            paired_tests = protocol_paired_tests(methods)
            if paired_tests:
                entry["paired_tests"] = paired_tests
            if args.site_gap and done(None, "labeled-only"):  # none when every run failed or was stopped
                entry["site_gap"] = site_gap(done(None, "labeled-only"), phantoms["unlabelled_site"])
            elif previous.get("site_gap") and same_experiment:
                entry["site_gap"] = previous["site_gap"]
            if entry.get("site_gap"):
                entry["site_gap_labeled_only"] = entry["site_gap"]["gap"]
            results["protocols"][protocol_key] = entry
        write_results(out, results)
        return results

    try:
        failed = run_tasks(tasks, args.jobs, record)
    except BenchmarkStopped:
        print(f"stopped: the finished runs are in {results_path}; run the same command again to resume the others "
              "from their checkpoints", file=sys.stderr, flush=True)
        sys.exit(130)
    results = save(complete=not failed)
    plot(results, out / "accuracy.png")
    print(render_markdown(results))
    if failed:
        sys.exit(f"{len(failed)} run(s) failed (above); the others are saved")


if __name__ == "__main__":
    main()
