"""`--intensity-remap`: a random intensity curve on the views only the student sees (candidate 10 of
benchmarks/results/recipe-choice-dev.md), so that organs are learnt across contrast phases."""

import contextlib
import json

import pytest
import torch

from conftest import TINY_TRAIN_ARGS, run_ltuda
from ltuda.augment import IntensityRemap
from ltuda.data.phantoms import generate_phantoms
from ltuda.train.config import make_config
from ltuda.train.steps import StepContext, ltuda_step, supervised_step


def test_off_returns_the_images_and_draws_no_random_number():
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    generator = torch.Generator().manual_seed(3)
    assert IntensityRemap(prob=0.0)(images, generator) is images
    # the next draw is the one it would be without the remap: every run trained before it stands
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=torch.Generator().manual_seed(3)))


def test_curves_stay_in_range_keep_air_and_can_reorder_tissues():
    # two tissues in every image: a darker one at 0.05 (native kidney) and a brighter one at 0.55
    images = torch.full((256, 1, 4, 4), 0.05)
    images[:, :, :, 2:] = 0.55
    images[:, :, 0, :] = -1.0  # air
    remapped = IntensityRemap(prob=1.0)(images, torch.Generator().manual_seed(0))
    assert remapped.shape == images.shape and remapped.min() >= -1.0 and remapped.max() <= 1.0
    assert torch.all(remapped[:, :, 0, :] == -1.0)
    dark, bright = remapped[:, 0, 1, 0], remapped[:, 0, 1, 3]
    reordered = (dark > bright).float().mean().item()
    assert 0.2 < reordered < 0.8  # a curve may reverse the two, as a contrast phase does; often it does not
    # each pixel of a tissue follows the same curve: the image stays an image of the same tissues
    assert torch.all(remapped[:, :, 1:, :2] == remapped[:, :, 1:2, :1])


def test_probability_sets_the_share_of_images_changed():
    images = torch.rand(2000, 1, 4, 4) * 1.8 - 0.9
    remapped = IntensityRemap(prob=0.5)(images, torch.Generator().manual_seed(1))
    changed = (remapped != images).flatten(1).any(dim=1).float().mean().item()
    assert 0.45 < changed < 0.55


