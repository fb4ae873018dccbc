"""Preprocessed-slice cache: each case is decoded and resized once, then memory-mapped on later runs.

The key covers the files' paths, sizes and modification times, the label mapping and the
preprocessing settings, so an edited label or a new image size is never served stale. A damaged
entry (truncated, overwritten) is detected by its recorded sizes, headers and CRC-32 and rebuilt.
"""

import errno
import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import write_error
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
        "cache_format": 2,  # entries carry sizes and checksums
        "image": _file_key(case.image),
        "label": _file_key(case.label),
        "map": {str(k): v for k, v in sorted(case.value_map.items())},
        "labeled": case.labeled,
        "classes": [(c["name"], c["value"]) for c in classes],
        "prep": prep.to_json(),
    }
    return hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


class DamagedEntry(Exception):
    """A cache entry that does not hold exactly what was stored (truncated, overwritten, foreign)."""


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _describe(path: Path, array: np.ndarray) -> dict:
    return {"size": path.stat().st_size, "crc32": _crc32(path), "shape": list(array.shape), "dtype": str(array.dtype)}


class SliceCache:
    """Each entry's meta.json records, per array file, its size, CRC-32, shape and dtype; an entry that
    does not match them (a truncated copy, a file from another entry or program, a half-written folder)
    is removed and rebuilt from the case's files, with a notice. It is never served."""

    FILES = ("image.npy", "labels.npy")

    def __init__(self, root=None, notify=None):
        self.root = Path(root) if root else default_cache_dir()
        self.notify = notify

    def load(self, case: Case, classes, prep: Preprocessing) -> PreparedCase:
        folder = self.root / case_key(case, classes, prep)
        if folder.exists():
            try:
                return self._read(case, folder)
            except DamagedEntry as exc:
                if self.notify:
                    self.notify(f"notice: the preprocessing cache of case {case.id} ({folder}) is damaged ({exc}); "
                                "rebuilding it from the case's files")
                self._discard(folder)
        prepared = load_case(case, classes, prep)
        self._store(folder, prepared)
        return prepared

    def _read(self, case: Case, folder: Path) -> PreparedCase:
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            files = meta["files"]
            arrays = {}
            for name in self.FILES:
                path, expected = folder / name, files[name]
                size = path.stat().st_size
                if size != expected["size"]:
                    raise DamagedEntry(f"{name} has {size} bytes, {expected['size']} were stored")
                array = np.load(path, mmap_mode="r", allow_pickle=False)
                if list(array.shape) != expected["shape"] or str(array.dtype) != expected["dtype"]:
                    raise DamagedEntry(f"{name} holds {array.dtype} {list(array.shape)}, "
                                       f"{expected['dtype']} {expected['shape']} were stored")
                if _crc32(path) != expected["crc32"]:
                    raise DamagedEntry(f"{name} does not match its checksum")
                arrays[name] = array
            return PreparedCase(case.id, arrays["image.npy"], arrays["labels.npy"], list(meta["labeled"]))
        except DamagedEntry:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DamagedEntry(str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__) from None

    def _discard(self, folder: Path):
        aside = folder.with_name(folder.name + f".damaged{os.getpid()}")
        try:
            os.replace(folder, aside)
        except OSError:
            return  # another process is healing it; our _store then keeps theirs
        shutil.rmtree(aside, ignore_errors=True)

    def _store(self, folder: Path, prepared: PreparedCase):
        try:
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            files = {}
            for name, array in zip(self.FILES, (prepared.image, prepared.labels)):
                np.save(tmp / name, array)
                files[name] = _describe(tmp / name, array)
            (tmp / "meta.json").write_text(json.dumps({"id": prepared.id, "labeled": prepared.labeled,
                                                       "files": files}))
            if folder.exists():  # another process won the race; its entry is equivalent
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                try:
                    os.replace(tmp, folder)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not folder.is_dir():
                        raise
                    shutil.rmtree(tmp, ignore_errors=True)  # it won between the check and the rename
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_error(exc, exc.filename or folder, "preprocessing cache", fix=(
                "Free space on that disk, or pass --cache-dir (or set LTUDA_CACHE_DIR) to a folder on another "
                "disk, then run the command again.")) from None
