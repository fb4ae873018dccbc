"""The model folder: `model.json` (metadata) + `model.pt` (tensors only), written atomically.

Loading uses `torch.load(weights_only=True)`, so a model file can never run code; a folder from
another schema version or with foreign weights is refused with a message that says so.
"""

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import pickle
import shlex
import time
from pathlib import Path

import torch

from .. import __version__
from ..errors import LtudaError, free_bytes, write_error
from .network import BACKBONES, HEADS, LTUDANet, NetworkConfig

SCHEMA = "ltuda-model"
VERSION = 1
WEIGHTS = "model.pt"


WHAT = {"model.pt": "model weights", "last.pt": "training checkpoint", "model.json": "model description",
        "config.json": "checkpoint settings"}


def _atomic_write_bytes(data, path, what=None) -> None:
    """Write to PATH.tmp, flush to disk, then rename over PATH: PATH is always the old or the new file.

    A full disk or a read-only folder ends in one LtudaError (what, where, space needed and free, the
    fix); the temporary file is removed and the previous PATH stays as it was.
    """
    path = Path(path)
    what = what or WHAT.get(path.name, "file")
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = free_bytes(path.parent)
        if free is not None and free < len(data):  # refuse before writing anything
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(exc, path, what, needed=len(data)) from None


def atomic_torch_save(obj, path, what=None) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic_write_bytes(buffer.getbuffer(), path, what)


def atomic_write_json(doc: dict, path, what=None) -> None:
    _atomic_write_bytes((json.dumps(doc, indent=2) + "\n").encode("utf-8"), path, what)


def safe_torch_load(path, what: str = "checkpoint", data=None, fix=None):
    """torch.load(weights_only=True) of a file (or of its bytes, `data`), every failure in our own words."""
    try:
        source = io.BytesIO(data) if data is not None else path
        return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LtudaError(f"{what} not found", path) from None
    except pickle.UnpicklingError as exc:  # a pickle that is not tensors and plain numbers: refused
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise LtudaError(f"holds Python objects, not only tensors, so it is not an LTUDA {what}; "
                             "it was not loaded, for safety", path,
                             fix or "Use a file written by `ltuda train`.") from None
        raise _damaged(path, what, fix) from None
    except Exception:  # truncated, overwritten, not a PyTorch file at all
        raise _damaged(path, what, fix) from None


def _damaged(path, what, fix=None, reason=None) -> LtudaError:
    reason = reason or f"it cannot be read as an LTUDA {what} file"
    if fix is None and what == "checkpoint":
        fix = "Restore it from a backup, or start the training again with --overwrite."
    if fix is None:
        fix = ("Restore it from a backup, or train again (`ltuda train --resume` continues from the last "
               "checkpoint when the folder has one).")
    return LtudaError(f"is damaged or incomplete ({reason})", path, fix)


