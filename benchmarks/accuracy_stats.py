"""Statistics of the accuracy benchmark: a method's summary over seeds, the learning-curve points, and the
one-sided paired t-tests that compare methods over the seeds both have."""

import numpy as np


def nanmean(values) -> float:
    """Mean ignoring NaN (an organ predicted empty has no HD95); NaN, quietly, when all are."""
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarise_seeds(runs: list) -> dict:
    """Mean and spread over seeds of the per-seed results of one method."""
    organs = list(runs[0]["per_organ_dice"])
    means = [r["mean_dice"] for r in runs]
    return {
        "mean_dice": float(np.mean(means)),
        "dice_std": float(np.std(means)),
        "per_seed": means,
        "per_organ_dice": {o: float(np.mean([r["per_organ_dice"][o] for r in runs])) for o in organs},
        "per_organ_dice_std": {o: float(np.std([r["per_organ_dice"][o] for r in runs])) for o in organs},
        "per_seed_organ_dice": {o: [r["per_organ_dice"][o] for r in runs] for o in organs},  # per-organ tests
        "mean_hd95_mm": nanmean([r["mean_hd95_mm"] for r in runs]),
        "per_organ_hd95_mm": {o: nanmean([r["per_organ_hd95_mm"][o] for r in runs]) for o in organs},
        "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
        "iterations": runs[0]["iterations"],
        "seeds": len(runs),
    }


def add_to_curve(point: dict, finished: dict, command: str, packages: str = None) -> dict:
    """Merge one invocation's finished runs ({method: {seed: result}}) into a learning-curve point.

    Runs are deterministic on one set of package versions, so a seed's figure from an earlier invocation
    stands beside this one's: a partial invocation adds seeds and never shrinks a method's record, and a
    point holds every recipe measured at it. Each recipe is compared with labelled-only over the seeds both
    have on the same package versions (runs recorded before versions were kept count as one set); LTUDA is
    also compared with CDA alone where the point has both, as the issue's target asks."""
    per_seed = point.setdefault("per_seed", {})
    versions = point.setdefault("packages", {})
    organs = point.setdefault("per_seed_organ_dice", {})  # which organ a gain comes from
    for key, results in finished.items():
        per_seed[key] = {**per_seed.get(key, {}), **{str(s): r["mean_dice"] for s, r in results.items()}}
        organs[key] = {**organs.get(key, {}),
                       **{str(s): r["per_organ_dice"] for s, r in results.items() if "per_organ_dice" in r}}
        if organs[key]:
            by_seed = list(organs[key].values())
            point.setdefault("per_organ_dice", {})[key] = {o: float(np.mean([d[o] for d in by_seed]))
                                                           for o in by_seed[0]}
        # a run scored again keeps the command and package versions it was trained with
        trained = {s: r for s, r in results.items() if r.get("trained_here", True) or str(s) not in versions.get(key, {})}
        versions[key] = {**versions.get(key, {}), **{str(s): packages for s in trained}}
        point.setdefault("iterations", {})[key] = next(iter(results.values()))["iterations"]
        if trained or key not in point.get("commands", {}):
            point.setdefault("commands", {})[key] = command

    def compare(key, other):
        dice, baseline = per_seed[key], per_seed.get(other, {})
        paired = [s for s in dice if s in baseline and versions.get(key, {}).get(s) == versions[other].get(s)]
        if key != other and paired:
            point[f"{key}_vs_{other}"] = {**paired_test([dice[s] for s in paired], [baseline[s] for s in paired]),
                                          other.replace("-", "_"): float(np.mean([baseline[s] for s in paired]))}
    for key, dice in per_seed.items():
        point[key] = float(np.mean(list(dice.values())))
        compare(key, "labeled-only")
    if "ltuda" in per_seed:
        compare("ltuda", "cda")
    return point


def paired_test(a: list, b: list) -> dict:
    """One-sided paired t-test that a > b over the seeds both have."""
    from scipy import stats

    n = min(len(a), len(b))
    gain = float(np.mean(np.subtract(a[:n], b[:n]))) if n else float("nan")
    if n < 2 or np.allclose(a[:n], b[:n]):
        return {"seeds": n, "mean_gain": gain, "t": float("nan"), "p_one_sided": float("nan")}
    t, p = stats.ttest_rel(a[:n], b[:n], alternative="greater")
    return {"seeds": n, "mean_gain": gain, "t": float(t), "p_one_sided": float(p)}


