"""The `ltuda` command: dataset check, train (also --init-from), predict, suggest, evaluate, phantoms, demo.

Every failure a user can cause ends in one readable message and exit code 1, never a traceback
(set LTUDA_DEBUG=1 to see one); with `--progress jsonl` it is also the stream's final `error` event.
"""

import argparse
import os
import shutil
import sys
import traceback
from pathlib import Path

from . import __version__
from .errors import DISK_FULL, READ_ONLY, LtudaError, ManifestProblems, write_error
from .progress import HumanReporter, TeeReporter, file_reporter, make_reporter

EXIT_STOPPED = 130


def _add_progress(parser):
    parser.add_argument("--progress", choices=("human", "jsonl", "none"), default="human",
                        help="jsonl: one JSON object per line on stdout for programs (the Slicer module)")


def add_evaluate_arguments(parser) -> None:
    """`ltuda evaluate`'s options. Here, not in evaluate.py: building the parser must not import torch and
    MONAI, or every `--help` and every argument error would take seconds."""
    parser.add_argument("--pred", required=True, help="predicted segmentation (.seg.nrrd or label map) or a folder of them")
    parser.add_argument("--truth", required=True, help="ground truth file or folder (matched to predictions by file name)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="model folder whose classes to score (model.json)")
    source.add_argument("--dataset", help="dataset.json (or its folder) whose classes to score")
    parser.add_argument("--truth-labels", help="label values of plain ground-truth label maps, e.g. 5=liver,1=spleen "
                                               "(default: the values are class values)")
    parser.add_argument("--out", help="folder for evaluation.json and evaluation.csv")


def _shard(text):
    from .claims import parse_shard
    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltuda", description="LTUDA: multi-organ segmentation from partially labelled CT.")
    parser.add_argument("--version", action="version", version=f"ltuda {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    dataset = sub.add_parser("dataset", help="dataset manifest tools")
    dsub = dataset.add_subparsers(dest="dataset_command", required=True)
    check = dsub.add_parser("check", help="read every file of a dataset and list every problem at once")
    check.add_argument("dataset", help="dataset.json or the folder holding it")
    check.add_argument("--allow-outside-paths", action="store_true", help="accept files outside the dataset folder")

    train = sub.add_parser("train", help="train a model (LTUDA or a baseline)")
    train.add_argument("--dataset", required=True, help="dataset.json or the folder holding it")
    train.add_argument("--out", required=True, help="model folder to create")
    train.add_argument("--preset", choices=("fast", "paper"), default=None,
                       help="fast: small network, 64x64 slices, minutes on a CPU; paper: the published setting (GPU). "
                            "Default: paper on a GPU, fast on a CPU")
    train.add_argument("--method", choices=("ltuda", "cda", "labeled-only", "naive", "marginal-exclusion"), default=None,
                       help="default: ltuda (with --init-from: the parent's)")
    train.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                       help="continue training this model (same network and organs) on the dataset's labels, with a "
                            "shorter schedule (a quarter of the parent's epochs); model.json records the lineage")
    for flag, kind, text in [
        ("--epochs-stage1", int, "epochs of stage 1 (CDA), or of the single stage of a baseline"),
        ("--epochs-stage2", int, "epochs of stage 2 (PDA)"),
        ("--iterations-per-epoch", int, "iterations per epoch (0: one pass over the training slices)"),
        ("--batch-size", int, "cases per batch, each expanded to 1 weak + K strong views"),
        ("--image-size", int, "slice size in pixels (a multiple of 16)"),
        ("--lr", float, "initial learning rate (SGD, Nesterov, poly decay)"),
        ("--momentum", float, "SGD momentum"),
        ("--ema-decay", float, "EMA decay of the teacher"),
        ("--pseudo-rampup-epochs", int, "epochs over which stage 1's pseudo-label loss ramps up (0: none)"),
        ("--warmup-epochs", int, "stage 1 opens with this many of its epochs trained on the labels only (0: none)"),
        ("--pseudo-uncertain-below", float,
         "ignore unlabelled organs the teacher gives a probability in [this, 0.5) (0.5: the paper's hard rule)"),
        ("--pseudo-confident-above", float,
         "a teacher positive for an unlabelled organ needs this probability; from 0.5 up to it the pixel is ignored "
         "(0.5: the paper's hard rule)"),
        ("--dice-weight", float,
         "weight of a partial soft-Dice term added to each pBCE term on ground truth, not on pseudo-labels "
         "(0: the paper's loss)"),
        ("--pseudo-gate", float,
         "use an unlabelled organ's pseudo-labels only once the teacher's running Dice on the cases that label it "
         "reaches this (0: always, the paper)"),
        ("--pseudo-dice-gate", float,
         "with --pseudo-dice: the Dice term covers an unlabelled organ's pseudo-targets only once the teacher's running "
         "Dice on the cases that label it reaches this; pBCE uses them throughout (0: from the start)"),
        ("--pseudo-dice-confident", float,
         "with --pseudo-dice: the Dice term sees an unlabelled organ's pseudo-target only where the teacher's "
         "probability is at least this or at most 1 - this; pBCE uses the rest (0.5: everywhere)"),
        ("--prototypes", int, "prototypes per class (M)"),
        ("--prototype-momentum", float, "momentum of prototype updates"),
        ("--strong-views", int, "CutMix strong views per sample (K)"),
        ("--intensity-remap", float,
         "share of the student's views (strong views; a baseline's and the warm-up's one view) given a random "
         "intensity curve, so organs are learnt across contrast phases; the teacher's view stays as scanned "
         "(0: off, the paper)"),
        ("--val-fraction", float, "share of training cases held out for validation when the manifest has no 'val' cases"),
        ("--seed", int, "random seed"),
    ]:
        train.add_argument(flag, type=kind, default=None, help=text)
    train.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                       help="sgd: the paper's (Nesterov, momentum 0.99); adamw converges faster on short CPU runs")
    train.add_argument("--pseudo-dice", action=argparse.BooleanOptionalAction, default=None,
                       help="also apply the Dice term to pseudo-label targets (of organs the gate lets through)")
    train.add_argument("--gate-cases", choices=("training", "held-out"), default=None,
                       help="where --pseudo-gate and --pseudo-dice-gate judge the teacher: its running Dice on the "
                            "training batches that label the organ, or its Dice on the held-out validation cases "
                            "at each validation")
    train.add_argument("--pbce-scaling", choices=("valid", "reference"), default=None,
                       help="valid: mean over labelled pixels and samples; reference: the reference code's "
                            "sum / (H*W), summed over samples")
    train.add_argument("--network", choices=("basic-unet", "reference-unet"), default=None,
                       help="basic-unet: MONAI BasicUNet (fast preset); reference-unet: the reference code's U-Net, "
                            "~13.4 M parameters (paper preset)")
    train.add_argument("--stage2-start", choices=("last", "best"), default=None,
                       help="stage 2 starts from the last or the best-validating stage-1 student (paper: best)")
    train.add_argument("--stage2-pseudo-labels", action=argparse.BooleanOptionalAction, default=None,
                       help="stage 2 trains on the unlabelled organs' pseudo-labels (paper); --no-stage2-pseudo-labels: "
                            "on the labelled organs alone, the pseudo-labels used in stage 1 only")
    train.add_argument("--unlabelled-slices", choices=("in-batch", "added"), default=None,
                       help="cases that label no organ: added (default), extra slices after the labelled ones, so "
                            "every labelled set is in every batch; in-batch: one more dataset taking batch places in "
                            "turn (before 2026-12-04)")
    train.add_argument("--intensity-remap-views", choices=("strong", "weak"), default=None,
                       help="with --intensity-remap, LTUDA's and CDA's views that get the curve: strong (every strong "
                            "view) or weak (the student's copy of the weak view, trained by the labelled term only)")
    train.add_argument("--intensity-remap-warmup", action=argparse.BooleanOptionalAction, default=None,
                       help="with --intensity-remap, stage 1's labelled-only warm-up gets the curve too (default); "
                            "--no-intensity-remap-warmup: the warm-up sees the scans as they are")
    train.add_argument("--lr-schedule", choices=("per-stage", "whole-run"), default=None,
                       help="per-stage: each stage restarts the poly decay (paper); whole-run: one decay over all "
                            "stages, the optimiser carried into stage 2 (short runs)")
    train.add_argument("--teacher-prototypes", choices=("copy", "ema"), default=None,
                       help="the teacher's prototype banks: copied from the student, or its EMA (paper: ema)")
    train.add_argument("--dry-run", action="store_true",
                       help="check the dataset, print the resolved settings and the parameter count as one JSON "
                            "object, write nothing")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    train.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    train.add_argument("--resume", action="store_true", help="continue the stopped run in --out from its last checkpoint")
    train.add_argument("--cache-dir", default=None, help="preprocessed-slice cache (default ~/.cache/ltuda or $LTUDA_CACHE_DIR)")
    train.add_argument("--allow-outside-paths", action="store_true")
    _add_progress(train)

    predict = sub.add_parser("predict", help="segment volumes with a trained model")
    predict.add_argument("--model", required=True, help="model folder")
    predict.add_argument("--input", required=True, help="volume file, DICOM series folder, or folder of volumes")
    predict.add_argument("--output", required=True, help="OUT.seg.nrrd, or a folder")
    predict.add_argument("--head", default="auto", help="auto, linear, proto-labeled or proto-unlabeled")
    predict.add_argument("--no-postprocess", action="store_true", help="skip largest-connected-component clean-up")
    predict.add_argument("--label-map", default=None, help="also write a plain label map (a file, or a folder in batch mode)")
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    predict.add_argument("--batch-size", type=int, default=None, help="slices per forward pass")
    predict.add_argument("--redo", action="store_true", help="batch mode: recompute outputs that already exist")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    predict.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                         help="folder mode: only the inputs whose index in name order mod N is I (0-based: 0/4 .. 3/4; "
                              "e.g. $SLURM_ARRAY_TASK_ID/N with --array=0-(N-1))")
    predict.add_argument("--claim-timeout", type=float, default=None, metavar="SECONDS",
                         help="folder mode: take over a case whose claim (OUTPUT/.claims/CASE.lock) has shown no sign of "
                              "life for this long, from a worker on another machine (default 3600)")
    _add_progress(predict)

    suggest = sub.add_parser("suggest", help="propose the organs each training case does not label, ranked for review")
    suggest.add_argument("--model", required=True, help="model folder")
    suggest.add_argument("--dataset", required=True, help="dataset.json or the folder holding it")
    suggest.add_argument("--out", required=True, help="folder for <case>.seg.nrrd proposals and suggestions.json")
    suggest.add_argument("--cases", default=None, metavar="ID[,ID...]", help="only these case ids (default: every training case)")
    suggest.add_argument("--score", choices=("entropy", "heads", "shift", "error", "volume", "random"), default=None,
                         help="what ranks the rows (default: random, which no uncertainty score beat in "
                              "benchmarks/annotation_loop.py)")
    suggest.add_argument("--order", choices=("balanced", "score"), default=None,
                         help="balanced: every organ's most uncertain row first, then every organ's second ...; "
                              "score: by the score alone (default: balanced; score for --score volume or random)")
    suggest.add_argument("--head", default="auto", help="auto, linear, proto-labeled or proto-unlabeled")
    suggest.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    suggest.add_argument("--batch-size", type=int, default=None, help="slices per forward pass")
    suggest.add_argument("--allow-outside-paths", action="store_true", help="accept files outside the dataset folder")
    _add_progress(suggest)

    evaluate = sub.add_parser("evaluate", help="3D Dice and HD95 (mm) of predictions against ground truth")
    add_evaluate_arguments(evaluate)

    phantoms = sub.add_parser("phantoms", help="write a synthetic partially labelled abdominal CT dataset")
    phantoms.add_argument("--out", required=True)
    phantoms.add_argument("--cases-per-site", type=int, default=4)
    phantoms.add_argument("--test-cases", type=int, default=4)
    phantoms.add_argument("--size", type=int, default=96, help="in-plane size in voxels")
    phantoms.add_argument("--seed", type=int, default=0)
    phantoms.add_argument("--layout", choices=("multi-site", "toy"), default="multi-site",
                          help="multi-site: a scanner per site; toy: the paper's toy set, one acquisition for all cases")
    phantoms.add_argument("--unlabelled-cases", type=int, default=0,
                          help="training cases that label no organ, from the test site's scanner (a hospital's own scans)")

    demo = sub.add_parser("demo", help="phantoms -> train LTUDA and the labelled-only baseline -> predict -> Dice")
    demo.add_argument("--out", default="ltuda-demo")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return parser


