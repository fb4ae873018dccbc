"""Progress reporting: a JSON-lines stream for programs (the Slicer module), readable lines for people.

With `--progress jsonl`, stdout carries one JSON object per line and nothing else; every stream ends
with a `done` or an `error` event. Human-readable logs always go to stderr.
"""

import json
import math
import sys
import time


def _clean(value):
    """JSON has no NaN/inf: send them as null so every line parses everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class Reporter:
    """Base reporter: `emit(event, **fields)` for machine events, `log(text)` for people."""

    def __init__(self, stream=None, log_stream=None):
        self.stream = stream if stream is not None else sys.stdout
        self.log_stream = log_stream if log_stream is not None else sys.stderr
        self.started = time.time()

    def emit(self, event: str, **fields):
        raise NotImplementedError

    def log(self, text: str):
        print(text, file=self.log_stream, flush=True)


class JsonlReporter(Reporter):
    def emit(self, event: str, **fields):
        record = {"event": event, "time": round(time.time() - self.started, 3)}
        record.update(_clean(fields))
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()


class HumanReporter(Reporter):
    """One readable line per event on stderr (training epochs, validation, checkpoints, cases)."""

    def emit(self, event: str, **fields):
        if event == "epoch":
            eta = fields.get("eta_s")
            self.log(
                f"[stage {fields.get('stage')}] epoch {fields.get('epoch')}/{fields.get('epochs')} "
                f"loss {fields.get('loss', float('nan')):.4f} lr {fields.get('lr', 0):.2e} "
                f"{fields.get('images_per_s', 0):.1f} img/s"
                + (f" ETA {format_seconds(eta)}" if eta is not None else "")
            )
        elif event == "validation":
            self.log(
                f"[stage {fields.get('stage')}] validation mean Dice {fields.get('mean_dice', float('nan')):.3f} "
                f"({fields.get('model')}/{fields.get('head')})"
            )
        elif event == "error":
            self.log(f"error: {fields.get('message')}")
        elif event in ("start", "done", "case", "case_failed", "checkpoint", "stage"):
            details = ", ".join(f"{k}={v}" for k, v in fields.items() if not isinstance(v, (dict, list)))
            self.log(f"{event}: {details}")


class SilentReporter(Reporter):
    def emit(self, event: str, **fields):
        pass

    def log(self, text: str):
        pass


def make_reporter(kind: str = "human") -> Reporter:
    if kind == "jsonl":
        return JsonlReporter()
    if kind == "none":
        return SilentReporter()
    return HumanReporter()


def format_seconds(seconds) -> str:
    seconds = int(max(0, seconds or 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class TeeReporter(Reporter):
    """Sends every event and log line to several reporters (the screen and the run's own files)."""

    def __init__(self, *reporters):
        super().__init__()
        self.reporters = reporters

    def emit(self, event: str, **fields):
        for r in self.reporters:
            r.emit(event, **fields)

    def log(self, text: str):
        for r in self.reporters:
            r.log(text)


class _LogFile:
    """An appended log file that never ends a run: on a write error (a full disk) it says so once on
    stderr and stops writing, so the error that matters (the checkpoint's) is the one reported."""

    def __init__(self, path):
        self.path = path
        self.handle = open(path, "a", encoding="utf-8")
        self.broken = False

    def _guard(self, action, *args):
        if self.broken:
            return
        try:
            action(*args)
        except OSError as exc:
            self.broken = True
            print(f"warning: {self.path}: cannot be written ({exc.strerror}); the run goes on without it",
                  file=sys.stderr, flush=True)

    def write(self, text):
        self._guard(self.handle.write, text)

    def flush(self):
        self._guard(self.handle.flush)


def file_reporter(jsonl_path, log_path) -> Reporter:
    """A JSON-lines event file plus a human log file, both appended (a resumed run keeps its history)."""
    return JsonlReporter(_LogFile(jsonl_path), _LogFile(log_path))
