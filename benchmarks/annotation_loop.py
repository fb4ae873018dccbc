"""Annotation-loop benchmark: does reviewing the suggested (case, organ) rows first give a better model?

    python benchmarks/annotation_loop.py --seeds 3 --rounds 2 --reviews 4
    python benchmarks/annotation_loop.py --smoke          # seconds: the pipeline end to end

A simulated annotator works on the toy-layout phantoms (benchmarks/accuracy.py's protocol, smaller).
Start: the partial labels (each training case labels one organ) and a model trained on them (fast
preset, shortened schedule, no validation split). Then R rounds; each round:
1. `ltuda suggest` (run_suggestion) proposes every organ a case does not label, with its scores;
2. the strategy orders the rows; the annotator reviews the top k: the organ's true label (from the
   phantom's full label) replaces the proposal, one review each. Its effort is the voxels it had to
   change (proposal XOR truth) against drawing the organ from scratch (the truth's voxels);
3. the model is fine-tuned from the previous one (`train --init-from`: prepare_finetune + LineageTrainer).
After every round the model's 3D Dice on the fully labelled test cases is measured (accuracy.py's score).
Strategies, at the same number of reviews: uncertainty (suggest's default score), random order,
largest predicted volume first, and optionally each uncertainty score by name (entropy, heads, shift).

Also, on the initial model (the rows are the same for every strategy there), how much of all the
correction work each ranking puts in its top k, and its Spearman correlation with the voxels to fix.

Writes OUT/annotation_loop.json and .md (and .png with matplotlib), saved after every finished chain.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import FIRST_SEED, PHANTOM_SEED, score  # noqa: E402  (reused, not copied)
from accuracy_stats import paired_test  # noqa: E402

ORGANS = ("liver", "spleen", "kidney", "pancreas")
SCORE_NAMES = ("entropy", "heads", "shift", "error")
# strategy -> (suggest's score, order). "uncertainty": the candidate the issue asks to prove, entropy in
# suggest's organ-balanced order.
STRATEGY_SPECS = {"uncertainty": ("entropy", "balanced"), "largest": ("volume", "score"),
                  **{name: (name, "score") for name in SCORE_NAMES},
                  **{f"{name}-balanced": (name, "balanced") for name in SCORE_NAMES}}
STRATEGIES = ("uncertainty", "random") + tuple(k for k in STRATEGY_SPECS if k != "uncertainty")


def loop_manifest(phantom_manifest, labelled: dict, path: Path) -> Path:
    """A manifest in which case c labels the organs labelled[c]: its full label file, other organs background."""
    from ltuda.manifest import write_manifest

    cases = []
    for case in phantom_manifest.cases:
        if case.split == "test":
            cases.append(case)
            continue
        organs = [o for o in ORGANS if o in labelled[case.id]]
        value_map = {i + 1: (o if o in organs else "background") for i, o in enumerate(ORGANS)}
        cases.append(type(case)(case.id, case.image, case.label_full, organs, value_map, case.split, dict(case.extra),
                                label_full=case.label_full))
    return write_manifest(path, phantom_manifest.classes, cases, name=path.stem)


def _effort(suggest_dir: Path, row: dict, truth_path: Path) -> tuple:
    import nrrd
    import SimpleITK as sitk

    labels, _ = nrrd.read(str(suggest_dir / row["segmentation"]), index_order="C")
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_path)))
    value = ORGANS.index(row["organ"]) + 1
    proposal, true = labels == row["label_value"], truth == value
    return int(np.count_nonzero(proposal ^ true)), int(np.count_nonzero(true))


def order_rows(rows, strategy: str, default_score: str, rng) -> list:
    """The strategy's review order, ranked by suggest's own rank_rows (the product's order)."""
    from ltuda.suggest import rank_rows

    if strategy == "random":
        return [rows[i] for i in rng.permutation(len(rows))]
    score_name, order = STRATEGY_SPECS[strategy]
    scored = [{**r, "score": r["volume_ml"] if score_name == "volume" else r["uncertainties"][score_name]}
              for r in rows]
    return rank_rows(scored, score_name, order)


def train_initial(manifest_path: Path, out: Path, seed: int, settings: dict, cache: Path):
    from ltuda.manifest import load_manifest
    from ltuda.progress import SilentReporter
    from ltuda.train.config import make_config
    from ltuda.train.finetune import LineageTrainer, dataset_labels

    manifest = load_manifest(manifest_path)
    config = make_config("fast", seed=seed, device="cpu", **settings)
    result = LineageTrainer(manifest, out, config, SilentReporter(), cache_dir=cache,
                            extra_metadata={"dataset_labels": dataset_labels(manifest)}).run()
    if result["status"] != "completed":
        raise RuntimeError(f"training stopped ({result['status']})")


def fine_tune(parent: Path, manifest_path: Path, out: Path, seed: int, cache: Path) -> dict:
    """What `ltuda train --init-from parent` does."""
    from ltuda.manifest import load_manifest
    from ltuda.progress import SilentReporter
    from ltuda.train.finetune import LINEAGE, LineageTrainer, dataset_labels, prepare_finetune

    manifest = load_manifest(manifest_path)
    config, state, family = prepare_finetune(parent, manifest, {"seed": seed, "device": "cpu"})
    result = LineageTrainer(manifest, out, config, SilentReporter(), cache_dir=cache, init_state=state,
                            extra_metadata={"dataset_labels": dataset_labels(manifest), LINEAGE: family}).run()
    if result["status"] != "completed":
        raise RuntimeError(f"fine-tuning stopped ({result['status']})")
    return family


def suggest_rows(model: Path, manifest_path: Path, out: Path, phantom_manifest) -> list:
    """Every row of `ltuda suggest`, with the annotator's effort (changed, truth voxels) attached."""
    from ltuda.suggest import run_suggestion

    summary = run_suggestion(model, manifest_path, out, device="cpu")
    if summary["failed"]:
        raise RuntimeError(f"suggest failed: {summary['failed']}")
    rows = json.loads((out / "suggestions.json").read_text())["rows"]
    truth = {c.id: c.label_full for c in phantom_manifest.cases if c.split != "test"}
    for row in rows:
        row["changed"], row["truth"] = _effort(out, row, truth[row["case"]])
    return rows


def ranking_quality(rows, k: int, default_score: str, seed: int) -> dict:
    """Per ranking: share of all correction voxels in its top k, and Spearman rho with the voxels to fix."""
    from scipy import stats

    total = sum(r["changed"] for r in rows) or 1
    changed = [r["changed"] for r in rows]
    out = {}
    for name in STRATEGIES:
        rng = np.random.default_rng(seed)
        ordered = order_rows(rows, name, default_score, rng)
        score_name = STRATEGY_SPECS.get(name, ("random",))[0]
        values = [r["volume_ml"] for r in rows] if score_name == "volume" else \
            (list(rng.random(len(rows))) if score_name == "random" else [r["uncertainties"][score_name] for r in rows])
        rho = stats.spearmanr(values, changed).correlation if len(rows) > 2 else float("nan")
        out[name] = {"top_k_share_of_correction": sum(r["changed"] for r in ordered[:k]) / total,
                     "spearman_with_voxels_to_fix": float(rho),
                     "organs_in_top_k": sorted({r["organ"] for r in ordered[:k]})}
    best = sorted(rows, key=lambda r: -r["changed"])
    out["best_possible"] = {"top_k_share_of_correction": sum(r["changed"] for r in best[:k]) / total}
    return out


def _completed(model_dir: Path) -> bool:
    try:
        return json.loads((model_dir / "model.json").read_text())["training"]["completed"] is True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run_seed(args, seed, phantoms_path: Path, work: Path, on_chain):
    """The initial model, then each strategy's chain of rounds; on_chain(strategy, record) after each."""
    from ltuda.manifest import load_manifest

    phantom_manifest = load_manifest(phantoms_path)
    cache = work / "cache"
    seed_dir = work / f"seed{seed}"
    start = {c.id: list(c.labeled) for c in phantom_manifest.cases if c.split != "test"}
    manifest0 = loop_manifest(phantom_manifest, start, phantoms_path.parent / f"loop-seed{seed}-start.json")
    initial = seed_dir / "initial"
    started = time.time()
    if not _completed(initial):  # a finished initial model (same settings, same seed) is reused
        train_initial(manifest0, initial, seed, args.initial_settings, cache)
    dice0 = score(initial, phantom_manifest, seed_dir / "eval-initial")["mean_dice"]
    rows0 = suggest_rows(initial, manifest0, seed_dir / "suggest-initial", phantom_manifest)
    quality = ranking_quality(rows0, args.reviews, args.default_score, seed)
    all_effort = sum(r["changed"] for r in rows0) / max(1, sum(r["truth"] for r in rows0))
    print(f"seed {seed}: initial model Dice {dice0:.3f} ({time.time() - started:.0f} s); proposals need "
          f"{all_effort:.3f} of the voxels of drawing from scratch", flush=True)
    for strategy in args.strategies:
        rng = np.random.default_rng([seed, STRATEGIES.index(strategy)])
        labelled = {k: list(v) for k, v in start.items()}
        model, rows, dice, reviewed, changed, truth = initial, rows0, [dice0], [], 0, 0
        for round_index in range(1, args.rounds + 1):
            chain = seed_dir / strategy / f"round{round_index}"
            if round_index > 1:
                rows = suggest_rows(model, manifest, chain / "suggest", phantom_manifest)
            picked = order_rows(rows, strategy, args.default_score, rng)[:args.reviews]
            for row in picked:
                labelled[row["case"]].append(row["organ"])
                reviewed.append({"round": round_index, "case": row["case"], "organ": row["organ"],
                                 "changed": row["changed"], "truth": row["truth"]})
                changed, truth = changed + row["changed"], truth + row["truth"]
            manifest = loop_manifest(phantom_manifest, labelled,
                                     phantoms_path.parent / f"loop-seed{seed}-{strategy}-r{round_index}.json")
            fine_tune(model, manifest, chain / "model", seed, cache)
            model = chain / "model"
            dice.append(score(model, phantom_manifest, chain / "eval")["mean_dice"])
            print(f"seed {seed} {strategy:<11} round {round_index}: Dice {dice[-1]:.3f}", flush=True)
        on_chain(seed, strategy, {"dice_by_round": dice, "reviewed": reviewed,
                                  "voxels_changed_fraction": changed / max(1, truth)},
                 {"ranking_quality": quality, "all_rows_voxels_changed_fraction": all_effort, "rows": len(rows0)})


def summarise(per_seed: dict, strategies, seeds) -> dict:
    out = {}
    for strategy in strategies:
        runs = [per_seed[s][strategy] for s in seeds if strategy in per_seed.get(s, {})]
        if not runs:
            continue
        curves = [r["dice_by_round"] for r in runs]
        changed = [r["voxels_changed_fraction"] for r in runs]
        out[strategy] = {"dice_by_round": [float(np.mean(c)) for c in zip(*curves)],
                         "dice_std_by_round": [float(np.std(c)) for c in zip(*curves)],
                         "per_seed": curves, "seeds_done": [s for s in seeds if strategy in per_seed.get(s, {})],
                         "voxels_changed_fraction": float(np.mean(changed)),
                         "reviewed": [r["reviewed"] for r in runs]}
    return out


def render_markdown(doc) -> str:
    lines = ["# Annotation-loop benchmark (simulated annotator, toy-layout phantoms)", "",
             f"Command: `{doc['command']}`  ", f"Settings: {doc['settings']}; machine {doc['machine']}", "",
             ("" if doc["complete"] else "**INCOMPLETE** (running or stopped): the tables hold the finished chains.\n"),
             f"Each round the annotator reviews the top {doc['reviews_per_round']} (case, organ) rows of the strategy's "
             f"order (the true label replaces the proposal), then the model is fine-tuned from the previous one "
             f"(`train --init-from`). Test: mean 3D Dice on the fully labelled test cases; mean (std) over seeds.", "",
             "| strategy | " + " | ".join(f"round {i}" for i in range(doc["rounds"] + 1))
             + " | per seed, last round | voxels changed / drawing from scratch (reviewed rows) |",
             "|---|" + "---|" * (doc["rounds"] + 1) + "---|---|"]
    for name, s in doc["strategies"].items():
        cells = [f"{m:.3f} ({sd:.3f})" for m, sd in zip(s["dice_by_round"], s["dice_std_by_round"])]
        last = " ".join(f"{c[-1]:.3f} ({seed})" for c, seed in zip(s["per_seed"], s["seeds_done"]))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {last} | {s['voxels_changed_fraction']:.3f} |")
    lines += ["", "Strategies: uncertainty = `suggest --score entropy` (organ-balanced order); largest = `--score volume`; "
              "random = a random order; NAME = `--score NAME --order score`; NAME-balanced = `--score NAME` "
              "(organ-balanced)."]
    random = doc["strategies"].get("random")
    if random:
        lines += ["", "Last round against random order (gain of the mean; spread = the larger std over seeds):", ""]
        for name, s in doc["strategies"].items():
            if name == "random":
                continue
            gain = s["dice_by_round"][-1] - random["dice_by_round"][-1]
            spread = max(s["dice_std_by_round"][-1], random["dice_std_by_round"][-1])
            lines.append(f"- {name}: {gain:+.3f} (spread {spread:.3f}): "
                         + ("beats random by more than the spread" if gain > spread else "NOT better than random "
                            "by more than the spread"))
    for name, test in doc.get("paired_tests", {}).items():
        lines.append(f"\n{name.replace('_', ' ')}, last round: mean gain {test['mean_gain']:.4f} over {test['seeds']} "
                     f"paired seeds, one-sided paired t-test p = {test['p_one_sided']:.4f}")
    fractions = doc["voxels_changed_fraction"]
    lines += ["", f"Review effort over ALL proposals of the initial models (voxels changed / voxels drawn from scratch, "
              f"mean over seeds): {fractions.get('all_rows', float('nan')):.3f}", ""]
    quality = doc.get("ranking_quality", {})
    if quality:
        lines += [f"Ranking quality on the initial models' rows (mean over seeds): share of all correction voxels "
                  f"in the top {doc['reviews_per_round']}, and Spearman rho of the score with the voxels to fix:", "",
                  "| ranking | top-k share | Spearman rho |", "|---|---|---|"]
        for name, q in quality.items():
            rho = q.get("spearman_with_voxels_to_fix")
            lines.append(f"| {name} | {q['top_k_share_of_correction']:.3f} | "
                         + ("" if rho is None else f"{rho:.3f}") + " |")
    return "\n".join(lines) + "\n"


def plot(doc, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in doc["strategies"].items():
        xs = list(range(len(s["dice_by_round"])))
        ax.errorbar(xs, s["dice_by_round"], yerr=s["dice_std_by_round"], marker="o", capsize=3, label=name)
    ax.set_xlabel(f"round ({doc['reviews_per_round']} reviews each)")
    ax.set_ylabel("mean 3D Dice (test cases)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_quality(per_seed_meta: dict) -> dict:
    runs = [m["ranking_quality"] for m in per_seed_meta.values()]
    if not runs:
        return {}
    out = {}
    for name in runs[0]:
        out[name] = {key: float(np.nanmean([r[name][key] for r in runs])) for key in runs[0][name]
                     if key != "organs_in_top_k"}
    return out


def main(argv=None):
    from ltuda.suggest import DEFAULT_SCORE, default_order

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reviews", type=int, default=4, help="reviews per round (k)")
    parser.add_argument("--strategies", default=None,
                        help=f"comma-separated, from {','.join(STRATEGIES)} (default: uncertainty,random,largest,"
                             f"entropy,error-balanced; --smoke: uncertainty,random,largest)")
    parser.add_argument("--cases-per-site", type=int, default=3)
    parser.add_argument("--test-cases", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="phantom in-plane size")
    parser.add_argument("--initial-epochs", default="8,3", help="epochs of stage 1,2 of the initial model")
    parser.add_argument("--iterations-per-epoch", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny everything: seconds, for the test suite")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--work", default=None, help="scratch folder (default: OUT/../work/annotation_loop)")
    args = parser.parse_args(argv)
    if args.strategies is None:
        args.strategies = "uncertainty,random,largest" + ("" if args.smoke else ",entropy,error-balanced")
    args.strategies = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown or not args.strategies:
        parser.error(f"--strategies: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(STRATEGIES)}")
    try:
        epochs1, epochs2 = (int(v) for v in args.initial_epochs.split(","))
    except ValueError:
        parser.error(f"--initial-epochs: expected two numbers such as 8,3, got {args.initial_epochs!r}")
    args.default_score = DEFAULT_SCORE
    args.initial_settings = {"epochs_stage1": epochs1, "epochs_stage2": epochs2, "val_fraction": 0.0,
                             "iterations_per_epoch": args.iterations_per_epoch}
    phantom_size = dict(cases_per_site=args.cases_per_site, test_cases=args.test_cases, shape=(args.size, args.size))
    if args.smoke:
        args.seeds, args.rounds, args.reviews = 1, 1, 1
        args.initial_settings = {"epochs_stage1": 1, "epochs_stage2": 1, "iterations_per_epoch": 2, "image_size": 32,
                                 "batch_size": 2, "pseudo_rampup_epochs": 0, "val_fraction": 0.0}
        phantom_size = dict(cases_per_site=1, test_cases=1, shape=(32, 32))
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / "work" / "annotation_loop"
    if args.smoke:
        work = work / "smoke"  # never reuses (or spoils) a real run's models
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from ltuda.data.phantoms import generate_phantoms

    phantoms = generate_phantoms(work / "phantoms", seed=PHANTOM_SEED, layout="toy", **phantom_size)
    seeds = [FIRST_SEED + i for i in range(args.seeds)]
    command = "python benchmarks/annotation_loop.py " + " ".join(argv if argv is not None else sys.argv[1:])
    per_seed, meta = {}, {}

    def save(complete: bool):
        strategies = summarise(per_seed, args.strategies, seeds)
        doc = {"command": command.strip(), "complete": complete, "seeds": seeds, "rounds": args.rounds,
               "reviews_per_round": args.reviews,
               "uncertainty_strategy": dict(zip(("score", "order"), STRATEGY_SPECS["uncertainty"])),
               "suggest_default": {"score": args.default_score, "order": default_order(args.default_score)},
               "settings": {"initial": args.initial_settings, "phantoms": {**phantom_size, "layout": "toy",
                            "seed": PHANTOM_SEED}, "fine_tune": "train --init-from defaults (a quarter of the epochs)"},
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "threads": torch.get_num_threads()},
               "strategies": strategies,
               "voxels_changed_fraction": {**{k: v["voxels_changed_fraction"] for k, v in strategies.items()},
                                           **({"all_rows": float(np.mean([m["all_rows_voxels_changed_fraction"]
                                                                          for m in meta.values()]))} if meta else {})},
               "ranking_quality": _mean_quality(meta), "ranking_quality_per_seed": meta}
        if "uncertainty" in strategies:
            doc["paired_tests"] = {}
            for other in ("random", "largest"):
                if other in strategies:
                    a = dict(zip(strategies["uncertainty"]["seeds_done"], strategies["uncertainty"]["per_seed"]))
                    b = dict(zip(strategies[other]["seeds_done"], strategies[other]["per_seed"]))
                    common = [s for s in a if s in b]
                    doc["paired_tests"][f"uncertainty_vs_{other}"] = paired_test([a[s][-1] for s in common],
                                                                                [b[s][-1] for s in common])
        tmp = out / "annotation_loop.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2, default=float) + "\n")
        os.replace(tmp, out / "annotation_loop.json")
        (out / "annotation_loop.md").write_text(render_markdown(doc))
        return doc

    def on_chain(seed, strategy, record, seed_meta):
        per_seed.setdefault(seed, {})[strategy] = record
        meta[seed] = seed_meta
        save(complete=False)

    for seed in seeds:
        run_seed(args, seed, phantoms, work, on_chain)
    doc = save(complete=True)
    plot(doc, out / "annotation_loop.png")
    print(render_markdown(doc))


if __name__ == "__main__":
    main()