def save_model(model_dir, network: LTUDANet, metadata: dict) -> None:
    """Write weights first, then model.json: a folder with model.json always has matching weights."""
    model_dir = Path(model_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    # The digest ties model.json to these exact weights: a reader that catches the folder between the
    # two writes (a training in progress) sees the mismatch and reads again.
    doc = {"schema": SCHEMA, "version": VERSION, "ltuda_version": __version__, "weights": WEIGHTS,
           "weights_sha256": hashlib.sha256(buffer.getbuffer()).hexdigest(),
           "network": network.config.to_json(), "heads": list(HEADS)}
    doc.update(metadata)
    weights, previous = model_dir / WEIGHTS, model_dir / (WEIGHTS + ".prev")
    with contextlib.suppress(OSError):
        previous.unlink()
    kept = False
    if weights.is_file():  # a second name for the old weights (no space needed), to put back on failure
        with contextlib.suppress(OSError, AttributeError, NotImplementedError):
            os.link(weights, previous)
            kept = True
    try:
        _atomic_write_bytes(buffer.getbuffer(), weights)
        atomic_write_json(doc, model_dir / "model.json")
    except LtudaError:
        if kept:  # model.json could not follow (a full disk): the old pair stays together
            with contextlib.suppress(OSError):
                os.replace(previous, weights)
        raise
    finally:
        with contextlib.suppress(OSError):
            previous.unlink()


def read_model_json(model_dir) -> dict:
    model_dir = Path(model_dir)
    path = model_dir / "model.json"
    if not path.is_file():
        _explain_missing_model(model_dir)
        raise LtudaError("is not an LTUDA model folder (model.json is missing)", model_dir,
                         "Pass the folder written by `ltuda train --out`.")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:  # nested thousands deep: no model.json we write
        raise LtudaError("cannot be read (it is nested too deeply to be a model description)", path,
                         "Retrain or restore the model folder.") from None
    except (OSError, ValueError) as exc:
        raise LtudaError(f"cannot be read ({str(exc)[:200]})", path, "Retrain or restore the model folder.") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise LtudaError("is not an LTUDA model description", path, "Pass the folder written by `ltuda train --out`.")
    if doc.get("version") != VERSION:
        raise LtudaError(
            f"was written by LTUDA {doc.get('ltuda_version', '?')} in model format {doc.get('version')!r}; "
            f"this LTUDA ({__version__}) reads format {VERSION}", path,
            "Retrain the model with this version, or use the LTUDA version that wrote it.",
        )
    _check_model_doc(doc, path, for_prediction=False)
    return doc


def _check_model_doc(doc: dict, path, for_prediction: bool) -> None:
    problem = _classes_problem(doc.get("classes")) or (_model_doc_problem(doc) if for_prediction else None)
    if problem:
        raise LtudaError(f"is damaged: {problem}", path, "Retrain or restore the model folder.")


def _is_int(value, low, high) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _classes_problem(classes):
    """What is wrong with a model.json's class list (read by predict and evaluate), or None."""
    if not isinstance(classes, list) or not classes:
        return "'classes' must be a non-empty list"
    for cls in classes:
        if not (isinstance(cls, dict) and isinstance(cls.get("name"), str) and 0 < len(cls["name"]) <= 200
                and _is_int(cls.get("value"), 1, 255) and isinstance(cls.get("color"), list) and len(cls["color"]) == 3
                and all(_is_int(c, 0, 255) for c in cls["color"])):
            return "each class needs a name, a value 1-255 and a colour of three values 0-255"
        term = cls.get("terminology")
        if term is not None and not (isinstance(term, dict) and all(
                code is None or (isinstance(code, list) and all(isinstance(part, str) for part in code))
                for code in term.values())):
            return f"the terminology of class '{cls['name']}' is not a list of codes"
    if len({cls["value"] for cls in classes}) != len(classes) or len({cls["name"] for cls in classes}) != len(classes):
        return "class names and values must be unique"
    return None


def _model_doc_problem(doc: dict):
    """What else in a model.json prediction cannot use (network, weights, preprocessing, head), or None.

    Checked here once, so a damaged or hand-edited file is one message instead of a failure deep inside
    (a huge 'features' entry would even try to build a network of that size)."""
    weights = doc.get("weights", WEIGHTS)
    if not isinstance(weights, str) or not weights or weights != Path(weights).name:
        return "'weights' must be a file name next to model.json"
    if not isinstance(doc.get("weights_sha256", ""), str):
        return "'weights_sha256' must be text"
    network = doc.get("network")
    if not isinstance(network, dict):
        return "'network' is missing"
    features = network.get("features")
    if not (_is_int(network.get("num_classes"), 1, 255) and isinstance(features, list) and 1 <= len(features) <= 8
            and all(_is_int(f, 1, 4096) for f in features) and _is_int(network.get("embedding_dim"), 1, 4096)
            and _is_int(network.get("prototypes_per_class"), 1, 1000)
            and network.get("backbone", BACKBONES[0]) in BACKBONES):
        return "'network' has values out of range"
    if len(doc["classes"]) != network["num_classes"]:
        return f"'classes' must list the network's {network['num_classes']} classes"
    prep = doc.get("preprocessing")
    if not (isinstance(prep, dict) and isinstance(prep.get("hu_window"), list) and len(prep["hu_window"]) == 2
            and all(_is_number(v) for v in prep["hu_window"]) and prep["hu_window"][0] < prep["hu_window"][1]
            and _is_int(prep.get("image_size"), 8, 4096) and isinstance(prep.get("orientation", "LPS"), str)):
        return "'preprocessing' needs an HU window [low, high] and an image size 8-4096"
    if doc.get("default_head", HEADS[0]) not in HEADS:
        return f"'default_head' must be one of {', '.join(HEADS)}"
    return None


def _explain_missing_model(model_dir: Path) -> None:
    """A folder with checkpoints but no model.json: a training that is running, or one that stopped early."""
    from ..train.lock import in_use_message, live_holder

    started_here = (model_dir / "checkpoints").is_dir() or (model_dir / "progress.jsonl").is_file()
    if not started_here:
        return
    holder = live_holder(model_dir)
    if holder is not None:
        raise LtudaError(f"has no model yet: {in_use_message(model_dir, holder)}, which has not reached its first "
                         "validation", model_dir, "Wait until model.json appears in the folder, then try again.")
    checkpoints = model_dir / "checkpoints"
    if not (checkpoints / "last.pt").is_file() and not (checkpoints / "config.json").is_file():
        raise LtudaError("training did not finish: it stopped before its first checkpoint, so there is nothing "
                         "to resume", model_dir,
                         "Start it again with `ltuda train --overwrite` (same --dataset and --out).")
    try:
        dataset = json.loads((model_dir / "checkpoints" / "config.json").read_text(encoding="utf-8"))["dataset"]
    except (OSError, ValueError, KeyError, TypeError):
        dataset = "DATASET"
    command = f"ltuda train --resume --dataset {shlex.quote(str(dataset))} --out {shlex.quote(str(model_dir))}"
    raise LtudaError(f"training did not finish: run `{command}`", model_dir,
                     "It continues from the last checkpoint (or starts again with the run's settings when it "
                     "stopped before one) and writes the model (model.json, model.pt).")


def _read_matching_weights(model_dir: Path, doc: dict):
    """(model.json, weights bytes) that belong together; retries while a training replaces them."""
    for attempt in range(20):
        weights = model_dir / doc.get("weights", WEIGHTS)
        try:
            data = weights.read_bytes()
        except FileNotFoundError:
            raise LtudaError("model weights not found", weights,
                             "Restore model.pt next to model.json, or train again.") from None
        except OSError as exc:
            raise LtudaError(f"cannot be read ({exc.strerror})", weights, "Check the file's permissions.") from None
        expected = doc.get("weights_sha256")
        if expected is None or hashlib.sha256(data).hexdigest() == expected:
            return doc, data
        from ..train.lock import live_holder
        if live_holder(model_dir) is None or attempt == 19:
            safe_torch_load(weights, "model weights", data=data)  # the more precise message when unreadable
            raise _damaged(weights, "model weights", reason="its contents do not match model.json")
        time.sleep(0.25)  # the training is between writing model.pt and model.json
        doc = read_model_json(model_dir)
    raise AssertionError("unreachable")  # pragma: no cover


def load_model(model_dir):
    """(network in eval mode, model.json dict)."""
    doc = read_model_json(model_dir)
    _check_model_doc(doc, Path(model_dir) / "model.json", for_prediction=True)
    doc, data = _read_matching_weights(Path(model_dir), doc)
    try:
        config = NetworkConfig.from_json(doc["network"])
    except (KeyError, TypeError, ValueError):
        raise LtudaError("has no valid 'network' section", Path(model_dir) / "model.json", "Retrain the model.") from None
    network = LTUDANet(config)
    weights = Path(model_dir) / doc.get("weights", WEIGHTS)
    state = safe_torch_load(weights, "model weights", data=data)
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise LtudaError(
            f"do not fit the network described in model.json ({str(exc).splitlines()[0][:160]})", weights,
            "The weights belong to another model; retrain or restore the matching model.pt.",
        ) from None
    network.eval()
    return network, doc
