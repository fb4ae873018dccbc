"""Speed benchmark: training throughput against a reference-style step, and file-to-file inference.

    python benchmarks/speed.py [--quick] [--out benchmarks/results] [--device all|cpu|cuda] [--sizes 200]

Training: images per second of our LTUDA step and of a reference-style step (per-sample CPU
augmentation, float32, one backbone pass per head), same network, batch and data, alternated in
one run so machine noise hits both alike. Inference: `ltuda predict` on a CT-like volume, from the
file to the `.seg.nrrd`, in a subprocess whose peak memory is sampled. On a GPU the same is measured
there too. Writes speed.json and speed.md.
"""

import argparse
import contextlib
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_style import reference_step  # noqa: E402

from ltuda.model.network import LTUDANet  # noqa: E402
from ltuda.model.store import save_model  # noqa: E402
from ltuda.terminology import default_classes  # noqa: E402
from ltuda.train.config import make_config  # noqa: E402
from ltuda.train.steps import StepContext, ltuda_step  # noqa: E402
from ltuda.train.trainer import network_config  # noqa: E402

C = 4


def _batch(size, image_size, device):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(size, 1, image_size, image_size, generator=g) * 2 - 1
    labels = torch.randint(0, C + 1, (size, image_size, image_size), generator=g)
    labeled = torch.zeros(size, C, dtype=torch.bool)
    labeled[torch.arange(size), torch.arange(size) % C] = True
    labels = torch.where(labeled.gather(1, (labels - 1).clamp(min=0).flatten(1)).view_as(labels) & (labels > 0), labels, 0)
    return images.to(device), labels.to(device), labeled.to(device)


