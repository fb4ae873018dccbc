"""Shared batch inference: several `ltuda predict` workers (processes, or machines on one file system)
work through one input folder into one output folder, each case done once.

Before a worker segments a case it claims it: OUTPUT/.claims/<stem>.lock, created with
O_CREAT|O_EXCL, JSON {"host", "pid", "started" (ISO 8601), "time" (epoch seconds), "case"}. The claim is
removed once the case's output is in place (or the case failed); a worker that finds a claim skips
the case. After taking a claim the worker looks for the output again, so a case another worker has
just finished is not redone.

A claim is taken over when its worker is gone:
- on this host: nobody holds the flock the worker keeps on its claim (Linux, macOS: immune to
  reused pids), or, where there is no flock, its pid no longer runs;
- from another host (or any host): the claim has shown no sign of life for `timeout` seconds. A
  worker touches its claim (mtime) at least once a minute while it segments, so a long case is not
  mistaken for a dead one.
Where flock works, two workers taking over one stale claim cannot both win. Without flock the
takeover renames the stale file away and checks it renamed the file it judged (best effort).
The same lock helpers as the training lock (train/lock.py) are used.
"""

import contextlib
import datetime
import glob
import json
import os
import socket
import time
import uuid
from pathlib import Path

from .errors import write_error
from .train.lock import as_int, pid_alive, same_file, try_flock

CLAIMS_DIR = ".claims"
DEFAULT_TIMEOUT_S = 3600.0
HEARTBEAT_S = 60.0


class Claim:
    """One case's claim, held from `ClaimBox.claim` until `release` (a context manager too)."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd
        self._touched = time.time()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def heartbeat(self, force: bool = False):
        """Refresh the claim's mtime (at most once per HEARTBEAT_S unless forced): the worker still lives."""
        now = time.time()
        if self._fd is None or (not force and now - self._touched < HEARTBEAT_S):
            return
        self._touched = now
        with contextlib.suppress(OSError):
            os.utime(str(self.path))

    def release(self):
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:  # remove it while still holding the flock, so nobody can take it over in between
            if same_file(fd, self.path):
                os.unlink(str(self.path))
        except OSError:
            pass
        finally:
            os.close(fd)


class ClaimBox:
    """The claims of one output folder."""

    def __init__(self, output_dir, timeout: float = DEFAULT_TIMEOUT_S, report=None):
        self.folder = Path(output_dir) / CLAIMS_DIR
        self.timeout = float(timeout)
        self.report = report

    def path_for(self, stem: str) -> Path:
        return self.folder / f"{stem}.lock"

    def claim(self, stem: str):
        """A held Claim, or None when a live worker holds this case."""
        path = self.path_for(stem)
        for _ in range(5):
            try:
                fd, created = os.open(str(path), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(str(path), os.O_RDWR), False
                except FileNotFoundError:
                    continue  # its worker just removed it
                except OSError as exc:
                    raise write_error(exc, path, "claim file") from None
            except FileNotFoundError:  # no .claims folder yet (or another worker just removed it)
                try:
                    self.folder.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise write_error(exc, self.folder, "claims folder") from None
                continue
            except OSError as exc:
                raise write_error(exc, path, "claim file") from None
            try:
                verdict = self._take(fd, path, created, stem)
            except BaseException:
                os.close(fd)
                raise
            if verdict == "ours":
                return Claim(path, fd)
            os.close(fd)
            if verdict == "busy":
                return None
        return None  # it keeps changing hands: another worker is on it

    def _take(self, fd: int, path: Path, created: bool, stem: str) -> str:
        """'ours' (our JSON written), 'busy' (a live worker holds it) or 'retry'."""
        locked = try_flock(fd)
        for _ in range(20 if created else 0):  # our new file: another worker may be judging it this instant
            if locked is not False:
                break
            time.sleep(0.05)
            locked = try_flock(fd)
        if locked is False:  # a live worker holds it
            return "retry" if created else "busy"
        if not same_file(fd, path):
            return "retry"  # removed or replaced while we opened it
        if not created:
            doc, age = _read(fd), _age(fd)
            if not self._stale(doc, age, locked):
                return "busy"
            if locked is None and not self._swap_out(fd, path):
                return "retry"  # no flock: the stale file was renamed away; claim afresh
            self._remove_temporaries(doc)
            self._log(f"notice: taking over the claim on {stem}: worker PID {doc.get('pid', '?')} on "
                      f"{doc.get('host', '?')} (since {doc.get('started', '?')}) is gone")
            if locked is None:
                return "retry"
        now = datetime.datetime.now().astimezone()
        doc = {"host": socket.gethostname(), "pid": os.getpid(), "started": now.isoformat(timespec="seconds"),
               "time": round(now.timestamp(), 3), "case": stem}
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(doc) + "\n").encode("utf-8"))
        except OSError as exc:  # a full disk: leave no claim behind
            with contextlib.suppress(OSError):
                os.unlink(str(path))
            raise write_error(exc, path, "claim file") from None
        return "ours"

    def _stale(self, doc: dict, age: float, locked) -> bool:
        if age > self.timeout:
            return True
        if not doc:  # no content yet: being written this instant, or its worker died before writing
            return age > 10
        if doc.get("host") != socket.gethostname():
            return False  # cannot check another machine's process: wait for the timeout
        if locked is True:
            return True  # nobody holds its flock: its worker is gone
        return not pid_alive(as_int(doc.get("pid")))

    def _swap_out(self, fd: int, path: Path) -> bool:
        """Without flock: rename the stale claim away; True when the file renamed was the one judged."""
        grave = path.with_name(f"{path.name}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(str(path), str(grave))
        except OSError:
            return False
        judged = same_file(fd, grave)
        if not judged:  # another worker's fresh claim: put it back unless a newer one exists
            with contextlib.suppress(OSError):
                os.link(str(grave), str(path))
        with contextlib.suppress(OSError):
            os.unlink(str(grave))
        return judged

    def _remove_temporaries(self, doc: dict):
        """A dead worker on this host may have left half-written temporary outputs: remove them."""
        pid = as_int(doc.get("pid"))
        if pid <= 0 or doc.get("host") != socket.gethostname() or not doc.get("case"):
            return
        for tmp in self.folder.parent.glob(f".{glob.escape(doc['case'])}.*.{pid}.*.tmp*"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _log(self, text: str):
        if self.report is not None:
            self.report.log(text)

    def tidy(self):
        """Remove the claims folder when no claim is left in it."""
        with contextlib.suppress(OSError):
            self.folder.rmdir()


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        doc = json.loads(os.read(fd, 1 << 16).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _age(fd: int) -> float:
    """Seconds since the claim last showed a sign of life (its mtime; written or touched by its worker)."""
    try:
        return max(0.0, time.time() - os.fstat(fd).st_mtime)
    except OSError:
        return 0.0


def parse_shard(text: str):
    """'I/N' -> (I, N) with 0 <= I < N (0-based, like SLURM_ARRAY_TASK_ID with --array=0-(N-1))."""
    parts = str(text).split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        index, count = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"'{text}' is not I/N (e.g. 0/4: the first of 4 shards, counted from 0)") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"'{text}': I must be 0..N-1 and N at least 1 (shards are counted from 0)")
    return index, count
