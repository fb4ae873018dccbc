"""The levers that decide what pseudo-labels teach at small compute: the reference pBCE scaling, the
per-organ gate, the Dice term on pseudo-targets, the oracle ceiling and the teacher diagnostics."""

import contextlib
import copy
import json
import math

import numpy as np
import pytest
import torch

from ltuda.data.preprocess import PreparedCase
from ltuda.losses import IGNORE, partial_bce, partial_seg_loss
from ltuda.model.network import LTUDANet, NetworkConfig
from ltuda.train.config import make_config
from ltuda.manifest import Case
from ltuda.train.diagnostics import case_group, pseudo_label_counts, pseudo_label_quality, quality_by_group
from ltuda.train.gate import OrganGate
from ltuda.train.steps import StepContext, ltuda_step, make_pseudo_labels

from test_method import _toy_batch

C = 4


def _bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_reference_pbce_matches_a_hand_computed_batch():
    # Two samples of 1x2 pixels, two organ channels. Channel 0: sample 0 labels both pixels, sample 1
    # only its first (the second is ignored). Channel 1: only sample 1 labels it.
    logits = torch.tensor([[[[2.0, -1.0]], [[0.5, 0.5]]],
                           [[[0.0, 3.0]], [[-2.0, 1.0]]]])
    target = torch.tensor([[[[1.0, 0.0]], [[IGNORE, IGNORE]]],
                           [[[0.0, IGNORE]], [[1.0, 0.0]]]])
    hw = 2
    channel0 = (_bce(2, 1) + _bce(-1, 0)) / hw + _bce(0, 0) / hw  # summed over samples, / all H*W pixels
    channel1 = (_bce(-2, 1) + _bce(1, 0)) / hw
    expected = (channel0 + channel1) / 2  # mean over the channels present
    assert partial_bce(logits, target, "reference").item() == pytest.approx(expected, rel=1e-6)
    # ours: mean over valid pixels, then over the labelling samples
    ours = ((_bce(2, 1) + _bce(-1, 0)) / 2 + _bce(0, 0)) / 2
    assert partial_bce(logits, target, "valid").item() == pytest.approx((ours + channel1) / 2, rel=1e-6)


def test_gate_opens_an_organ_only_once_the_teacher_segments_it():
    gate = OrganGate(C, threshold=0.5, momentum=0.0)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = 1  # sample 0 labels organ 1
    labels[1, 2:, 2:] = 2  # sample 1 labels organ 2
    labeled = torch.tensor([[True, False, False, False], [False, True, False, False]])
    predicted = labels.clone()
    predicted[1] = 0  # the teacher finds organ 1 and misses organ 2
    predicted[1, 2, 2] = 2  # one pixel of four
    gate.update(predicted, labels, labeled)
    assert gate.dice()[0].item() == pytest.approx(1.0)
    assert gate.dice()[1].item() == pytest.approx(2 * 1 / (1 + 4))
    assert gate.open().tolist() == [True, False, False, False]  # organs never seen stay closed
    assert OrganGate(C, threshold=0.0).open().all()  # threshold 0: the paper, always on


def test_closed_organs_are_ignored_where_unlabelled_and_kept_where_labelled():
    images, labels, labeled = _toy_batch()
    net = LTUDANet(NetworkConfig(C, (8, 8, 16, 16, 32, 16), 16, 3))
    gate = OrganGate(C, threshold=0.5, momentum=1.0)  # frozen: this batch does not move it
    gate.overlap, gate.total = torch.tensor([1.0, 0, 0, 0]), torch.tensor([2.0, 1, 1, 1])  # only organ 1 open
    _, target, _ = make_pseudo_labels(net, images, labels, labeled, contextlib.nullcontext, 0.5, gate)
    for sample in range(4):
        for organ in range(C):
            channel = target[sample, organ]
            if labeled[sample, organ]:  # a labelled organ is its ground truth
                assert torch.equal(channel, (labels[sample] == organ + 1).float())
            elif organ == 0:  # open: the teacher's labels, nothing ignored
                assert (channel >= 0).all()
            else:  # closed and unlabelled: no pseudo-label at all
                assert (channel == IGNORE).all()


