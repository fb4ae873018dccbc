"""The method page, piece by piece: views, pseudo-labels, losses, prototypes, and that both stages learn."""

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ltuda.augment import WeakAugment, cutmix, cutmix_boxes
from ltuda.losses import (marginal_exclusion_loss, onehot_target, partial_bce, partial_dice, partial_seg_loss,
                          partial_target, prototype_loss)
from ltuda.model.network import LTUDANet, NetworkConfig, class_probabilities, linear_hard_label
from ltuda.model.prototypes import momentum_update, sinkhorn_assign
from ltuda.train.config import make_config
from ltuda.train.steps import StepContext, ltuda_step, make_pseudo_labels, supervised_step

C = 4


def test_cutmix_boxes_follow_the_method_page():
    g = torch.Generator().manual_seed(1)
    boxes = cutmix_boxes(2000, 64, 48, g, "cpu")
    areas = boxes.sum(dim=(1, 2)).float() / (64 * 48)
    assert areas.min() >= 0.015 and areas.max() <= 0.42  # U[0.02, 0.4] up to pixel rounding
    assert 0.18 < areas.mean() < 0.24  # mean of U[0.02, 0.4] is 0.21
    rows = boxes.any(dim=2).sum(dim=1).float()
    cols = boxes.any(dim=1).sum(dim=1).float()
    assert torch.all(rows * cols == boxes.sum(dim=(1, 2)))  # exactly one rectangle each
    ratio = rows / cols
    assert ratio.min() > 0.25 and ratio.max() < 1 / 0.25  # aspect in [0.3, 1/0.3], clipped by the image


def test_cutmix_pastes_the_next_sample_into_each_sample():
    x = torch.arange(3).float()[:, None, None].expand(3, 8, 8).clone()
    boxes = torch.zeros(3, 8, 8, dtype=torch.bool)
    boxes[:, 2:5, 3:6] = True
    mixed = cutmix(x, boxes)
    for i in range(3):
        assert torch.all(mixed[i][boxes[i]] == (i + 1) % 3)
        assert torch.all(mixed[i][~boxes[i]] == i)
    channels = cutmix(x[:, None].expand(3, 2, 8, 8), boxes)  # [B, C, H, W] targets mix alike
    assert torch.equal(channels[:, 0], mixed)


def test_weak_view_transforms_image_and_labels_together():
    g = torch.Generator().manual_seed(0)
    images = torch.full((6, 1, 32, 32), -1.0)
    labels = torch.zeros(6, 32, 32, dtype=torch.long)
    images[:, :, 8:24, 10:20] = 0.5
    labels[:, 8:24, 10:20] = 3
    out_images, out_labels = WeakAugment(scale_prob=1.0, rotation_prob=1.0)(images, labels, g)
    assert set(out_labels.unique().tolist()) <= {0, 3}
    organ = out_labels == 3
    assert (out_images[:, 0][organ] > -0.3).float().mean() > 0.98  # labels still sit on their organ
    identity = WeakAugment(scale_prob=0.0, rotation_prob=0.0)(images, labels, g)
    assert torch.allclose(identity[0], images, atol=1e-5) and torch.equal(identity[1], labels)


def test_partial_target_ignores_unlabelled_channels():
    labels = torch.tensor([[[0, 1], [2, 3]]])
    labeled = torch.tensor([[True, False, True, False]])
    target = partial_target(labels, labeled, C)
    assert target[0, 0].tolist() == [[0, 1], [0, 0]]
    assert torch.all(target[0, 1] == -1) and torch.all(target[0, 3] == -1)
    assert target[0, 2].tolist() == [[0, 0], [0, 1]]  # channel 2 is organ value 3


