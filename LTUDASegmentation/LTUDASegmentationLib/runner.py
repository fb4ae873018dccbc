"""Run the backend in a child process without ever blocking the caller.

- Started with an argument list (no shell), in its own process group/session, stdout and stderr
  on separate pipes (stdout carries the JSON-lines progress stream, stderr the human log).
- Two reader threads decode each line as UTF-8 with replacement characters (a non-UTF-8 locale or
  a stray byte cannot crash the reader), append it to the run's log file and put it on a queue.
  No Qt object is touched from a thread: the owner drains the queue with `poll()` on its own
  thread (a QTimer in Slicer's GUI, or the blocking `wait()` loop in scripts and tests).
- `stop(grace)` asks the child to stop (SIGTERM to the whole process group; CTRL_BREAK on
  Windows), then kills the whole tree when it is still running after `grace` seconds; `kill()`
  kills the tree at once. The launcher (PythonSlicer) is a parent of the real interpreter, so
  the whole group/tree is signalled, never only the direct child, and a real interpreter that
  outlives its launcher keeps the whole grace period (backend.py starts python-real directly when
  it can).
"""

import os
import queue
import signal
import subprocess
import threading
import time

STDOUT = "stdout"
STDERR = "stderr"
EXIT = "exit"


def _decode(raw):
    return raw.decode("utf-8", errors="replace").rstrip("\r\n")