@pytest.mark.parametrize("pseudo_dice, expected", [(False, [1.0, 0.0, 1.0]), (True, [1.0, 1.0, 1.0])])
def test_dice_on_pseudo_targets_only_when_asked(monkeypatch, pseudo_dice, expected):
    import ltuda.train.steps as steps
    weights = []

    def recording_loss(logits, target, dice_weight=0.0, scaling="valid"):
        weights.append(dice_weight)
        return partial_seg_loss(logits, target, dice_weight, scaling)

    monkeypatch.setattr(steps, "partial_seg_loss", recording_loss)
    config = make_config("fast", strong_views=1, dice_weight=1.0, pseudo_dice=pseudo_dice)
    net = LTUDANet(NetworkConfig(C, (8, 8, 16, 16, 32, 16), 16, 3))
    ctx = StepContext(config, C, torch.Generator().manual_seed(0), contextlib.nullcontext)
    ltuda_step(ctx, net, copy.deepcopy(net), _toy_batch(), 1)
    assert weights == expected  # weak labels, strong pseudo-labels, strong labels


def test_the_dice_gate_keeps_pbce_on_every_pseudo_target_and_dice_on_the_open_organs_only(monkeypatch):
    import ltuda.train.steps as steps
    calls = []  # (target, dice_target) of every loss term

    def recording_loss(logits, target, dice_weight=0.0, scaling="valid", dice_target=None):
        calls.append((target, dice_target))
        return partial_seg_loss(logits, target, dice_weight, scaling, dice_target=dice_target)

    monkeypatch.setattr(steps, "partial_seg_loss", recording_loss)
    config = make_config("fast", strong_views=1, dice_weight=1.0, pseudo_dice=True, pseudo_dice_gate=0.5,
                         pseudo_uncertain_below=0.5)
    net = LTUDANet(NetworkConfig(C, (8, 8, 16, 16, 32, 16), 16, 3))
    ctx = StepContext(config, C, torch.Generator().manual_seed(0), contextlib.nullcontext)
    ctx.gate.momentum = 1.0  # frozen: the step does not move it
    ctx.gate.overlap, ctx.gate.total = torch.tensor([1.0, 0, 0, 0]), torch.tensor([2.0, 1, 1, 1])  # only organ 1
    images, labels, labeled = _toy_batch()
    ltuda_step(ctx, net, copy.deepcopy(net), (images, labels, labeled), 1)
    (weak, no_gate), (pseudo, dice), (strong, no_gate_strong) = calls
    assert no_gate is None and no_gate_strong is None  # ground-truth terms: Dice on their own targets
    assert (pseudo >= 0).all()  # pBCE: every organ's pseudo-target, the teacher's negatives included
    organs = torch.arange(C)
    # where a pixel came from (CutMix pastes other samples in) decides what it labels, so compare channels:
    # the Dice target is the pBCE target with the unlabelled channels of closed organs ignored
    kept = (dice == pseudo)
    ignored = (dice == IGNORE)
    assert (kept | ignored).all()
    assert kept[:, 0].all()  # organ 1 is open: all of it, labelled or not
    for organ in organs[1:]:
        channel_ignored = ignored[:, organ]
        assert channel_ignored.any()  # closed: ignored where the pixel's case does not label it
        assert not channel_ignored.all()  # ... and kept where it does (ground truth)


def test_the_dice_gate_without_the_dice_term_on_pseudo_targets_is_refused(tiny_dataset, tmp_path, capsys):
    from ltuda.cli import main

    code = main(["train", "--dataset", str(tiny_dataset), "--out", str(tmp_path / "model"), "--pseudo-dice-gate", "0.7",
                 "--dry-run"])
    err = capsys.readouterr().err
    assert code != 0 and "--pseudo-dice-gate" in err and "Add --pseudo-dice" in err and "Traceback" not in err
    assert not (tmp_path / "model").exists()


