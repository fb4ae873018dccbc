"""The training run: stages, EMA teacher, validation, atomic checkpoints, resume and clean stops."""

import contextlib
import copy
import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..data.cache import SliceCache
from ..data.preprocess import Preprocessing
from ..data.slices import SlicePool
from ..errors import LtudaError, ManifestProblems
from ..manifest import Case, Manifest
from ..model.network import HEADS, LTUDANet, NetworkConfig
from ..model.store import atomic_torch_save, atomic_write_json, safe_torch_load, save_model
from ..validation import validate
from .config import STAGE_NAMES, TrainConfig
from .diagnostics import case_group, pseudo_label_counts, quality_by_group, quality_from_counts
from .distributed import share_start, steps_per_epoch
from .lock import STOP_NAME, stop_requested as stop_file_present
from .steps import StepContext, ltuda_step, supervised_step

LAST = Path("checkpoints") / "last.pt"
BEST_STUDENT = Path("checkpoints") / "best_student.pt"  # stage 1's best student, where stage 2 may start
CONFIG = Path("checkpoints") / "config.json"


def network_config(config: TrainConfig, num_classes: int) -> NetworkConfig:
    return NetworkConfig(num_classes, tuple(config.features), config.embedding_dim, config.prototypes, config.network)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise LtudaError("--device cuda was requested but no CUDA GPU is available to PyTorch",
                         fix="Use --device cpu (or auto), or install a CUDA build of PyTorch.")
    if requested in ("auto", "cuda"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({torch.get_num_threads()} threads)"


def split_validation(manifest: Manifest, fraction: float, seed: int):
    """(train cases, val cases): the manifest's "val" cases, else a share of each labelling group.

    Cases are grouped by which organs they label, so every organ keeps cases on both sides. Cases that
    label nothing are never held out: there is nothing to score on them.
    """
    train = manifest.split("train")
    given = manifest.split("val")
    if given or fraction <= 0:
        return train, given
    rng = np.random.default_rng(seed)
    groups = {}
    for case in train:
        if case.labeled:
            groups.setdefault(tuple(case.labeled), []).append(case)
    keep, val = [], []
    for cases in groups.values():
        order = rng.permutation(len(cases))
        n_val = int(round(fraction * len(cases))) if len(cases) >= 2 else 0
        n_val = min(max(n_val, 1 if len(cases) >= 3 else 0), len(cases) - 1)
        val += [cases[i] for i in order[:n_val]]
        keep += [cases[i] for i in order[n_val:]]
    return keep + [c for c in train if not c.labeled], val


def pseudo_rampup(epoch: float, rampup_epochs: int) -> float:
    """Weight of the pseudo-label term: exp(-5 (1 - t)^2) over the ramp-up, then 1."""
    if rampup_epochs <= 0 or epoch >= rampup_epochs:
        return 1.0
    return math.exp(-5.0 * (1.0 - epoch / rampup_epochs) ** 2)


def fully_labelled(case: Case, classes) -> Case:
    """The case read from its "label_full" file, every organ labelled (class values)."""
    return Case(case.id, case.image, case.label_full, [c["name"] for c in classes],
                {c["value"]: c["name"] for c in classes}, case.split)


class StopRequested(Exception):
    pass


class Trainer:
    def __init__(self, manifest: Manifest, out_dir, config: TrainConfig, report, cache_dir=None, resume=False,
                 group=None):
        self.manifest, self.out_dir, self.config, self.report = manifest, Path(out_dir), config, report
        # torchrun with several processes: a distributed.Group; only its rank 0 (the leader) validates,
        # reads and writes the model folder. None: one process, as always.
        self.group = group
        self.leader = group is None or group.leader
        self.classes = manifest.classes
        self.num_classes = len(self.classes)
        self.cache = SliceCache(cache_dir, notify=report.log)
        self.resume = resume
        self.stop_requested = False
        self.device = group.device if group is not None else pick_device(config.device)
        self.prep = Preprocessing(tuple(config.hu_window), config.image_size)
        self.started = time.time()

    # ----- setup -----
    def _autocast(self):
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _load_data(self):
        train, val = split_validation(self.manifest, self.config.val_fraction, self.config.seed)
        unlabelled = [c for c in train if not c.labeled]
        if unlabelled and self.config.stages == (0,):
            # a supervised-only method has nothing to learn from them: they would only take batch places
            train = [c for c in train if c.labeled]
            self.report.log(f"{len(unlabelled)} case(s) label no organ; {self.config.method} learns from labels "
                            "only, so they are not used (ltuda and cda learn from them through pseudo-labels)")
        elif unlabelled:
            self.report.log(f"{len(unlabelled)} case(s) label no organ: {self.config.method} learns from them "
                            "through pseudo-labels")
        self.report.log(f"preprocessing {len(train) + len(val)} case(s) (cached in {self.cache.root})")
        problems, prepared, full = [], {}, {}
        with_full = all(c.label_full is not None for c in train)
        if self.config.oracle_pseudo_labels and not with_full:
            raise LtudaError("the oracle needs every training case's full labels (\"label_full\")", self.manifest.path,
                             "Use phantoms (they record them), or train without the oracle.")
        for case in train + val:
            try:
                prepared[case.id] = self.cache.load(case, self.classes, self.prep)
                if with_full and case in train:
                    full[case.id] = self.cache.load(fully_labelled(case, self.classes), self.classes, self.prep)
            except LtudaError as exc:
                problems.append(str(exc))
        if problems:
            raise ManifestProblems(problems)
        self.train_cases, self.val_cases = train, val
        self._check_held_out_gate(val)
        # Teacher diagnostics on the organs each case does not label, where the truth is known.
        self.diagnostic_pairs = [(prepared[c.id], full[c.id]) for c in train] if with_full else []
        groups = [case_group(c) for c in train]  # by site and phase, where the manifest says so
        self.diagnostic_groups = groups if len({g for g in groups if g}) > 1 else []
        self.diagnostics = []
        oracle = [full[c.id] for c in train] if self.config.oracle_pseudo_labels else None
        self.pool = SlicePool([prepared[c.id] for c in train], self.num_classes, self.device, full_labels=oracle)
        self.val_prepared = [prepared[c.id] for c in val]
        if self.config.iterations_per_epoch <= 0:
            self.config.iterations_per_epoch = max(1, math.ceil(len(self.pool) / self.config.batch_size))

    def _check_held_out_gate(self, val):
        """A held-out organ gate opens an organ only on the teacher's Dice on held-out cases that label it:
        an organ no validation case labels would never open."""
        if self.config.gate_cases != "held-out" or not {1, 2} & set(self.config.stages):
            return  # no gate, or a method without pseudo-labels
        labelled = {name for case in val for name in case.labeled}
        missing = [c["name"] for c in self.classes if c["name"] not in labelled]
        if missing:
            raise LtudaError(f"--gate-cases held-out: no validation case labels {', '.join(missing)}, so its gate "
                             "would never open", self.manifest.path,
                             "Raise --val-fraction (each organ needs 3 or more labelled cases), mark \"val\" cases "
                             "that label every organ in the manifest, or use --gate-cases training.")

    def _network(self) -> LTUDANet:
        net = LTUDANet(network_config(self.config, self.num_classes))
        net = net.to(self.device)
        if self.device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        return net

    def _optimizer(self, net):
        cfg = self.config
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)

    # ----- checkpoints -----
    def _save_last(self, stage_index, epoch, iteration):
        state = {
            "format": torch.tensor(1),
            "stage_index": torch.tensor(stage_index),
            "epoch": torch.tensor(epoch),
            "iteration": torch.tensor(iteration),
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "best_dice": torch.tensor(self.best["mean_dice"]),
            "elapsed": torch.tensor(self.elapsed()),
            "gate": self.ctx.gate.state_dict(),
        }
        atomic_torch_save(state, self.out_dir / LAST)
        self._save_run_config()
        self.report.emit("checkpoint", kind="last", path=str(self.out_dir / LAST))

    def _save_run_config(self):
        """The run's settings and progress beside the checkpoint. Also written before the first step, so
        that a run killed before its first checkpoint can be started again with its own settings."""
        atomic_write_json({"config": self.config.to_json(), "best": self.best,
                           "best_student_dice": self.best_student_dice, "diagnostics": self.diagnostics,
                           "dataset": str(Path(self.manifest.path).absolute())}, self.out_dir / CONFIG)

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def _metadata(self, completed: bool) -> dict:
        cfg = self.config
        return {
            "classes": self.classes,
            "preprocessing": self.prep.to_json(),
            "default_head": self.best.get("head") or "linear",
            "training": {
                "method": cfg.method, "preset": cfg.preset, "stages": list(cfg.stages),
                "epochs": {str(s): cfg.epochs(s) for s in cfg.stages}, "iterations_per_epoch": cfg.iterations_per_epoch,
                "seconds": round(self.elapsed(), 1), "device": device_name(self.device), "dataset": str(self.manifest.path),
                "cases": {"train": len(self.train_cases), "val": len(self.val_cases),
                          "unlabelled": sum(not c.labeled for c in self.train_cases)}, "seed": cfg.seed,
                "completed": completed, "best": {k: self.best[k] for k in ("stage", "epoch", "model", "head")},
                "config": cfg.to_json(), "ltuda_version": __version__,
            },
            "validation": {
                "mean_dice": self.best["mean_dice"],
                "per_organ": self.best.get("per_organ", {}),
                "by_head": self.best.get("by_head", {}),
            },
            "pseudo_label_quality": self.diagnostics,
        }

    def _consider_best(self, stage, epoch, results):
        """results: {(model, head): (mean, per_organ)}; keep the best network+head seen so far."""
        (model, head), (mean, per_organ) = max(results.items(), key=lambda kv: (kv[1][0], kv[0][0] == "teacher"))
        by_head = {f"{m}/{h}": r[0] for (m, h), r in results.items()}
        if mean > self.best["mean_dice"] or self.best["stage"] is None:
            self.best = {"mean_dice": mean, "per_organ": per_organ, "stage": stage, "epoch": epoch, "model": model,
                         "head": head, "by_head": by_head}
            network = self.teacher if model == "teacher" else self.student
            save_model(self.out_dir, network, self._metadata(completed=False))
            self.report.emit("checkpoint", kind="best", path=str(self.out_dir / "model.pt"), mean_dice=mean,
                             model=model, head=head)

    # ----- the loop -----
    def _ema_update(self, step: int):
        decay = min(self.config.ema_decay, 1.0 - 1.0 / (step + 1))  # short warm-up (mean-teacher practice)
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.student.parameters()):
                t.mul_(decay).add_(s.detach(), alpha=1 - decay)
            ema_banks = self.config.teacher_prototypes == "ema"
            for (name, t), s in zip(self.teacher.named_buffers(), self.student.buffers()):
                if ema_banks and name.startswith("prototypes"):
                    t.mul_(decay).add_(s, alpha=1 - decay)
                    t.copy_(torch.nn.functional.normalize(t, dim=-1))
                else:
                    t.copy_(s)

    def _handle_signal(self, signum, frame):
        self.stop_requested = True
        self.report.log("stop requested: saving a checkpoint, then exiting (run again with --resume to continue)")

    def _stop_now(self) -> bool:
        """A signal, or a STOP file in the model folder (any platform), asks for a clean stop."""
        if not self.stop_requested and stop_file_present(self.out_dir):
            self.stop_requested = True
            with contextlib.suppress(OSError):
                (self.out_dir / STOP_NAME).unlink()
            self.report.log(f"stop requested ({STOP_NAME} file in {self.out_dir}): saving a checkpoint, then exiting "
                            "(run again with --resume to continue)")
        return self.stop_requested

    def run(self) -> dict:
        self._load_data()
        cfg = self.config
        self.generator = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.student = self._network()
        self.teacher = copy.deepcopy(self.student)
        self.optimizer = self._optimizer(self.student)
        self.best = {"mean_dice": -1.0, "stage": None, "epoch": None, "model": None, "head": None}
        self.elapsed_before = 0.0
        self.best_student_dice = -1.0
        self.ctx = ctx = StepContext(cfg, self.num_classes, self.generator, self._autocast)
        start_stage, start_epoch, start_iter = 0, 0, 0
        if self.resume and self.leader:
            start_stage, start_epoch, start_iter = self._restore()
        elif self.leader:
            (self.out_dir / CONFIG).parent.mkdir(parents=True, exist_ok=True)
            self._save_run_config()
        world = 1
        if self.group is not None:  # rank 0's position, optimiser and gate; each rank its own random stream
            self.group.attach(ctx)
            start_stage, start_epoch, start_iter = share_start(self, (start_stage, start_epoch, start_iter))
            world = self.group.world
        stages = list(cfg.stages)
        iters = steps_per_epoch(cfg.iterations_per_epoch, world)
        start_iter = math.ceil(start_iter / world)  # checkpoints count batches: N ranks draw N per step
        total = sum(cfg.epochs(s) for s in stages) * iters
        done_before = sum(cfg.epochs(s) for s in stages[:start_stage]) * iters + start_epoch * iters + start_iter
        self.report.emit("start", command="train", method=cfg.method, preset=cfg.preset, device=self.device.type,
                         device_name=device_name(self.device), stages=stages,
                         epochs={str(s): cfg.epochs(s) for s in stages}, iterations_per_epoch=iters,
                         cases={"train": len(self.train_cases), "val": len(self.val_cases)},
                         slices=len(self.pool), resumed=self.resume,
                         **({"processes": world} if self.group is not None else {}))
        previous = {sig: signal.signal(sig, self._handle_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        global_step, run_started, steps_this_run = done_before, time.time(), 0
        try:
            for stage_index in range(start_stage, len(stages)):
                stage = stages[stage_index]
                first_epoch = start_epoch if stage_index == start_stage else 0
                if first_epoch == 0 and start_iter == 0 and stage_index > 0:
                    self._begin_stage()
                net = self._for_stage(stage)
                self.report.emit("stage", stage=stage, name=STAGE_NAMES[stage], epochs=cfg.epochs(stage))
                for epoch in range(first_epoch, cfg.epochs(stage)):
                    lr = cfg.learning_rate(stage_index, epoch)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    self.student.train()
                    losses, images, epoch_started = [], 0, time.time()
                    first_iter = start_iter if (stage_index == start_stage and epoch == first_epoch) else 0
                    for iteration in range(first_iter, iters):
                        if self._stop_agreed():
                            if self.leader:
                                self._save_last(stage_index, epoch, iteration * world)
                            raise StopRequested()
                        batch = self.pool.batch(cfg.batch_size, self.generator, cfg.unlabelled_slices)
                        ctx.pseudo_weight = pseudo_rampup(epoch - cfg.warmup_epochs + iteration / iters,
                                                          cfg.pseudo_rampup_epochs)
                        if stage == 0 or (stage == 1 and epoch < cfg.warmup_epochs):
                            loss = supervised_step(ctx, net, batch, remap=stage == 0 or cfg.intensity_remap_warmup)
                        else:
                            loss = ltuda_step(ctx, net, self.teacher, batch, stage)
                        if not torch.isfinite(loss):
                            raise LtudaError(f"the loss became {loss.item()} at stage {stage}, epoch {epoch + 1}",
                                             fix="Lower --lr, or check the images for extreme values.")
                        self.optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        self.optimizer.step()
                        if self.group is not None:
                            self.group.average_buffers(self.student)  # BatchNorm statistics, as the weights
                        global_step += 1
                        steps_this_run += 1
                        self._ema_update(global_step)
                        losses.append(loss.item())
                        images += batch[0].shape[0]
                    seconds = time.time() - epoch_started
                    rate = (time.time() - run_started) / max(1, steps_this_run)
                    self.report.emit(
                        "epoch", stage=stage, epoch=epoch + 1, epochs=cfg.epochs(stage),
                        loss=float(np.mean(losses)) if losses else float("nan"), lr=lr,
                        images_per_s=images * world / max(seconds, 1e-9),
                        eta_s=rate * (total - global_step), progress=global_step / total,
                        **self._gate_status(ctx, stage),
                    )
                    last_epoch = epoch + 1 == cfg.epochs(stage)
                    validating = (epoch + 1) % cfg.validate_every == 0 or last_epoch
                    if self.leader:  # the other ranks wait for rank 0 at the next collective
                        if validating:
                            self._diagnose(stage, epoch + 1)
                            if self.val_prepared:
                                self._validate(stage, epoch + 1)
                        self._save_last(stage_index, epoch + 1, 0)
                    if validating and ctx.gate.held_out and self.group is not None:
                        ctx.gate.set_held_out(self.group.broadcast_tensor(ctx.gate.held_out_dice))
                start_epoch, start_iter = 0, 0
        except StopRequested:
            if self.leader:
                self._finish(completed=False)
            return {"status": "cancelled", "mean_dice": self.best["mean_dice"]}
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.leader:
            self._finish(completed=True)
        return {"status": "completed", "mean_dice": self.best["mean_dice"]}

    def _stop_agreed(self) -> bool:
        """A stop request; under torchrun, agreed by all ranks so that they stop at the same step."""
        if self.group is None:
            return self._stop_now()
        return self.group.any(self._stop_now() if self.leader else self.stop_requested)

    def _for_stage(self, stage):
        """The network the steps train: the student, or under torchrun its DistributedDataParallel view,
        after every rank took rank 0's student and teacher (a stage may start from rank 0's best student)."""
        if self.group is None:
            return self.student
        self.group.broadcast_module(self.student)
        self.group.broadcast_module(self.teacher)
        return self.group.wrap(self.student, stage)

    def _gate_status(self, ctx, stage) -> dict:
        """The organ gate's running teacher Dice and which organs use pseudo-labels (LTUDA stages only)."""
        if stage == 0 or not ctx.gate.enabled:
            return {}
        names = [c["name"] for c in self.classes]
        dice, open_, dice_open = ctx.gate.dice().tolist(), ctx.gate.open().tolist(), ctx.gate.dice_open().tolist()
        status = {"teacher_dice": dict(zip(names, [round(d, 4) for d in dice])),
                  "pseudo_labels_on": [n for n, o in zip(names, open_) if o]}
        if self.config.pseudo_dice and ctx.gate.dice_threshold > 0:
            status["pseudo_dice_on"] = [n for n, o in zip(names, dice_open) if o]
        return status

    def _begin_stage(self):
        """A new stage starts from the previous stage's last (or best, `stage2_start`) student; the teacher
        restarts from it too, and so does the optimiser unless one learning-rate decay spans the whole run.

        The model is the best checkpoint of the final stage (as in the paper, per stage), so every
        head it offers has been trained.
        """
        if self.config.stage2_start == "best" and (self.out_dir / BEST_STUDENT).is_file():
            self.student.load_state_dict(safe_torch_load(self.out_dir / BEST_STUDENT, "checkpoint"))
            self.report.log("stage 2 starts from the best-validating stage-1 student")
        self.teacher.load_state_dict(self.student.state_dict())
        if self.config.lr_schedule == "per-stage":
            self.optimizer = self._optimizer(self.student)
        self.best = {"mean_dice": -1.0, "stage": None, "epoch": None, "model": None, "head": None}

    def _diagnose(self, stage, epoch):
        """The teacher's pseudo-label quality where they are used, when the truth is known."""
        if stage not in (1, 2) or not self.diagnostic_pairs or self.config.oracle_pseudo_labels:
            return
        counts = pseudo_label_counts(self.teacher, self.diagnostic_pairs, self.classes, self.device, self._autocast)
        entry = {"stage": stage, "epoch": epoch, "per_organ": quality_from_counts(counts, self.classes)}
        entry.update(self._gate_status(self.ctx, stage))  # with an organ gate: which organs it had let in
        if self.diagnostic_groups:
            entry["by_group"] = quality_by_group(counts, self.diagnostic_groups, self.classes)
        self.diagnostics.append(entry)
        self.report.emit("pseudo_labels", **entry)

    def _validate(self, stage, epoch):
        heads = ("linear",) if stage in (0, 1) else HEADS
        results = {}
        for model_name, net in (("student", self.student), ("teacher", self.teacher)):
            for head in heads:
                mean, per_organ = validate(net, self.val_prepared, self.classes, head, self.device, self._autocast)
                results[(model_name, head)] = (mean, per_organ)
                self.report.emit("validation", stage=stage, epoch=epoch, model=model_name, head=head,
                                 mean_dice=mean, per_organ=per_organ)
        if self.ctx.gate.held_out:  # the organ gate's verdict until the next validation
            per_organ = results[("teacher", "linear")][1]
            self.ctx.gate.set_held_out(torch.tensor([per_organ.get(c["name"], 0.0) for c in self.classes]))
        student_mean = max(mean for (model, _), (mean, _) in results.items() if model == "student")
        if stage == 1 and student_mean > self.best_student_dice:
            self.best_student_dice = student_mean
            atomic_torch_save(self.student.state_dict(), self.out_dir / BEST_STUDENT)
        self._consider_best(stage, epoch, results)

    def _finish(self, completed: bool):
        if self.best["stage"] is None:  # no validation cases: the final teacher is the model
            self.best.update({"stage": self.config.stages[-1], "epoch": self.config.epochs(self.config.stages[-1]),
                              "model": "teacher", "head": "linear", "mean_dice": float("nan")})
            save_model(self.out_dir, self.teacher, self._metadata(completed))
        else:
            meta = self._metadata(completed)
            atomic_write_json({**safe_json(self.out_dir / "model.json"), **meta}, self.out_dir / "model.json")

    def _restore(self):
        path = self.out_dir / LAST
        if not path.is_file():
            raise LtudaError("has no checkpoint to resume from", self.out_dir, "Start a new run without --resume.")
        state = safe_torch_load(path, "checkpoint")
        try:
            self.student.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.generator.set_state(state["generator"])
            if "gate" in state:
                self.ctx.gate.load_state_dict(state["gate"])
            saved = safe_json(self.out_dir / CONFIG)
            self.best = saved.get("best", self.best)
            self.best_student_dice = float(saved.get("best_student_dice", -1.0))
            self.diagnostics = list(saved.get("diagnostics", []))
            self.elapsed_before = float(state["elapsed"])
            return int(state["stage_index"]), int(state["epoch"]), int(state["iteration"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise LtudaError(f"does not match this training run ({str(exc).splitlines()[0][:160]})", path,
                             "Resume with the same settings, or start again with --overwrite.") from None


def safe_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
