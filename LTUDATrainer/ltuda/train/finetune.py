"""`ltuda train --init-from MODEL_DIR`: continue training a model on an enlarged label set.

The new run starts from the parent's weights (student and teacher), keeps the parent's network,
preprocessing and training settings, and by default runs a quarter of the parent's epochs per stage
with no pseudo-label ramp-up (the teacher starts from a trained model, so its pseudo-labels are
usable from the first step). Any flag given on the command line still overrides a setting; one that
would change the network is refused. Every model records which organs each training case labelled
("dataset_labels"), so a fine-tuned model's "lineage" can list the labels added since its parent.
"""

import hashlib
from pathlib import Path

from ..errors import LtudaError
from ..manifest import parse_manifest
from ..model.store import load_model
from .config import TrainConfig
from .trainer import Trainer, network_config

SCHEDULE_FRACTION = 0.25  # of the parent's epochs per stage
LINEAGE = "lineage"


def dataset_labels(manifest) -> dict:
    """{case id: [organs it labels]} of the training cases (train and val splits)."""
    return {c.id: list(c.labeled) for c in manifest.cases if c.split != "test"}


def _parent_labels(parent_doc: dict):
    """The parent's {case: organs}: recorded in its model.json, else read from its training manifest."""
    if isinstance(parent_doc.get("dataset_labels"), dict):
        return parent_doc["dataset_labels"]
    path = (parent_doc.get("training") or {}).get("dataset")
    if not path:
        return None
    try:
        manifest, _ = parse_manifest(path, allow_outside_paths=True)
    except LtudaError:
        return None
    return dataset_labels(manifest)


def lineage(parent_dir, parent_doc: dict, manifest, weights: bytes = None) -> dict:
    """{"parent", "parent_sha256", "labels_added": [{"case", "organ"}] or None when the parent's labels are unknown}."""
    sha = parent_doc.get("weights_sha256")
    if not sha:
        sha = hashlib.sha256(weights if weights is not None else
                             (Path(parent_dir) / parent_doc.get("weights", "model.pt")).read_bytes()).hexdigest()
    before = _parent_labels(parent_doc)
    added = None
    if before is not None:
        added = [{"case": case, "organ": organ} for case, organs in dataset_labels(manifest).items()
                 for organ in organs if organ not in before.get(case, [])]
    return {"parent": str(Path(parent_dir).resolve()), "parent_sha256": sha, "labels_added": added}


def finetune_config(parent_doc: dict, model_dir, overrides: dict) -> TrainConfig:
    """The parent's training settings, a shorter schedule, then the flags the user gave (`overrides`)."""
    saved = (parent_doc.get("training") or {}).get("config")
    if not isinstance(saved, dict):
        raise LtudaError("records no training settings, so training cannot continue from it",
                         Path(model_dir) / "model.json", "Train a new model without --init-from.")
    config = TrainConfig.from_json(saved)
    config.epochs_stage1 = max(1, round(config.epochs_stage1 * SCHEDULE_FRACTION))
    config.epochs_stage2 = max(1, round(config.epochs_stage2 * SCHEDULE_FRACTION))
    config.pseudo_rampup_epochs = 0
    config.warmup_epochs = 0  # the parent's teacher already sees every organ
    config.extra = {}
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    return config


def check_compatible(parent_doc: dict, config: TrainConfig, manifest, model_dir):
    """One clear message when the parent cannot be continued on this dataset with these settings."""
    model_dir = Path(model_dir)
    parent = [(c["name"], int(c["value"])) for c in parent_doc.get("classes", [])]
    here = [(c["name"], int(c["value"])) for c in manifest.classes]
    if parent != here:
        show = lambda pairs: ", ".join(f"{n} ({v})" for n, v in pairs)  # noqa: E731
        raise LtudaError(f"segments {show(parent)}; the dataset's organs are {show(here)}", model_dir,
                         "--init-from needs the same organs with the same label values: train a new model "
                         "without --init-from, or pass the model trained on this dataset's organs.")
    wanted = network_config(config, len(manifest.classes)).to_json()
    prep = parent_doc.get("preprocessing") or {}
    if wanted != parent_doc.get("network") or int(prep.get("image_size", -1)) != config.image_size or \
            [float(v) for v in prep.get("hu_window", [])] != [float(v) for v in config.hu_window]:
        theirs = parent_doc.get("network") or {}
        raise LtudaError(
            f"has another network ({theirs.get('name', '?')} {theirs.get('features', '?')}, image size "
            f"{prep.get('image_size', '?')}) than these settings ask for ({wanted['name']} {wanted['features']}, "
            f"image size {config.image_size})", model_dir,
            "Leave out --preset, --network, --image-size and --prototypes: --init-from keeps the parent's network.")


def prepare_finetune(model_dir, manifest, overrides: dict, preset=None):
    """(config, initial weights, lineage) for `train --init-from`; every problem is one LtudaError."""
    if not Path(model_dir).is_dir():
        raise LtudaError("--init-from: model folder not found", model_dir, "Pass the folder of a trained model.")
    network, doc = load_model(model_dir)  # validates model.json and the weights (weights_only)
    parent_preset = (doc.get("training") or {}).get("preset")
    if preset is not None and preset != parent_preset:
        raise LtudaError(f"--preset {preset}: the parent was trained with the {parent_preset} preset", model_dir,
                         "Leave out --preset: --init-from keeps the parent's settings.")
    config = finetune_config(doc, model_dir, overrides)
    check_compatible(doc, config, manifest, model_dir)
    family = lineage(model_dir, doc, manifest)
    config.extra = {LINEAGE: family}  # kept in checkpoints/config.json, so --resume keeps the lineage
    return config, network.state_dict(), family


class LineageTrainer(Trainer):
    """The trainer, started from given weights, writing extra keys into model.json.

    A subclass (not a change to Trainer): the network is built once per run by `_network` and the
    metadata by `_metadata`, the two places this needs.
    """

    def __init__(self, *args, init_state=None, extra_metadata=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_state = init_state
        self.extra_metadata = dict(extra_metadata or {})

    def _network(self):
        net = super()._network()
        if self.init_state is not None:
            net.load_state_dict(self.init_state, strict=True)
            self.report.log("starting from the parent model's weights")
        return net

    def _metadata(self, completed: bool) -> dict:
        return {**super()._metadata(completed), **self.extra_metadata}
