"""One training step per method: views, pseudo-labels and loss of a batch (no optimiser here).

The student sees the weak view and the K strong views in ONE forward pass, and every head reads the
same backbone features: the reference code recomputes the backbone per head and per view.
"""

from typing import NamedTuple, Optional

import torch

from ..augment import IntensityRemap, WeakAugment, cutmix, cutmix_boxes
from ..losses import IGNORE, marginal_exclusion_loss, onehot_target, partial_seg_loss, partial_target, prototype_loss
from ..model.network import linear_hard_label
from ..model.prototypes import momentum_update, sinkhorn_assign
from .config import TrainConfig
from .gate import OrganGate


class StepContext:
    """What every step needs: the settings, the augmentations and the random generator."""

    def __init__(self, config: TrainConfig, num_classes: int, generator: torch.Generator, autocast):
        self.config = config
        self.num_classes = num_classes
        self.generator = generator
        self.autocast = autocast
        self.weak = WeakAugment(scale_range=config.scale_range, rotation_deg=config.rotation_deg)
        self.remap = IntensityRemap(prob=config.intensity_remap)
        self.pseudo_weight = 1.0  # set by the trainer during the stage-1 ramp-up
        self.gate = OrganGate(num_classes, config.pseudo_gate, dice_threshold=config.pseudo_dice_gate,
                              held_out=config.gate_cases == "held-out")
        self.reduce = None  # distributed training: sums bank statistics over all ranks (distributed.py)

    def seg_loss(self, logits, target, pseudo: bool = False, dice_target=None):
        """pBCE, plus the configured partial Dice on ground-truth targets, and on pseudo-targets only
        with `pseudo_dice` (on `dice_target` where given: the organs the gate has not yet let into
        the Dice term ignored).

        Dice is there so that labelled small organs are learnt in a short run. On the pseudo-targets of
        a poor teacher it would punish every pixel the teacher missed far harder than BCE does (its
        gradient scales with 1/organ size), so the student would copy the teacher's misses; with the
        organ gate, only organs the teacher already segments well have pseudo-targets at all, or with
        `pseudo_dice_gate`, the Dice term on them.
        """
        cfg = self.config
        dice = cfg.dice_weight if (not pseudo or cfg.pseudo_dice) else 0.0
        if dice_target is None:
            return partial_seg_loss(logits, target, dice, cfg.pbce_scaling)
        return partial_seg_loss(logits, target, dice, cfg.pbce_scaling, dice_target=dice_target)


def supervised_step(ctx: StepContext, student, batch, remap: bool = True) -> torch.Tensor:
    """Baselines on the weak view: labelled-only pBCE, naive union, or marginal + exclusion (also stage 1's
    warm-up, where `remap` False keeps the intensity curve off)."""
    images, labels, labeled = batch[:3]
    images, labels = ctx.weak(images, labels, ctx.generator)
    if remap:
        images = ctx.remap(images, ctx.generator)  # no teacher here: the one view is the student's
    method = ctx.config.method
    if method == "naive":  # every unlabelled organ is taken as background
        labeled = torch.ones_like(labeled)
    with ctx.autocast():
        logits = student(images, heads=("linear",))["linear"]
    if method == "marginal-exclusion":
        # A fixed background logit of 0 makes softmax argmax equal to the sigmoid threshold rule.
        with_background = torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)
        return marginal_exclusion_loss(with_background, labels, labeled)
    return ctx.seg_loss(logits, partial_target(labels, labeled, ctx.num_classes))


class PseudoLabels(NamedTuple):
    hard: torch.Tensor  # [B, H, W] class index: ground truth where the case has it, else the teacher's
    target: torch.Tensor  # [B, C, H, W] per-organ targets of the pseudo-label term (-1: ignored)
    dice_target: Optional[torch.Tensor] = None  # the Dice term's targets where they differ (None: `target`)


