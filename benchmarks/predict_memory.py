"""Peak memory of `ltuda predict` against the volume's size (issue 14: a 512x512x1500 CT in under 4 GiB).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/predict_memory.py [--slices 100 200 400 1500]
        [--label after] [--out benchmarks/results]

Each size: a CT-like int16 volume (uncompressed .nrrd, 512x512 slices), then one `ltuda predict` subprocess
(tiny untrained "fast"-preset network, CPU, post-processing on), file to `.seg.nrrd`. The peak is the
kernel's own high-water mark of that process's resident memory (wait4's ru_maxrss), so no short spike
is missed. Results are merged into predict_memory.json under `--label` (e.g. "before" and "after" a
change, each run from its own checkout) and predict_memory.md is rewritten from the JSON.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from speed import untrained_model  # noqa: E402


def ct_like_volume(path, slices, size=512, seed=0, slab=50):
    """speed.py's body-shaped int16 CT in HU, made slab by slab (a 1500-slice volume would take GBs at once)."""
    rng = np.random.default_rng(seed)
    volume = np.empty((slices, size, size), dtype=np.int16)
    y, x = np.ogrid[:size, :size]
    body = ((y - size / 2) / (size * 0.38)) ** 2 + ((x - size / 2) / (size * 0.45)) ** 2 < 1
    for start in range(0, slices, slab):
        z = np.arange(start, min(slices, start + slab))[:, None, None]
        block = np.where(body, 40, -1000).astype(np.int16) + rng.normal(0, 15, (z.shape[0], size, size)).astype(np.int16)
        organ = ((y - size * 0.45) / (size * 0.15)) ** 2 + ((x - size * 0.35) / (size * 0.18)) ** 2 + \
            ((z - slices / 2) / (slices * 0.3)) ** 2 < 1
        block[organ] += 60
        volume[start:start + z.shape[0]] = block
    image = sitk.GetImageFromArray(volume)
    del volume
    image.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(image, str(path), useCompression=False)
    return path


# A small launcher process runs `ltuda predict` and reports wait4's ru_maxrss. Linux hands a child the
# high-water mark of the memory it was forked from (at exec), so measuring straight from this process
# (which just built a GB-sized volume) would report this process's peak, not predict's.
LAUNCHER = """
import os, subprocess, sys
with open(os.devnull, "wb") as null:
    proc = subprocess.Popen(sys.argv[1:], stdout=null, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
sys.stderr.buffer.write(err)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def measure(model_dir, source, out):
    """(seconds, peak RSS GiB, exit code, last stderr line) of one `ltuda predict` subprocess."""
    cmd = [sys.executable, "-m", "ltuda", "predict", "--model", str(model_dir), "--input", str(source),
           "--output", str(out), "--device", "cpu", "--overwrite", "--progress", "none"]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    code, maxrss_kib = (int(v) for v in result.stdout.split())
    stderr = result.stderr.strip()
    return seconds, maxrss_kib * 1024 / 2**30, code, stderr.splitlines()[-1] if stderr else ""


def write_markdown(results, path):
    labels = list(results["runs"])
    sizes = sorted({int(s) for run in results["runs"].values() for s in run}, key=int)
    lines = ["# `ltuda predict` peak memory against volume size", "",
             "Peak resident memory (GiB, the kernel's high-water mark) of one `ltuda predict` process on a CT-like",
             "int16 volume of 512x512 slices (uncompressed .nrrd), CPU, tiny untrained network, post-processing on.",
             "Target (issue 14): 512x512x1500 under 4 GiB.", "",
             "| slices | " + " | ".join(f"{label} peak GiB | {label} s" for label in labels) + " |",
             "|---:|" + "---:|---:|" * len(labels)]
    for size in sizes:
        cells = []
        for label in labels:
            row = results["runs"][label].get(str(size))
            if row is None:
                cells += ["", ""]
            elif row["exit"] != 0:
                cells += [f"failed (exit {row['exit']})", f"{row['seconds']:.0f}"]
            else:
                cells += [f"{row['peak_gib']:.2f}", f"{row['seconds']:.0f}"]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    lines += ["", f"Machine: {results['machine']}", ""]
    lines += [f"- {label}: {note}" for label, note in results.get("code", {}).items()]
    lines += ["", "Command(s):", ""]
    lines += [f"    {cmd}" for cmd in results["commands"]]
    path.write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[100, 200, 400, 1500])
    parser.add_argument("--label", default="after", help="name of this run in the results (e.g. before, after)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--code-note", default=None, help="which code this label measured (e.g. a commit)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "predict_memory.json"
    results = json.loads(json_path.read_text()) if json_path.exists() else {"runs": {}, "commands": []}
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, " \
                         f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    command = "OMP_NUM_THREADS=1 nice -n 10 python benchmarks/predict_memory.py " + " ".join(sys.argv[1:])
    if command not in results["commands"]:
        results["commands"].append(command)
    run = results["runs"].setdefault(args.label, {})
    if args.code_note:
        results.setdefault("code", {})[args.label] = args.code_note
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = untrained_model(tmp / "model", "fast")
        for slices in args.slices:
            source = ct_like_volume(tmp / f"ct{slices}.nrrd", slices)
            seconds, peak, code, last = measure(model, source, tmp / f"ct{slices}.seg.nrrd")
            run[str(slices)] = {"peak_gib": round(peak, 3), "seconds": round(seconds, 1), "exit": code,
                                "message": last if code else ""}
            print(f"{args.label} {slices} slices: peak {peak:.2f} GiB, {seconds:.0f} s, exit {code} {last if code else ''}",
                  flush=True)
            source.unlink()
            json_path.write_text(json.dumps(results, indent=2) + "\n")
            write_markdown(results, out / "predict_memory.md")


if __name__ == "__main__":
    main()
