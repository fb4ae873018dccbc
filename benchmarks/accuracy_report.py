"""The accuracy benchmark's report: accuracy.md from accuracy.json (tables, paired tests, the teacher's
pseudo-label diagnostics, the learning curve) and accuracy.png."""

from pathlib import Path

import numpy as np

from accuracy_stats import nanmean


def _fmt(value, digits=3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def _quality_lines(methods: dict) -> list:
    """Teacher pseudo-label precision / recall / Dice per organ, on the organs a case does not label, at
    the end of stage 1 and at the end of training (mean over seeds)."""
    lines = []
    for key, r in methods.items():
        runs = [q for q in r.get("pseudo_label_quality", []) if q]
        if not runs:
            continue
        organs = list(runs[0][-1]["per_organ"])
        lines += ["", f"Teacher pseudo-labels of `{key}` where they are used (precision / recall / Dice, mean over "
                  f"{len(runs)} seed(s)):", "", "| when | " + " | ".join(organs) + " |", "|---|" + "---|" * len(organs)]
        for label, pick in (("end of stage 1", lambda run: [d for d in run if d["stage"] == 1][-1:]),
                            ("end of training", lambda run: run[-1:])):
            picked = [p[0] for p in map(pick, runs) if p]
            if not picked:
                continue
            lines.append(f"| {label} | " + " | ".join(_quality_cells([d["per_organ"] for d in picked], organs)) + " |")
        # at the end of training, by the training cases' site and phase (where the teacher meets a shift)
        groups = sorted({g for run in runs for g in run[-1].get("by_group", {})})
        for group in groups:
            picked = [run[-1]["by_group"][group] for run in runs if group in run[-1].get("by_group", {})]
            lines.append(f"| end of training, {group} cases | " + " | ".join(_quality_cells(picked, organs)) + " |")
        lines += _gate_rows(runs, organs)
    return lines


def _gate_rows(runs: list, organs: list) -> list:
    """With an organ gate that kept some organ out at some moment: when each organ got in, per seed."""
    rows = []
    for field, label in (("pseudo_labels_on", "pseudo-labels used"), ("pseudo_dice_on", "Dice term on pseudo-targets")):
        entries = [d for run in runs for d in run if field in d]
        if not any(set(organs) - set(d[field]) for d in entries):
            continue
        cells = [" ".join(next((f"{d['stage']}.{d['epoch']}" for d in run if organ in d.get(field, [])), "never")
                          for run in runs) for organ in organs]
        rows.append(f"| {label} from (stage.epoch, per seed) | " + " | ".join(cells) + " |")
    return rows


def _quality_cells(per_organ_runs: list, organs: list) -> list:
    """One "precision / recall / Dice" cell per organ, mean over the runs that measured it."""
    return [" / ".join(_fmt(nanmean([q.get(organ, {}).get(m, np.nan) for q in per_organ_runs]), 2)
                       for m in ("precision", "recall", "dice")) for organ in organs]


def render_markdown(results) -> str:
    lines = ["# Accuracy benchmark (partially labelled phantoms)", "",
             "Every method trains the same number of iterations with the same network and seeds. Dice is 3D on the "
             "fully labelled test cases, mean over cases then seeds (spread = std over seeds); HD95 in mm.", ""]
    for protocol, entry in results.get("protocols", {}).items():
        methods = entry["methods"]
        if not methods:
            continue
        organs = list(next(iter(methods.values()))["per_organ_dice"])
        lines += [f"## Protocol: {protocol}" + ("" if entry.get("complete") else " (INCOMPLETE: running or stopped)"),
                  "", "Commands: " + ", ".join(f"`{c}`" for c in entry["commands"]) + "  ",
                  f"Preset: {entry['preset']}; phantoms version {entry.get('phantoms_version', 1)}; "
                  + (f"scarce labels: the first {entry['cases_per_site']} cases of each site; "
                     if entry.get("cases_per_site") else "") + "seeds "
                  f"{entry['seeds']}; settings for every method: "
                  f"{entry.get('settings') or 'none'}; machine {entry['machine']}", ""]
        if entry.get("site_gap"):
            gap = entry["site_gap"]
            other = ("the test cases', which come from the unlabelled site's scanner and patients"
                     if gap.get("against") == "unlabelled site" else "the other sites'")
            lines += [f"Site gap of labelled-only (Dice on held-out cases of the site that labels the organ minus "
                      f"{other}, {gap['seeds']} seed(s)): {gap['gap']:.3f}; per organ "
                      + ", ".join(f"{o} {gap['own_site'][o]:.3f}/{gap['other_sites'][o]:.3f}" for o in gap["per_organ"])
                      + (f"; between the labelled sites: {gap['between_labelled_sites']:.3f}"
                         if "between_labelled_sites" in gap else ""), ""]
            if gap.get("by_site_and_phase"):
                organs_gap = list(gap["per_organ"])
                lines += ["Labelled-only Dice by site and contrast phase (held-out cases of the training sites, then the "
                          "test cases; mean over seeds):", "", "| site, phase | " + " | ".join(organs_gap) + " |",
                          "|---|" + "---|" * len(organs_gap)]
                lines += [f"| {key} | " + " | ".join(_fmt(row[o]) for o in organs_gap) + " |"
                          for key, row in sorted(gap["by_site_and_phase"].items(), key=lambda kv: kv[0].startswith("test"))]
                lines.append("")
        lines += ["| method | mean Dice | spread | per seed | " + " | ".join(organs)
                  + " | mean HD95 (mm) | iterations | train s |",
                  "|---|---|---|---|" + "---|" * len(organs) + "---|---|---|"]
        for key, r in methods.items():
            spread = _fmt(r["dice_std"]) if r["seeds"] > 1 else "n/a (1 seed)"
            lines.append(f"| {key} | {r['mean_dice']:.3f} | {spread} | "
                         + " ".join(f"{d:.3f} ({s})" for s, d in zip(r["seeds_done"], r["per_seed"]))
                         + " | " + " | ".join(f"{r['per_organ_dice'][o]:.3f}" for o in organs)
                         + f" | {_fmt(r['mean_hd95_mm'], 1)} | {r['iterations']} | {r['train_seconds']:.0f} |")
        lines += _quality_lines(methods)
        for name, test in entry.get("paired_tests", {}).items():
            lines.append(f"\n{name.replace('_', ' ')}: mean gain {_fmt(test['mean_gain'])} over {test['seeds']} paired "
                         f"seeds, one-sided paired t-test p = {_fmt(test['p_one_sided'], 4)}")
            if test.get("per_organ"):
                lines[-1] += "; per organ " + ", ".join(f"{o} {_fmt(t['mean_gain'])} (p = {_fmt(t['p_one_sided'], 3)})"
                                                        for o, t in test["per_organ"].items())
        lines.append("")
    for protocol, curve in _curves(results):
        lines += [f"## Learning curve: {protocol}", "",
                  "Commands: " + ", ".join(f"`{c}`" for c in curve.get("commands", [])), "",
                  *([f"x1 is the protocol's own rows (the same preset and settings; seeds {curve['1']['seeds']}).", ""]
                    if curve.get("1", {}).get("from_protocol") else []),
                  "| schedule | recipe | labelled-only | recipe's Dice | gain over labelled-only | p (one-sided, paired) "
                  "| seeds | iterations |", "|---|---|---|---|---|---|---|---|"]
        for factor, point in _curve_points(curve):
            for key in _curve_recipes(point):
                test = point[f"{key}_vs_labeled-only"]  # both means over the seeds both have
                baseline = test.get("labeled_only", point.get("labeled-only"))
                lines.append(f"| x{factor} | {key} | {_fmt(baseline)} | {_fmt(baseline + test['mean_gain'])} | "
                             f"{_fmt(test['mean_gain'])} | {_fmt(test['p_one_sided'], 3)} | {test['seeds']} | "
                             f"{point['iterations'][key]} |")
        organ_rows = [(factor, key, dice, len(point["per_seed_organ_dice"][key]))
                      for factor, point in _curve_points(curve) for key, dice in point.get("per_organ_dice", {}).items()]
        if organ_rows:
            organs = list(organ_rows[0][2])
            lines += ["", "| schedule | method | " + " | ".join(organs) + " | seeds |",
                      "|---|---|" + "---|" * len(organs) + "---|"]
            lines += [f"| x{factor} | {key} | " + " | ".join(_fmt(dice[o]) for o in organs) + f" | {seeds} |"
                      for factor, key, dice, seeds in organ_rows]
        for factor, point in _curve_points(curve):
            if "ltuda_vs_cda" in point:
                test = point["ltuda_vs_cda"]
                lines.append(f"\nx{factor}, ltuda against cda: CDA {_fmt(test['cda'])}, mean gain "
                             f"{_fmt(test['mean_gain'])} over {test['seeds']} paired seeds, one-sided paired t-test "
                             f"p = {_fmt(test['p_one_sided'], 3)}")
        lines.append("")
    return "\n".join(lines) + "\n"


def _curves(results: dict) -> list:
    """(protocol, learning curve), each with its x1 point taken from the protocol's own rows where it has none:
    those rows are the same preset and settings at 1x on the same seeds (the multi-site curve runs 2 and 4)."""
    curves = []
    for protocol, curve in results.get("learning_curve", {}).items():
        entry = results.get("protocols", {}).get(protocol, {})
        methods, test = entry.get("methods", {}), entry.get("paired_tests", {}).get("ltuda_vs_labeled-only")
        same_run = (entry.get("preset"), entry.get("settings")) == (curve.get("preset"), curve.get("settings"))
        if "1" not in curve and test and same_run:
            rows = {key: methods[key] for key in ("labeled-only", "ltuda")}
            point = {key: row["mean_dice"] for key, row in rows.items()}
            point.update({"ltuda_vs_labeled-only": {**test, "labeled_only": point["labeled-only"]}, "from_protocol": True,
                          "seeds": ", ".join(map(str, entry["seeds"])),
                          "iterations": {key: row["iterations"] for key, row in rows.items()}})
            curve = {"1": point, **curve}
        curves.append((protocol, curve))
    return curves


def _curve_points(curve: dict) -> list:
    """(factor, point) of a learning curve, by factor (the other keys record its commands and settings)."""
    return sorted(((k, v) for k, v in curve.items() if isinstance(v, dict) and k != "settings"),
                  key=lambda item: float(item[0]))


def _curve_recipes(point: dict) -> list:
    """The methods a learning-curve point compares with labelled-only, the shipped recipe (ltuda) first."""
    return _ltuda_first(k[:-len("_vs_labeled-only")] for k in point if k.endswith("_vs_labeled-only"))


def _ltuda_first(keys) -> list:
    return sorted(set(keys), key=lambda k: (k != "ltuda", k))


def plot(results: dict, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # optional: the tables carry the same numbers
        return
    protocols = [(p, e) for p, e in results.get("protocols", {}).items() if e["methods"]]
    curves = _curves(results)
    diagnosed = [(p, e["methods"]["ltuda"]["pseudo_label_quality"]) for p, e in protocols
                 if e["methods"].get("ltuda", {}).get("pseudo_label_quality")]
    panels = len(protocols) + len(curves) + len(diagnosed)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.8), squeeze=False)
    for ax, (protocol, per_seed) in zip(axes[0][len(protocols) + len(curves):], diagnosed):
        _plot_pseudo_label_quality(ax, protocol, [q for q in per_seed if q])
    for ax, (protocol, entry) in zip(axes[0], protocols):
        keys = list(entry["methods"])
        ax.bar(keys, [entry["methods"][k]["mean_dice"] for k in keys],
               yerr=[entry["methods"][k]["dice_std"] for k in keys], capsize=4,
               color=["#d35f3c" if k == "ltuda" else "#888888" for k in keys])
        ax.set_ylabel("mean 3D Dice (test cases)")
        ax.set_ylim(0, 1)
        ax.set_title(f"{protocol}: equal iterations, {len(entry['seeds'])} seeds")
        plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
    for ax, (protocol, curve) in zip(axes[0][len(protocols):], curves):
        factors = [factor for factor, _ in _curve_points(curve)]
        recipes = _ltuda_first(k for f in factors for k in _curve_recipes(curve[f]))
        for key, colour in zip(["labeled-only"] + recipes, ["#888888", "#d35f3c", "#3c7dd3", "#5fa35f", "#a35fa3"]):
            xs = [float(f) for f in factors if key in curve[f]]
            ax.plot(xs, [curve[f][key] for f in factors if key in curve[f]], "o-", color=colour, label=key)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("schedule (x fast preset)")
        ax.set_ylabel("mean 3D Dice")
        ax.set_title(f"learning curve: {protocol}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_pseudo_label_quality(ax, protocol, per_seed):
    """The teacher's pseudo-label Dice per organ (on the organs a case does not label) by epoch of LTUDA's
    run, mean over seeds."""
    steps = [(d["stage"], d["epoch"]) for d in per_seed[0]]
    organs = list(per_seed[0][0]["per_organ"]) if per_seed[0] else []
    xs = list(range(1, len(steps) + 1))
    for organ in organs:
        ys = [np.mean([run[i]["per_organ"].get(organ, {}).get("dice", np.nan) for run in per_seed if len(run) > i])
              for i in range(len(steps))]
        ax.plot(xs, ys, "o-", markersize=3, label=organ)
    stage2 = next((i for i, (stage, _) in enumerate(steps, start=1) if stage == 2), None)
    if stage2:
        ax.axvline(stage2 - 0.5, color="#bbbbbb", linestyle="--")
    ax.set_xlabel("epoch (stage 1, then stage 2)")
    ax.set_ylabel("teacher pseudo-label Dice")
    ax.set_ylim(0, 1)
    ax.set_title(f"{protocol}: pseudo-labels where they are used")
    ax.legend(fontsize=8)
