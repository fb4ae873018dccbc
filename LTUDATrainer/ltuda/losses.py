"""Losses for partially labelled segmentation.

partial_bce: BCE per organ channel over non-ignored pixels (-1 = ignore), averaged over the samples
that label the channel, then over the channels present in the batch; or, with scaling="reference", as
the reference code computes pBCE: each sample's sum divided by all H*W pixels, summed over samples.
partial_dice: soft Dice per organ channel over the same non-ignored pixels, pooled over the batch.
prototype_loss: ProtoSeg's CE + 0.01 PPC + 0.001 PPD on a prototype classifier.
marginal_exclusion_loss: Shi et al. 2021, the classic softmax baseline for partial labels.
"""

import torch
import torch.nn.functional as F

IGNORE = -1.0


def partial_target(labels: torch.Tensor, labeled: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class-value labels [B, H, W] and labelled-class mask [B, C] -> per-channel target [B, C, H, W].

    A labelled channel is a complete binary mask (every other pixel is a true negative); an
    unlabelled channel is ignored (-1).
    """
    organs = torch.arange(1, num_classes + 1, device=labels.device)[None, :, None, None]
    target = (labels[:, None] == organs).float()
    return torch.where(labeled[:, :, None, None], target, torch.full_like(target, IGNORE))


def onehot_target(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full (pseudo-)labels [B, H, W] -> [B, C, H, W] binary targets, nothing ignored."""
    organs = torch.arange(1, num_classes + 1, device=labels.device)[None, :, None, None]
    return (labels[:, None] == organs).float()


SCALINGS = ("valid", "reference")


def partial_bce(logits: torch.Tensor, target: torch.Tensor, scaling: str = "valid") -> torch.Tensor:
    """scaling "valid": mean over a sample's non-ignored pixels, then over the samples that label the
    channel. "reference": sum over non-ignored pixels / all H*W pixels, SUMMED over those samples, so a
    term every sample has (pseudo-labels) weighs about B times one that a single sample labels, and a
    small CutMix box is not up-weighted."""
    valid = target >= 0
    loss = F.binary_cross_entropy_with_logits(logits.float(), target.clamp(min=0), reduction="none")
    pixels = valid.sum(dim=(2, 3))  # [B, C]
    sample_has = pixels > 0
    samples = sample_has.sum(dim=0)  # [B, C] -> [C]
    if scaling == "reference":
        per_sample = (loss * valid).sum(dim=(2, 3)) / (target.shape[2] * target.shape[3])
        per_channel = (per_sample * sample_has).sum(dim=0)
    else:
        per_sample = (loss * valid).sum(dim=(2, 3)) / pixels.clamp(min=1)
        per_channel = (per_sample * sample_has).sum(dim=0) / samples.clamp(min=1)
    present = samples > 0
    if not present.any():
        return logits.sum() * 0.0
    return per_channel[present].mean()


def partial_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per organ channel, pooled over the batch's non-ignored pixels, mean over channels.

    Pooling over the batch (nnU-Net's "batch Dice") keeps slices without the organ well defined. Not
    part of the paper's loss: BCE alone learns small organs slowly, which matters in short CPU runs.
    """
    valid = (target >= 0).float()
    probs = torch.sigmoid(logits.float()) * valid
    truth = target.clamp(min=0) * valid
    # Only channels with some foreground: on an empty one, Dice's only minimum is "nothing anywhere",
    # which would erase a small organ from every batch that happens not to show it (BCE covers those).
    present = truth.sum(dim=(0, 2, 3)) > 0
    if not present.any():
        return logits.sum() * 0.0
    overlap = (probs * truth).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + truth.sum(dim=(0, 2, 3))
    dice = (2 * overlap + eps) / (total + eps)
    return (1 - dice)[present].mean()


def partial_seg_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 0.0,
                     scaling: str = "valid", dice_target: torch.Tensor = None) -> torch.Tensor:
    """pBCE, plus `dice_weight` x partial Dice when asked for: on `dice_target` where given (the same
    targets with more of them ignored), otherwise on `target`."""
    loss = partial_bce(logits, target, scaling)
    if not dice_weight:
        return loss
    return loss + dice_weight * partial_dice(logits, target if dice_target is None else dice_target)


def prototype_loss(logits, similarity, target, proto_index, ppc_weight=0.01, ppd_weight=0.001, valid=None):
    """CE(prototype logits, target) + PPC + PPD.

    logits [B, K, H, W]; similarity [B, K, M, H, W]; target [B, H, W] class index (K = C+1);
    proto_index [B, H, W]: the prototype (0..M-1) each pixel is assigned to within its class;
    valid [B, H, W] bool (optional): the pixels that have a target at all.
    """
    b, k, m, h, w = similarity.shape
    flat = similarity.float().reshape(b, k * m, h, w)
    contrast_target = target * m + proto_index
    assigned = flat.gather(1, contrast_target[:, None])[:, 0]
    if valid is not None:
        ignore = torch.full_like(target, -100)
        target, contrast_target = torch.where(valid, target, ignore), torch.where(valid, contrast_target, ignore)
        if not valid.any():
            return logits.sum() * 0.0
    ce = F.cross_entropy(logits.float(), target, ignore_index=-100)
    ppc = F.cross_entropy(flat, contrast_target, ignore_index=-100)
    distance = (1.0 - assigned).pow(2)
    ppd = distance[valid].mean() if valid is not None else distance.mean()
    return ce + ppc_weight * ppc + ppd_weight * ppd


def marginal_exclusion_loss(logits: torch.Tensor, labels: torch.Tensor, labeled: torch.Tensor, eps: float = 1e-5):
    """Marginal CE + exclusion Dice (Shi et al., MedIA 2021) on C+1 softmax logits.

    Marginal: unlabelled organs' probabilities are merged into background, so predicting an
    unlabelled organ where the file says background is not punished. Exclusion: pixels of a
    labelled organ cannot belong to any other organ, so each organ's predicted probability on
    pixels known not to be it is penalised as a soft Dice overlap.
    """
    probs = torch.softmax(logits.float(), dim=1)  # [B, C+1, H, W]
    c = labeled.shape[1]
    unlabeled = (~labeled).float()[:, :, None, None]
    merged_background = probs[:, :1] + (probs[:, 1:] * unlabeled).sum(dim=1, keepdim=True)
    merged = torch.cat([merged_background, probs[:, 1:] * (1 - unlabeled)], dim=1)
    marginal = F.nll_loss(torch.log(merged.clamp(min=eps)), labels)
    organs = torch.arange(1, c + 1, device=labels.device)[None, :, None, None]
    other = labels[:, None] != organs
    # A labelled organ's negatives are known everywhere; an unlabelled one's only on labelled organs.
    known_not = torch.where(labeled[:, :, None, None], other, other & (labels[:, None] > 0)).float()
    overlap = (probs[:, 1:] * known_not).sum(dim=(2, 3))
    denom = probs[:, 1:].sum(dim=(2, 3)) + known_not.sum(dim=(2, 3))
    has = known_not.sum(dim=(2, 3)) > 0
    exclusion = (2 * overlap / (denom + eps))[has].mean() if has.any() else logits.sum() * 0
    return marginal + exclusion
