"""Preprocessed-slice cache: each case is decoded and resized once, then memory-mapped on later runs.

The key covers the files' paths, sizes and modification times, the label mapping and the
preprocessing settings, so an edited label or a new image size is never served stale.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import LtudaError
from ..manifest import Case
from .preprocess import PreparedCase, Preprocessing, load_case


def default_cache_dir() -> Path:
    env = os.environ.get("LTUDA_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ltuda"


def _file_key(path):
    if path is None:
        return None
    try:
        stat = Path(path).stat()
    except OSError:
        return [str(path), None, None]
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def case_key(case: Case, classes, prep: Preprocessing) -> str:
    doc = {
        "version": __version__,
        "image": _file_key(case.image),
        "label": _file_key(case.label),
        "map": {str(k): v for k, v in sorted(case.value_map.items())},
        "labeled": case.labeled,
        "classes": [(c["name"], c["value"]) for c in classes],
        "prep": prep.to_json(),
    }
    return hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


class SliceCache:
    def __init__(self, root=None):
        self.root = Path(root) if root else default_cache_dir()

    def load(self, case: Case, classes, prep: Preprocessing) -> PreparedCase:
        folder = self.root / case_key(case, classes, prep)
        meta_file = folder / "meta.json"
        if meta_file.is_file():
            try:
                meta = json.loads(meta_file.read_text())
                return PreparedCase(
                    case.id,
                    np.load(folder / "image.npy", mmap_mode="r"),
                    np.load(folder / "labels.npy", mmap_mode="r"),
                    meta["labeled"],
                )
            except (OSError, ValueError, KeyError):
                pass  # a damaged entry is simply rebuilt
        prepared = load_case(case, classes, prep)
        self._store(folder, prepared)
        return prepared

    def _store(self, folder: Path, prepared: PreparedCase):
        try:
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            np.save(tmp / "image.npy", prepared.image)
            np.save(tmp / "labels.npy", prepared.labels)
            (tmp / "meta.json").write_text(json.dumps({"id": prepared.id, "labeled": prepared.labeled}))
            if folder.exists():  # another process won the race; its entry is equivalent
                for f in tmp.iterdir():
                    f.unlink()
                tmp.rmdir()
            else:
                os.replace(tmp, folder)
        except OSError as exc:
            raise LtudaError(f"cannot write the preprocessing cache ({exc.strerror})", folder,
                             "Free disk space or pass --cache-dir to a writable folder.") from None
