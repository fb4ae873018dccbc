"""How good the teacher's pseudo-labels are, where they are used: the organs a case does NOT label.

Needs every organ's truth for the training cases (the manifest's optional "label_full"), which
phantoms have and real partially labelled data does not. The pseudo-label term trains on exactly
these pixels, so their precision and recall say whether it helps or hurts.
"""

import numpy as np
import torch

from ..validation import predict_prepared


@torch.no_grad()
def pseudo_label_quality(teacher, pairs, classes, device, autocast) -> dict:
    """pairs: (partial prepared case, fully labelled prepared case) of training cases.

    {organ: {"precision", "recall", "dice"}} of the teacher's threshold-rule labels against the
    truth, pooled over the cases that do not label the organ (organs every case labels are absent).
    """
    counts = {c["value"]: np.zeros(3) for c in classes}  # true pos, predicted, actual
    for partial, full in pairs:
        pred = predict_prepared(teacher, full.image, "linear", device, autocast).numpy()
        truth = np.asarray(full.labels)
        for value in counts:
            if value in partial.labeled:
                continue
            p, t = pred == value, truth == value
            counts[value] += (np.count_nonzero(p & t), np.count_nonzero(p), np.count_nonzero(t))
    quality = {}
    for c in classes:
        tp, predicted, actual = counts[c["value"]]
        if actual == 0 and predicted == 0:
            continue
        quality[c["name"]] = {
            "precision": round(tp / predicted, 4) if predicted else 0.0,
            "recall": round(tp / actual, 4) if actual else 0.0,
            "dice": round(2 * tp / (predicted + actual), 4),
        }
    return quality
