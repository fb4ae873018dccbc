"""Training settings: the published hyper-parameters as defaults, two presets, every value settable."""

from dataclasses import asdict, dataclass, field, fields

METHODS = ("ltuda", "cda", "labeled-only", "naive", "marginal-exclusion")

# Which stages each method runs: 0 = one supervised stage (baselines), 1 = CDA, 2 = PDA.
METHOD_STAGES = {
    "ltuda": (1, 2),
    "cda": (1,),
    "labeled-only": (0,),
    "naive": (0,),
    "marginal-exclusion": (0,),
}
STAGE_NAMES = {0: "supervised", 1: "CDA", 2: "PDA"}


@dataclass
class TrainConfig:
    method: str = "ltuda"
    preset: str = "paper"
    # schedule
    epochs_stage1: int = 120
    epochs_stage2: int = 120
    iterations_per_epoch: int = 0  # 0: one pass over the training slices per epoch
    batch_size: int = 4
    optimizer: str = "sgd"  # "sgd" (the paper: Nesterov, momentum 0.99) or "adamw"
    lr: float = 1e-3
    momentum: float = 0.99
    nesterov: bool = True
    poly_power: float = 0.9
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    # Epochs over which stage 1's pseudo-label term ramps up (exp(-5(1-t)^2), mean-teacher practice);
    # 0 = full weight from the start, as the method page states.
    pseudo_rampup_epochs: int = 0
    # Stage 1 opens with this many epochs of labelled-only training (part of its epochs): the teacher
    # labels nothing until the student has seen every organ's own labels; the ramp-up starts after it.
    warmup_epochs: int = 0
    seed: int = 43
    # Weight of a partial soft-Dice term added to every pBCE term on ground truth (0 = the paper's loss).
    dice_weight: float = 0.0
    # Unlabelled organs the teacher gives a probability in [this, 0.5) are ignored by the pseudo-label
    # term instead of taken as background (0.5 = the paper's hard rule).
    pseudo_uncertain_below: float = 0.5
    # An unlabelled organ's pseudo-label is positive only where the teacher's probability reaches this;
    # from 0.5 up to it the pixel is ignored (0.5 = the paper's hard rule; FixMatch's confidence threshold).
    pseudo_confident_above: float = 0.5
    # Use an unlabelled organ's pseudo-labels only once the teacher's running Dice on the cases that
    # label it reaches this (0 = always, the paper).
    pseudo_gate: float = 0.0
    # Also apply the Dice term (dice_weight) to pseudo-label targets.
    pseudo_dice: bool = False
    # With pseudo_dice: the Dice term covers an unlabelled organ's pseudo-targets only once the teacher's
    # running Dice on the cases that label it reaches this; its pBCE term (the teacher's negatives too)
    # stays on throughout (0 = every organ whose pseudo-labels are used).
    pseudo_dice_gate: float = 0.0
    # With pseudo_dice: the Dice term sees an unlabelled organ's pseudo-target only where the teacher is sure,
    # its probability at least this or at most 1 - this; pBCE keeps the rest (0.5 = everywhere). Dice
    # punishes a wrong pseudo-target by 1/organ size; the teacher's unsure pixels are where most are wrong.
    pseudo_dice_confident: float = 0.5
    # Stage 2 trains on the unlabelled organs' pseudo-labels (the paper), or on the labels alone (False):
    # at small compute stage 2's pseudo-labels cost what stage 1's gain (benchmarks/results/strong-views).
    stage2_pseudo_labels: bool = True
    # Cases that label no organ (a hospital's own unlabelled scans): "added", extra slices after the batch_size
    # labelled ones (as many as one labelled dataset gets), so every labelled set stays in every batch; or
    # "in-batch", one more partial dataset in the batch's turn, taking places the labelled sets would get
    # (before 2026-12-04; 0.038 behind on development data, benchmarks/results/recipe-choice-dev.md).
    unlabelled_slices: str = "added"
    # Share of the images only the student sees (LTUDA's and CDA's strong views; a baseline's one view,
    # and so also the one view of stage 1's labelled-only warm-up) that get a random intensity curve
    # (augment.IntensityRemap), so organs are found across contrast phases; the teacher's weak view stays
    # as scanned (0 = off, the paper).
    intensity_remap: float = 0.0
    # Which of LTUDA's and CDA's student views get the curve: "strong", every strong view (the labelled and
    # the pseudo-label terms there), or "weak", the student's copy of the weak view, which only the labelled
    # term trains on (the teacher labels the weak view as scanned either way).
    intensity_remap_views: str = "strong"
    # Whether stage 1's labelled-only warm-up gets the curve too (True), or sees the scans as they are, the
    # curve starting with the pseudo-labels (False): with it, a small low-contrast organ (pancreas) may leave
    # the warm-up unlearnt, and the teacher then calls it background (recipe-choice-dev.md, candidate 11).
    intensity_remap_warmup: bool = True
    # Where the organ gates (pseudo_gate, pseudo_dice_gate) judge the teacher: "training", its running
    # Dice on the training batches that label the organ, or "held-out", its Dice on the validation cases
    # at each validation (cases neither it nor the student trains on).
    gate_cases: str = "training"
    # pBCE normalisation: "valid" (mean over non-ignored pixels and labelling samples) or "reference"
    # (the reference code: sum / all H*W pixels, summed over samples).
    pbce_scaling: str = "valid"
    # Stage 2 starts from the "last" stage-1 student, or from the "best" (best-validating) one, as the
    # reference code does (model_best.pth).
    stage2_start: str = "last"
    # Learning-rate decay (poly): "per-stage" restarts at lr with a fresh optimiser in each stage, as the
    # paper does over 120 + 120 epochs; "whole-run" decays once over all stages' epochs and carries the
    # optimiser into stage 2, so a short run does not spend stage 2 recovering from a restart.
    lr_schedule: str = "per-stage"
    # The teacher's prototype banks: copied from the student ("copy"), or an EMA of the student's
    # ("ema"), as in the reference code where the banks are parameters.
    teacher_prototypes: str = "copy"
    # Benchmark ceiling: the true labels ("label_full") replace the teacher's pseudo-labels.
    oracle_pseudo_labels: bool = False
    # method
    strong_views: int = 2
    prototypes: int = 5
    prototype_momentum: float = 0.999
    sinkhorn_iterations: int = 3
    sinkhorn_epsilon: float = 0.05
    ppc_weight: float = 0.01
    ppd_weight: float = 0.001
    scale_range: tuple = (0.75, 1.25)
    rotation_deg: float = 30.0
    cutmix_area: tuple = (0.02, 0.4)
    # data and network
    network: str = "basic-unet"  # or "reference-unet" (the reference code's U-Net)
    image_size: int = 256
    hu_window: tuple = (-325.0, 325.0)
    features: tuple = (32, 32, 64, 128, 256, 64)
    embedding_dim: int = 64
    val_fraction: float = 0.2
    device: str = "auto"
    validate_every: int = 1
    extra: dict = field(default_factory=dict)

    def epochs(self, stage: int) -> int:
        return self.epochs_stage2 if stage == 2 else self.epochs_stage1

    @property
    def stages(self):
        return METHOD_STAGES[self.method]

    def learning_rate(self, stage_index: int, epoch: int) -> float:
        """The poly-decayed learning rate of an epoch of the stage at stage_index."""
        if self.lr_schedule == "whole-run":
            done = sum(self.epochs(s) for s in self.stages[:stage_index]) + epoch
            total = sum(self.epochs(s) for s in self.stages)
        else:
            done, total = epoch, self.epochs(self.stages[stage_index])
        return self.lr * (1 - done / total) ** self.poly_power

    def to_json(self) -> dict:
        doc = asdict(self)
        for key in ("scale_range", "cutmix_area", "hu_window", "features"):
            doc[key] = list(doc[key])
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in doc.items() if k in known}
        return cls(**values)