def cmd_dataset_check(args, report) -> int:
    from .checks import check_dataset
    manifest, problems = check_dataset(args.dataset, allow_outside_paths=args.allow_outside_paths)
    if problems:
        raise ManifestProblems(problems)
    counts = {c["name"]: sum(c["name"] in case.labeled for case in manifest.cases if case.split != "test")
              for c in manifest.classes}
    print(f"{manifest.path}: OK, {len(manifest.cases)} case(s); labelled training cases per organ: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _prepare_out_dir(out: Path, overwrite: bool, resume: bool) -> bool:
    """Checks and clears the model folder; returns whether there is a checkpoint to continue from."""
    from .train.trainer import CONFIG

    has_model = (out / "model.json").exists() or (out / "checkpoints").exists()
    if resume:
        if (out / "checkpoints" / "last.pt").exists():
            return True
        if (out / CONFIG).exists():  # killed before its first checkpoint: starts again, with its own settings
            return False
        raise LtudaError("has no checkpoint to resume from", out, "Start a new run without --resume.")
    if has_model and not overwrite:
        raise LtudaError("already holds a model", out, "Pass --overwrite to replace it, --resume to continue it, "
                         "or choose another --out.")
    if has_model:
        for name in ("model.json", "model.pt", "progress.jsonl", "train.log"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return False


def cmd_train(args, report) -> int:
    from .manifest import load_manifest
    from .train.lock import FolderLock

    out = Path(args.out)
    manifest = load_manifest(args.dataset, allow_outside_paths=args.allow_outside_paths)
    # Checked before the lock and the folder are touched: a bad parent changes nothing.
    finetune = _prepare_finetune(args, manifest, out) if args.init_from else None
    if args.dry_run:
        return _dry_run(args, out, finetune)
    from .train import distributed
    group = distributed.join(args.device)  # None unless torchrun started several processes
    if group is not None:
        return _train_distributed(args, report, manifest, out, group, finetune)
    # The lock comes before anything touches the folder: --overwrite never deletes a folder in use.
    with FolderLock(out, report) as lock:
        return _train_locked(args, report, manifest, out, lock, finetune)


def _prepare_finetune(args, manifest, out: Path):
    from .train.finetune import prepare_finetune

    if args.resume:
        raise LtudaError("--init-from and --resume do not go together", out,
                         "--resume continues the run in --out (a fine-tune keeps its parent); leave one out.")
    if Path(args.init_from).resolve() == out.resolve():
        raise LtudaError("--init-from and --out are the same folder", out,
                         "Write the continued model to a new folder (the parent stays as it is).")
    overrides = {k: getattr(args, k) for k in TRAIN_SETTINGS}
    overrides.update(method=args.method, device=args.device)
    config, state, family = prepare_finetune(args.init_from, manifest, overrides, preset=args.preset)
    _check_config(config)
    return config, state, family


def _train_locked(args, report, manifest, out, lock, finetune=None, group=None) -> int:
    from .train.config import TrainConfig
    from .train.finetune import LINEAGE, LineageTrainer, dataset_labels
    from .train.trainer import CONFIG, safe_json

    resumable = _prepare_out_dir(out, args.overwrite, args.resume)
    init_state = None
    restart = None
    if args.resume:
        config = TrainConfig.from_json(safe_json(out / CONFIG).get("config", {}))
        config.device = args.device
        if not resumable:
            if (config.extra or {}).get(LINEAGE):  # its start was the parent's weights, not a checkpoint
                raise LtudaError("stopped before its first checkpoint, so it cannot be resumed", out,
                                 "Run the same `ltuda train --init-from ...` command again with --overwrite.")
            restart = (f"notice: {out} stopped before its first checkpoint; --resume starts it again from the "
                       "beginning, with its saved settings")
    elif finetune is not None:
        config, init_state, _ = finetune
    else:
        config = _config_from_args(args)
    if group is not None:
        group.broadcast_object(config.to_json())  # the other ranks train with rank 0's settings
    files = file_reporter(out / "progress.jsonl", out / "train.log")
    for notice in lock.notices:
        files.log(notice)
    run_report = TeeReporter(report, files)
    if restart:
        run_report.log(restart)
    extra = {"dataset_labels": dataset_labels(manifest)}
    if (config.extra or {}).get(LINEAGE):
        extra[LINEAGE] = config.extra[LINEAGE]
    result = LineageTrainer(manifest, out, config, run_report, cache_dir=args.cache_dir, resume=resumable,
                            init_state=init_state, extra_metadata=extra, group=group).run()
    if group is not None:
        group.any(False)  # the other ranks exit after rank 0 saved (torchrun ends the job when one exits)
    run_report.emit("done", status=result["status"], model_dir=str(out), mean_dice=result["mean_dice"])
    return 0 if result["status"] == "completed" else EXIT_STOPPED


def _train_distributed(args, report, manifest, out, group, finetune=None) -> int:
    """One rank of a torchrun job. Rank 0 trains as a single process does (lock, folder, progress
    stream); the others are silent. A failure names the rank it started on."""
    from .progress import SilentReporter

    try:
        if group.leader:
            from .train.lock import FolderLock
            with FolderLock(out, report) as lock:
                code = _train_locked(args, report, manifest, out, lock, finetune, group)
        else:
            code = _train_follower(args, manifest, out, group, SilentReporter())
    except LtudaError as exc:
        cause = group.record_failure(str(exc), wait_s=0)
        if not group.leader:  # silent on stdout (rank 0's stream); stderr names the rank
            print(f"error: {cause}", file=sys.stderr, flush=True)
            return 1
        raise LtudaError(cause) from None
    except Exception as exc:  # noqa: BLE001 - often a collective that broke because another rank is gone
        detail = str(exc).splitlines()[0] if str(exc) else ""
        cause = group.record_failure(f"unexpected {type(exc).__name__}: {detail}", wait_s=3)
        if os.environ.get("LTUDA_DEBUG"):
            traceback.print_exc()
        if not group.leader:
            print(f"error: {cause}", file=sys.stderr, flush=True)
            return 1
        raise LtudaError(f"the distributed training stopped: {cause}",
                         fix="See that rank's message; fix it and continue with --resume (any number of processes).") \
            from None
    group.close()
    return code


def _train_follower(args, manifest, out, group, silent) -> int:
    """Ranks other than 0: rank 0's settings, no lock, nothing written, nothing said."""
    from .train.config import TrainConfig
    from .train.trainer import Trainer

    config = TrainConfig.from_json(group.broadcast_object(None))
    config.device = args.device
    result = Trainer(manifest, out, config, silent, cache_dir=args.cache_dir, resume=args.resume, group=group).run()
    group.any(False)  # wait for rank 0's last save
    return 0 if result["status"] == "completed" else EXIT_STOPPED


TRAIN_SETTINGS = (
    "epochs_stage1", "epochs_stage2", "iterations_per_epoch", "batch_size", "image_size", "lr", "momentum",
    "ema_decay", "pseudo_rampup_epochs", "warmup_epochs", "pseudo_uncertain_below", "pseudo_confident_above",
    "pseudo_gate", "pseudo_dice", "pseudo_dice_gate", "pseudo_dice_confident", "gate_cases", "pbce_scaling",
    "dice_weight", "optimizer", "prototypes", "prototype_momentum", "strong_views", "val_fraction", "seed", "network",
    "stage2_start", "stage2_pseudo_labels", "teacher_prototypes", "lr_schedule", "unlabelled_slices",
    "intensity_remap", "intensity_remap_views", "intensity_remap_warmup")


def _config_from_args(args):
    """The training settings: the preset (paper on a GPU, fast on a CPU) with the flags given, range-checked."""
    from .train.config import make_config
    from .train.trainer import pick_device

    preset = args.preset or ("paper" if pick_device(args.device).type == "cuda" else "fast")
    config = make_config(preset, method=args.method, device=args.device,
                         **{k: getattr(args, k) for k in TRAIN_SETTINGS})
    return _check_config(config)


def _check_config(config):
    if config.image_size % 16:
        raise LtudaError(f"--image-size {config.image_size} is not a multiple of 16", fix="Use e.g. 64, 128 or 256.")
    if not 0.0 <= config.pseudo_uncertain_below <= 0.5:
        raise LtudaError(f"--pseudo-uncertain-below {config.pseudo_uncertain_below} is outside [0, 0.5]",
                         fix="Use 0.5 for the paper's rule, or e.g. 0.2 to ignore unsure teacher pixels.")
    if not 0.0 <= config.intensity_remap <= 1.0:
        raise LtudaError(f"--intensity-remap {config.intensity_remap} is outside [0, 1]",
                         fix="Use 0 (off) or a share of views such as 0.5.")
    if not config.intensity_remap_warmup and not config.intensity_remap:
        raise LtudaError("--no-intensity-remap-warmup keeps the intensity curve off the warm-up, but the curve is off",
                         fix="Add --intensity-remap (e.g. 0.5), or leave out --no-intensity-remap-warmup.")
    if not 0.5 <= config.pseudo_confident_above < 1.0:
        raise LtudaError(f"--pseudo-confident-above {config.pseudo_confident_above} is outside [0.5, 1)",
                         fix="Use 0.5 for the paper's rule, or e.g. 0.9 to train only on confident teacher positives.")
    if not 0.0 <= config.pseudo_gate < 1.0:
        raise LtudaError(f"--pseudo-gate {config.pseudo_gate} is outside [0, 1)",
                         fix="Use 0 to always use pseudo-labels, or a teacher Dice such as 0.5.")
    if not 0.0 <= config.pseudo_dice_gate < 1.0:
        raise LtudaError(f"--pseudo-dice-gate {config.pseudo_dice_gate} is outside [0, 1)",
                         fix="Use 0 for the Dice term on every organ's pseudo-targets, or a teacher Dice such as 0.7.")
    if config.pseudo_dice_gate and not config.pseudo_dice:
        raise LtudaError("--pseudo-dice-gate gates the Dice term on pseudo-targets, which is off",
                         fix="Add --pseudo-dice (and a --dice-weight above 0), or leave out --pseudo-dice-gate.")
    if not 0.5 <= config.pseudo_dice_confident < 1.0:
        raise LtudaError(f"--pseudo-dice-confident {config.pseudo_dice_confident} is outside [0.5, 1)",
                         fix="Use 0.5 for the Dice term on every pseudo-target pixel, or e.g. 0.9 for the teacher's "
                             "sure ones.")
    if config.pseudo_dice_confident > 0.5 and not config.pseudo_dice:
        raise LtudaError("--pseudo-dice-confident limits the Dice term on pseudo-targets, which is off",
                         fix="Add --pseudo-dice (and a --dice-weight above 0), or leave out --pseudo-dice-confident.")
    if config.gate_cases == "held-out" and not (config.pseudo_gate or config.pseudo_dice_gate):
        raise LtudaError("--gate-cases held-out says where an organ gate judges the teacher, but no gate is on",
                         fix="Add --pseudo-gate or --pseudo-dice-gate (e.g. 0.7), or leave out --gate-cases.")
    if config.warmup_epochs < 0 or (config.warmup_epochs >= config.epochs_stage1 and 1 in config.stages):
        raise LtudaError(f"--warmup-epochs {config.warmup_epochs} is not in [0, --epochs-stage1 "
                         f"{config.epochs_stage1})", fix="Use e.g. half of stage 1's epochs, or 0 for none.")
    if config.dice_weight < 0:
        raise LtudaError(f"--dice-weight {config.dice_weight} is negative", fix="Use 0 (the paper) or e.g. 1.")
    return config


def _dry_run(args, out: Path, finetune=None) -> int:
    """Check the dataset and print what a run would use, as one JSON object; write nothing."""
    import json

    from .checks import check_dataset
    from .model.network import LTUDANet
    from .train.trainer import network_config

    manifest, problems = check_dataset(args.dataset, allow_outside_paths=args.allow_outside_paths)
    if problems:
        raise ManifestProblems(problems)
    config = finetune[0] if finetune else _config_from_args(args)
    network = LTUDANet(network_config(config, len(manifest.classes)))
    print(json.dumps({"dataset": str(manifest.path), "out": str(out), "classes": [c["name"] for c in manifest.classes],
                      "cases": {s: len(manifest.split(s)) for s in ("train", "val", "test")},
                      "settings": config.to_json(), "network": network.config.to_json(),
                      "parameters": sum(p.numel() for p in network.parameters())}))
    return 0


def cmd_predict(args, report) -> int:
    from .predict import run_prediction
    summary = run_prediction(args.model, args.input, args.output, head=args.head, postprocess=not args.no_postprocess,
                             label_map=args.label_map, device=args.device, batch_size=args.batch_size,
                             redo=args.redo, overwrite=args.overwrite, report=report, shard=args.shard,
                             claim_timeout=args.claim_timeout)
    if summary["cases"] > 1 or summary["failed"]:
        report.log(f"{summary['cases']} case(s): {summary['done']} done, {summary['skipped']} skipped, "
                   + (f"{summary['busy']} being done by other workers, " if summary.get("busy") else "")
                   + f"{len(summary['failed'])} failed; {summary['seconds_per_case']} s per case")
        for failure in summary["failed"]:
            report.log(f"  failed: {failure['message']}")
    return 1 if summary["failed"] else 0


def cmd_suggest(args, report) -> int:
    from .suggest import run_suggestion
    case_ids = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    summary = run_suggestion(args.model, args.dataset, args.out, case_ids=case_ids, device=args.device,
                             score=args.score, order=args.order, head=args.head, batch_size=args.batch_size, report=report,
                             allow_outside_paths=args.allow_outside_paths)
    report.log(f"{summary['cases']} case(s) lack organs: {summary['done']} done, {summary['skipped']} already done, "
               f"{len(summary['failed'])} failed; {summary['rows']} row(s) in {summary['suggestions']}")
    for failure in summary["failed"]:
        report.log(f"  failed: {failure['message']}")
    if summary["status"] == "cancelled":
        return EXIT_STOPPED
    return 1 if summary["failed"] else 0


def cmd_evaluate(args, report) -> int:
    from .evaluate import run
    return run(args, report)


def cmd_phantoms(args, report) -> int:
    from .data.phantoms import generate_phantoms
    path = generate_phantoms(args.out, cases_per_site=args.cases_per_site, test_cases=args.test_cases,
                             shape=(args.size, args.size), seed=args.seed, report=report,
                             layout=args.layout, unlabelled_cases=args.unlabelled_cases)
    print(path)
    return 0


def cmd_demo(args, report) -> int:
    from .demo import run_demo
    run_demo(Path(args.out), device=args.device, report=report)
    return 0


COMMANDS = {"train": cmd_train, "predict": cmd_predict, "suggest": cmd_suggest, "evaluate": cmd_evaluate, "phantoms": cmd_phantoms,
            "demo": cmd_demo}


def main(argv=None) -> int:
    args = _build_parser().parse_args(argv)
    report = make_reporter(getattr(args, "progress", "human"))
    try:
        if args.command == "dataset":
            return cmd_dataset_check(args, report)
        return COMMANDS[args.command](args, report)
    except LtudaError as exc:
        _report_error(report, str(exc))
        return 1
    except OSError as exc:  # a write site without its own message: still what, where and why
        if not exc.filename:
            return _unexpected(report, exc)
        if exc.errno in DISK_FULL + READ_ONLY:
            _report_error(report, str(write_error(exc, exc.filename, "file")))
        else:  # a path the system refuses (too long, not a folder, a loop of links...): the path and why
            _report_error(report, str(LtudaError(f"{exc.strerror or exc}", exc.filename,
                                                 "Check the path, then run the command again.")))
        return 1
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return EXIT_STOPPED
    except Exception as exc:  # an internal fault: still one line, with a way to get the details
        return _unexpected(report, exc)


def _unexpected(report, exc) -> int:
    if os.environ.get("LTUDA_DEBUG"):
        traceback.print_exc()
    detail = str(exc).splitlines()[0] if str(exc) else ""
    _report_error(report, f"unexpected {type(exc).__name__}: {detail} (set LTUDA_DEBUG=1 for details and report it)")
    return 1


def _report_error(report, message: str):
    """The stream's final `error` event, and one line on stderr for a person."""
    report.emit("error", message=message, log=None)
    if not isinstance(report, HumanReporter):
        print(f"error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
