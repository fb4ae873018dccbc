"""The numbers of benchmarks/gpu_check.sh: its accuracy plan, and its report.

    python benchmarks/gpu_check_report.py plan --speed OUT/speed.json --seconds 270
        prints "EPOCHS ITERATIONS": the paper-preset schedule LTUDA (the slower of the two methods) trains
        in about that many seconds while labelled-only shares the GPU, from the measured step speed.
    python benchmarks/gpu_check_report.py summarise --out OUT --steps WORK/steps.tsv ...
        writes OUT/gpu_check.json and gpu_check.md from speed.json, accuracy.json, ddp_smoke.jsonl and the
        steps' outcomes, with the issue's targets (stage-2 training >= 5x the reference-style step, a
        512x512x200 volume predicted in under 3 s).
"""

import argparse
import json
import math
from pathlib import Path

EPOCHS = 4  # per stage; each epoch ends in a validation, so a few epochs keep that overhead small
PAPER_BATCH = 4
TRAINING_SHARE = 0.6  # of the budget: the rest goes to preprocessing, validations and scoring the test cases
TARGET_SPEEDUP, TARGET_PREDICT_S = 5.0, 3.0


def plan(speed_path: Path, seconds: float) -> tuple:
    """(epochs per stage, iterations per epoch) for LTUDA's two stages in `seconds`, both methods sharing the GPU."""
    try:
        speed = json.loads(speed_path.read_text())
        rates = [speed[f"train_img_s_ours_paper_stage{s}_gpu"] / PAPER_BATCH for s in (1, 2)]  # steps per second
    except (OSError, ValueError, KeyError):
        return EPOCHS, 50  # no measurement: a schedule that fits on any H100/H200
    shared = [r / 2 for r in rates]  # two processes on one GPU
    per_iteration = sum(1 / r for r in shared)  # one iteration of each stage
    iterations = int(TRAINING_SHARE * seconds / (EPOCHS * per_iteration))
    return EPOCHS, max(5, min(iterations, 5000))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _steps(path: Path) -> list:
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, code, seconds, limit = line.split("\t")
        rows.append({"step": name, "exit": code if code == "skipped" else int(code), "seconds": int(seconds),
                     "limit_s": int(limit)})
    return rows


def _ddp(path: Path) -> dict:
    events = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    start = next((e for e in events if e.get("event") == "start"), {})
    last = events[-1] if events else {}
    epochs = [e for e in events if e.get("event") == "epoch"]
    return {"processes": start.get("processes"), "device": start.get("device_name"),
            "final_event": last.get("event"), "status": last.get("status") or last.get("message"),
            "images_per_s": [round(e["images_per_s"], 1) for e in epochs if e.get("images_per_s") is not None]}


def summarise(out: Path, steps: Path, ddp_backend: str, seconds: float, command: str, dry_run: bool) -> dict:
    suffix = "cpu" if dry_run else "gpu"
    speed = _read_json(out / "speed.json")
    accuracy = _read_json(out / "accuracy.json").get("protocols", {}).get("toy", {})
    methods = accuracy.get("methods", {})
    figures = {k: v for k, v in speed.items() if k.endswith(suffix) or f"_{suffix}_" in k}
    report = {
        "command": command, "dry_run": dry_run, "seconds": seconds, "gpu": speed.get("gpu_name"),
        "torch": speed.get("machine", {}).get("torch"), "steps": _steps(steps),
        "speed": figures,
        "accuracy": {k: {"mean_dice": m.get("mean_dice"), "iterations": m.get("iterations"),
                         "train_seconds": m.get("train_seconds")} for k, m in methods.items()},
        "accuracy_settings": accuracy.get("settings"), "accuracy_preset": accuracy.get("preset"),
        "ddp_smoke": {"backend": ddp_backend, **_ddp(out / "ddp_smoke.jsonl")},
    }
    checks = {}
    for preset in ("fast", "paper"):
        speedup = speed.get(f"train_speedup_{preset}_stage2_{suffix}")
        if speedup is not None:
            checks[f"stage-2 training ({preset}) >= {TARGET_SPEEDUP:g}x the reference-style step"] = \
                {"value": speedup, "met": speedup >= TARGET_SPEEDUP}
        predict = speed.get(f"infer_s_512x512x200_{suffix}_{preset}")
        if predict is not None:
            checks[f"predict 512x512x200 ({preset}) < {TARGET_PREDICT_S:g} s"] = \
                {"value": predict, "met": predict < TARGET_PREDICT_S}
    report["targets"] = checks if not dry_run else {}  # a CPU rehearsal measures nothing the targets are about
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    return report


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    lines = ["# GPU check" + (" (dry run: a CPU rehearsal, no GPU figures)" if report["dry_run"] else ""), "",
             f"Command: `{report['command']}`  ", f"GPU: {report['gpu'] or 'none'}  ", f"torch: {report['torch']}  ",
             f"Duration: {report['seconds']} s", "", "| step | exit | seconds | limit |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['exit']} | {s['seconds']} | {s['limit_s']} |" for s in report["steps"]]
    if report["targets"]:
        lines += ["", "| target | value | met |", "|---|---|---|"]
        lines += [f"| {name} | {_fmt(t['value'])} | {'yes' if t['met'] else 'NO'} |" for name, t in report["targets"].items()]
    lines += ["", "## Speed", "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(report["speed"].items())]
    lines += ["", f"## Accuracy (toy protocol, {report['accuracy_preset']} preset, {report['accuracy_settings']})", "",
              "| method | mean Dice | iterations | training s |", "|---|---|---|---|"]
    lines += [f"| {k} | {_fmt(m['mean_dice'])} | {m['iterations']} | {m['train_seconds']} |"
              for k, m in report["accuracy"].items()]
    ddp = report["ddp_smoke"]
    lines += ["", "## DDP smoke run", "",
              f"{ddp['processes']} processes, backend {ddp['backend']}, {ddp['device']}: final event "
              f"`{ddp['final_event']}` ({ddp['status']}), images/s per epoch {ddp['images_per_s']}", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan")
    p.add_argument("--speed", type=Path, required=True)
    p.add_argument("--seconds", type=float, required=True)
    s = sub.add_parser("summarise")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--steps", type=Path, required=True)
    s.add_argument("--ddp-backend", required=True)
    s.add_argument("--seconds", type=float, required=True)
    s.add_argument("--command", required=True)
    s.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "plan":
        print(*plan(args.speed, args.seconds))
    else:
        report = summarise(args.out, args.steps, args.ddp_backend, args.seconds, args.command, args.dry_run)
        failed = [s["step"] for s in report["steps"] if s["exit"] not in (0, "skipped")]
        print(json.dumps({"failed_steps": failed, "targets": report["targets"]}, indent=2))


if __name__ == "__main__":
    main()