def test_a_training_with_the_dice_gate_reports_which_organs_get_the_dice_term(tiny_dataset, tmp_path):
    from conftest import TINY_TRAIN_ARGS, run_ltuda

    out = tmp_path / "model"
    result = run_ltuda("train", "--dataset", tiny_dataset, "--out", out, *TINY_TRAIN_ARGS, "--pseudo-dice",
                       "--pseudo-dice-gate", "0.5", "--progress", "jsonl", "--cache-dir", tmp_path / "cache")
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert epochs and all("pseudo_dice_on" in e and "teacher_dice" in e for e in epochs)
    for e in epochs:  # the organs on are those whose running teacher Dice reached the threshold
        assert sorted(e["pseudo_dice_on"]) == sorted(n for n, d in e["teacher_dice"].items() if d >= 0.5)
        assert e["pseudo_labels_on"] == list(e["teacher_dice"])  # pBCE gate off: every organ's pseudo-labels
    model = json.loads((out / "model.json").read_text())
    assert json.dumps(model).count('"pseudo_dice_gate": 0.5') == 1
    # the phantoms have full labels, so model.json keeps the gate's state beside each pseudo-label diagnosis
    diagnosed = {(d["stage"], d["epoch"]): d for d in model["pseudo_label_quality"]}
    assert diagnosed
    for e in epochs:
        assert diagnosed[e["stage"], e["epoch"]]["pseudo_dice_on"] == e["pseudo_dice_on"]


def test_the_held_out_gate_follows_the_validation_verdict_not_the_training_batches():
    gate = OrganGate(C, threshold=0.5, dice_threshold=0.7, held_out=True)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = 1
    labeled = torch.tensor([[True, False, False, False]])
    gate.update(labels.clone(), labels, labeled)  # a perfect teacher on a training batch ...
    assert gate.dice().tolist() == [0, 0, 0, 0] and not gate.open().any()  # ... is not what it is judged on
    gate.set_held_out(torch.tensor([0.9, 0.6, 0.2, 0.0]))
    assert gate.open().tolist() == [True, True, False, False]
    assert gate.dice_open().tolist() == [True, False, False, False]
    restored = OrganGate(C, threshold=0.5, dice_threshold=0.7, held_out=True)
    restored.load_state_dict(gate.state_dict())  # a resumed run keeps the last verdict
    assert restored.dice_open().tolist() == [True, False, False, False]
    older = {"overlap": torch.ones(C), "total": torch.ones(C)}  # a checkpoint from before the held-out gate
    restored.load_state_dict(older)
    assert not restored.open().any()


def test_a_held_out_gate_takes_the_teachers_dice_at_each_validation(tiny_dataset, tmp_path):
    from conftest import TINY_TRAIN_ARGS, run_ltuda

    out = tmp_path / "model"
    result = run_ltuda("train", "--dataset", tiny_dataset, "--out", out, *TINY_TRAIN_ARGS, "--epochs-stage1", "2",
                       "--pseudo-dice", "--pseudo-dice-gate", "0.5", "--gate-cases", "held-out",
                       "--progress", "jsonl", "--cache-dir", tmp_path / "cache")
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    verdict, checked = None, 0
    for e in events:
        if e["event"] == "validation" and e["model"] == "teacher" and e["head"] == "linear":
            verdict = {name: round(d, 4) for name, d in e["per_organ"].items()}
        elif e["event"] == "epoch" and "teacher_dice" in e:
            # the gate used during an epoch is the teacher's Dice on the held-out cases at the last validation
            expected = verdict or {name: 0.0 for name in e["teacher_dice"]}
            assert e["teacher_dice"] == pytest.approx(expected, abs=1e-4)
            assert sorted(e["pseudo_dice_on"]) == sorted(n for n, d in expected.items() if d >= 0.5)
            checked += 1
    assert checked >= 2 and verdict is not None
    assert json.loads((out / "model.json").read_text())["training"]["completed"] is True


def test_a_held_out_gate_without_a_gate_is_refused(tiny_dataset, tmp_path, capsys):
    from ltuda.cli import main

    code = main(["train", "--dataset", str(tiny_dataset), "--out", str(tmp_path / "model"), "--gate-cases", "held-out",
                 "--dry-run"])
    err = capsys.readouterr().err
    assert code != 0 and "--gate-cases held-out" in err and "--pseudo-dice-gate" in err and "Traceback" not in err


