"""One training per model folder: an exclusive lock file, and the STOP file that asks a run to stop.

`ltuda train` creates MODEL_DIR/train.lock with O_CREAT|O_EXCL (JSON: host, pid, start time) before
it touches anything else in the folder, and removes it when it exits, also on an error or a stop.
A second training into the same folder is refused while the lock's process is alive. A lock left by
a process that is gone (a kill -9, a power cut) is taken over with a notice. Where the OS has flock
(Linux, macOS) the running training also holds a flock on the file, and "gone" means nobody holds it
(immune to reused pids, and two runs cannot both take one stale lock over); elsewhere (Windows) it
means the pid no longer runs. A lock from another host cannot be checked and is honoured; the
message says how to clear it.

A file named STOP in the model folder asks the running training to stop the way SIGTERM does (last
checkpoint saved, exit 130); it works the same on every platform. A new run removes a leftover STOP.
"""

import contextlib
import datetime
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from ..errors import LtudaError, write_error

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = "train.lock"
STOP_NAME = "STOP"


def pid_alive(pid: int) -> bool:
    """True when a process with this id runs on this machine (or might: when we may not ask)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists
        try:
            code = ctypes.c_ulong()
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def try_flock(fd: int):
    """True: flock taken. False: another process holds it. None: this OS or filesystem has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (BlockingIOError, PermissionError):
        return False
    except OSError:  # e.g. ENOLCK on some network filesystems
        return None


def same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(str(path))
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def read_lock(folder):
    """The lock's JSON dict, {} when it is there but unreadable, None when there is no lock."""
    path = Path(folder) / LOCK_NAME
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def live_holder(folder):
    """The lock dict of a training that is running into `folder` now, else None."""
    doc = read_lock(folder)
    if doc is None:
        return None
    if not doc:
        return {"host": "?", "pid": "?", "started": "?"}  # being written this very moment, or damaged
    if doc.get("host") == socket.gethostname() and not pid_alive(as_int(doc.get("pid"))):
        return None
    return doc


def in_use_message(folder, doc) -> str:
    return f"{folder} is in use by PID {doc.get('pid', '?')} on {doc.get('host', '?')} since {doc.get('started', '?')}"


def as_int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


class _Terminated(KeyboardInterrupt):
    """SIGTERM before the training loop installs its own handler: unwind (the lock is removed), exit 130."""