PRESETS = {
    # The paper's network, loss scaling and schedule (toy set: 120 epochs per stage); for a GPU.
    "paper": {
        "network": "reference-unet",
        "features": (64, 128, 256, 512, 512, 64),
        "pbce_scaling": "reference",
        "stage2_start": "best",
        "teacher_prototypes": "ema",
    },
    # A small network on 64x64 slices that trains in minutes on a laptop CPU. A schedule of a few
    # hundred iterations (the paper runs ~94k) needs AdamW and a faster-moving teacher; a Dice term
    # on the labels so that small organs (pancreas) are learnt at all in that time; and, while the
    # teacher cannot yet find small organs in other sites' images, half of stage 1 on the labels only
    # (the teacher labels nothing before it has seen every organ) and ignoring (not calling background)
    # the pixels it is unsure of. Without them, those organs' own labels lose against "background"
    # pseudo-labels from every other site. One learning-rate decay over both stages, so that the short
    # stage 2 does not restart at the full rate (benchmarks/results/recipe-choice-dev.md chose this).
    "fast": {
        "epochs_stage1": 16,
        "epochs_stage2": 6,
        "iterations_per_epoch": 40,
        "image_size": 64,
        "features": (16, 16, 32, 64, 128, 32),
        "embedding_dim": 32,
        "optimizer": "adamw",
        "lr": 3e-3,
        "ema_decay": 0.99,
        "prototype_momentum": 0.99,
        "warmup_epochs": 8,
        "pseudo_rampup_epochs": 0,
        "lr_schedule": "whole-run",
        "pseudo_uncertain_below": 0.2,
        "dice_weight": 1.0,
    },
}


def make_config(preset: str = "paper", **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("network", values.get("network")) != values.get("network") and "features" not in overrides:
        values.pop("features", None)  # the preset's widths belong to its own network
    if "epochs_stage1" in overrides and "warmup_epochs" not in overrides and values.get("warmup_epochs"):
        # the preset's warm-up is a share of its stage 1, and keeps that share of a shorter or longer one
        values["warmup_epochs"] = values["warmup_epochs"] * overrides["epochs_stage1"] // values["epochs_stage1"]
    values.update(overrides)
    return TrainConfig(preset=preset, **values)
