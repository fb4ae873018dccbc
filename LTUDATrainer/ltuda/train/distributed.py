"""Training one model on several processes: `torchrun --nproc_per_node N -m ltuda train ...`.

torchrun starts N copies of `ltuda train` and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `join()` turns them into a process group (NCCL on GPUs, gloo on CPUs, or
LTUDA_DIST_BACKEND) with a timeout (LTUDA_DIST_TIMEOUT seconds, default 1800), so a rank that stops
answering ends the run instead of hanging it. Without torchrun (or with one process) `join()` returns
None and training runs exactly as before.

What stays identical on every rank, and how:
- weights: PyTorch's DistributedDataParallel averages the gradients (one wrapper per stage, since
  stage 1 leaves the prototype and projection heads unused);
- prototype banks: each bank update all-reduces the assignment-weighted embedding sums and their
  masses before the momentum step (`Group.sum_`, passed to the step as `ctx.reduce`), so every rank
  applies the update the whole global batch asks for; the organ gate's Dice counts alike, or with the
  held-out gate (`--gate-cases held-out`), rank 0's verdict at each validation, broadcast;
- BatchNorm running statistics: averaged after every step (DDP's default, rank 0's buffers broadcast
  each forward, would also overwrite the banks and hide a missing all-reduce);
- the EMA teacher follows from the above: same student, same buffers, same formula;
- stage starts and resumes: rank 0's student, teacher and optimiser state are broadcast.
Each rank draws its own batches (its own random stream, the same per-site balance inside each
batch), so one step trains on N batches and an epoch takes ceil(iterations / N) steps.

Only rank 0 takes the model-folder lock, reads and writes checkpoints and model.json, validates and
reports progress; the other ranks are silent. A stop (SIGTERM, STOP file) on any rank is agreed on by
all ranks at the next step. A rank that fails records "rank R of N: cause" in torchrun's key-value
store, so rank 0's progress stream ends with an error that names it.
"""

import datetime
import inspect
import math
import os
from typing import Optional

import torch
import torch.distributed as dist

FAILURE_KEY = "ltuda/failure"
DEFAULT_TIMEOUT_S = 1800.0