def _autocast_for(device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def train_throughput(preset, stage, device, rounds, steps):
    """(ours img/s, reference-style img/s, peak GPU GiB of ours or None), alternating short bursts of each."""
    config = make_config(preset)
    torch.manual_seed(0)
    net = LTUDANet(network_config(config, C)).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    ref_net = copy.deepcopy(net).float()
    teachers = copy.deepcopy(net), copy.deepcopy(ref_net)
    batch = _batch(config.batch_size, config.image_size, device)
    cpu_batch = tuple(t.cpu() for t in batch)
    ctx = StepContext(config, C, torch.Generator().manual_seed(0), _autocast_for(device))
    ours_opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    ref_opt = torch.optim.SGD(ref_net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)

    def ours():
        loss = ltuda_step(ctx, net, teachers[0], batch, stage)
        ours_opt.zero_grad(set_to_none=True)
        loss.backward()
        ours_opt.step()

    def reference():
        # the reference augments on the CPU, then copies the batch to the device
        loss = reference_step(config, C, ref_net, teachers[1], tuple(t.to(device) for t in cpu_batch), stage) \
            if device.type == "cpu" else _reference_on(device, config, ref_net, teachers[1], cpu_batch, stage)
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        ref_opt.step()

    timings = {"ours": [], "reference": []}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ours()  # warm-up, and our step's peak memory
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    reference()
    for _ in range(rounds):
        for name, fn in (("ours", ours), ("reference", reference)):
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync(device)
            timings[name].append((time.perf_counter() - start) / steps)
    per_step = {k: float(np.median(v)) for k, v in timings.items()}
    return config.batch_size / per_step["ours"], config.batch_size / per_step["reference"], peak


def _reference_on(device, config, net, teacher, cpu_batch, stage):
    """Reference-style on a GPU: per-sample CPU augmentation inside the step, network on the GPU."""
    import reference_style as ref

    images, labels, labeled = cpu_batch
    views = [ref._weak_one(images[i], labels[i], config) for i in range(images.shape[0])]
    weak_images = torch.stack([v[0] for v in views])
    weak_labels = torch.stack([v[1] for v in views])
    config_copy = copy.copy(config)
    config_copy.scale_range, config_copy.rotation_deg = (1.0, 1.0), 0.0  # already augmented above
    return ref.reference_step(config_copy, C, net, teacher, (weak_images.to(device), weak_labels.to(device),
                                                              labeled.to(device)), stage)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ct_like_volume(path, slices, size=512, seed=0):
    """A body-shaped CT-like volume in HU (int16), written to `path`."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:slices, :size, :size]
    body = ((y - size / 2) / (size * 0.38)) ** 2 + ((x - size / 2) / (size * 0.45)) ** 2 < 1
    volume = np.where(body, 40, -1000).astype(np.int16) + rng.normal(0, 15, (slices, size, size)).astype(np.int16)
    organ = ((y - size * 0.45) / (size * 0.15)) ** 2 + ((x - size * 0.35) / (size * 0.18)) ** 2 + \
        ((z - slices / 2) / (slices * 0.3)) ** 2 < 1
    volume[organ] += 60
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(image, str(path), useCompression=False)
    return path


def timed_predict(model_dir, source, out, device):
    """(seconds, peak RSS GiB, peak GPU GiB or None) of one `ltuda predict` subprocess, file to file."""
    cmd = [sys.executable, "-m", "ltuda", "predict", "--model", str(model_dir), "--input", str(source),
           "--output", str(out), "--device", device, "--overwrite", "--progress", "jsonl"]
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True)))
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.read().decode(errors="replace"))
    done = json.loads(proc.stdout.read().decode().splitlines()[-1])
    return seconds, peak / 2**30, done.get("peak_gpu_gib")


def untrained_model(folder, preset):
    """Speed does not depend on the weights: an untrained network of the preset's size."""
    config = make_config(preset)
    net = LTUDANet(network_config(config, C))
    save_model(folder, net, {"classes": default_classes(), "default_head": "proto-unlabeled",
                             "preprocessing": {"hu_window": [-325, 325], "image_size": config.image_size,
                                               "orientation": "LPS"},
                             "training": {"method": "untrained (benchmark)", "preset": preset}, "validation": {}})
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and one volume size (for tests)")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="all: the CPU, and the GPU when there is one; cuda: the GPU rows alone (gpu_check.sh)")
    parser.add_argument("--sizes", default=None, metavar="N,N",
                        help="slices of the 512x512 volumes to predict (default 100,200,400; 40 with --quick)")
    args = parser.parse_args()
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch sees no CUDA GPU (a CPU build of torch, or no driver)")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    devices = [d for d in devices if args.device in ("all", d.type)]
    rounds, steps = (1, 1) if args.quick else (3, 3)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                           "torch": torch.__version__},
               "command": " ".join(["python benchmarks/speed.py", *sys.argv[1:]])}
    rows = []
    for device in devices:
        suffix = "gpu" if device.type == "cuda" else "cpu"
        if device.type == "cuda":
            results["gpu_name"] = torch.cuda.get_device_name(0)
        presets = ("fast",) if (args.quick or device.type == "cpu") else ("fast", "paper")
        if device.type == "cpu" and not args.quick:
            presets = ("fast", "paper")
        for preset in presets:
            for stage in (1, 2):
                if device.type == "cpu" and preset == "paper" and stage == 2 and args.quick:
                    continue
                ours, ref, peak = train_throughput(preset, stage, device, rounds if preset == "fast" else 1,
                                                   steps if preset == "fast" else 1)
                key = f"{preset}_stage{stage}_{suffix}"
                results[f"train_img_s_ours_{key}"] = round(ours, 2)
                results[f"train_img_s_reference_{key}"] = round(ref, 2)
                results[f"train_speedup_{key}"] = round(ours / ref, 2)
                if peak is not None:
                    results[f"train_peak_gpu_gb_{key}"] = round(peak, 2)
                rows.append(f"| train {preset} stage {stage} | {suffix} | {ours:.1f} img/s | {ref:.1f} img/s | "
                            f"{ours / ref:.2f}x |")
                print(rows[-1], flush=True)
        results[f"train_speedup_stage1_{suffix}"] = results[f"train_speedup_fast_stage1_{suffix}"]
        results[f"train_speedup_stage2_{suffix}"] = results[f"train_speedup_fast_stage2_{suffix}"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = (40,) if args.quick else (100, 200, 400)
        if args.sizes:
            sizes = tuple(int(n) for n in args.sizes.split(","))
        volumes = {n: ct_like_volume(tmp / f"ct_{n}.nii", n) for n in sizes}
        for device in devices:
            suffix = "gpu" if device.type == "cuda" else "cpu"
            for preset in (("fast",) if device.type == "cpu" else ("fast", "paper")):
                model = untrained_model(tmp / f"model_{preset}", preset)
                for n, source in volumes.items():
                    seconds, rss, gpu = timed_predict(model, source, tmp / f"out_{n}.seg.nrrd", device.type)
                    results[f"infer_s_512x512x{n}_{suffix}_{preset}"] = round(seconds, 2)
                    results[f"infer_peak_rss_gb_512x512x{n}_{suffix}_{preset}"] = round(rss, 2)
                    if gpu is not None:
                        results[f"infer_peak_gpu_gb_512x512x{n}_{suffix}_{preset}"] = round(gpu, 2)
                    memory = f"peak RSS {rss:.2f} GiB" + (f", GPU {gpu:.2f} GiB" if gpu is not None else "")
                    rows.append(f"| predict 512x512x{n} ({preset}) | {suffix} | {seconds:.1f} s | {memory} | |")
                    print(rows[-1], flush=True)
            main_n = 200 if 200 in volumes else sizes[0]
            results[f"infer_s_512x512x200_{suffix}_fast"] = results.get(f"infer_s_512x512x{main_n}_{suffix}_fast")
            results[f"infer_peak_rss_gb_{suffix}"] = max(v for k, v in results.items()
                                                          if k.startswith("infer_peak_rss_gb_512") and suffix in k)
    results["seconds"] = round(time.time() - started, 1)
    (out / "speed.json").write_text(json.dumps(results, indent=2) + "\n")
    md = ["# Speed benchmark", "", f"Command: `{results['command']}`  ", f"Machine: {results['machine']}  ",
          f"GPU: {results.get('gpu_name', 'none (CPU only in this run)')}  ", f"Duration: {results['seconds']} s", "",
          "Training throughput: ours vs a reference-style step (per-sample CPU augmentation, float32, one backbone "
          "pass per head), same network and batch, alternated in one run. Inference: `ltuda predict`, file to "
          "`.seg.nrrd`, untrained weights of the preset's size (speed does not depend on them).", "",
          "| what | device | ours | reference-style / memory | ratio |", "|---|---|---|---|---|", *rows, ""]
    (out / "speed.md").write_text("\n".join(md))
    print(json.dumps({k: v for k, v in results.items() if k.startswith(("train_speedup_stage", "infer_s_512x512x200",
                                                                        "infer_peak"))}, indent=2))


if __name__ == "__main__":
    main()