class ProcessRunner:
    """One child process. `poll()` returns [(kind, value)]: (STDOUT, line), (STDERR, line) and,
    once, (EXIT, return code) after every output line was delivered."""

    def __init__(self, args, env=None, cwd=None, logPath=None):
        self.args = [str(a) for a in args]
        self.env = env
        self.cwd = None if cwd is None else str(cwd)
        self.logPath = None if logPath is None else str(logPath)
        self.process = None
        self.returncode = None
        self.stopRequested = False
        self.killed = False
        self._queue = queue.Queue()
        self._readers = []
        self._logFile = None
        self._logLock = threading.Lock()
        self._killDeadline = None
        self._exitReported = False
        self._exitSeenAt = None
        self._orphansKilledAt = None

    # -- life cycle -------------------------------------------------------------------------
    def start(self):
        if self.logPath:
            os.makedirs(os.path.dirname(os.path.abspath(self.logPath)), exist_ok=True)
            self._logFile = open(self.logPath, "a", encoding="utf-8", errors="replace")
            self._logFile.write("$ " + " ".join(_quote(a) for a in self.args) + "\n")
            self._logFile.flush()
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        try:
            self.process = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, env=self.env, cwd=self.cwd, **kwargs)
        except OSError as exc:
            self._closeLog()
            raise OSError(f"Could not start {self.args[0]}: {exc.strerror or exc}") from exc
        for kind, pipe in ((STDOUT, self.process.stdout), (STDERR, self.process.stderr)):
            thread = threading.Thread(target=self._read, args=(kind, pipe), daemon=True, name=f"ltuda-{kind}")
            thread.start()
            self._readers.append(thread)
        return self

    def _read(self, kind, pipe):
        try:
            for raw in iter(pipe.readline, b""):
                line = _decode(raw)
                self._writeLog(line)
                self._queue.put((kind, line))
        except (OSError, ValueError):
            pass
        finally:
            try:
                pipe.close()
            except OSError:
                pass

    def _writeLog(self, line):
        with self._logLock:
            if self._logFile is None:
                return
            try:
                self._logFile.write(line + "\n")
                self._logFile.flush()
            except (OSError, ValueError):
                pass

    @property
    def pid(self):
        return None if self.process is None else self.process.pid

    def isRunning(self):
        return self.process is not None and self.process.poll() is None

    def finished(self):
        return self._exitReported

    # -- output -----------------------------------------------------------------------------
    def poll(self, maxItems=10000):
        """Everything the child printed since the last call (never blocks)."""
        items = []
        if self.process is None:
            return items
        if self._killDeadline is not None and time.monotonic() >= self._killDeadline:
            self._killDeadline = None
            if self.isRunning():
                self.kill()
        while len(items) < maxItems:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if not self._exitReported and self.process.poll() is not None:
            # A grandchild that outlives the child can hold the pipes open: kill the rest of the
            # group after a few seconds and stop waiting for its output. After a stop request the
            # grandchild (the real interpreter behind a launcher that ended at once) keeps the
            # whole grace period to save its state.
            now = time.monotonic()
            if self._exitSeenAt is None:
                self._exitSeenAt = now
            readersDone = not any(t.is_alive() for t in self._readers)
            if not readersDone:
                graceLeft = self._killDeadline is not None and now < self._killDeadline
                if self._orphansKilledAt is None and not graceLeft and now - self._exitSeenAt > 5.0:
                    killTree(self.process.pid)
                    self._orphansKilledAt = now
                readersDone = self._orphansKilledAt is not None and now - self._orphansKilledAt > 3.0
            if readersDone and self._queue.empty():
                self._reportExit(items)
        return items

    def _reportExit(self, items):
        self.returncode = self.process.returncode
        self._exitReported = True
        self._closeLog(f"[exit code {self.returncode}]")
        items.append((EXIT, self.returncode))

    def wait(self, timeout=None, onItems=None, idle=None, interval=0.05):
        """Block until the child exits (or `timeout` seconds), handing output to onItems(items);
        `idle()` runs between polls (Slicer passes one that processes GUI events). Returns the
        return code, or None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._exitReported:
            items = self.poll()
            if items and onItems is not None:
                onItems(items)
            if self._exitReported:
                break
            if deadline is not None and time.monotonic() >= deadline:
                return None
            if idle is not None:
                idle()
            time.sleep(interval)
        return self.returncode

    # -- stopping ---------------------------------------------------------------------------
    def stop(self, grace=10.0):
        """Ask the child to stop, kill its tree if it has not after `grace` seconds (checked by
        poll()/wait()). grace <= 0 kills at once."""
        self.stopRequested = True
        if not self.isRunning():
            return
        if grace <= 0:
            self.kill()
            return
        self.terminate()
        self._killDeadline = time.monotonic() + grace

    def terminate(self):
        """Polite stop request to the whole process group (the child saves a checkpoint)."""
        if not self.isRunning():
            return
        try:
            if os.name == "nt":
                self.process.send_signal(signal.CTRL_BREAK_EVENT)
            else:
                os.killpg(self.process.pid, signal.SIGTERM)
        except (OSError, ProcessLookupError):
            pass

    def kill(self):
        """Kill the child and every process it started."""
        if self.process is None:
            return
        self.killed = True
        killTree(self.process.pid)
        try:
            self.process.kill()
        except OSError:
            pass

    def _closeLog(self, lastLine=None):
        if self._logFile is None:
            return
        with self._logLock:
            try:
                if lastLine:
                    self._logFile.write(lastLine + "\n")
                self._logFile.close()
            except (OSError, ValueError):
                pass
            self._logFile = None


def _descendants(pid):
    """Every process below pid, as objects with kill(). A descendant may have left the process group:
    torchrun starts each rank in a session of its own, so only this list reaches them."""
    try:
        import psutil
    except ImportError:
        return _descendantsFromPs(pid)
    try:
        return psutil.Process(pid).children(recursive=True)
    except Exception:
        return []


class _Pid:
    def __init__(self, pid):
        self.pid = pid

    def kill(self):
        os.kill(self.pid, signal.SIGKILL)


def _descendantsFromPs(pid):
    """Without psutil (POSIX): the parent links `ps` lists; Windows' taskkill /T walks the tree itself."""
    if os.name == "nt":
        return []
    try:
        listing = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, timeout=10).stdout.decode("ascii", "replace")
    except (OSError, subprocess.SubprocessError):
        return []
    children = {}
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(fields[0]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return [_Pid(p) for p in found]


def killTree(pid):
    """SIGKILL the process group led by pid (POSIX) / taskkill /T (Windows), plus any descendant
    psutil can see (one that left the group)."""
    children = _descendants(pid)
    if os.name == "nt":
        try:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
                           timeout=30)
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    for child in children:
        try:
            child.kill()
        except Exception:
            pass


def _quote(text):
    if not text or any(c in text for c in " \t\"'"):
        return '"' + text.replace('"', '\\"') + '"'
    return text