class Group:
    """This process's place in a torchrun job, and the collectives training needs."""

    def __init__(self, rank: int, world: int, local_rank: int, device: torch.device, backend: str, store=None):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device, self.backend, self.store = device, backend, store

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world}"

    # ----- collectives -----
    def _on_wire(self, tensor: torch.Tensor) -> torch.Tensor:
        """NCCL reduces device tensors only; gloo takes both."""
        return tensor.to(self.device) if self.backend == "nccl" and tensor.device != self.device else tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) over the ranks; returns the summed tensor on the input's device."""
        wire = self._on_wire(tensor)
        dist.all_reduce(wire, op=dist.ReduceOp.SUM)
        return wire.to(tensor.device) if wire is not tensor else tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on at least one (stop requests)."""
        return bool(self.sum_(torch.tensor([1.0 if flag else 0.0])).item() > 0)

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (small Python objects: settings, counters)."""
        box = [obj if self.leader else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def broadcast_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` on every rank (a copy on the input's device; e.g. the held-out organ gate)."""
        wire = self._on_wire(tensor.clone())
        dist.broadcast(wire, src=0)
        return wire.to(tensor.device)

    def broadcast_module(self, module: torch.nn.Module):
        """Rank 0's parameters and buffers into every rank's copy, in place."""
        with torch.no_grad():
            for tensor in module.state_dict().values():
                wire = self._on_wire(tensor)
                dist.broadcast(wire, src=0)
                if wire is not tensor:
                    tensor.copy_(wire)

    def average_buffers(self, module: torch.nn.Module):
        """Mean over the ranks of the floating-point buffers that are not prototype banks (BatchNorm
        running statistics), in one all-reduce. The banks are kept identical by their own update."""
        buffers = [b for name, b in module.named_buffers()
                   if b.is_floating_point() and not name.startswith("prototypes")]
        if not buffers:
            return
        with torch.no_grad():
            flat = self.sum_(torch.cat([b.reshape(-1).float() for b in buffers])) / self.world
            offset = 0
            for b in buffers:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()

    def wrap(self, module: torch.nn.Module, stage: int) -> torch.nn.Module:
        """A DistributedDataParallel view of `module` for one stage (stage 1 and the baselines leave the
        prototype heads unused; stage 2 uses every parameter)."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # No buffer broadcast before each forward: it would overwrite the banks with rank 0's (newer
        # PyTorch names the switch forward_sync_buffers).
        no_sync = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=stage != 2, **no_sync)

    def attach(self, ctx):
        """The step's bank updates and organ gate reduce over all ranks."""
        ctx.reduce = self.sum_
        ctx.gate.reduce = self.sum_

    # ----- failures -----
    def record_failure(self, message: str, wait_s: float = 0.0) -> str:
        """"rank R of N: cause" of the run's first failure: another rank's, when one recorded it (a
        collective breaks when its peer is gone: wait up to `wait_s` for that peer's note), else ours,
        recorded in the job's store for the others."""
        mine = f"{self.describe()}: {message}"
        if self.store is None:
            return mine
        try:
            if wait_s > 0:
                try:
                    self.store.wait([FAILURE_KEY], datetime.timedelta(seconds=wait_s))
                except Exception:  # noqa: BLE001 - no note from anyone: the failure is ours
                    pass
            return self.store.compare_set(FAILURE_KEY, "", mine).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - the store is gone: never hide the real failure behind this
            return mine

    def close(self):
        if dist.is_initialized():
            dist.barrier()  # every rank done with its collectives before any tears its connections down
            dist.destroy_process_group()


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def join(device_request: str = "auto") -> Optional[Group]:
    """The process group of a torchrun job with more than one process, else None."""
    world = world_size()
    if world <= 1:
        return None
    from ..errors import LtudaError
    from .trainer import pick_device

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_request)
    if device.type == "cuda":
        # Several ranks may share one GPU (a smoke test); NCCL cannot, gloo can (LTUDA_DIST_BACKEND=gloo).
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    backend = os.environ.get("LTUDA_DIST_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
    if backend not in ("nccl", "gloo"):
        raise LtudaError(f"LTUDA_DIST_BACKEND={backend} is not a backend ltuda can train with",
                         fix="Use nccl (GPUs) or gloo (CPUs, or several processes on one GPU).")
    try:
        timeout = datetime.timedelta(seconds=float(os.environ.get("LTUDA_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    except ValueError:
        raise LtudaError(f"LTUDA_DIST_TIMEOUT={os.environ.get('LTUDA_DIST_TIMEOUT')} is not a number of seconds",
                         fix="Set it to e.g. 1800, longer than one validation of the run.") from None
    dist.init_process_group(backend, timeout=timeout)
    store = None
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        try:  # a client of the job's own key-value store (torchrun's), for failure notes
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
        except Exception:  # noqa: BLE001 - failure notes are a nicety
            store = None
    return Group(rank, world, local_rank, device, backend, store)


def steps_per_epoch(iterations: int, world: int) -> int:
    """An epoch is `iterations` batches; N ranks draw N of them per step."""
    return max(1, math.ceil(iterations / max(1, world)))


def rank_seed(seed: int, rank: int, step: int) -> int:
    """Rank r > 0's random stream, fresh for a new run and for a resume (rank 0 keeps the run's own)."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2 ** 63)


def _to_cpu(value):
    """A state dict with every tensor on the CPU (for pickling across ranks on different GPUs)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def share_start(trainer, start: tuple) -> tuple:
    """Where the run starts (stage, epoch, batch) and the state rank 0 restored from its checkpoint, on
    every rank; ranks other than 0 get their own random stream. Returns the start position."""
    group = trainer.group
    state = None
    if group.leader:
        state = {"start": list(start), "elapsed": trainer.elapsed_before, "gate": trainer.ctx.gate.state_dict(),
                 "optimizer": _to_cpu(trainer.optimizer.state_dict()) if trainer.resume else None}
    state = group.broadcast_object(state)
    if not group.leader:
        if state["optimizer"] is not None:
            trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.ctx.gate.load_state_dict(state["gate"])
        trainer.elapsed_before = state["elapsed"]
        stage, epoch, batch = state["start"]
        position = (stage * 100_000 + epoch) * 100_000 + batch
        trainer.generator.manual_seed(rank_seed(trainer.config.seed, group.rank, position))
    return tuple(state["start"])
