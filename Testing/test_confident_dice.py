"""The Dice term on pseudo-targets limited to the pixels the teacher is sure of (--pseudo-dice-confident)."""

import contextlib
import copy
import json
import math

import torch

from ltuda.losses import IGNORE
from ltuda.model.network import LTUDANet, NetworkConfig
from ltuda.train.config import make_config
from ltuda.train.steps import StepContext, ltuda_step, make_pseudo_labels

from test_method import _toy_batch

C = 4


class FixedProbabilityTeacher:
    """Two organs on one row of five pixels; the case labels organ 1 on pixel 0."""

    def __call__(self, images, heads):
        def logit(p):
            return math.log(p / (1 - p))

        organ1 = [0.99, 0.01, 0.01, 0.01, 0.01]
        organ2 = [0.95, 0.95, 0.7, 0.3, 0.05]  # sure, sure, unsure positive, unsure negative, sure negative
        return {"linear": torch.tensor([[[logit(p) for p in organ1], [logit(p) for p in organ2]]]).view(1, 2, 1, 5)}


def _pseudo_labels(dice_confident):
    labels = torch.tensor([[[1, 0, 0, 0, 0]]])
    labeled = torch.tensor([[True, False]])
    return make_pseudo_labels(FixedProbabilityTeacher(), torch.zeros(1, 1, 1, 5), labels, labeled,
                              contextlib.nullcontext, 0.5, None, 0.5, dice_confident)


def test_off_the_dice_term_sees_the_pseudo_targets_themselves():
    assert _pseudo_labels(0.5).dice_target is None


def test_the_dice_term_ignores_the_teachers_unsure_pixels_and_pbce_keeps_them():
    pseudo = _pseudo_labels(0.9)
    assert torch.equal(pseudo.target, _pseudo_labels(0.5).target)  # pBCE's targets do not change
    assert pseudo.target[0, 1, 0].tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    # organ 2: pixel 0 is organ 1's ground truth (a known negative), 1 and 4 are sure, 2 and 3 are not
    assert pseudo.dice_target[0, 1, 0].tolist() == [0.0, 1.0, IGNORE, IGNORE, 0.0]
    assert pseudo.dice_target[0, 0, 0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]  # the labelled organ: untouched


def _dice_targets_of_one_step(monkeypatch, **settings):
    """The targets the Dice term gets in the pseudo-label terms of one stage-1 step."""
    seen = []
    seg_loss = StepContext.seg_loss

    def recording_loss(self, logits, target, pseudo=False, dice_target=None):
        if pseudo:
            seen.append((target, dice_target))
        return seg_loss(self, logits, target, pseudo=pseudo, dice_target=dice_target)

    monkeypatch.setattr(StepContext, "seg_loss", recording_loss)
    config = make_config("fast", strong_views=2, pseudo_uncertain_below=0.5, pseudo_dice=True, **settings)
    torch.manual_seed(0)
    net = LTUDANet(NetworkConfig(C, (8, 8, 16, 16, 32, 16), 16, 3))
    ctx = StepContext(config, C, torch.Generator().manual_seed(0), contextlib.nullcontext)
    images, labels, labeled = _toy_batch()
    loss = ltuda_step(ctx, net, copy.deepcopy(net), (images, labels, labeled), stage=1)
    assert torch.isfinite(loss) and len(seen) == 2
    return seen


def test_a_training_step_hands_the_confident_targets_to_the_dice_term(monkeypatch):
    for target, dice_target in _dice_targets_of_one_step(monkeypatch):
        assert dice_target is None  # off: the Dice term's targets are the pseudo-targets
    ignored_more = 0
    for target, dice_target in _dice_targets_of_one_step(monkeypatch, pseudo_dice_confident=0.9):
        kept = dice_target != IGNORE
        assert torch.equal(dice_target[kept], target[kept])  # same targets where it keeps them
        assert ((target == IGNORE) <= (dice_target == IGNORE)).all()  # ignores all pBCE ignores, and more
        ignored_more += int(((dice_target == IGNORE) & (target != IGNORE)).sum())
    assert ignored_more > 0  # an untrained teacher is unsure almost everywhere


def test_with_the_organ_gate_the_sure_pixels_only_add_ignores(monkeypatch):
    gate_alone = _dice_targets_of_one_step(monkeypatch, pseudo_dice_gate=0.99)  # closed for every organ
    both = _dice_targets_of_one_step(monkeypatch, pseudo_dice_confident=0.9, pseudo_dice_gate=0.99)
    for (target, alone), (_, with_mask) in zip(gate_alone, both):
        assert ((alone == IGNORE) <= (with_mask == IGNORE)).all()
        assert (alone == IGNORE).sum() > (target == IGNORE).sum()  # the closed gate did ignore organs


def test_the_cli_records_the_setting_and_refuses_it_out_of_range_or_alone(tiny_dataset, tmp_path, capsys):
    from ltuda.cli import main

    base = ["train", "--dataset", str(tiny_dataset), "--out", str(tmp_path / "model"), "--dry-run"]
    assert main(base + ["--pseudo-dice", "--pseudo-dice-confident", "0.9"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["pseudo_dice_confident"] == 0.9
    assert main(base + ["--pseudo-dice", "--pseudo-dice-confident", "0.3"]) != 0
    err = capsys.readouterr().err
    assert "--pseudo-dice-confident 0.3" in err and "0.9" in err and "Traceback" not in err
    assert main(base + ["--pseudo-dice-confident", "0.9"]) != 0
    err = capsys.readouterr().err
    assert "--pseudo-dice" in err and "which is off" in err and "Traceback" not in err
    assert not (tmp_path / "model").exists()


def test_the_default_is_the_dice_term_on_every_pseudo_target_pixel(tiny_dataset, tmp_path, capsys):
    from ltuda.cli import main

    assert main(["train", "--dataset", str(tiny_dataset), "--out", str(tmp_path / "model"), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["pseudo_dice_confident"] == 0.5