class _Recorder(torch.nn.Module):
    """A network that records what it is shown and answers with zero logits for 2 organs."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, images, heads=("linear",), prototype_from=None):
        self.seen.append(images.detach().clone())
        b, _, h, w = images.shape
        return {"linear": self.weight * torch.ones(b, 2, h, w)}


def _context(method: str, remap: float) -> StepContext:
    config = make_config("fast", method=method, intensity_remap=remap, rotation_deg=0.0, scale_range=(1.0, 1.0))
    return StepContext(config, 2, torch.Generator().manual_seed(5), contextlib.nullcontext)


def _batch():
    images = torch.rand(4, 1, 16, 16) * 1.6 - 0.8  # no air, so every pixel can change
    labels = torch.zeros(4, 16, 16, dtype=torch.long)
    labels[:2, 4:8, 4:8], labels[2:, 8:12, 8:12] = 1, 2
    labeled = torch.tensor([[True, False], [True, False], [False, True], [False, True]])
    return images, labels, labeled


def _share_of_strong_pixels_as_scanned(student, teacher, b=4) -> float:
    """Strong-view pixels equal to the weak view's (outside a CutMix box a strong view is its own scan)."""
    weak, strong = student.seen[0][:b], student.seen[0][b:]
    assert torch.equal(teacher.seen[0], weak)  # the teacher labels the weak view as the student sees it
    return (strong == weak.repeat(len(strong) // b, 1, 1, 1)).float().mean().item()


def test_ltuda_remaps_the_strong_views_only():
    as_scanned = {}
    for remap in (0.0, 1.0):
        student, teacher = _Recorder(), _Recorder()
        ltuda_step(_context("ltuda", remap), student, teacher, _batch(), stage=1)
        as_scanned[remap] = _share_of_strong_pixels_as_scanned(student, teacher)
    assert as_scanned[0.0] > 0.5  # only the pasted boxes differ
    assert as_scanned[1.0] < 0.05  # every strong view is remapped (a blend weight of 0 is measure-zero)


def test_ltuda_can_remap_the_students_weak_view_instead():
    student, teacher = _Recorder(), _Recorder()
    context = _context("ltuda", 1.0)
    context.config.intensity_remap_views = "weak"
    images = _batch()
    ltuda_step(context, student, teacher, images, stage=1)
    weak, strong = student.seen[0][:4], student.seen[0][4:]
    assert not torch.isclose(weak, teacher.seen[0]).any()  # the student's copy is remapped, the teacher's is not
    assert (strong == teacher.seen[0].repeat(2, 1, 1, 1)).float().mean().item() > 0.5  # strong views as scanned


def test_labelled_only_remaps_its_one_view():
    seen = {}
    for remap in (0.0, 1.0):
        student = _Recorder()
        supervised_step(_context("labeled-only", remap), student, _batch())
        seen[remap] = student.seen[0]
    assert not torch.isclose(seen[0.0], seen[1.0]).any()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_phantoms(tmp_path_factory.mktemp("remap"), cases_per_site=2, test_cases=1, shape=(48, 48), seed=0)


def test_training_records_the_setting_and_rejects_a_share_outside_0_1(dataset, tmp_path):
    out = tmp_path / "model"
    run_ltuda("train", "--dataset", dataset, "--out", out, "--method", "cda", *TINY_TRAIN_ARGS,
              "--intensity-remap", "0.5", "--progress", "none")
    assert json.loads((out / "model.json").read_text())["training"]["config"]["intensity_remap"] == 0.5
    wrong = run_ltuda("train", "--dataset", dataset, "--out", tmp_path / "wrong", "--intensity-remap", "1.5",
                      check=False)
    assert wrong.returncode != 0 and "--intensity-remap 1.5" in wrong.stderr and "Traceback" not in wrong.stderr
    assert not (tmp_path / "wrong" / "model.json").exists()


@pytest.mark.parametrize("method, in_warmup", [("ltuda", True), ("ltuda", False), ("labeled-only", False)])
def test_the_warm_up_sees_the_scans_as_they_are_when_asked(tiny_dataset, tmp_path, monkeypatch, method, in_warmup):
    """`--no-intensity-remap-warmup` (candidate 14): stage 1's labelled-only warm-up trains on the scans as they
    are, the curve starting with the pseudo-labels; a baseline's one view keeps it (it has no warm-up)."""
    import ltuda.train.trainer as trainer_module
    from ltuda.manifest import load_manifest
    from ltuda.progress import SilentReporter

    steps, remapped = [], []  # the kind of each step run; the step kind of each call of the curve

    def recording(step, kind):
        def wrapped(*args, **kwargs):
            steps.append(kind)
            return step(*args, **kwargs)
        return wrapped

    original = IntensityRemap.__call__

    def counted(self, images, generator):
        remapped.append(steps[-1])
        return original(self, images, generator)

    monkeypatch.setattr(IntensityRemap, "__call__", counted)
    monkeypatch.setattr(trainer_module, "supervised_step", recording(trainer_module.supervised_step, "labels"))
    monkeypatch.setattr(trainer_module, "ltuda_step", recording(trainer_module.ltuda_step, "pseudo"))
    config = make_config("fast", method=method, epochs_stage1=2, epochs_stage2=1, iterations_per_epoch=2,
                         image_size=32, batch_size=2, val_fraction=0.5, warmup_epochs=1, seed=1, intensity_remap=1.0,
                         intensity_remap_views="weak", intensity_remap_warmup=in_warmup)
    trainer_module.Trainer(load_manifest(tiny_dataset), tmp_path / "model", config, SilentReporter(),
                           cache_dir=tmp_path / "cache").run()
    if method == "labeled-only":  # no warm-up: its one view gets the curve at every step
        assert set(steps) == {"labels"} and remapped == steps
    else:
        assert steps == ["labels"] * 2 + ["pseudo"] * 4  # the warm-up's epoch, stage 1's second, stage 2
        assert remapped.count("labels") == (2 if in_warmup else 0)
        assert remapped.count("pseudo") == 4  # the student's copy of the weak view, once per step


def test_the_warm_up_without_the_curve_is_recorded_and_refused_without_a_curve(tiny_dataset, tmp_path):
    out = tmp_path / "model"
    run_ltuda("train", "--dataset", tiny_dataset, "--out", out, *TINY_TRAIN_ARGS, "--intensity-remap", "0.5",
              "--intensity-remap-views", "weak", "--no-intensity-remap-warmup", "--progress", "none")
    config = json.loads((out / "model.json").read_text())["training"]["config"]
    assert config["intensity_remap_warmup"] is False and config["intensity_remap_views"] == "weak"
    wrong = run_ltuda("train", "--dataset", tiny_dataset, "--out", tmp_path / "wrong", "--no-intensity-remap-warmup",
                      check=False)
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert "--no-intensity-remap-warmup" in wrong.stderr and "--intensity-remap (e.g. 0.5)" in wrong.stderr
    assert not (tmp_path / "wrong").exists()


def test_the_curve_in_the_warm_up_is_the_default():
    assert make_config("fast").intensity_remap_warmup is True
