"""The Train section's "GPUs" choice: how many training processes, and how to start more than one.

The choice is 1 (one process, `python -m ltuda train`, exactly as before), "all" (one process per
CUDA GPU the backend's probe reports) or a number N >= 2. More than one process runs the backend
under PyTorch's own launcher, `python -m torch.distributed.run --standalone --nproc_per_node N -m
ltuda train ...` (torchrun, with the same interpreter), which trains one model with distributed data
parallel: NCCL on GPUs, gloo on CPUs; only rank 0 writes the model folder and the progress stream.

When several processes make no sense the run falls back to one process with a note saying why:
"all" on a backend with no CUDA GPU or only one, or with the device 'cpu'. Several processes on the
CPU (gloo) start only when the user asked for an explicit N and training runs on the CPU (no CUDA
GPU, or the device 'cpu'): it works and is how the tests run it, but one process that uses every
core is usually as fast. An explicit N larger than the number of GPUs is refused: NCCL cannot
share one GPU between processes.
"""

import os

from .errors import LTUDAError

ALL = "all"
MAX_PROCESSES = 64  # one machine; several machines are a job for torchrun on the command line
SETTINGS_KEY = "TrainGpus"


def parseGpus(value):
    """1, "all" or a whole number from 2 up (also as text, as settings store it) -> 1 | "all" | N."""
    choice = value
    if isinstance(value, str):
        text = value.strip().lower()
        choice = ALL if text == ALL else (int(text) if text.isdigit() else None)
    elif isinstance(value, bool) or not isinstance(value, int):  # True is an int to Python, not a count
        choice = None
    if choice == ALL or (isinstance(choice, int) and 1 <= choice <= MAX_PROCESSES):
        return choice
    raise LTUDAError(f"GPUs must be 1, 'all' or a whole number of training processes from 2 to {MAX_PROCESSES}, "
                     f"not {value!r}.")


def gpuCount(probe):
    """CUDA GPUs the backend's probe saw (0 without a probe, torch or CUDA)."""
    gpu = probe.gpu if probe is not None else None
    if not gpu:
        return 0
    try:
        return max(1, int(gpu.get("count", 1)))
    except (TypeError, ValueError):
        return 1


def planProcesses(gpus, device, probe):
    """(processes, note) for the GPUs choice, the device ('auto' | 'cpu' | 'cuda') and the backend's
    ProbeResult. The note (empty when there is nothing to say) tells the user what was chosen and why;
    an impossible explicit choice raises LTUDAError."""
    choice = parseGpus(gpus)
    if choice == 1:
        return 1, ""
    if device == "cpu":
        if choice == ALL:
            return 1, "GPUs 'all' with the device 'cpu': training runs as one process on the CPU."
        return choice, _cpuNote(choice, "the device is 'cpu'")
    count = gpuCount(probe)
    if count == 0:
        if device == "cuda":
            raise LTUDAError("No CUDA GPU is visible to the backend Python: choose the device 'auto' or 'cpu', or "
                             "pick a Python with a CUDA build of torch in the Setup section.")
        if choice == ALL:
            return 1, "GPUs 'all': the backend sees no CUDA GPU, so training runs as one process on the CPU."
        return choice, _cpuNote(choice, "the backend sees no CUDA GPU")
    name = (probe.gpu or {}).get("name") or "GPU"
    if choice == ALL:
        if count == 1:
            return 1, f"GPUs 'all': the backend sees one GPU ({name}), so training runs as one process."
        return count, f"Training on all {count} GPUs the backend sees: {count} processes (torchrun, NCCL)."
    if choice > count:
        seen = "one GPU" if count == 1 else f"{count} GPUs"
        raise LTUDAError(f"GPUs {choice}: the backend sees {seen} ({name}). Choose at most {count} (or 'all'); "
                         "processes cannot share a GPU.")
    return choice, f"Training on {choice} of the {count} GPUs the backend sees: {choice} processes (torchrun, NCCL)."


def _cpuNote(processes, why):
    return (f"{processes} training processes on the CPU ({why}; torchrun with gloo), as asked. Each process gets "
            "its share of the cores; one process is usually as fast.")


def torchrunEnvironment(env, processes):
    """The backend's environment for `processes` ranks on this machine: torchrun would give every rank
    one CPU thread (OMP_NUM_THREADS=1) unless told otherwise; share the cores instead. A value the
    user set is kept."""
    env = dict(env)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, processes)))
    return env


def spinBoxValue(choice):
    """The panel's spin box shows "all" as its special value 0."""
    choice = parseGpus(choice)
    return 0 if choice == ALL else choice


def choiceFromSpinBox(value):
    return ALL if int(value) == 0 else parseGpus(int(value))
