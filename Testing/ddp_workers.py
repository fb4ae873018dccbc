"""What the distributed-training tests run under a real torchrun (test_distributed.py), and the pieces
its one-process reference shares with them.

    python -m torch.distributed.run --nproc_per_node 2 --standalone Testing/ddp_workers.py steps OUT
        one training step of each stage (0: supervised, 1: CDA, 2: PDA with prototype banks) on this
        rank's half of a fixed batch, through the trainer's own distributed pieces; writes each rank's
        student, teacher and buffers after every stage to OUT/<variant>-rank<R>.pt; variant
        "no-bank-all-reduce" runs the same with the banks' all-reduce removed.
    python -m torch.distributed.run --nproc_per_node 2 --standalone Testing/ddp_workers.py failing-rank ARGS...
        `ltuda train ARGS...`, where rank 1's second LTUDA step raises.
"""

import contextlib
import copy
import sys
import types
from pathlib import Path

import torch

from ltuda.model.network import LTUDANet
from ltuda.train.config import make_config
from ltuda.train.steps import StepContext, ltuda_step, supervised_step
from ltuda.train.trainer import Trainer, network_config

C = 4  # organs
HALF = 2  # samples per rank
STAGES = (0, 1, 2)


def settings():
    """The fast preset's tiny network on 32x32 slices; the paper's hard pseudo-label rule, so that an
    untrained teacher's pseudo-labels (probabilities near 0.5) still update the unlabelled bank."""
    # SGD, not the preset's AdamW: Adam's first step moves every weight by about +-lr whatever the size of
    # its gradient, so a bias just before InstanceNorm (gradient ~1e-9, pure rounding) would move by +-lr
    # depending on summation order (threads); SGD keeps a rounding difference a rounding difference.
    return make_config("fast", image_size=32, method="ltuda", pseudo_uncertain_below=0.5, optimizer="sgd")


def whole_batch():
    """A fixed batch of 2 * HALF partially labelled samples: sample i labels organ i mod C only, so each
    half holds two different "sites" (the per-site balance of one rank's batch)."""
    g = torch.Generator().manual_seed(7)
    n, size = 2 * HALF, settings().image_size
    images = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    labels = torch.zeros(n, size, size, dtype=torch.long)
    labeled = torch.zeros(n, C, dtype=torch.bool)
    for i in range(n):
        organ = i % C
        labeled[i, organ] = True
        top, left = 4 + 3 * i, 6 + 2 * i
        labels[i, top:top + 10, left:left + 12] = organ + 1
        images[i, 0, top:top + 10, left:left + 12] += 0.8
    return images, labels, labeled


def half(batch, rank):
    return tuple(t[rank * HALF:(rank + 1) * HALF] for t in batch)


def rank_generator(rank):
    return torch.Generator().manual_seed(1000 + rank)


def new_models():
    config = settings()
    torch.manual_seed(config.seed)
    student = LTUDANet(network_config(config, C))
    teacher = copy.deepcopy(student)
    return config, student, teacher


def optimizer_for(config, student):
    return Trainer._optimizer(types.SimpleNamespace(config=config), student)


def step_loss(ctx, net, teacher, batch, stage):
    return supervised_step(ctx, net, batch) if stage == 0 else ltuda_step(ctx, net, teacher, batch, stage)


def ema(config, student, teacher, step):
    """The trainer's own EMA update."""
    Trainer._ema_update(types.SimpleNamespace(config=config, student=student, teacher=teacher), step)


def snapshot(student, teacher):
    return {"student": {k: v.detach().clone() for k, v in student.state_dict().items()},
            "teacher": {k: v.detach().clone() for k, v in teacher.state_dict().items()}}


def run_steps(group, out: Path, variant: str):
    """One step per stage on this rank's half, as the trainer takes it under torchrun."""
    config, student, teacher = new_models()
    ctx = StepContext(config, C, rank_generator(group.rank), contextlib.nullcontext)
    group.attach(ctx)
    if variant == "no-bank-all-reduce":
        ctx.reduce = None  # what a missing bank all-reduce would be
    batch = half(whole_batch(), group.rank)
    states = []
    for step, stage in enumerate(STAGES, start=1):
        optimizer = optimizer_for(config, student)
        group.broadcast_module(student)
        group.broadcast_module(teacher)
        net = group.wrap(student, stage)
        student.train()
        loss = step_loss(ctx, net, teacher, batch, stage)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        group.average_buffers(student)
        ema(config, student, teacher, step)
        states.append(snapshot(student, teacher))
    torch.save(states, out / f"{variant}-rank{group.rank}.pt")


def failing_rank(argv):
    """`ltuda train` in which rank 1 fails at its second LTUDA step, as a CUDA fault would."""
    import os

    from ltuda import cli
    from ltuda.train import trainer

    if os.environ.get("RANK") == "1":
        real, calls = trainer.ltuda_step, []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("simulated fault: CUDA error: an illegal memory access was encountered")
            return real(*args, **kwargs)

        trainer.ltuda_step = failing
    return cli.main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "steps":
        from ltuda.train import distributed

        group = distributed.join("cpu")
        for name in ("all-reduce", "no-bank-all-reduce"):
            run_steps(group, Path(sys.argv[2]), name)
        group.close()
    elif sys.argv[1] == "failing-rank":
        sys.exit(failing_rank(sys.argv[2:]))
