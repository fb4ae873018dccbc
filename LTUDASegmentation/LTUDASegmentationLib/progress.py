"""Reader of the backend's progress stream (`--progress jsonl`): one JSON object per stdout line.

Training events: start, stage, epoch, validation, checkpoint, done | error.
Prediction events: start, progress, case, case_failed, done | error (also `ltuda suggest`'s stream).
Unknown events and fields are kept but ignored, so a newer backend does not break the panel.
"""

import json

CASE_COMMANDS = ("predict", "suggest")  # commands that go case by case (progress fraction, case events)


def formatSeconds(seconds):
    if seconds is None:
        return ""
    seconds = int(max(0, round(float(seconds))))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def parseLine(line):
    """The event dict of a stream line, or None for a line that is not a JSON object with 'event'."""
    text = (line or "").strip()
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        return None
    return event


class ProgressState:
    """Everything the panel shows about a run, updated event by event."""

    def __init__(self):
        self.command = None
        self.device = None
        self.deviceName = None
        self.processes = None  # training ranks under torchrun (the start event says when more than one)
        self.stages = []
        self.epochs = {}  # stage -> epoch count
        self.stage = None
        self.stageName = ""
        self.epoch = None
        self.epochsInStage = None
        self.loss = None
        self.learningRate = None
        self.imagesPerSecond = None
        self.etaSeconds = None
        self.meanDice = None
        self.perOrgan = {}
        self.lossHistory = []  # [(global epoch, loss)]
        self.diceHistory = []  # [(global epoch, mean Dice)]
        self.checkpoints = {}  # kind -> path
        self.predictFraction = None
        self.predictStage = ""
        self.cases = None
        self.casesDone = 0
        self.caseFailures = []  # [{"input", "message"}]
        self.outputs = []
        self.done = None  # the done event
        self.error = None  # message of the error event
        self.errorLog = None
        self.events = 0
        self.otherLines = []  # stdout lines that were not events (kept for the log)

    # -- feeding ------------------------------------------------------------------------------
    def feed(self, line):
        """Update from one stdout line; returns the event dict (None for a non-event line)."""
        event = parseLine(line)
        if event is None:
            if line and line.strip():
                self.otherLines.append(line)
                del self.otherLines[:-50]
            return None
        self.events += 1
        handler = getattr(self, "_on_" + event["event"], None)
        if handler is not None:
            handler(event)
        return event

    def _on_start(self, e):
        self.command = e.get("command")
        self.device = e.get("device")
        self.deviceName = e.get("device_name")
        self.processes = _int(e.get("processes"))
        self.stages = [int(s) for s in e.get("stages") or []]
        self.epochs = {int(k): int(v) for k, v in (e.get("epochs") or {}).items()}
        if e.get("command") in CASE_COMMANDS:
            self.cases = e.get("cases")
            self.predictFraction = 0.0

    def _on_stage(self, e):
        self.stage = _int(e.get("stage"))
        self.stageName = str(e.get("name") or "")
        self.epoch = None
        self.epochsInStage = self.epochs.get(self.stage)

    def _on_epoch(self, e):
        self.stage = _int(e.get("stage"), self.stage)
        self.epoch = _int(e.get("epoch"))
        self.epochsInStage = _int(e.get("epochs"), self.epochsInStage)
        if self.stage is not None and self.epochsInStage is not None:
            self.epochs.setdefault(self.stage, self.epochsInStage)
        self.loss = _float(e.get("loss"))
        self.learningRate = _float(e.get("lr"))
        self.imagesPerSecond = _float(e.get("images_per_s"))
        self.etaSeconds = _float(e.get("eta_s"))
        if self.loss is not None:
            self.lossHistory.append((self.globalEpoch(), self.loss))

    def _on_validation(self, e):
        self.meanDice = _float(e.get("mean_dice"))
        self.perOrgan = dict(e.get("per_organ") or {})
        if self.meanDice is not None:
            epoch = _int(e.get("epoch"), self.epoch)
            self.diceHistory.append((self.globalEpoch(_int(e.get("stage"), self.stage), epoch), self.meanDice))

    def _on_checkpoint(self, e):
        self.checkpoints[str(e.get("kind"))] = e.get("path")

    def _on_progress(self, e):
        self.predictFraction = _float(e.get("fraction"), self.predictFraction)
        self.predictStage = str(e.get("stage") or "")

    def _on_case(self, e):
        self.casesDone = _int(e.get("index"), self.casesDone + 1)
        self.cases = _int(e.get("cases"), self.cases)
        if e.get("output"):
            self.outputs.append(e.get("output"))

    def _on_case_failed(self, e):
        self.caseFailures.append({"input": e.get("input"), "message": e.get("message")})

    def _on_done(self, e):
        self.done = e
        if e.get("mean_dice") is not None:
            self.meanDice = _float(e.get("mean_dice"), self.meanDice)
        if self.command in CASE_COMMANDS:
            self.predictFraction = 1.0

    def _on_error(self, e):
        self.error = str(e.get("message") or "the backend reported an error")
        self.errorLog = e.get("log")

    # -- derived ------------------------------------------------------------------------------
    def globalEpoch(self, stage=None, epoch=None):
        """Epoch counted over all stages (x axis of the plot)."""
        stage = self.stage if stage is None else stage
        epoch = self.epoch if epoch is None else epoch
        before = sum(n for s, n in self.epochs.items() if stage is not None and s < stage)
        return before + (epoch or 0)

    def totalEpochs(self):
        return sum(self.epochs.values())

    def fraction(self):
        """0..1 progress of the whole run, or None when unknown."""
        if self.command in CASE_COMMANDS or (self.command is None and self.predictFraction is not None):
            return self.predictFraction
        total = self.totalEpochs()
        if not total:
            return None
        if self.done is not None:
            return 1.0
        return min(1.0, self.globalEpoch() / float(total))

    def statusText(self):
        """One line for the panel, e.g. 'Stage 1 (CDA): epoch 3/10 | loss 0.412 | Dice 0.81 | 35 img/s | 2m10s left'."""
        if self.error:
            return "Error: " + self.error
        if self.command in CASE_COMMANDS:
            text = "Segmenting" if self.command == "predict" else "Proposing missing organs"
            if self.predictStage:
                text += f" ({self.predictStage})"
            if self.predictFraction is not None:
                text += f": {int(round(100 * self.predictFraction))}%"
            return text
        if self.command is None:
            return "Starting..."
        parts = []
        if self.stage is not None:
            head = f"Stage {self.stage}" + (f" ({self.stageName})" if self.stageName else "")
            if self.epoch is not None:
                head += f": epoch {self.epoch}/{self.epochsInStage or '?'}"
            parts.append(head)
        else:
            parts.append("Preparing data" + (f" on {self.deviceName or self.device}" if self.device else "") +
                         (f" ({self.processes} processes)" if (self.processes or 1) > 1 else ""))
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.meanDice is not None:
            parts.append(f"Dice {self.meanDice:.3f}")
        if self.imagesPerSecond:  # under torchrun: all ranks together
            parts.append(f"{self.imagesPerSecond:.1f} img/s" +
                         (f" ({self.processes} processes)" if (self.processes or 1) > 1 else ""))
        if self.etaSeconds is not None and self.done is None:
            parts.append(f"{formatSeconds(self.etaSeconds)} left")
        return " | ".join(parts)


def _int(value, default=None):
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _float(value, default=None):
    try:
        return float(value)
    except (TypeError, ValueError):
        return default
