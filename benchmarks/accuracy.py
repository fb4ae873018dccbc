"""Accuracy benchmark: LTUDA against what users would do instead, on partially labelled phantoms.

    python benchmarks/accuracy.py [--preset fast|paper] [--seeds 3] [--smoke] [--out benchmarks/results]
    python benchmarks/accuracy.py --methods labeled-only,ltuda --equal-iterations --set epochs_stage1=32 ...

Four training sites each label one organ; the test site (another scanner) is fully labelled. Every
method trains with the same network, budget and seeds, then segments the test cases; 3D Dice and
HD95 (mm) per organ. Methods: fully supervised (same images, all organs labelled: the upper bound),
naive union, labelled-only pBCE, marginal + exclusion, CDA only, LTUDA (CDA + PDA, each head).
Ablations: prototypes per class, strong views, labelled cases per organ. Writes accuracy.json,
accuracy.md and accuracy.png.

By default each method runs its preset schedule, so LTUDA (stage 1 + stage 2) trains for more
iterations than the one-stage methods; --equal-iterations gives those methods both stages' epochs.
--set KEY=VALUE changes any training setting for every method (e.g. a longer schedule).
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ltuda.data.phantoms import generate_phantoms
from ltuda.evaluate import evaluate_case, summarise
from ltuda.manifest import load_manifest, write_manifest
from ltuda.model.network import HEADS
from ltuda.predict import Predictor
from ltuda.io.segnrrd import write_seg_nrrd
from ltuda.io.volumes import read_image
from ltuda.progress import SilentReporter
from ltuda.train.config import METHOD_STAGES, TrainConfig, make_config
from ltuda.train.trainer import Trainer

METHODS = {
    # key: (method, dataset variant)
    "fully-supervised": ("labeled-only", "full"),
    "naive": ("naive", "partial"),
    "labeled-only": ("labeled-only", "partial"),
    "marginal-exclusion": ("marginal-exclusion", "partial"),
    "cda": ("cda", "partial"),
    "ltuda": ("ltuda", "partial"),
}


def subset_manifest(manifest_path: Path, per_site: int) -> Path:
    """The same dataset with only the first `per_site` training cases of each site."""
    manifest = load_manifest(manifest_path)
    kept, counts = [], {}
    for case in manifest.cases:
        key = tuple(case.labeled) if case.split != "test" else None
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
            if counts[key] > per_site:
                continue
        kept.append(case)
    path = manifest_path.with_name(f"{manifest_path.stem}_{per_site}cases.json")
    write_manifest(path, manifest.classes, kept, name=f"{manifest.name}-{per_site}")
    return path


def score(model_dir: Path, manifest, heads, work: Path) -> dict:
    """Per head: mean Dice, per-organ Dice and HD95 on the fully labelled test cases.

    "auto" resolves to one of the named heads (the one that validated best); each head is
    predicted once and "auto" shares that head's scores.
    """
    predictors = {head: Predictor(model_dir, head=head, device="auto") for head in heads}
    scored = {}
    for predictor in predictors.values():
        if predictor.head in scored:
            continue
        cases = []
        for case in manifest.split("test"):
            image = read_image(case.image)
            pred = work / f"{case.id}_{predictor.head}.seg.nrrd"
            write_seg_nrrd(pred, predictor.segment(image), image, manifest.classes)
            cases.append(evaluate_case(pred, case.label, manifest.classes, truth_value_map=case.value_map))
        mean = summarise(cases, manifest.classes)["mean"]
        dice = {n: m["dice"] for n, m in mean.items()}
        hd95 = {n: m["hd95_mm"] for n, m in mean.items()}
        scored[predictor.head] = {"mean_dice": _nanmean(list(dice.values())), "per_organ_dice": dice,
                                  "per_organ_hd95_mm": hd95, "mean_hd95_mm": _nanmean(list(hd95.values()))}
    return {head: scored[predictor.head] for head, predictor in predictors.items()}


def run_one(manifest_path, method, seed, preset, overrides, work: Path, heads=("auto",)):
    manifest = load_manifest(manifest_path)
    config = make_config(preset, method=method, seed=seed, **overrides)
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    outcome = Trainer(manifest, model_dir, config, SilentReporter(), cache_dir=work.parent / "cache").run()
    if outcome["status"] != "completed":  # the trainer caught Ctrl-C/SIGTERM: stop the benchmark too
        sys.exit(f"stopped during {method} seed {seed}; results so far are in accuracy.json")
    result = score(model_dir, manifest, heads, work)
    result["train_seconds"] = round(time.time() - started, 1)
    return result


def parse_setting(text: str) -> tuple:
    """KEY=VALUE -> (key, value), the value read as JSON (numbers, lists) or else kept as text."""
    key, sep, value = text.partition("=")
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"method", "seed", "preset"}  # the benchmark's own
    if not sep or key not in known:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def method_overrides(method: str, preset: str, overrides: dict, equal_iterations: bool) -> dict:
    """The settings one method trains with; with equal_iterations a one-stage method gets both stages' epochs."""
    if not equal_iterations or len(METHOD_STAGES[method]) > 1:
        return overrides
    config = make_config(preset, **overrides)
    return {**overrides, "epochs_stage1": config.epochs_stage1 + config.epochs_stage2}


