"""Distributed training (issue 16): `torchrun -m ltuda train` with DDP on gloo, on the CPU.

Real `python -m torch.distributed.run` subprocesses (argument lists), real tiny trainings. The step
test compares each rank, after one step of each stage on half of a fixed batch, with one process that
takes the same step on the whole batch (its two halves, gradients averaged, the bank updated once
from both halves' statistics, BatchNorm statistics averaged); the same run with the banks' all-reduce
removed must be caught drifting.
"""

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import ddp_workers as W
from conftest import TINY_TRAIN_ARGS, run_ltuda
from ltuda.data.slices import SlicePool
from ltuda.train.distributed import rank_seed, steps_per_epoch
from ltuda.train.steps import StepContext

HERE = Path(__file__).resolve().parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", LTUDA_DIST_TIMEOUT="300")


def torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
            "--monitor-interval", "0.2", *map(str, args)]


def _events(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ----- each rank's batches -----

def test_each_rank_draws_its_own_batches_with_one_slice_of_every_site():
    """4 single-organ sites; the pixel value says which site and slice a sample is."""
    cases = []
    for site in range(4):
        labels = np.zeros((6, 8, 8), np.uint8)
        labels[:, 2:5, 2:5] = site + 1
        image = (10 * site + np.arange(6, dtype=np.float16))[:, None, None] * np.ones((1, 8, 8), np.float16)
        cases.append(types.SimpleNamespace(image=image, labels=labels, labeled=[site + 1]))
    pool = SlicePool(cases, 4)
    generators = [torch.Generator().manual_seed(43), torch.Generator().manual_seed(rank_seed(43, 1, 0))]
    drawn = [[], []]
    for _ in range(8):
        for rank, generator in enumerate(generators):
            images, labels, labeled = pool.batch(4, generator)
            ids = images[:, 0, 0, 0].round().long().tolist()
            assert sorted(i // 10 for i in ids) == [0, 1, 2, 3]  # one slice of every site, on every rank
            assert labeled.sum(dim=1).tolist() == [1, 1, 1, 1]
            drawn[rank].append(ids)
    assert drawn[0] != drawn[1]  # the ranks draw different slices
    # an epoch of 40 batches is 20 steps of 2 ranks; a remainder is one more step
    assert (steps_per_epoch(40, 1), steps_per_epoch(40, 2), steps_per_epoch(5, 2), steps_per_epoch(1, 4)) == (40, 20, 3, 1)


# ----- one step of each stage: two ranks == one process with the whole batch -----

def reference_states():
    """The whole batch in one process: per half the step each rank takes (same random streams), then
    one optimiser step on the averaged gradients and one bank update from both halves' sums."""
    config, student, teacher = W.new_models()
    batch = W.whole_batch()
    halves = [W.half(batch, r) for r in (0, 1)]
    generators = [W.rank_generator(r) for r in (0, 1)]
    states = []
    for step, stage in enumerate(W.STAGES, start=1):
        optimizer = W.optimizer_for(config, student)
        student.train()
        starts = [g.get_state() for g in generators]
        recorded = []
        for r in (0, 1):  # each half's bank statistics, as its rank would all-reduce them
            calls = []
            ctx = StepContext(config, W.C, generators[r], contextlib.nullcontext)
            ctx.reduce = lambda t, calls=calls: calls.append(t.clone()) or t
            W.step_loss(ctx, copy.deepcopy(student), copy.deepcopy(teacher), halves[r], stage)
            recorded.append(calls)
        pooled = [a + b for a, b in zip(*recorded)]
        grads, copies = [], []
        for r in (0, 1):
            generators[r].set_state(starts[r])
            net = copy.deepcopy(student)
            ctx = StepContext(config, W.C, generators[r], contextlib.nullcontext)
            order = iter(pooled)
            ctx.reduce = lambda t, order=order: next(order).clone()
            loss = W.step_loss(ctx, net, copy.deepcopy(teacher), halves[r], stage)
            grads.append(torch.autograd.grad(loss, list(net.parameters()), allow_unused=True))
            copies.append(net)
        for p, g0, g1 in zip(student.parameters(), *grads):
            p.grad = None if g0 is None else (g0 + g1) / 2
        optimizer.step()
        with torch.no_grad():
            for name, buffer in student.named_buffers():
                parts = [dict(c.named_buffers())[name] for c in copies]
                same_everywhere = name.startswith("prototypes") or not buffer.is_floating_point()
                buffer.copy_(parts[0] if same_everywhere else (parts[0] + parts[1]) / 2)
        W.ema(config, student, teacher, step)
        states.append(W.snapshot(student, teacher))
    return states


def _differences(a, b):
    """{model/tensor name: max abs difference} between two snapshots."""
    return {f"{model}/{name}": (a[model][name].float() - b[model][name].float()).abs().max().item()
            for model in ("student", "teacher") for name in a[model]}


@pytest.fixture(scope="module")
def rank_states(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-steps")
    result = subprocess.run(torchrun(HERE / "ddp_workers.py", "steps", out), capture_output=True, text=True,
                            timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: [torch.load(out / f"{name}-rank{r}.pt", weights_only=True) for r in (0, 1)]
            for name in ("all-reduce", "no-bank-all-reduce")}


@pytest.fixture(scope="module")
def reference():
    return reference_states()


def test_two_ranks_with_half_a_batch_each_match_one_process_with_the_whole_batch(rank_states, reference):
    for rank in (0, 1):
        for stage, (ours, theirs) in zip(W.STAGES, zip(rank_states["all-reduce"][rank], reference)):
            worst = max(_differences(ours, theirs).items(), key=lambda kv: kv[1])
            assert worst[1] < 2e-5, f"rank {rank}, after the stage-{stage} step: {worst[0]} differs by {worst[1]}"
    # the step changed what it should: weights, BatchNorm statistics, banks, teacher
    before = W.snapshot(*W.new_models()[1:])
    moved = _differences(rank_states["all-reduce"][0][-1], before)
    for name in ("student/linear_head.weight", "student/projection.1.running_mean", "student/prototypes_labeled",
                 "student/prototypes_unlabeled", "teacher/linear_head.weight", "teacher/prototypes_unlabeled"):
        assert moved[name] > 1e-6, name


def test_without_the_bank_all_reduce_the_banks_drift_apart(rank_states, reference):
    rank0, rank1 = (states[-1] for states in rank_states["no-bank-all-reduce"])
    drift = _differences(rank0, rank1)
    banks = [k for k in drift if "prototypes" in k]
    assert max(drift[k] for k in banks) > 1e-3, "the banks should drift apart without the all-reduce"
    # ... while everything DDP itself keeps in step still agrees: the test singles out the banks
    assert max(v for k, v in drift.items() if k not in banks) < 2e-5
    assert max(_differences(rank0, reference[-1])[k] for k in banks) > 1e-3


# ----- real trainings under torchrun -----

def test_a_two_process_training_completes_and_only_rank_0_speaks(tiny_dataset, tmp_path):
    out = tmp_path / "ddp"
    result = subprocess.run(torchrun("-m", "ltuda", "train", "--dataset", tiny_dataset, "--out", out,
                                     *TINY_TRAIN_ARGS, "--progress", "jsonl"),
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    events = _events(result.stdout)  # every line is rank 0's JSON: the other rank said nothing
    assert [e["event"] for e in events].count("start") == 1 and events[-1]["event"] == "done"
    assert events[0]["processes"] == 2 and events[-1]["status"] == "completed"
    # 2 batches per epoch, drawn by 2 ranks at once: one step per epoch
    assert events[0]["iterations_per_epoch"] == 1
    model = json.loads((out / "model.json").read_text())
    assert model["training"]["completed"] is True
    assert not (out / "train.lock").exists()
    assert {e["model"] for e in events if e["event"] == "validation"} == {"student", "teacher"}


def test_a_held_out_gate_under_torchrun_completes_on_rank_0s_verdict(tiny_dataset, tmp_path):
    # Only rank 0 validates and every rank takes part in the broadcast of its verdict: a rank that
    # skipped it would pair its next collective with the broadcast, and the run would hang or fail.
    out = tmp_path / "ddp-held-out"
    result = subprocess.run(torchrun("-m", "ltuda", "train", "--dataset", tiny_dataset, "--out", out,
                                     *TINY_TRAIN_ARGS, "--epochs-stage1", "2", "--pseudo-dice", "--pseudo-dice-gate",
                                     "0.5", "--gate-cases", "held-out", "--progress", "jsonl"),
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    events = _events(result.stdout)
    assert events[-1]["status"] == "completed"
    validations = [e for e in events if e["event"] == "validation" and e["model"] == "teacher"
                   and e["head"] == "linear"]
    last_epoch = [e for e in events if e["event"] == "epoch"][-1]
    assert last_epoch["teacher_dice"] == pytest.approx(validations[-2]["per_organ"], abs=1e-4)


def test_sigterm_to_the_group_saves_once_and_a_single_process_resumes(tiny_dataset, tmp_path):
    out = tmp_path / "ddp-stop"
    args = torchrun("-m", "ltuda", "train", "--dataset", tiny_dataset, "--out", out, "--preset", "fast",
                    "--epochs-stage1", "2", "--epochs-stage2", "1", "--iterations-per-epoch", "8",
                    "--image-size", "32", "--batch-size", "2", "--val-fraction", "0", "--progress", "jsonl")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(json.loads(line))
        if seen[-1]["event"] == "stage":
            break
    os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler or the Slicer module's cancel does
    started = time.time()
    rest, stderr = proc.communicate(timeout=120)
    assert time.time() - started < 60
    events = seen + _events(rest)
    assert events[-1]["event"] == "done" and events[-1]["status"] == "cancelled", stderr[-3000:]
    saves = [e for e in events if e["event"] == "checkpoint" and e["kind"] == "last"]
    assert len(saves) == 1, events  # one save, by rank 0, for the stop
    assert "stop requested" in (out / "train.log").read_text()
    # each rank exits 130; torchrun itself reports its own SIGTERM (PyTorch's launcher exits 1 then)
    assert proc.returncode != 0
    assert not (out / "train.lock").exists()
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    # stopped inside the first epoch; the position counts batches, 2 per step of 2 ranks
    assert (int(state["stage_index"]), int(state["epoch"])) == (0, 0)
    stopped_at = int(state["iteration"])
    assert stopped_at % 2 == 0 and stopped_at < 8

    resumed = run_ltuda("train", "--dataset", tiny_dataset, "--out", out, "--resume", "--progress", "jsonl",
                        env=ENV, timeout=300)
    events = _events(resumed.stdout)
    assert events[0]["resumed"] is True and "processes" not in events[0]
    assert events[0]["iterations_per_epoch"] == 8  # one process: every batch of the epoch is its own step
    assert events[-1]["status"] == "completed"
    # it went on where the 2 ranks stopped: the first epoch ends one third into the run
    assert [e for e in events if e["event"] == "epoch"][0]["progress"] == pytest.approx(1 / 3)
    assert json.loads((out / "model.json").read_text())["training"]["completed"] is True


def test_a_failing_rank_ends_the_run_with_a_message_naming_it(tiny_dataset, tmp_path):
    out = tmp_path / "ddp-fault"
    started = time.time()
    result = subprocess.run(torchrun(HERE / "ddp_workers.py", "failing-rank", "train", "--dataset", tiny_dataset,
                                     "--out", out, *TINY_TRAIN_ARGS, "--progress", "jsonl"),
                            capture_output=True, text=True, timeout=240, env=ENV)
    assert time.time() - started < 200  # never the process group's timeout
    assert result.returncode != 0
    events = _events(result.stdout)
    assert events[-1]["event"] == "error", result.stdout
    message = events[-1]["message"]
    assert "rank 1 of 2" in message and "illegal memory access" in message, message
    assert "rank 1 of 2: unexpected RuntimeError: simulated fault" in result.stderr
    assert not (out / "train.lock").exists()