@torch.no_grad()
def make_pseudo_labels(teacher, images, labels, labeled, autocast, uncertain_below: float = 0.5, gate=None,
                       confident_above: float = 0.5, dice_confident: float = 0.5) -> PseudoLabels:
    """Teacher's hard labels on the weak view, with ground truth where the case has it.

    Teacher organ c is kept only where c is NOT labelled in that case; labelled organs come from the
    ground truth (a labelled organ's other pixels are true negatives, so become background).
    Returns hard labels [B, H, W] and per-organ targets [B, C, H, W]. In the targets, an unlabelled
    organ whose teacher probability lies in [uncertain_below, 0.5) is ignored (-1) rather than taken
    as background, except on the case's labelled organs; uncertain_below = 0.5 (the default) is the
    paper's rule, nothing ignored; 0 keeps only the teacher's positives for unlabelled organs. Likewise
    a teacher positive below confident_above is ignored rather than trained as the organ.
    With an OrganGate, the teacher's prediction updates it, and an organ the gate keeps closed is
    ignored on every case that does not label it. With dice_confident above 0.5, `dice_target` is the
    targets with the teacher's unsure pixels (probability between 1 - dice_confident and dice_confident)
    ignored as well.
    """
    with autocast():
        logits = teacher(images, heads=("linear",))["linear"]
    hard = linear_hard_label(logits)
    if gate is not None and gate.enabled:
        gate.update(hard, labels, labeled)
    predicted_labeled = labeled.gather(1, (hard - 1).clamp(min=0).flatten(1)).view_as(hard) & (hard > 0)
    hard = torch.where(labels > 0, labels, torch.where(predicted_labeled, torch.zeros_like(hard), hard))
    target = onehot_target(hard, labeled.shape[1])
    ignored = torch.full_like(target, IGNORE)
    if uncertain_below < 0.5 or confident_above > 0.5 or dice_confident > 0.5:  # the paper's rule needs no probs
        probs = torch.sigmoid(logits.float())
        # a labelled organ's pixels are known not to be any other organ: never unsure there
        from_teacher = ~labeled[:, :, None, None] & (labels == 0)[:, None]
    if uncertain_below < 0.5 or confident_above > 0.5:
        unsure = torch.where(target == 0, probs >= uncertain_below, probs < confident_above)
        target = torch.where(unsure & from_teacher, ignored, target)
    if gate is not None and gate.enabled:
        closed = ~gate.open().to(labeled.device)[None, :] & ~labeled
        target = torch.where(closed[:, :, None, None], ignored, target)
    dice_target = None
    if dice_confident > 0.5:
        unsure = (probs > 1.0 - dice_confident) & (probs < dice_confident)
        dice_target = torch.where(unsure & from_teacher, ignored, target)
    return PseudoLabels(hard, target, dice_target)


def _strong_views(ctx, images, partial, pseudo, pseudo_target, labels, dice_target):
    """K CutMix views of the weak batch: images, partial targets, pseudo-labels, their per-organ
    targets, ground-truth organs and the pseudo-targets of the Dice term, all cut and pasted with the
    same boxes (dice_target None: the Dice term sees the pseudo-targets themselves)."""
    b, _, h, w = images.shape
    views = []
    for _ in range(ctx.config.strong_views):
        boxes = cutmix_boxes(b, h, w, ctx.generator, images.device, area_range=ctx.config.cutmix_area)
        tensors = (images, partial, pseudo, pseudo_target, labels, dice_target)
        view = [None if t is None else cutmix(t, boxes) for t in tensors]
        if ctx.config.intensity_remap_views == "strong":  # the teacher labelled the scan as it was
            view[0] = ctx.remap(view[0], ctx.generator)
        views.append(tuple(view))
    return views


def _dice_targets(ctx, pseudo_target, dice_target, labeled):
    """The pseudo-targets the Dice term sees: `dice_target` (the teacher's unsure pixels ignored) or the
    pseudo-targets themselves, and with `pseudo_dice_gate`, an unlabelled organ the gate has not yet let
    into the Dice term ignored there (pBCE still trains on it). None: the same as the pseudo-targets."""
    if not (ctx.config.pseudo_dice and ctx.config.pseudo_dice_gate > 0):
        return dice_target
    target = pseudo_target if dice_target is None else dice_target
    closed = ~ctx.gate.dice_open().to(labeled.device)[None, :] & ~labeled
    return torch.where(closed[:, :, None, None], torch.full_like(target, IGNORE), target)