# The comparisons a protocol reports: LTUDA against labelled-only and CDA (the claims), and each diagnostic
# row against the row it takes one part away from: whether the pseudo-labels pay (LTUDA or CDA against its own
# training without them) and whether stage 2 does (that training against stage 1 alone).
PROTOCOL_PAIRS = (("ltuda", "labeled-only"), ("ltuda", "cda"), ("cda", "labeled-only"),
                  ("ltuda", "ltuda-pseudo-labels-off"), ("cda", "cda-pseudo-labels-off"),
                  ("ltuda-pseudo-labels-off", "labeled-only"), ("cda-pseudo-labels-off", "labeled-only"),
                  ("ltuda-pseudo-labels-off", "cda-pseudo-labels-off"),
                  # candidate 8: pseudo-labels in stage 1 only, against both baselines, LTUDA and CDA (stage 1 alone)
                  ("ltuda-stage1-pseudo-labels", "labeled-only"), ("ltuda-stage1-pseudo-labels", "ltuda"),
                  ("ltuda-stage1-pseudo-labels", "cda"),
                  # multi-site: the unlabelled scans beside the batch (the default since 2026-12-04) against in its places
                  ("ltuda", "ltuda-in-batch"), ("cda-pseudo-labels-off", "cda-pseudo-labels-off-in-batch"),
                  ("ltuda-in-batch", "labeled-only"), ("cda-pseudo-labels-off-in-batch", "labeled-only"),
                  # candidate 10: a random intensity curve on the student's views, for LTUDA and labelled-only alike
                  ("ltuda-intensity-remap", "labeled-only-intensity-remap"), ("ltuda-intensity-remap", "ltuda"),
                  ("labeled-only-intensity-remap", "labeled-only"), ("ltuda-intensity-remap", "labeled-only"),
                  # candidate 11: the curve on the student's weak view only
                  ("ltuda-intensity-remap-weak", "labeled-only-intensity-remap"), ("ltuda-intensity-remap-weak", "ltuda"),
                  ("ltuda-intensity-remap-weak", "labeled-only"),
                  # candidate 14: the same, the warm-up on the scans as they are
                  ("ltuda-intensity-remap-after-warmup", "ltuda"), ("ltuda-intensity-remap-after-warmup", "labeled-only"),
                  ("ltuda-intensity-remap-after-warmup", "labeled-only-intensity-remap"),
                  ("ltuda-intensity-remap-after-warmup", "ltuda-intensity-remap-weak"),
                  # the ceiling of today's recipe: true labels as pseudo-labels
                  ("ltuda-oracle", "labeled-only"), ("ltuda-oracle", "ltuda"),
                  ("ltuda-oracle-pseudo-dice", "ltuda-oracle"), ("ltuda-oracle-pseudo-dice", "labeled-only"),
                  # candidate 12: the held-out Dice gate (candidate 6) across the site shift
                  ("ltuda-held-out-dice-gate", "ltuda"), ("ltuda-held-out-dice-gate", "labeled-only"),
                  # candidate 13: the same gate, the Dice term on the teacher's sure pixels only
                  ("ltuda-confident-dice-gate", "ltuda"), ("ltuda-confident-dice-gate", "labeled-only"),
                  ("ltuda-confident-dice-gate", "ltuda-held-out-dice-gate"),
                  # candidate 15: stage 2 as long as stage 1, against both baselines and CDA (no stage 2)
                  ("ltuda-equal-stages", "ltuda"), ("ltuda-equal-stages", "labeled-only"), ("ltuda-equal-stages", "cda"))


def protocol_paired_tests(methods: dict) -> dict:
    """paired_methods of each PROTOCOL_PAIRS pair that a protocol's methods hold, measured on the same
    package versions (runs of another install are another draw of each seed)."""
    return {f"{a}_vs_{b}": paired_methods(methods[a], methods[b]) for a, b in PROTOCOL_PAIRS
            if a in methods and b in methods and methods[a].get("packages") == methods[b].get("packages")}


def paired_methods(a: dict, b: dict) -> dict:
    """paired_test of method summary a against b over the seeds both finished, overall and per organ."""
    def by_seed(row, values):
        return dict(zip(row["seeds_done"], values))

    def test(first, second):
        common = [s for s in first if s in second]
        return paired_test([first[s] for s in common], [second[s] for s in common])

    result = test(by_seed(a, a["per_seed"]), by_seed(b, b["per_seed"]))
    if "per_seed_organ_dice" in a and "per_seed_organ_dice" in b:  # rows saved before 2026-12-04 lack them
        organs_a, organs_b = a["per_seed_organ_dice"], b["per_seed_organ_dice"]
        result["per_organ"] = {o: test(by_seed(a, organs_a[o]), by_seed(b, organs_b[o]))
                               for o in organs_a if o in organs_b}
    return result