def test_a_held_out_gate_without_held_out_cases_for_every_organ_is_refused(tiny_dataset, tmp_path):
    from conftest import TINY_TRAIN_ARGS, run_ltuda

    out = tmp_path / "model"
    result = run_ltuda("train", "--dataset", tiny_dataset, "--out", out, *TINY_TRAIN_ARGS, "--val-fraction", "0",
                       "--pseudo-gate", "0.5", "--gate-cases", "held-out", "--cache-dir", tmp_path / "cache",
                       check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "no validation case labels liver, spleen, kidney, pancreas" in result.stderr
    assert "--val-fraction" in result.stderr
    assert not (out / "model.pt").exists()


def test_the_oracle_trains_on_the_true_labels(monkeypatch):
    import ltuda.train.steps as steps
    targets = []

    def recording_loss(logits, target, dice_weight=0.0, scaling="valid"):
        targets.append(target)
        return partial_seg_loss(logits, target, dice_weight, scaling)

    monkeypatch.setattr(steps, "partial_seg_loss", recording_loss)
    images, labels, labeled = _toy_batch()
    full = labels.clone()
    full[:] = labels.sum(dim=0)  # every sample shows all four organs at the same places
    config = make_config("fast", strong_views=1, cutmix_area=(0.02, 0.02), scale_range=(1.0, 1.0), rotation_deg=0.0)
    net = LTUDANet(NetworkConfig(C, (8, 8, 16, 16, 32, 16), 16, 3))
    ctx = StepContext(config, C, torch.Generator().manual_seed(0), contextlib.nullcontext)
    ltuda_step(ctx, net, copy.deepcopy(net), (images, labels, labeled, full), 1)
    pseudo_target = targets[1]  # weak labels, then the strong view's pseudo-labels
    organs = torch.arange(1, C + 1)[None, :, None, None]
    assert torch.equal(pseudo_target, (full[:, None] == organs).float())  # same image everywhere: CutMix is a no-op


class _FixedTeacher(torch.nn.Module):
    """Predicts organ 1 on the left half of every slice, nothing else."""

    def forward(self, x, heads=("linear",)):
        logits = torch.full((x.shape[0], C, x.shape[2], x.shape[3]), -10.0)
        logits[:, 0, :, : x.shape[3] // 2] = 10.0
        return {"linear": logits}


def test_pseudo_label_quality_is_measured_on_the_organs_a_case_does_not_label():
    truth = np.zeros((2, 4, 4), dtype=np.uint8)
    truth[:, :, 1:3] = 1  # organ 1 covers columns 1-2; the teacher predicts columns 0-1
    truth[:, 0, 3] = 2
    image = np.zeros((2, 4, 4), dtype=np.float16)
    labels_organ2 = np.where(truth == 2, 2, 0).astype(np.uint8)
    pairs = [(PreparedCase("a", image, labels_organ2, [2]), PreparedCase("a", image, truth, [1, 2, 3, 4])),
             # this case labels organ 1 itself: its organ-1 pixels do not count
             (PreparedCase("b", image, np.where(truth == 1, 1, 0), [1]), PreparedCase("b", image, truth, [1, 2, 3, 4]))]
    classes = [{"name": n, "value": v} for v, n in enumerate(("liver", "spleen", "kidney", "pancreas"), start=1)]
    quality = pseudo_label_quality(_FixedTeacher(), pairs, classes, "cpu", contextlib.nullcontext)
    # case a only: predicted 16 pixels of organ 1, 16 true, 8 shared
    assert quality["liver"] == {"precision": 0.5, "recall": 0.5, "dice": 0.5}
    # organ 2 is unlabelled in case b: 2 true pixels, never predicted
    assert quality["spleen"] == {"precision": 0.0, "recall": 0.0, "dice": 0.0}
    assert "kidney" not in quality  # absent and never predicted


def test_pseudo_label_quality_by_site_and_phase_keeps_each_group_apart():
    truth = np.zeros((2, 4, 4), dtype=np.uint8)
    truth[:, :, 0:2] = 1  # case "seen": the teacher's left half is exactly the organ
    shifted = np.zeros_like(truth)
    shifted[:, :, 2:4] = 1  # case "missed": the organ is on the side the teacher never predicts
    image = np.zeros((2, 4, 4), dtype=np.float16)
    empty = np.zeros_like(truth)
    pairs = [(PreparedCase("seen", image, empty, []), PreparedCase("seen", image, truth, [1, 2, 3, 4])),
             (PreparedCase("missed", image, empty, []), PreparedCase("missed", image, shifted, [1, 2, 3, 4]))]
    classes = [{"name": n, "value": v} for v, n in enumerate(("liver", "spleen", "kidney", "pancreas"), start=1)]
    counts = pseudo_label_counts(_FixedTeacher(), pairs, classes, "cpu", contextlib.nullcontext)
    by_group = quality_by_group(counts, ["local contrast", "local native"], classes)
    assert by_group["local contrast"]["liver"] == {"precision": 1.0, "recall": 1.0, "dice": 1.0}
    assert by_group["local native"]["liver"] == {"precision": 0.0, "recall": 0.0, "dice": 0.0}
    # pooled, the two cases average out: what the groups are there to show
    pooled = pseudo_label_quality(_FixedTeacher(), pairs, classes, "cpu", contextlib.nullcontext)
    assert pooled["liver"] == {"precision": 0.5, "recall": 0.5, "dice": 0.5}
    case = lambda **extra: Case("x", None, None, [], extra=extra)  # noqa: E731
    assert case_group(case(site="local", phase="native")) == "local native"
    assert case_group(case(site="kidney")) == "kidney"
    assert case_group(case()) is None


def test_stage2_starts_from_the_best_stage1_student(tiny_dataset, tmp_path, monkeypatch):
    import ltuda.train.trainer as trainer_module
    from ltuda.manifest import load_manifest
    from ltuda.progress import SilentReporter

    calls = []

    def falling_dice(*args, **kwargs):  # the first validation is the best: best and last students differ
        calls.append(1)
        return 1.0 / len(calls), {}

    monkeypatch.setattr(trainer_module, "validate", falling_dice)
    starts = []

    class Recording(trainer_module.Trainer):
        def _validate(self, stage, epoch):
            super()._validate(stage, epoch)
            if stage == 1 and epoch == 1:
                starts.append({k: v.clone() for k, v in self.student.state_dict().items()})

        def _begin_stage(self):
            last = {k: v.clone() for k, v in self.student.state_dict().items()}
            super()._begin_stage()
            starts.append(last)
            starts.append({k: v.clone() for k, v in self.student.state_dict().items()})
            starts.append({k: v.clone() for k, v in self.teacher.state_dict().items()})

    config = make_config("fast", epochs_stage1=3, epochs_stage2=1, iterations_per_epoch=2, image_size=32,
                         batch_size=2, val_fraction=0.5, stage2_start="best", seed=1)
    Recording(load_manifest(tiny_dataset), tmp_path / "model", config, SilentReporter(),
              cache_dir=tmp_path / "cache").run()
    first_epoch, last, student, teacher = starts
    weights = [k for k in first_epoch if not k.startswith("prototypes")]
    assert all(torch.equal(student[k], first_epoch[k]) and torch.equal(teacher[k], first_epoch[k]) for k in weights)
    assert not all(torch.equal(last[k], first_epoch[k]) for k in weights)  # stage 1 went on after its best epoch


def test_teacher_prototype_banks_follow_the_student_by_ema():
    from types import SimpleNamespace

    from ltuda.train.trainer import Trainer

    student = LTUDANet(NetworkConfig(C, (8, 8, 16, 16, 32, 16), 16, 3))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        student.prototypes_unlabeled.copy_(torch.nn.functional.normalize(torch.randn_like(student.prototypes_unlabeled), dim=-1))
    before = teacher.prototypes_unlabeled.clone()
    fake = SimpleNamespace(config=make_config("fast", ema_decay=0.9, teacher_prototypes="ema"), student=student,
                           teacher=teacher)
    Trainer._ema_update(fake, step=100)
    expected = torch.nn.functional.normalize(0.9 * before + 0.1 * student.prototypes_unlabeled, dim=-1)
    assert torch.allclose(teacher.prototypes_unlabeled, expected, atol=1e-6)
    fake.config = make_config("fast", ema_decay=0.9, teacher_prototypes="copy")
    Trainer._ema_update(fake, step=100)
    assert torch.equal(teacher.prototypes_unlabeled, student.prototypes_unlabeled)


@pytest.mark.parametrize("schedule", ["per-stage", "whole-run"])
def test_the_learning_rate_restarts_per_stage_or_decays_once_over_the_run(tiny_dataset, tmp_path, schedule):
    from ltuda.manifest import load_manifest
    from ltuda.progress import SilentReporter
    from ltuda.train.trainer import Trainer

    class Recording(SilentReporter):
        def emit(self, event, **fields):
            if event == "epoch":
                rates.append(fields["lr"])

    class KeepsOptimiser(Trainer):
        def _begin_stage(self):
            before = self.optimizer
            super()._begin_stage()
            optimisers.append((before, self.optimizer))

    rates, optimisers = [], []
    config = make_config("fast", epochs_stage1=2, epochs_stage2=2, iterations_per_epoch=1, image_size=32,
                         batch_size=2, val_fraction=0.5, lr=1e-3, lr_schedule=schedule, seed=1)
    KeepsOptimiser(load_manifest(tiny_dataset), tmp_path / "model", config, Recording(),
                   cache_dir=tmp_path / "cache").run()
    half = 1e-3 * 0.5 ** 0.9
    if schedule == "per-stage":  # the reference code: stage 2 is a new run at the full rate, a new optimiser
        assert rates == pytest.approx([1e-3, half, 1e-3, half])
        assert optimisers[0][0] is not optimisers[0][1]
    else:
        assert rates == pytest.approx([1e-3 * (1 - k / 4) ** 0.9 for k in range(4)])
        assert optimisers[0][0] is optimisers[0][1]


def test_a_warm_up_trains_on_the_labels_only_then_ramps_the_pseudo_labels_up_from_its_end(tiny_dataset, tmp_path,
                                                                                             monkeypatch):
    import ltuda.train.trainer as trainer_module
    from ltuda.manifest import load_manifest
    from ltuda.progress import SilentReporter

    steps = []  # (stage, "labels" or "pseudo", pseudo-label weight)

    def recording(step, kind):
        def wrapped(ctx, *args, **kwargs):
            stage = args[-1] if kind == "pseudo" else 1
            steps.append((stage, kind, ctx.pseudo_weight))
            return step(ctx, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(trainer_module, "supervised_step", recording(trainer_module.supervised_step, "labels"))
    monkeypatch.setattr(trainer_module, "ltuda_step", recording(trainer_module.ltuda_step, "pseudo"))
    config = make_config("fast", epochs_stage1=4, epochs_stage2=1, iterations_per_epoch=1, image_size=32,
                         batch_size=2, val_fraction=0.5, warmup_epochs=2, pseudo_rampup_epochs=2, seed=1)
    trainer_module.Trainer(load_manifest(tiny_dataset), tmp_path / "model", config, SilentReporter(),
                           cache_dir=tmp_path / "cache").run()
    assert [(stage, kind) for stage, kind, _ in steps] == [(1, "labels"), (1, "labels"), (1, "pseudo"), (1, "pseudo"),
                                                           (2, "pseudo")]
    # the ramp-up counts from the warm-up's end: exp(-5) at its first pseudo-label step, exp(-5/4) half-way
    assert [weight for _, _, weight in steps[2:4]] == pytest.approx([math.exp(-5), math.exp(-1.25)])


def test_a_warm_up_as_long_as_stage_1_is_refused_with_the_fix(tiny_dataset, tmp_path, capsys):
    from ltuda.cli import main

    code = main(["train", "--dataset", str(tiny_dataset), "--out", str(tmp_path / "model"), "--epochs-stage1", "4",
                 "--warmup-epochs", "4", "--dry-run"])
    err = capsys.readouterr().err
    assert code != 0 and "--warmup-epochs 4" in err and "half of stage 1" in err and "Traceback" not in err
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("stage1_flags, expected", [([], 8), (["--epochs-stage1", "4"], 2), (["--epochs-stage1", "1"], 0),
                                                    (["--epochs-stage1", "4", "--warmup-epochs", "1"], 1)])
def test_the_fast_presets_warm_up_keeps_its_share_of_a_changed_stage_1(tiny_dataset, tmp_path, capsys, stage1_flags,
                                                                       expected):
    """Half of the fast preset's stage 1 is its warm-up: a user who shortens stage 1 keeps a half-length warm-up
    (not a refusal, nor a stage 1 with no pseudo-labels left), unless they set the warm-up themselves."""
    from ltuda.cli import main

    code = main(["train", "--dataset", str(tiny_dataset), "--out", str(tmp_path / "model"), "--preset", "fast",
                 *stage1_flags, "--dry-run"])
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert code == 0 and settings["warmup_epochs"] == expected
    assert settings["pseudo_rampup_epochs"] == 0 and settings["lr_schedule"] == "whole-run"


@pytest.mark.parametrize("confident_above, expected", [(0.5, [0.0, 1.0, 1.0, 0.0]), (0.9, [0.0, IGNORE, 1.0, 0.0])])
def test_unsure_teacher_positives_are_ignored_above_the_paper_rule(confident_above, expected):
    """Organ 2 is unlabelled in this case: the teacher's 0.7 is a positive under the paper's rule and
    ignored under a 0.9 threshold; its 0.95 is a positive under both. The labelled organ's own pixel is a
    known negative of organ 2 whatever the teacher says."""
    def logit(p):
        return math.log(p / (1 - p))

    class Teacher:
        def __call__(self, images, heads):
            organ1 = [logit(0.99), logit(0.01), logit(0.01), logit(0.01)]
            organ2 = [logit(0.95), logit(0.7), logit(0.95), logit(0.1)]
            return {"linear": torch.tensor([[organ1, organ2]]).view(1, 2, 1, 4)}

    labels = torch.tensor([[[1, 0, 0, 0]]])
    labeled = torch.tensor([[True, False]])
    _, target, _ = make_pseudo_labels(Teacher(), torch.zeros(1, 1, 1, 4), labels, labeled, contextlib.nullcontext,
                                      0.5, None, confident_above)
    assert target[0, 1, 0].tolist() == expected
    assert target[0, 0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]  # the labelled organ is its ground truth


def test_a_confidence_threshold_outside_its_range_is_refused_with_the_fix(tiny_dataset, tmp_path, capsys):
    from ltuda.cli import main

    code = main(["train", "--dataset", str(tiny_dataset), "--out", str(tmp_path / "model"),
                 "--pseudo-confident-above", "0.3", "--dry-run"])
    err = capsys.readouterr().err
    assert code != 0 and "--pseudo-confident-above 0.3" in err and "0.9" in err and "Traceback" not in err


@pytest.mark.parametrize("stage2_pseudo_labels", [True, False])
def test_stage_2_trains_on_the_labelled_organs_alone_when_its_pseudo_labels_are_off(monkeypatch, stage2_pseudo_labels):
    targets = []  # the target of each pseudo-label term
    seg_loss = StepContext.seg_loss

    def recording_loss(self, logits, target, pseudo=False, dice_target=None):
        if pseudo:
            targets.append(target)
        return seg_loss(self, logits, target, pseudo=pseudo, dice_target=dice_target)

    monkeypatch.setattr(StepContext, "seg_loss", recording_loss)
    config = make_config("fast", strong_views=2, pseudo_uncertain_below=0.5, stage2_pseudo_labels=stage2_pseudo_labels)
    net = LTUDANet(NetworkConfig(C, (8, 8, 16, 16, 32, 16), 16, 3))
    ctx = StepContext(config, C, torch.Generator().manual_seed(0), contextlib.nullcontext)
    images, labels, _ = _toy_batch()
    labeled = torch.zeros(4, C, dtype=torch.bool)
    labeled[:, 0] = True  # every sample labels organ 1 alone, so every pasted pixel does too
    labels = torch.where(labels == 1, labels, torch.zeros_like(labels))
    for stage in (1, 2):
        targets.clear()
        loss = ltuda_step(ctx, net, copy.deepcopy(net), (images, labels, labeled), stage)
        assert torch.isfinite(loss) and len(targets) == 2
        for target in targets:
            assert (target[:, 0] != IGNORE).all()  # the labelled organ: trained in every stage
            from_teacher = (target[:, 1:] != IGNORE).any().item()
            assert from_teacher == (stage == 1 or stage2_pseudo_labels)  # the others: by the teacher or not
