"""The one exception type users see: a message for a person, no traceback."""

import errno
import os
import shutil
from pathlib import Path

DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


class LtudaError(Exception):
    """Bad input or a failed run, explained: what is wrong, which file, how to fix it."""

    def __init__(self, message: str, path=None, fix: str = ""):
        self.path = None if path is None else _shorten(str(path), 300)
        self.fix = fix
        message = "\n".join(_shorten(line, 1000) for line in str(message).split("\n"))
        parts = [message if self.path is None else f"{self.path}: {message}"]
        if fix:
            parts.append(fix)
        super().__init__(" ".join(parts))


def _shorten(text: str, limit: int) -> str:
    """A path or message line of a sane length (a 100 KB path in a message helps nobody)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit * 2 // 3]}...({len(text)} characters)...{text[-limit // 4:]}"


class ManifestProblems(LtudaError):
    """Every problem found in a dataset at once, one per line."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problem(s) found:\n" + "\n".join(f"  - {p}" for p in self.problems))


def human_bytes(n) -> str:
    n = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def free_bytes(path):
    """Free space on the disk holding `path` (or its nearest existing parent), None when unknown."""
    path = Path(path)
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(str(candidate)).free
        except OSError:
            continue
    return None


def write_error(exc: OSError, path, what: str, needed=None, fix=None) -> LtudaError:
    """One message for a failed write: what was written where, why (full, read-only), and the fix."""
    path, fix_override = Path(path), fix
    if exc.errno in DISK_FULL:
        free = free_bytes(path.parent)
        space = []
        if needed is not None:
            space.append(f"{human_bytes(needed)} needed")
        if free is not None:
            space.append(f"{human_bytes(free)} free")
        reason = "the disk is full" + (f" ({', '.join(space)})" if space else "")
        fix = ("Free space on that disk, or write to another folder, then run the command again; "
               "the files written before are intact (a stopped training continues with `ltuda train --resume`).")
    elif exc.errno in READ_ONLY:
        reason = "the folder is read-only" if exc.errno == errno.EROFS else "permission denied"
        fix = "Choose a folder you can write to, then run the command again."
    else:
        reason = exc.strerror or str(exc)
        fix = "Check the disk and the folder, then run the command again."
    return LtudaError(f"could not write the {what}: {reason}.", path, fix_override or fix)


def failed_write_cause(folder, needed=None):
    """Why a library's write into `folder` failed when it did not say (SimpleITK raises a bare
    RuntimeError): an OSError for a read-only folder or a disk with less than `needed` bytes free,
    else None."""
    folder = Path(folder)
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return OSError(errno.EROFS, os.strerror(errno.EROFS))
    except (OSError, AttributeError):  # no statvfs on Windows
        pass
    if folder.is_dir() and not os.access(folder, os.W_OK):
        return OSError(errno.EACCES, os.strerror(errno.EACCES))
    free = free_bytes(folder)
    if free is not None and needed is not None and free < needed:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None
