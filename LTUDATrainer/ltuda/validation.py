"""Validation Dice on held-out cases, in the preprocessed slice space, labelled organs only.

A partially labelled case is scored only on the organs it labels: its other organs are unknown.
"""

import numpy as np
import torch
from monai.metrics import compute_dice

from .model.network import class_probabilities


@torch.no_grad()
def predict_prepared(net, image: np.ndarray, head: str, device, autocast, batch_size: int = 32) -> torch.Tensor:
    """Class values [Z, S, S] for a preprocessed volume."""
    was_training = net.training
    net.eval()
    out = []
    for start in range(0, image.shape[0], batch_size):
        x = torch.from_numpy(np.asarray(image[start:start + batch_size], dtype=np.float32))[:, None].to(device)
        with autocast():
            scores = class_probabilities(net(x, heads=(head,)), head)
        out.append(scores.argmax(dim=1).cpu())
    net.train(was_training)
    return torch.cat(out)


def organ_dice(pred: torch.Tensor, truth: torch.Tensor, values) -> dict:
    """3D Dice per class value with MONAI (NaN where the organ is absent from both)."""
    pred_1h = torch.stack([pred == v for v in values])[None].float()
    truth_1h = torch.stack([truth == v for v in values])[None].float()
    dice = compute_dice(pred_1h, truth_1h, include_background=True, ignore_empty=True)[0]
    return {v: float(d) for v, d in zip(values, dice)}


def validate(net, prepared_cases, classes, head: str, device, autocast):
    """(mean Dice over organs, {organ: mean Dice over the cases that label it})."""
    scores = {c["value"]: [] for c in classes}
    for case in prepared_cases:
        pred = predict_prepared(net, case.image, head, device, autocast)
        truth = torch.as_tensor(np.array(case.labels, dtype=np.int64))  # a copy: the cache is read-only
        for value, dice in organ_dice(pred, truth, case.labeled).items():
            if not np.isnan(dice):
                scores[value].append(dice)
    per_organ = {c["name"]: float(np.mean(scores[c["value"]])) for c in classes if scores[c["value"]]}
    mean = float(np.mean(list(per_organ.values()))) if per_organ else float("nan")
    return mean, per_organ
