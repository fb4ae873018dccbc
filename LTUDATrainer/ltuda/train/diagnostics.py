"""How good the teacher's pseudo-labels are, where they are used: the organs a case does NOT label.

Needs every organ's truth for the training cases (the manifest's optional "label_full"), which
phantoms have and real partially labelled data does not. The pseudo-label term trains on exactly
these pixels, so their precision and recall say whether it helps or hurts.
"""

import numpy as np
import torch

from ..validation import predict_prepared


def case_group(case):
    """"<site> <phase>" from the manifest's optional "site" and "phase" fields (either alone, if only one
    is given), else None: where the teacher meets a shift, e.g. the native scans of a hospital's own
    unlabelled cases, pooled figures hide it."""
    parts = [str(case.extra[key]) for key in ("site", "phase") if key in case.extra]
    return " ".join(parts) or None


@torch.no_grad()
def pseudo_label_counts(teacher, pairs, classes, device, autocast) -> list:
    """pairs: (partial prepared case, fully labelled prepared case) of training cases.

    Per pair, {class value: [true positives, predicted, actual]} of the teacher's threshold-rule labels
    against the truth, for the organs that case does not label."""
    per_pair = []
    for partial, full in pairs:
        pred = predict_prepared(teacher, full.image, "linear", device, autocast).numpy()
        truth = np.asarray(full.labels)
        counts = {}
        for c in classes:
            value = c["value"]
            if value in partial.labeled:
                continue
            p, t = pred == value, truth == value
            counts[value] = np.array([np.count_nonzero(p & t), np.count_nonzero(p), np.count_nonzero(t)])
        per_pair.append(counts)
    return per_pair


def quality_from_counts(per_pair: list, classes) -> dict:
    """{organ: {"precision", "recall", "dice"}} pooled over the given pairs' counts (organs that no pair
    counts, or that are neither present nor predicted, are absent)."""
    quality = {}
    for c in classes:
        counted = [counts[c["value"]] for counts in per_pair if c["value"] in counts]
        if not counted:
            continue
        tp, predicted, actual = np.sum(counted, axis=0)
        if actual == 0 and predicted == 0:
            continue
        quality[c["name"]] = {
            "precision": round(float(tp / predicted), 4) if predicted else 0.0,
            "recall": round(float(tp / actual), 4) if actual else 0.0,
            "dice": round(float(2 * tp / (predicted + actual)), 4),
        }
    return quality


def pseudo_label_quality(teacher, pairs, classes, device, autocast) -> dict:
    """The teacher's pseudo-label quality pooled over the cases that do not label each organ."""
    return quality_from_counts(pseudo_label_counts(teacher, pairs, classes, device, autocast), classes)


def quality_by_group(per_pair: list, groups: list, classes) -> dict:
    """{group: quality} for each group name in `groups` (one per pair; None: in no group)."""
    names = sorted({g for g in groups if g is not None})
    return {name: quality_from_counts([c for c, g in zip(per_pair, groups) if g == name], classes) for name in names}
