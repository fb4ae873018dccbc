"""Trained model folders: read and check `model.json`, and remember the models the user has.

A model folder (LTUDATrainer/CONTRACTS.md) holds model.json {"schema": "ltuda-model", "version": 1,
"classes", "preprocessing", "network", "heads", "default_head", "training", "validation", ...} and
model.pt (tensors only). Only model.json is read here; the weights are loaded by the backend.
"""

import json
import os

from .errors import LTUDAError

MODEL_SCHEMA = "ltuda-model"
MODEL_VERSION = 1
HEADS = ("auto", "linear", "proto-labeled", "proto-unlabeled")
SETTINGS_KEY = "Models"


class ModelInfo:
    def __init__(self, path, doc):
        self.path = os.path.abspath(str(path))
        self.doc = doc

    @property
    def classes(self):
        return self.doc.get("classes") or []

    @property
    def organNames(self):
        return [c.get("name") for c in self.classes]

    @property
    def training(self):
        return self.doc.get("training") or {}

    @property
    def completed(self):
        return bool(self.training.get("completed", True))

    @property
    def meanDice(self):
        return (self.doc.get("validation") or {}).get("mean_dice")

    @property
    def defaultHead(self):
        return self.doc.get("default_head") or "linear"

    @property
    def heads(self):
        return list(self.doc.get("heads") or [])

    @property
    def lineage(self):
        """{"parent", "parent_sha256", "labels_added": [{"case", "organ"}]} of a fine-tuned model, else {}."""
        value = self.doc.get("lineage")
        return value if isinstance(value, dict) else {}

    @property
    def name(self):
        return os.path.basename(self.path.rstrip("/\\")) or self.path

    def title(self):
        dice = f", Dice {self.meanDice:.2f}" if isinstance(self.meanDice, (int, float)) else ""
        stopped = ", stopped early" if not self.completed else ""
        return f"{self.name} ({', '.join(self.organNames)}{dice}{stopped})"

    def summary(self):
        t = self.training
        lines = [f"Folder: {self.path}", f"Organs: {', '.join(self.organNames)}"]
        if t:
            lines.append(f"Trained: method {t.get('method', '?')}, preset {t.get('preset', '?')}, "
                         f"device {t.get('device', '?')}" + ("" if self.completed else " (stopped before the end)"))
        if isinstance(self.meanDice, (int, float)):
            lines.append(f"Validation mean Dice: {self.meanDice:.3f}")
        if self.lineage.get("parent"):
            added = self.lineage.get("labels_added") or []
            lines.append(f"Fine-tuned from {self.lineage['parent']} with {len(added)} label(s) added")
        lines.append(f"Default head: {self.defaultHead}; LTUDA {self.doc.get('ltuda_version', '?')}")
        return "\n".join(lines)


def readModel(path):
    """ModelInfo of a model folder; raises LTUDAError saying why the folder cannot be used."""
    path = os.path.abspath(str(path))
    if not os.path.isdir(path):
        raise LTUDAError(f"The model folder {path} does not exist.")
    jsonPath = os.path.join(path, "model.json")
    if not os.path.isfile(jsonPath):
        raise LTUDAError(f"{path} is not an LTUDA model folder (it has no model.json). Choose the folder a training "
                         "wrote (the 'Model folder' of the Train section).")
    try:
        with open(jsonPath, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise LTUDAError(f"The model description {jsonPath} cannot be read ({exc}). Retrain the model or restore "
                         "the folder.") from None
    if not isinstance(doc, dict) or doc.get("schema") != MODEL_SCHEMA:
        raise LTUDAError(f"{jsonPath} is not an LTUDA model description. Choose a folder written by LTUDA training.")
    if doc.get("version") != MODEL_VERSION:
        raise LTUDAError(
            f"The model in {path} was made by another version of LTUDA (LTUDA {doc.get('ltuda_version', '?')}, "
            f"model format {doc.get('version')!r}); this extension reads model format {MODEL_VERSION}. Retrain the "
            "model with this version, or use the LTUDA version that made it.")
    if not doc.get("classes"):
        raise LTUDAError(f"The model in {path} lists no organs; its model.json is damaged. Retrain the model.")
    weights = os.path.join(path, doc.get("weights") or "model.pt")
    if not os.path.isfile(weights):
        raise LTUDAError(f"The model in {path} has no weights file ({os.path.basename(weights)}); training may have "
                         "been stopped before the first checkpoint. Retrain, or resume the training.")
    return ModelInfo(path, doc)


class ModelRegistry:
    """The model folders this user trained or added, kept in the settings (most recent first)."""

    def __init__(self, settings):
        self.settings = settings

    def paths(self):
        value = self.settings.value(SETTINGS_KEY, [])
        return [p for p in value if isinstance(p, str)] if isinstance(value, list) else []

    def add(self, path):
        """Check the folder and remember it; returns its ModelInfo."""
        info = readModel(path)
        paths = [p for p in self.paths() if os.path.normcase(p) != os.path.normcase(info.path)]
        self.settings.setValue(SETTINGS_KEY, [info.path] + paths)
        return info

    def remove(self, path):
        target = os.path.normcase(os.path.abspath(str(path)))
        self.settings.setValue(SETTINGS_KEY, [p for p in self.paths() if os.path.normcase(p) != target])

    def models(self):
        """ModelInfo of every remembered folder that is still usable (others are skipped, not forgotten)."""
        out = []
        for path in self.paths():
            try:
                out.append(readModel(path))
            except LTUDAError:
                continue
        return out
