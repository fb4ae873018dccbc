"""Fault-injection suite (issue 14): kill -9 at random moments, a second training into a folder in use, full and
read-only disks at every write site, fuzzed inputs, and predict's peak memory on a 512x512x1500 CT.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/faults.py [--seed 0] [--kill-trials 20] [--fuzz-inputs 600]
        [--out benchmarks/results] [--work DIR] [--skip-memory]

Everything runs the real `ltuda` command in subprocesses (argument lists) on tiny phantom trainings, with a
fixed random seed. Full disks are real small tmpfs mounts (root), read-only ones are tmpfs remounted read-only;
without root the disk sections are reported as not run. Writes faults.json (the shape of issue 14, plus
details) and faults.md.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TINY = ["--preset", "fast", "--method", "ltuda", "--epochs-stage1", "2", "--epochs-stage2", "2",
        "--iterations-per-epoch", "2", "--image-size", "32", "--batch-size", "2", "--val-fraction", "0.5"]


def ltuda(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "ltuda", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def clear_error(result) -> bool:
    """Exit 1, an `error:` line of ours, no traceback, not the internal-fault message."""
    text = result.stderr + result.stdout
    return (result.returncode == 1 and "Traceback" not in text and "error: unexpected" not in text
            and any(line.startswith("error: ") for line in result.stderr.splitlines()))


def _events(text):
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


# ----- kill -9 -----

class Training:
    """A `ltuda train --progress jsonl` subprocess whose events are collected as they come."""

    def __init__(self, args, cwd=None):
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "ltuda", "train", *map(str, args), "--progress", "jsonl"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
        self.events, self.stderr = [], []
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, is_events):
        for line in stream:
            if is_events:
                self.events.extend(_events(line))
            else:
                self.stderr.append(line)

    def wait(self, timeout=600):
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return code


def _temporaries(out: Path):
    """Temporary files of checkpoint and model writes being written now. The run's settings, saved once
    before the first step, are not a checkpoint write: a "during a write" trial waits for a real one."""
    found = []
    first_checkpoint_done = (out / "checkpoints" / "last.pt").exists()
    for folder in (out, out / "checkpoints"):
        try:
            found += [e.name for e in os.scandir(folder)
                      if ".tmp" in e.name and (first_checkpoint_done or not e.name.startswith("config.json"))]
        except OSError:
            pass
    return found


def _iterations_done(events, per_epoch, total):
    epochs = [e for e in events if e.get("event") == "epoch"]
    return int(round(epochs[-1]["progress"] * total)) if epochs else 0


def _checkpoint_iterations(path: Path, epochs_per_stage, per_epoch):
    from ltuda.model.store import safe_torch_load
    state = safe_torch_load(path)
    stage, epoch, iteration = int(state["stage_index"]), int(state["epoch"]), int(state["iteration"])
    return sum(epochs_per_stage[:stage]) * per_epoch + epoch * per_epoch + iteration


def kill9_trials(dataset: Path, test_image: Path, work: Path, trials: int, rng: random.Random, log):
    per_epoch, epochs_per_stage = 2, [2, 2]
    total = sum(epochs_per_stage) * per_epoch
    # Calibration: how long a whole tiny training takes here.
    calibration = Training(["--dataset", dataset, "--out", work / "calibration", *TINY])
    assert calibration.wait() == 0, "".join(calibration.stderr)
    duration = time.time() - calibration.started
    rows = []
    for trial in range(trials):
        out = work / f"kill{trial:02d}"
        shutil.rmtree(out, ignore_errors=True)
        at_write = trial % 3 == 2  # every third trial: killed the moment a checkpoint/model file is being written
        delay = rng.uniform(0.3, duration * 0.95)
        run = Training(["--dataset", dataset, "--out", out, *TINY])
        seen_write, deadline = None, time.time() + (duration * 1.5 if at_write else delay)
        while time.time() < deadline and run.proc.poll() is None:
            if at_write:
                if time.time() - run.started > delay * 0.3:
                    temporaries = _temporaries(out)
                    if temporaries:
                        seen_write = temporaries
                        break
                time.sleep(0.0005)
            else:
                time.sleep(0.01)
        finished_first = run.proc.poll() is not None
        if not finished_first:
            run.proc.kill()
        run.wait()
        row = {"trial": trial, "mode": "during a write" if at_write else "random moment",
               "killed_at_s": round(time.time() - run.started, 2), "during_write": seen_write,
               "finished_before_kill": finished_first}
        events = list(run.events)
        row["after_first_validation"] = any(e.get("event") == "checkpoint" and e.get("kind") == "best" for e in events)
        predict = ltuda("predict", "--model", out, "--input", test_image, "--output", out.parent / f"p{trial}.seg.nrrd",
                        "--overwrite", "--device", "cpu")
        row["predict_after_kill"] = "ok" if predict.returncode == 0 else (
            "clear error" if clear_error(predict) else "FAILED")
        row["predict_message"] = predict.stderr.strip().splitlines()[-1][:300] if predict.returncode else ""
        last = out / "checkpoints" / "last.pt"
        if last.exists():
            restored = _checkpoint_iterations(last, epochs_per_stage, per_epoch)
            row["lost_iterations"] = max(0, _iterations_done(events, per_epoch, total) - restored)
            resume = Training(["--dataset", dataset, "--out", out, *TINY, "--resume"])
            row["resume_exit"] = resume.wait()
            row["resumed"] = row["resume_exit"] == 0 and ltuda("predict", "--model", out, "--input", test_image,
                                                               "--output", out.parent / f"r{trial}.seg.nrrd",
                                                               "--overwrite", "--device", "cpu").returncode == 0
            row["lock_taken_over"] = any("lock" in line.lower() for line in resume.stderr)
        elif (out / "checkpoints" / "config.json").exists():
            # killed before the first checkpoint but after the settings were saved: --resume starts it again
            resume = ltuda("train", "--dataset", dataset, "--out", out, "--resume", "--progress", "none")
            row["resume_exit"] = resume.returncode
            row["lost_iterations"] = _iterations_done(events, per_epoch, total)
            row["resumed"] = resume.returncode == 0 and ltuda("predict", "--model", out, "--input", test_image,
                                                              "--output", out.parent / f"r{trial}.seg.nrrd",
                                                              "--overwrite", "--device", "cpu").returncode == 0
            row["restarted_by_resume"] = True
        else:  # killed before even the settings were saved: --resume must say so, and a fresh start must work
            refused = ltuda("train", "--dataset", dataset, "--out", out, *TINY, "--resume")
            fresh = ltuda("train", "--dataset", dataset, "--out", out, *TINY, "--overwrite", "--progress", "none")
            row["lost_iterations"] = _iterations_done(events, per_epoch, total)
            row["resumed"] = clear_error(refused) and fresh.returncode == 0
            row["restarted_fresh"] = True
        rows.append(row)
        log(f"kill -9 trial {trial}: {row['mode']} at {row['killed_at_s']} s "
            f"({'write ' + str(seen_write) if seen_write else 'no write seen' if at_write else ''}); "
            f"predict after kill: {row['predict_after_kill']}; resumed: {row['resumed']}; lost {row['lost_iterations']}")
        shutil.rmtree(out, ignore_errors=True)
    after = [r for r in rows if r["after_first_validation"]]
    return {
        "trials": len(rows),
        "resumed": sum(r["resumed"] for r in rows),
        "usable_after_kill": sum(r["predict_after_kill"] == "ok" for r in after),
        "after_first_validation": len(after),
        "before_first_validation_clear_message": sum(r["predict_after_kill"] == "clear error"
                                                     for r in rows if not r["after_first_validation"]),
        "killed_during_a_write": sum(bool(r["during_write"]) for r in rows),
        "restarted_by_resume_no_checkpoint_yet": sum(bool(r.get("restarted_by_resume")) for r in rows),
        "restarted_fresh_no_settings_yet": sum(bool(r.get("restarted_fresh")) for r in rows),
        "max_lost_iterations": max((r["lost_iterations"] for r in rows), default=0),
        "iterations_per_training": total,
        "training_seconds": round(duration, 1),
        "details": rows,
    }


# ----- a second training into a folder in use -----

def concurrent_train(dataset: Path, work: Path, log):
    out = work / "busy"
    shutil.rmtree(out, ignore_errors=True)
    first = Training(["--dataset", dataset, "--out", out, "--preset", "fast", "--method", "labeled-only",
                      "--epochs-stage1", "2000", "--iterations-per-epoch", "2", "--image-size", "32", "--batch-size", "2"])
    deadline = time.time() + 300
    while not any(e.get("event") == "epoch" for e in first.events) and time.time() < deadline:
        time.sleep(0.1)
    attempts = []
    for extra in ([], ["--overwrite"], ["--resume"]):
        second = ltuda("train", "--dataset", dataset, "--out", out, *TINY, *extra)
        attempts.append({"flags": extra, "exit": second.returncode, "clear": clear_error(second),
                         "in_use_message": f"is in use by PID {first.proc.pid}" in second.stderr,
                         "message": second.stderr.strip().splitlines()[-1][:300] if second.stderr.strip() else ""})
    still_running = first.proc.poll() is None
    (out / "STOP").write_text("")
    code = first.wait(300)
    history = _events((out / "progress.jsonl").read_text()) if (out / "progress.jsonl").exists() else []
    unharmed = still_running and code == 130 and [e["event"] for e in history].count("start") == 1
    log(f"concurrent train: {sum(a['clear'] and a['in_use_message'] for a in attempts)}/3 refused; first unharmed: {unharmed}")
    shutil.rmtree(out, ignore_errors=True)
    return {"attempts": len(attempts), "refused": sum(a["clear"] and a["in_use_message"] for a in attempts),
            "first_run_unharmed": unharmed, "details": attempts}


# ----- full and read-only disks -----

class Disks:
    def __init__(self, root: Path):
        self.root, self.mounts = root, []

    def make(self, kib: int, fill: bool = True) -> Path:
        target = self.root / f"disk{len(self.mounts)}"
        target.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={max(64, kib)}k", "tmpfs", str(target)], check=True,
                       capture_output=True)
        self.mounts.append(target)
        return target

    @staticmethod
    def fill(target: Path, leave: int = 0):
        """Fill the disk, leaving about `leave` bytes free."""
        free = shutil.disk_usage(str(target)).free
        with open(target / "filler", "wb") as f:
            try:
                f.write(b"\0" * max(0, free - leave))
            except OSError:
                pass

    @staticmethod
    def read_only(target: Path):
        subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True, capture_output=True)

    def close(self):
        for target in self.mounts:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "filler"}


def disk_sites(dataset: Path, model: Path, test_image: Path, work: Path, log):
    if os.geteuid() != 0:
        return {"sites": 0, "clear": 0, "intact": 0, "note": "not root: no tmpfs mounts here"}
    disks = Disks(work / "mounts")
    rows = []

    def site(name, run, disk, check_intact=None, needs_full=True):
        before = _snapshot(disk)
        result = run(disk)
        after = _snapshot(disk)
        leftovers = [k for k in after if ".tmp" in k]
        kept = all(after.get(k) == v for k, v in before.items())
        intact = kept and not leftovers and (check_intact(disk) if check_intact else True)
        words = ("the disk is full" if needs_full else "read-only") in result.stderr
        row = {"site": name, "exit": result.returncode, "clear": clear_error(result) and words, "intact": intact,
               "leftovers": leftovers, "message": result.stderr.strip().splitlines()[-1][:300] if result.stderr else ""}
        rows.append(row)
        log(f"disk site {name}: clear {row['clear']}, intact {row['intact']}: {row['message'][:160]}")

    try:
        out_ok = work / "predict_ok"
        out_ok.mkdir(exist_ok=True)
        cache_env = dict(os.environ)
        # 1. the slice cache
        disk = disks.make(256)
        Disks.fill(disk)
        cache_env["LTUDA_CACHE_DIR"] = str(disk / "cache")
        site("slice cache (full)", lambda d: ltuda("train", "--dataset", dataset, "--out", work / "m_cache", *TINY,
                                                 "--overwrite", env=cache_env), disk)
        # 2. checkpoints and the model during a real training: room for the first checkpoint and model only
        sizes = {n: (model / n).stat().st_size for n in ("model.pt", "checkpoints/last.pt")}
        kib = (sizes["model.pt"] * 2 + sizes["checkpoints/last.pt"] + 256 * 1024) // 1024
        disk = disks.make(kib)

        def model_loads(d):
            from ltuda.model.store import load_model, safe_torch_load
            try:
                safe_torch_load(d / "m" / "checkpoints" / "last.pt")
                if (d / "m" / "model.json").exists():
                    load_model(d / "m")
                return True
            except Exception:  # noqa: BLE001
                return False
        site("training checkpoint / model (full)",
             lambda d: ltuda("train", "--dataset", dataset, "--out", d / "m", "--preset", "fast", "--method",
                             "labeled-only", "--epochs-stage1", "6", "--iterations-per-epoch", "2", "--image-size",
                             "32", "--batch-size", "2", "--val-fraction", "0.5"), disk, model_loads)
        # 3. model.json and model.pt writers, over an existing model
        for what, code in (("model description model.json", "store.atomic_write_json({'x': 'y' * 2**20}, d / 'model.json')"),
                           ("model weights model.pt", "store.atomic_torch_save({'w': torch.ones(2**18)}, d / 'model.pt')")):
            for mode in ("full", "read-only"):
                disk = disks.make(512 if mode == "full" else 4096)  # read-only: room enough that only that matters
                subprocess.run([sys.executable, "-c", "import sys, torch; from pathlib import Path; "
                                "from ltuda.model import store; d = Path(sys.argv[1]); "
                                "store.atomic_write_json({'old': 1}, d / 'model.json'); "
                                "store.atomic_torch_save({'w': torch.zeros(4)}, d / 'model.pt')", str(disk)], check=True)
                Disks.fill(disk) if mode == "full" else Disks.read_only(disk)
                script = ("import sys, torch; from pathlib import Path; from ltuda.model import store; "
                          "from ltuda.errors import LtudaError\nd = Path(sys.argv[1])\ntry:\n    " + code +
                          "\nexcept LtudaError as e:\n    print('error:', e, file=sys.stderr); sys.exit(1)")
                site(f"{what} ({mode})", lambda d, s=script: subprocess.run([sys.executable, "-c", s, str(d)],
                                                                            capture_output=True, text=True),
                     disk, needs_full=mode == "full")
        # 4. predictions, label maps, evaluation reports, phantoms: full and read-only
        for mode in ("full", "read-only"):
            disk = disks.make(2048)
            first = ltuda("predict", "--model", model, "--input", test_image, "--output", disk / "case.seg.nrrd",
                          "--label-map", disk / "case_labels.nrrd", "--device", "cpu")
            assert first.returncode == 0, first.stderr
            Disks.fill(disk) if mode == "full" else Disks.read_only(disk)
            site(f"prediction .seg.nrrd ({mode})",
                 lambda d: ltuda("predict", "--model", model, "--input", test_image, "--output", d / "case.seg.nrrd",
                                 "--overwrite", "--device", "cpu"), disk, needs_full=mode == "full")
            site(f"label map ({mode})",
                 lambda d: ltuda("predict", "--model", model, "--input", test_image, "--output",
                                 out_ok / f"x_{mode}.seg.nrrd", "--overwrite", "--label-map", d / "case_labels.nrrd",
                                 "--device", "cpu"), disk, needs_full=mode == "full")
            site(f"evaluation report ({mode})",
                 lambda d: ltuda("evaluate", "--pred", d / "case.seg.nrrd", "--truth", d / "case.seg.nrrd",
                                 "--out", d / "report"), disk, needs_full=mode == "full")
            site(f"phantoms ({mode})", lambda d: ltuda("phantoms", "--out", d / "ph", "--cases-per-site", "1",
                                                       "--test-cases", "1", "--size", "48"),
                 disk, needs_full=mode == "full")
    finally:
        disks.close()
    return {"sites": len(rows), "clear": sum(r["clear"] for r in rows), "intact": sum(r["intact"] for r in rows),
            "details": rows}


# ----- the report -----

def write_markdown(results, path: Path):
    k, c, d, f = results["kill9"], results["concurrent_train"], results["disk_full"], results["fuzz"]
    lines = ["# Fault-injection suite (issue 14)", "",
             f"Command: `{results['command']}`  ", f"Machine: {results['machine']}; {results['seconds']:.0f} s in all.", "",
             "## kill -9 during tiny trainings", "",
             *([f"Measured again by `{results['kill9_command']}`.", ""] if results.get("kill9_command") else []),
             f"- trials: {k['trials']} ({k['killed_during_a_write']} killed while a checkpoint/model file was being "
             f"written, the others at a random moment); each training is {k['iterations_per_training']} iterations, "
             f"{k['training_seconds']} s here",
             f"- resumed to the end: {k['resumed']} / {k['trials']} "
             f"({k.get('restarted_by_resume_no_checkpoint_yet', 0)} killed before the first checkpoint: `--resume` "
             "started them again with their saved settings; "
             f"{k.get('restarted_fresh_no_settings_yet', k.get('restarted_fresh_no_checkpoint_yet', 0))} killed "
             "before even the settings were saved: `--resume` said so, a fresh start finished)",
             f"- able to segment right after the kill: {k['usable_after_kill']} / {k['after_first_validation']} "
             "killed after the first validation; before it, `predict` gave a clear message in "
             f"{k['before_first_validation_clear_message']} / {k['trials'] - k['after_first_validation']}",
             f"- most iterations lost to a kill: {k['max_lost_iterations']}", "",
             "## A second training into a folder in use", "",
             f"- refused (exit 1, \"in use by PID ... on HOST since ...\"): {c['refused']} / {c['attempts']} "
             "(plain, `--overwrite`, `--resume`); the first run went on untouched and stopped cleanly: "
             f"{c['first_run_unharmed']}", "",
             "## Full and read-only disks (real tmpfs mounts)", "",
             "| site | clear message | nothing half-written, earlier files intact |", "|---|---|---|"]
    lines += [f"| {r['site']} | {'yes' if r['clear'] else 'NO'} | {'yes' if r['intact'] else 'NO'} |"
              for r in d.get("details", [])]
    lines += ["", f"{d['clear']} / {d['sites']} clear, {d['intact']} / {d['sites']} intact.", "",
              "## Fuzzing", "",
              f"{f['inputs']} mutated inputs, each through the real command in a long-lived worker "
              f"({f['seconds']:.0f} s): {f['clear_errors']} clear errors, {f['correct']} correct results, "
              f"{f['tracebacks']} tracebacks, {f['crashes']} crashes, {f['hangs']} hangs "
              f"(also {f['unclear']} unclear endings, {f['wrong_results']} wrong results, "
              f"{f['inputs_modified']} modified inputs).", "",
              "| input | inputs | clear errors | correct | failures |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {kind} | {v['inputs']} | {v['clear_errors']} | {v['correct']} | {v['failures']} |"
              for kind, v in sorted(results["fuzz_per_kind"].items())]
    peak = results["predict_peak_gib"].get("512x512x1500")
    lines += ["", "## Prediction memory", "",
              f"Peak resident memory of `ltuda predict` on a 512x512x1500 int16 CT (CPU, tiny network): "
              f"{peak} GiB (target: under 4 GiB). See predict_memory.md for the growth with size.", ""]
    if results.get("predict_peak_command"):
        lines += [f"Measured by `{results['predict_peak_command']}` (after the run above: its first measurement was "
                  "taken from the suite's own process, whose memory high-water mark Linux passes on to a child).", ""]
    path.write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-trials", type=int, default=20)
    parser.add_argument("--fuzz-inputs", type=int, default=600)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--work", default=None)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--only-memory", action="store_true",
                        help="measure predict's peak again and update that entry of an existing faults.json")
    parser.add_argument("--only-kill", action="store_true",
                        help="run the kill -9 trials again and update that entry of an existing faults.json")
    args = parser.parse_args()
    from ltuda.data.phantoms import generate_phantoms
    from ltuda.manifest import load_manifest
    import fuzz
    import predict_memory

    def log(message):
        print(message, file=sys.stderr, flush=True)

    if args.only_memory:
        out = Path(args.out)
        results = json.loads((out / "faults.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            source = predict_memory.ct_like_volume(Path(tmp) / "ct1500.nrrd", 1500)
            seconds, peak, code, last = predict_memory.measure(
                predict_memory.untrained_model(Path(tmp) / "fast", "fast"), source, Path(tmp) / "ct1500.seg.nrrd")
        results["predict_peak_gib"] = {"512x512x1500": round(peak, 3) if code == 0 else f"failed: {last}"}
        results["predict_peak_command"] = "OMP_NUM_THREADS=1 nice -n 10 python benchmarks/faults.py --only-memory"
        log(f"predict 512x512x1500: peak {peak:.2f} GiB, {seconds:.0f} s, exit {code}")
        (out / "faults.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        write_markdown(results, out / "faults.md")
        return
    started, rng = time.time(), random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="ltuda-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LTUDA_CACHE_DIR", str(work / "cache"))
    dataset = generate_phantoms(work / "phantoms", cases_per_site=2, test_cases=1, shape=(48, 48), seed=args.seed)
    test_image = next(c.image for c in load_manifest(dataset).cases if c.split == "test")
    if args.only_kill:
        out = Path(args.out)
        results = json.loads((out / "faults.json").read_text())
        results["kill9"] = kill9_trials(dataset, test_image, work, args.kill_trials, rng, log)
        results["kill9_command"] = "OMP_NUM_THREADS=1 nice -n 10 python benchmarks/faults.py " + " ".join(sys.argv[1:])
        (out / "faults.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        write_markdown(results, out / "faults.md")
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
        return
    model = work / "model"
    trained = ltuda("train", "--dataset", dataset, "--out", model, *TINY, "--overwrite", "--progress", "none")
    assert trained.returncode == 0, trained.stderr
    results = {"command": "OMP_NUM_THREADS=1 nice -n 10 python benchmarks/faults.py " + " ".join(sys.argv[1:]),
               "seed": args.seed,
               "machine": f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"}
    fuzzed = fuzz.run_fuzz(model, args.fuzz_inputs, args.seed, work / "fuzz", log=log)
    results["fuzz"] = {k: fuzzed["counts"][k] for k in ("inputs", "clear_errors", "correct", "tracebacks", "crashes",
                                                        "hangs", "unclear", "wrong_results", "inputs_modified",
                                                        "seconds")}
    results["fuzz_per_kind"] = fuzzed["per_kind"]
    results["fuzz_failures"] = fuzzed["failures"]
    results["concurrent_train"] = concurrent_train(dataset, work, log)
    results["disk_full"] = disk_sites(dataset, model, test_image, work, log)
    results["kill9"] = kill9_trials(dataset, test_image, work, args.kill_trials, rng, log)
    results["predict_peak_gib"] = {}
    if not args.skip_memory:
        source = predict_memory.ct_like_volume(work / "ct1500.nrrd", 1500)
        seconds, peak, code, last = predict_memory.measure(predict_memory.untrained_model(work / "fast", "fast"),
                                                           source, work / "ct1500.seg.nrrd")
        results["predict_peak_gib"]["512x512x1500"] = round(peak, 3) if code == 0 else f"failed: {last}"
        log(f"predict 512x512x1500: peak {peak:.2f} GiB, {seconds:.0f} s, exit {code}")
        source.unlink()
    results["seconds"] = round(time.time() - started, 1)
    ordered = {key: results[key] for key in ("kill9", "concurrent_train", "disk_full", "fuzz", "predict_peak_gib")}
    ordered.update({k: v for k, v in results.items() if k not in ordered})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps(ordered, indent=2, default=str) + "\n")
    write_markdown(ordered, out / "faults.md")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "details"} if isinstance(v, dict) else v
                      for k, v in ordered.items() if k in ("kill9", "concurrent_train", "disk_full", "fuzz",
                                                           "predict_peak_gib")}, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
