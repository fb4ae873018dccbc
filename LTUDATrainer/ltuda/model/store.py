"""The model folder: `model.json` (metadata) + `model.pt` (tensors only), written atomically.

Loading uses `torch.load(weights_only=True)`, so a model file can never run code; a folder from
another schema version or with foreign weights is refused with a message that says so.
"""

import json
import os
from pathlib import Path

import torch

from .. import __version__
from ..errors import LtudaError
from .network import HEADS, LTUDANet, NetworkConfig

SCHEMA = "ltuda-model"
VERSION = 1
WEIGHTS = "model.pt"


def atomic_torch_save(obj, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(doc: dict, path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def safe_torch_load(path, what: str = "checkpoint"):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LtudaError(f"{what} not found", path) from None
    except Exception as exc:  # corrupt, truncated or carrying pickled objects
        raise LtudaError(
            f"is not a readable LTUDA {what} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", path,
            "Use a file written by `ltuda train`; retrain if it was damaged.",
        ) from None


def save_model(model_dir, network: LTUDANet, metadata: dict) -> None:
    """Write weights first, then model.json: a folder with model.json always has matching weights."""
    model_dir = Path(model_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    atomic_torch_save(state, model_dir / WEIGHTS)
    doc = {"schema": SCHEMA, "version": VERSION, "ltuda_version": __version__, "weights": WEIGHTS,
           "network": network.config.to_json(), "heads": list(HEADS)}
    doc.update(metadata)
    atomic_write_json(doc, model_dir / "model.json")


def read_model_json(model_dir) -> dict:
    model_dir = Path(model_dir)
    path = model_dir / "model.json"
    if not path.is_file():
        raise LtudaError("is not an LTUDA model folder (model.json is missing)", model_dir,
                         "Pass the folder written by `ltuda train --out`.")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LtudaError(f"cannot be read ({exc})", path, "Retrain or restore the model folder.") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise LtudaError("is not an LTUDA model description", path, "Pass the folder written by `ltuda train --out`.")
    if doc.get("version") != VERSION:
        raise LtudaError(
            f"was written by LTUDA {doc.get('ltuda_version', '?')} in model format {doc.get('version')!r}; "
            f"this LTUDA ({__version__}) reads format {VERSION}", path,
            "Retrain the model with this version, or use the LTUDA version that wrote it.",
        )
    return doc


def load_model(model_dir):
    """(network in eval mode, model.json dict)."""
    doc = read_model_json(model_dir)
    try:
        config = NetworkConfig.from_json(doc["network"])
    except (KeyError, TypeError, ValueError):
        raise LtudaError("has no valid 'network' section", Path(model_dir) / "model.json", "Retrain the model.") from None
    network = LTUDANet(config)
    weights = Path(model_dir) / doc.get("weights", WEIGHTS)
    state = safe_torch_load(weights, "model weights")
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise LtudaError(
            f"do not fit the network described in model.json ({str(exc).splitlines()[0][:160]})", weights,
            "The weights belong to another model; retrain or restore the matching model.pt.",
        ) from None
    network.eval()
    return network, doc