def _nanmean(values) -> float:
    """Mean ignoring NaN (an organ predicted empty has no HD95); NaN, quietly, when all are."""
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _spread(r) -> str:
    return f"{r['dice_std']:.3f}" if r["seeds"] > 1 else "n/a (1 seed)"


def summarise_seeds(runs: list) -> dict:
    """Mean and spread over seeds of a list of per-seed results for one head."""
    organs = list(runs[0]["per_organ_dice"])
    means = [r["mean_dice"] for r in runs]
    return {
        "mean_dice": float(np.mean(means)),
        "dice_std": float(np.std(means)),
        "per_organ_dice": {o: float(np.mean([r["per_organ_dice"][o] for r in runs])) for o in organs},
        "per_organ_dice_std": {o: float(np.std([r["per_organ_dice"][o] for r in runs])) for o in organs},
        "mean_hd95_mm": _nanmean([r["mean_hd95_mm"] for r in runs]),
        "per_organ_hd95_mm": {o: _nanmean([r["per_organ_hd95_mm"][o] for r in runs]) for o in organs},
        "seeds": len(runs),
        "per_seed_mean_dice": means,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("fast", "paper"), default="fast")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ablation-seeds", type=int, default=None, help="seeds per ablation point (default: --seeds)")
    parser.add_argument("--cases-per-site", type=int, default=10)
    parser.add_argument("--test-cases", type=int, default=6)
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--equal-iterations", action="store_true",
                        help="one-stage methods train for stage 1 + stage 2 epochs, as many iterations as LTUDA")
    parser.add_argument("--set", dest="settings", type=parse_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="a training setting for every method, e.g. --set epochs_stage1=32 (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="smallest configuration: one seed, a few iterations")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--work", default=None, help="scratch folder (default: OUT/../work/accuracy)")
    args = parser.parse_args(argv)
    requested = args.methods.split(",")
    methods = {key: METHODS[key] for key in requested if key in METHODS}
    unknown = [key for key in requested if key not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(METHODS)}")
    started = time.time()
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / "work" / "accuracy"
    out.mkdir(parents=True, exist_ok=True)
    overrides = {}
    if args.smoke:
        args.seeds, args.cases_per_site, args.test_cases, args.no_ablations = 1, 2, 1, True
        overrides = {"epochs_stage1": 1, "epochs_stage2": 1, "iterations_per_epoch": 2, "image_size": 32, "batch_size": 2}
    settings = dict(args.settings)
    overrides.update(settings)
    ablation_seeds = args.ablation_seeds or args.seeds
    phantoms = generate_phantoms(work / "phantoms", cases_per_site=args.cases_per_site, test_cases=args.test_cases,
                                 shape=(48, 48) if args.smoke else (96, 96), seed=1000)
    variants = {"partial": phantoms, "full": phantoms.with_name("dataset_full.json")}
    command = "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"command": command.strip(), "preset": args.preset, "seeds": args.seeds, "ablation_seeds": ablation_seeds,
               "settings": settings, "equal_iterations": args.equal_iterations,
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
               "methods": {}, "heads": {}, "ablations": {}}
    flat = results["methods"]

    def save(complete: bool):
        """Written after every seed and ablation point, so a stopped run keeps what it measured."""
        results["complete"] = complete
        results["seconds"] = round(time.time() - started, 1)
        results.update(flat)  # per method key at the top level, as documented
        (out / "accuracy.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
        (out / "accuracy.md").write_text(render_markdown(results))

    # Seeds outside, methods inside: whenever the run stops, every method has the same seeds so far.
    per_method = {key: {h: [] for h in (("auto",) + HEADS if method == "ltuda" else ("auto",))}
                  for key, (method, _) in methods.items()}
    for seed in range(args.seeds):
        for key, (method, variant) in methods.items():
            # LTUDA: every head, and "auto" (the head that validated best, what a user gets by default)
            heads = tuple(per_method[key])
            trained_with = method_overrides(method, args.preset, overrides, args.equal_iterations)
            r = run_one(variants[variant], method, 43 + seed, args.preset, trained_with, work / key / f"seed{seed}", heads)
            for h in heads:
                per_method[key][h].append(r[h])
            print(f"{key:<20} seed {seed}: " + ", ".join(f"{h} {r[h]['mean_dice']:.3f}" for h in heads)
                  + f" ({r['train_seconds']} s)", flush=True)
            summaries = {h: summarise_seeds(v) for h, v in per_method[key].items()}
            if method == "ltuda":
                results["heads"] = summaries
            flat[key] = summaries["auto"]
        results["seeds_done"] = seed + 1
        save(complete=False)
    ltuda_runs = per_method["ltuda"]["auto"] if "ltuda" in methods else []
    if not args.no_ablations:
        default = make_config(args.preset, **overrides)
        for name, values, used, build in (
            ("prototypes", (1, 3, 5, 10), default.prototypes, lambda v: (phantoms, {"prototypes": v})),
            ("strong_views", (1, 2, 3), default.strong_views, lambda v: (phantoms, {"strong_views": v})),
            ("labeled_cases_per_organ", (3, 5, 10), args.cases_per_site, lambda v: (subset_manifest(phantoms, v), {})),
        ):
            results["ablations"][name] = {}
            for v in values:
                if v == used and len(ltuda_runs) >= ablation_seeds:  # the LTUDA row above is this point
                    runs = ltuda_runs[:ablation_seeds]
                else:
                    manifest_path, extra = build(v)
                    runs = [run_one(manifest_path, "ltuda", 43 + s, args.preset, {**overrides, **extra},
                                    work / f"ablation_{name}_{v}" / f"seed{s}")["auto"]
                            for s in range(ablation_seeds)]
                results["ablations"][name][str(v)] = summarise_seeds(runs)
                print(f"ablation {name}={v}: {results['ablations'][name][str(v)]['mean_dice']:.3f}", flush=True)
                save(complete=False)
    save(complete=True)
    plot(flat, out / "accuracy.png")
    print(render_markdown(results))


def render_markdown(results) -> str:
    methods = results["methods"]
    organs = list(next(iter(methods.values()))["per_organ_dice"])
    lines = ["# Accuracy benchmark (partially labelled phantoms)", "",
             f"Command: `{results['command']}`  ",
             f"Preset: {results['preset']}, seeds: {results.get('seeds_done', 0)} of {results['seeds']} done "
             + (f"(ablations: {results.get('ablation_seeds')} seed(s) each)  " if results.get("ablations")
                else "(no ablations)  "),
             f"Machine: {results['machine']}  ",
             f"Settings changed for every method: {results.get('settings') or 'none'}; one-stage methods train for "
             + ("stage 1 + stage 2 epochs (equal iterations)" if results.get("equal_iterations") else
                "stage 1 epochs (each method's preset schedule)") + "  ",
             f"Duration: {results['seconds']} s" + ("" if results.get("complete") else " (INCOMPLETE: still running or stopped)"),
             "",
             "Test set: a fifth, fully labelled site. Dice is 3D, mean over test cases then seeds (spread = std "
             "over seeds); HD95 in mm.", "",
             "| method | mean Dice | spread | " + " | ".join(organs) + " | mean HD95 (mm) |",
             "|---|---|---|" + "---|" * len(organs) + "---|"]
    for key, r in methods.items():
        lines.append(f"| {key} | {r['mean_dice']:.3f} | {_spread(r)} | "
                     + " | ".join(f"{r['per_organ_dice'][o]:.3f}" for o in organs) + f" | {r['mean_hd95_mm']:.1f} |")
    if results.get("heads"):
        lines += ["", "LTUDA by head (auto = the head that validated best, the default):", "",
                  "| head | mean Dice | spread |", "|---|---|---|"]
        for head, r in results["heads"].items():
            lines.append(f"| {head} | {r['mean_dice']:.3f} | {_spread(r)} |")
    for name, rows in results.get("ablations", {}).items():
        lines += ["", f"Ablation: {name} (LTUDA, best-validating head)", "", "| value | mean Dice | spread |",
                  "|---|---|---|"]
        for value, r in rows.items():
            lines.append(f"| {value} | {r['mean_dice']:.3f} | {_spread(r)} |")
    return "\n".join(lines) + "\n"


def plot(methods: dict, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # optional: the tables carry the same numbers
        return
    keys = list(methods)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(keys, [methods[k]["mean_dice"] for k in keys], yerr=[methods[k]["dice_std"] for k in keys], capsize=4,
           color=["#888888"] * (len(keys) - 1) + ["#d35f3c"])
    ax.set_ylabel("mean 3D Dice (test site)")
    ax.set_ylim(0, 1)
    ax.set_title("Partially labelled phantoms: LTUDA vs alternatives")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
