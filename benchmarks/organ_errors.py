"""Where a method's Dice goes: voxel precision and recall per organ of the accuracy benchmark's finished runs.

Dice alone cannot tell a model that paints an organ where it is not (precision) from one that misses it
(recall); pseudo-labels can cause either. This reads the test-case segmentations the accuracy benchmark
left in its work folder, pools the voxels over test cases and seeds, and prints one table per schedule
point:

    python benchmarks/organ_errors.py --points main,x2 --methods labeled-only,ltuda,ltuda-rampup

A second table says where each organ's missed voxels went (background, or which other organ took them).
`--cases-per-site N` reads the runs of `accuracy.py --cases-per-site N`. It trains nothing; the figures go
to benchmarks/results/organ_errors.{json,md} (or --out).
"""

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def pooled_errors(run_folders, cases, classes) -> tuple:
    """(segmentations read, {organ: {"precision", "recall"}}) over every test case of every run folder that
    has it."""
    from ltuda.evaluate import load_class_labels

    counts = {c["name"]: np.zeros(3, dtype=np.int64) for c in classes}  # true positives, predicted, true
    # where each organ's true voxels went: {organ: [voxels predicted as background, as class 1, ..., as class C]}
    values = [0] + [c["value"] for c in classes]
    went = {c["name"]: np.zeros(len(values), dtype=np.int64) for c in classes}
    seen = 0
    for case in cases:
        predictions = [folder / f"{case.id}.seg.nrrd" for folder in run_folders]
        predictions = [path for path in predictions if path.is_file()]
        if not predictions:
            continue
        _, truth = load_class_labels(case.label, classes, case.value_map)  # once per case, for every seed
        for pred_path in predictions:
            _, pred = load_class_labels(pred_path, classes)
            seen += 1
            for c in classes:
                p, t = pred == c["value"], truth == c["value"]
                counts[c["name"]] += [np.count_nonzero(p & t), np.count_nonzero(p), np.count_nonzero(t)]
                went[c["name"]] += np.bincount(pred[t].ravel().astype(np.int64), minlength=max(values) + 1)[values]
    names = ["background"] + [c["name"] for c in classes]
    return seen, {name: {"precision": tp / max(predicted, 1), "recall": tp / max(true, 1),
                         # share of the organ's true voxels that another class took
                         "missed_as": {other: float(went[name][i] / max(true, 1))
                                       for i, other in enumerate(names) if other != name}}
                  for name, (tp, predicted, true) in counts.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", default="toy")
    parser.add_argument("--points", default="main,x2", help="schedule points: main (1x), x2, x4, ...")
    parser.add_argument("--methods", default="labeled-only,ltuda")
    parser.add_argument("--work", default=str(HERE / "work" / "accuracy"))
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--by-phase", action="store_true",
                        help="a row per contrast phase of the test cases (native, portal venous) as well")
    parser.add_argument("--cases-per-site", type=int, default=None, metavar="N",
                        help="the runs of accuracy.py --cases-per-site N (scarce labels)")
    args = parser.parse_args(argv)
    from accuracy import phantoms_folder, scarce_suffix
    from ltuda.manifest import load_manifest

    work = Path(args.work)
    manifest = load_manifest(phantoms_folder(work, args.protocol, args.cases_per_site) / "dataset.json")
    groups = {"": manifest.split("test")}
    if args.by_phase:
        for case in manifest.split("test"):
            groups.setdefault(f" {case.extra['phase']}", []).append(case)
    results = {}
    for point in args.points.split(","):
        for key in args.methods.split(","):
            folders = sorted((work / (args.protocol + scarce_suffix(args.cases_per_site)) / point / key).glob("seed*"))
            for group, cases in groups.items():
                seen, errors = pooled_errors(folders, cases, manifest.classes)
                if seen:  # runs still training have no segmentations yet
                    results.setdefault(point + group, {})[key] = {"cases": seen, "organs": errors}
    organs = [c["name"] for c in manifest.classes]
    lines = ["# Voxel precision / recall per organ (test cases, pooled over cases and seeds)", "",
             f"Command: `python benchmarks/organ_errors.py --protocol {args.protocol} --points {args.points} "
             f"--methods {args.methods}" + (" --by-phase" if args.by_phase else "")
             + (f" --cases-per-site {args.cases_per_site}" if args.cases_per_site else "") + "`", "",
             "| point | method | cases | " + " | ".join(organs) + " |",
             "|---|---|---|" + "---|" * len(organs)]
    for point, methods in results.items():
        for key, pooled in methods.items():
            errors = pooled["organs"]
            lines.append(f"| {point} | {key} | {pooled['cases']} | "
                         + " | ".join(f"{errors[o]['precision']:.3f} / {errors[o]['recall']:.3f}" for o in organs) + " |")
    lines += ["", "Where each organ's missed voxels went (share of its true voxels predicted as background / "
              "another organ):", "", "| point | method | " + " | ".join(organs) + " |", "|---|---|" + "---|" * len(organs)]
    for point, methods in results.items():
        for key, pooled in methods.items():
            errors = pooled["organs"]
            lines.append(f"| {point} | {key} | " + " | ".join(
                ", ".join(f"{other} {share:.3f}" for other, share in errors[o]["missed_as"].items()) for o in organs)
                + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "organ_errors.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "organ_errors.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