def ltuda_step(ctx: StepContext, student, teacher, batch, stage: int) -> torch.Tensor:
    c = ctx.num_classes
    images, labels, labeled = batch[:3]
    if len(batch) > 3:  # the oracle: true labels instead of the teacher's, warped with the same transform
        images, packed = ctx.weak(images, labels + (c + 1) * batch[3], ctx.generator)
        labels, pseudo = packed % (c + 1), packed // (c + 1)
        pseudo_target, dice_target = onehot_target(pseudo, c), None
    else:
        images, labels = ctx.weak(images, labels, ctx.generator)
        cfg = ctx.config
        pseudo, pseudo_target, dice_target = make_pseudo_labels(
            teacher, images, labels, labeled, ctx.autocast, cfg.pseudo_uncertain_below, ctx.gate,
            cfg.pseudo_confident_above, cfg.pseudo_dice_confident if cfg.pseudo_dice else 0.5)
    if stage == 2 and not ctx.config.stage2_pseudo_labels:  # the labelled organs' targets alone
        only_labeled = lambda t: torch.where(labeled[:, :, None, None], t, torch.full_like(t, IGNORE))  # noqa: E731
        pseudo_target = only_labeled(pseudo_target)
        dice_target = None if dice_target is None else only_labeled(dice_target)
    partial = partial_target(labels, labeled, c)
    views = _strong_views(ctx, images, partial, pseudo, pseudo_target, labels,
                          _dice_targets(ctx, pseudo_target, dice_target, labeled))
    b, k = images.shape[0], len(views)
    heads = ("linear",) if stage == 1 else ("linear", "proto-labeled", "proto-unlabeled")
    # the student's own copy of the weak view, where only the labelled term trains
    weak = ctx.remap(images, ctx.generator) if ctx.config.intensity_remap_views == "weak" else images
    with ctx.autocast():
        out = student(torch.cat([weak] + [v[0] for v in views]), heads=heads, prototype_from=b)
    linear = out["linear"]
    loss = ctx.seg_loss(linear[:b], partial)
    strong_pseudo = torch.cat([v[2] for v in views])
    strong_linear = linear[b:]
    for i, (_, view_partial, _, view_pseudo_target, _, view_dice_target) in enumerate(views):
        logits = strong_linear[i * b:(i + 1) * b]
        weight = ctx.pseudo_weight if stage == 1 else 1.0
        loss = loss + weight * ctx.seg_loss(logits, view_pseudo_target, pseudo=True, dice_target=view_dice_target)
        if stage == 1:
            loss = loss + ctx.seg_loss(logits, view_partial)
    if stage == 2:
        strong_labels = torch.cat([v[4] for v in views])
        # a pixel whose pseudo-label is unsure for some organ has no class to train the prototypes with
        certain = (torch.cat([v[3] for v in views]) != IGNORE).all(dim=1)
        loss = loss + k * _prototype_terms(ctx, student, out, strong_pseudo, strong_labels, certain)
    return loss


def _prototype_terms(ctx, student, out, target, gt_labels, certain) -> torch.Tensor:
    """Both prototype classifiers on the strong views (mean over views), and their bank updates.

    Labelled bank: updated from ground-truth-labelled organ pixels. Unlabelled bank: from pseudo-
    labelled organs and background, ground-truth pixels ignored. No set labels background, so the
    labelled bank's background prototypes are a copy of the unlabelled bank's. Pixels that are not
    `certain` neither train the classifiers nor update the banks.
    """
    cfg, classes = ctx.config, ctx.num_classes + 1
    network = getattr(student, "module", student)  # the banks of a DistributedDataParallel-wrapped student
    labeled_fg = gt_labels > 0
    eligible = {
        "proto-labeled": labeled_fg,
        "proto-unlabeled": ~labeled_fg,  # pseudo organs and background
    }
    banks = {"proto-labeled": "prototypes_labeled", "proto-unlabeled": "prototypes_unlabeled"}
    embedding = out["embedding"]
    pixels = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1]).detach()
    flat_target = target.reshape(-1)
    total = 0.0
    for head, bank_name in banks.items():
        logits, similarity = out[head], out[head + "-similarity"]
        with torch.no_grad():
            # similarity [V, K, M, H, W] -> each pixel's similarities to its own class's prototypes
            own = similarity.permute(0, 3, 4, 1, 2).reshape(-1, classes, similarity.shape[2])
            own = own[torch.arange(own.shape[0], device=own.device), flat_target]
            assignment, index = sinkhorn_assign(own, flat_target, classes, cfg.sinkhorn_iterations, cfg.sinkhorn_epsilon)
            correct = logits.argmax(dim=1) == target
        total = total + prototype_loss(logits, similarity, target, index.view_as(target), cfg.ppc_weight,
                                       cfg.ppd_weight, valid=certain)
        with torch.no_grad():
            use = (correct & eligible[head] & certain).reshape(-1)
            bank = getattr(network, bank_name)
            bank.copy_(momentum_update(bank, pixels, flat_target, assignment, use, cfg.prototype_momentum,
                                       reduce=ctx.reduce))
    network.prototypes_labeled[0].copy_(network.prototypes_unlabeled[0])
    return total