def test_partial_bce_averages_over_labelled_samples_then_channels():
    logits = torch.randn(2, C, 4, 4)
    labels = torch.randint(0, C + 1, (2, 4, 4))
    labeled = torch.tensor([[True, False, False, False], [True, True, False, False]])
    target = partial_target(labels, labeled, C)
    bce = F.binary_cross_entropy_with_logits(logits, onehot_target(labels, C), reduction="none").mean(dim=(2, 3))
    expected = (bce[:, 0].mean() + bce[1, 1]) / 2  # channel 0: both samples; channel 1: sample 1 only
    assert torch.isclose(partial_bce(logits, target), expected)
    assert partial_bce(logits, torch.full_like(target, -1)).item() == 0.0


def test_partial_dice_pools_labelled_pixels_over_the_batch():
    target = torch.full((2, 2, 1, 4), -1.0)
    target[0, 0, 0] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # channel 0 labelled in sample 0 only
    logits = torch.full((2, 2, 1, 4), -20.0)
    logits[0, 0, 0, :2] = 20.0  # exactly right on sample 0
    logits[1, 0] = 20.0  # sample 1 does not label channel 0: whatever it predicts is ignored
    assert partial_dice(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    logits[0, 0, 0, 2:] = 20.0  # two false positives: Dice 2*2 / (4 + 2)
    assert partial_dice(logits, target).item() == pytest.approx(1 - (4 + 1) / (6 + 1), abs=1e-6)
    assert partial_dice(logits, torch.full_like(target, -1)).item() == 0.0
    bce = partial_bce(logits, target)
    assert partial_seg_loss(logits, target, 0.0) == bce
    assert partial_seg_loss(logits, target, 2.0) == pytest.approx(float(bce + 2 * partial_dice(logits, target)))


def test_partial_dice_leaves_channels_without_foreground_to_bce():
    # A batch that shows no pixel of an organ says nothing about its overlap; Dice there would only
    # push the organ's probability to zero everywhere.
    target = torch.zeros((2, 2, 1, 4))
    target[0, 0, 0, :2] = 1.0  # channel 0 has foreground, channel 1 none
    logits = torch.full((2, 2, 1, 4), -20.0)
    logits[0, 0, 0, :2] = 20.0
    logits[:, 1] = 3.0  # false positives on the empty channel
    assert partial_dice(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    assert partial_bce(logits, target).item() > 0.5


def test_linear_threshold_rule():
    logits = torch.tensor([[-2.0, 1.0, 0.5, -1.0], [-3.0, -2.0, -0.1, -5.0]])[:, :, None, None]
    assert linear_hard_label(logits).flatten().tolist() == [2, 0]
    scores = class_probabilities({"linear": logits}, "linear")
    assert scores.argmax(dim=1).flatten().tolist() == [2, 0]


class FixedTeacher(torch.nn.Module):
    """Predicts a fixed hard label map (as logits), to test pseudo-label masking exactly."""

    def __init__(self, hard):
        super().__init__()
        self.hard = hard

    def forward(self, images, heads=("linear",)):
        logits = torch.full((self.hard.shape[0], C) + self.hard.shape[1:], -10.0)
        for c in range(1, C + 1):
            logits[:, c - 1][self.hard == c] = 10.0
        return {"linear": logits}


def test_pseudo_labels_keep_teacher_only_for_unlabelled_organs():
    # case labels organ 1 only; teacher says: organ 1 (wrong place), organ 2 (unlabelled), background
    labels = torch.tensor([[[1, 1, 0, 0, 0]]])
    teacher_hard = torch.tensor([[[0, 1, 1, 2, 0]]])
    labeled = torch.tensor([[True, False, False, False]])
    pseudo, target, _ = make_pseudo_labels(FixedTeacher(teacher_hard), torch.zeros(1, 1, 1, 5), labels, labeled,
                                           contextlib.nullcontext)
    # GT organ wins; teacher's labelled-organ guess outside GT becomes background; unlabelled organ kept
    assert pseudo.tolist() == [[[1, 1, 0, 2, 0]]]
    assert torch.equal(target, onehot_target(pseudo, C))  # the paper's rule: nothing ignored


class ProbabilityTeacher(torch.nn.Module):
    def __init__(self, probs):
        super().__init__()
        self.logits = torch.logit(probs)

    def forward(self, images, heads=("linear",)):
        return {"linear": self.logits}


def test_uncertain_teacher_pixels_are_ignored_only_for_unlabelled_organs():
    # two organs; the case labels organ 1. Teacher probabilities per pixel for organs 1 and 2:
    probs = torch.tensor([[[[0.3, 0.3, 0.05, 0.9]],    # organ 1 (labelled: never ignored)
                           [[0.3, 0.05, 0.3, 0.1]]]])  # organ 2 (unlabelled)
    labels = torch.tensor([[[1, 0, 0, 0]]])  # pixel 0 is organ 1: known not to be organ 2
    labeled = torch.tensor([[True, False]])
    teacher = ProbabilityTeacher(probs)
    _, paper, _ = make_pseudo_labels(teacher, torch.zeros(1, 1, 1, 4), labels, labeled, contextlib.nullcontext)
    assert (paper >= 0).all()  # uncertain_below = 0.5: every pixel is a target
    pseudo, target, _ = make_pseudo_labels(teacher, torch.zeros(1, 1, 1, 4), labels, labeled, contextlib.nullcontext,
                                           uncertain_below=0.2)
    assert pseudo.tolist() == [[[1, 0, 0, 0]]]  # organ 1 at 0.9 outside its label -> background
    assert target[0, 0, 0].tolist() == [1, 0, 0, 0]  # labelled organ: a complete mask
    # unlabelled organ: 0.3 is unsure (ignored) except on the labelled organ; 0.05 and 0.1 are sure
    assert target[0, 1, 0].tolist() == [0, 0, -1, 0]


def test_prototype_loss_leaves_out_pixels_without_a_target():
    torch.manual_seed(0)
    logits, similarity = torch.randn(1, 3, 2, 4), torch.rand(1, 3, 2, 2, 4)
    target, index = torch.randint(0, 3, (1, 2, 4)), torch.randint(0, 2, (1, 2, 4))
    valid = torch.zeros(1, 2, 4, dtype=torch.bool)
    valid[0, 0] = True  # first row only
    masked = prototype_loss(logits, similarity, target, index, valid=valid)
    first_row = prototype_loss(logits[:, :, :1], similarity[:, :, :, :1], target[:, :1], index[:, :1])
    assert torch.isclose(masked, first_row)
    assert prototype_loss(logits, similarity, target, index, valid=torch.zeros_like(valid)).item() == 0.0


def test_sinkhorn_spreads_each_class_over_its_prototypes():
    torch.manual_seed(0)
    scores = F.normalize(torch.randn(600, 5), dim=1)
    classes = torch.randint(0, 3, (600,))
    q, index = sinkhorn_assign(scores, classes, 3, iterations=3, epsilon=0.05)
    assert torch.allclose(q.sum(dim=1), torch.ones(600), atol=1e-4)
    for k in range(3):
        per_prototype = q[classes == k].sum(dim=0) / (classes == k).sum()
        assert torch.all((per_prototype - 0.2).abs() < 0.08)  # balanced: about 1/M each
    assert index.shape == (600,) and index.max() < 5


def test_momentum_update_moves_only_assigned_prototypes():
    bank = F.normalize(torch.randn(3, 2, 4), dim=-1)
    embedding = F.normalize(torch.tensor([[1.0, 0, 0, 0]] * 4), dim=1)
    classes = torch.tensor([1, 1, 1, 1])
    assignment = torch.tensor([[1.0, 0.0]] * 4)
    use = torch.tensor([True, True, False, False])
    new = momentum_update(bank, embedding, classes, assignment, use, momentum=0.5)
    assert torch.allclose(new.norm(dim=-1), torch.ones(3, 2))
    expected = F.normalize(0.5 * bank[1, 0] + 0.5 * embedding[0], dim=0)
    assert torch.allclose(new[1, 0], expected, atol=1e-6)
    assert torch.equal(new[0], bank[0]) and torch.equal(new[1, 1], bank[1, 1]) and torch.equal(new[2], bank[2])


def test_marginal_exclusion_does_not_punish_unlabelled_organs_in_background():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labeled = torch.tensor([[True, False, False, False]])
    says_organ2 = torch.full((1, C + 1, 4, 4), -5.0)
    says_organ2[:, 2] = 5.0  # organ 2 is unlabelled here: allowed where the file says background
    says_organ1 = torch.full((1, C + 1, 4, 4), -5.0)
    says_organ1[:, 1] = 5.0  # organ 1 is labelled and absent: must be punished
    assert marginal_exclusion_loss(says_organ2, labels, labeled) < marginal_exclusion_loss(says_organ1, labels, labeled)


def _toy_batch(size=32):
    """Four 'sites', each labelling one square organ; every image shows all four organs."""
    images = torch.full((4, 1, size, size), -0.6)
    labels_full = torch.zeros(4, size, size, dtype=torch.long)
    spots = [(2, 2), (2, 18), (18, 2), (18, 18)]
    for c, (r, q) in enumerate(spots, start=1):
        images[:, :, r:r + 12, q:q + 12] = -0.6 + 0.35 * c
        labels_full[:, r:r + 12, q:q + 12] = c
    labeled = torch.eye(4, dtype=torch.bool)
    labels = torch.where(labels_full == torch.arange(1, 5)[:, None, None], labels_full, torch.zeros_like(labels_full))
    return images, labels, labeled


@pytest.mark.parametrize("stage", [1, 2])
def test_ltuda_losses_are_finite_and_decrease(stage):
    torch.manual_seed(0)
    config = make_config("fast", strong_views=2, lr=0.01, ema_decay=0.9)
    net = LTUDANet(NetworkConfig(C, (8, 8, 16, 16, 32, 16), 16, 3))
    teacher = copy.deepcopy(net)
    ctx = StepContext(config, C, torch.Generator().manual_seed(0), contextlib.nullcontext)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    batch = _toy_batch()
    losses = []
    for step in range(30):
        loss = ltuda_step(ctx, net, teacher, batch, stage)
        assert math.isfinite(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), net.parameters()):
                t.mul_(0.9).add_(s, alpha=0.1)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    if stage == 2:
        assert torch.allclose(net.prototypes_labeled[0], net.prototypes_unlabeled[0])  # background copied
        assert torch.allclose(net.prototypes_unlabeled.norm(dim=-1), torch.ones(C + 1, 3), atol=1e-5)


@pytest.mark.parametrize("stage, expected", [
    (1, [1.0, 0.0, 1.0, 0.0, 1.0]),  # weak labels; per strong view: pseudo-labels, then labels
    (2, [1.0, 0.0, 0.0]),            # weak labels; one pseudo-label term per strong view
])
def test_dice_term_is_on_ground_truth_not_on_pseudo_labels(monkeypatch, stage, expected):
    import ltuda.train.steps as steps
    weights = []

    def recording_loss(logits, target, dice_weight=0.0, scaling="valid"):
        weights.append(dice_weight)
        return partial_seg_loss(logits, target, dice_weight, scaling)

    monkeypatch.setattr(steps, "partial_seg_loss", recording_loss)
    config = make_config("fast", strong_views=2, dice_weight=1.0)
    net = LTUDANet(NetworkConfig(C, (8, 8, 16, 16, 32, 16), 16, 3))
    ctx = StepContext(config, C, torch.Generator().manual_seed(0), contextlib.nullcontext)
    ltuda_step(ctx, net, copy.deepcopy(net), _toy_batch(), stage)
    assert weights == expected


@pytest.mark.parametrize("method", ["labeled-only", "naive", "marginal-exclusion"])
def test_baselines_learn(method):
    torch.manual_seed(0)
    config = make_config("fast", method=method, dice_weight=0.0)  # the losses as published
    net = LTUDANet(NetworkConfig(C, (8, 8, 16, 16, 32, 16), 16, 3))
    ctx = StepContext(config, C, torch.Generator().manual_seed(0), contextlib.nullcontext)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    batch = _toy_batch()
    losses = []
    for _ in range(20):
        loss = supervised_step(ctx, net, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