class FolderLock:
    """`with FolderLock(out, report):` holds MODEL_DIR/train.lock for the life of one training."""

    def __init__(self, folder, report=None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.report = report
        self.notices = []
        self.created_folder = False
        self._previous_sigterm = None
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def acquire(self):
        if not self.folder.exists():
            try:
                self.folder.mkdir(parents=True)
                self.created_folder = True
            except FileExistsError:
                pass
            except OSError as exc:
                raise LtudaError(f"cannot be created ({exc.strerror})", self.folder,
                                 "Choose a writable --out folder.") from None
        for _ in range(5):
            try:
                fd, created = os.open(str(self.path), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(str(self.path), os.O_RDWR), False
                except FileNotFoundError:
                    continue  # its owner just removed it
                except OSError as exc:
                    raise write_error(exc, self.path, "training lock") from None
            except OSError as exc:
                raise write_error(exc, self.path, "training lock") from None
            try:
                if self._claim(fd, created):
                    self._fd, fd = fd, None
                    self._remove_stale_stop()
                    self._catch_sigterm()
                    return
            finally:
                if fd is not None:
                    os.close(fd)
        raise LtudaError(f"{self.folder} is in use: its lock could not be taken (another training keeps starting)",
                         fix=f"Make sure no other `ltuda train` writes to this folder, then delete {self.path}.")

    def _claim(self, fd: int, created: bool) -> bool:
        """True: the lock is ours (our JSON written). False: try again. LtudaError: the folder is in use.

        Where the OS offers flock (Linux, macOS) the lock file is also flock-ed for the life of the run, so
        "its process is gone" means "nobody holds the flock" (the kernel drops it on any death, even kill -9),
        and two runs taking over one stale lock cannot both win. Elsewhere the pid is checked.
        """
        locked = try_flock(fd)
        if locked is False:  # a live training holds it (or grabbed our new file first)
            if created:
                return False
            raise self._in_use(self._read_fd(fd) or {})
        if not same_file(fd, self.path):
            return False  # removed or replaced while we opened it
        if not created:
            doc = self._read_fd(fd)
            if locked is None:  # no flock here: judge by host and pid
                if not doc:
                    time.sleep(0.5)  # maybe being written this instant
                    doc = self._read_fd(fd)
                if not doc:
                    raise LtudaError(f"{self.folder} is in use (its lock {self.path} cannot be read)",
                                     fix=f"If no training is running into this folder, delete {self.path} and start "
                                         "again.")
            if doc and (doc.get("host") != socket.gethostname() or
                        (locked is None and as_int(doc.get("pid")) != os.getpid() and pid_alive(as_int(doc.get("pid"))))):
                raise self._in_use(doc)
            notice = (f"notice: taking over the lock of {self.folder}: it was left by PID {doc.get('pid', '?')} "
                      f"(started {doc.get('started', '?')}), which is no longer running")
            self.notices.append(notice)
            if self.report is not None:
                self.report.log(notice)
        doc = {"host": socket.gethostname(), "pid": os.getpid(),
               "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "command": "ltuda train"}
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(doc) + "\n").encode("utf-8"))
        except OSError as exc:  # a full disk: no lock file may stay behind
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise write_error(exc, self.path, "training lock") from None
        return True

    @staticmethod
    def _read_fd(fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            doc = json.loads(os.read(fd, 1 << 16).decode("utf-8"))
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _in_use(self, doc: dict) -> LtudaError:
        if not doc:
            return LtudaError(f"{self.folder} is in use (another training is starting in it)",
                              fix="Wait for that training to finish, or train into another --out folder.")
        fix = ("Wait for that training to finish, stop it (create a file named STOP in the folder, or end the "
               "process), or train into another --out folder.")
        if doc.get("host") != socket.gethostname():
            fix += f" If it is no longer running on {doc.get('host')}, delete {self.path}."
        return LtudaError(in_use_message(self.folder, doc), fix=fix)

    def _remove_stale_stop(self):
        try:
            os.unlink(self.folder / STOP_NAME)
            message = f"notice: removed a leftover {self.folder / STOP_NAME} from an earlier stop request"
            self.notices.append(message)
            if self.report is not None:
                self.report.log(message)
        except FileNotFoundError:
            pass
        except OSError:
            pass

    def _catch_sigterm(self):
        def handler(signum, frame):
            raise _Terminated()
        try:
            self._previous_sigterm = signal.signal(signal.SIGTERM, handler)
        except (ValueError, OSError):  # not the main thread
            self._previous_sigterm = None

    def release(self):
        if self._previous_sigterm is not None:
            try:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
            except (ValueError, OSError):
                pass
            self._previous_sigterm = None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if fcntl is not None:  # remove it while still holding it, so nobody can take it in between
                with contextlib.suppress(OSError):
                    if same_file(fd, self.path):
                        os.unlink(self.path)
                os.close(fd)
            else:  # Windows cannot remove an open file
                os.close(fd)
                with contextlib.suppress(OSError):
                    if (read_lock(self.folder) or {}).get("pid") == os.getpid():
                        os.unlink(self.path)
        if self.created_folder:
            try:
                self.folder.rmdir()  # only when the run failed before writing anything
            except OSError:
                pass


def stop_requested(folder) -> bool:
    """True when MODEL_DIR/STOP exists (polled between training steps)."""
    return os.path.exists(os.path.join(str(folder), STOP_NAME))
