"""Scoring segmentations against ground truth: 3D Dice and 3D HD95 in millimetres per organ (MONAI metrics).

Conventions, per case and organ:
- absent in both prediction and truth: Dice NaN and HD95 NaN: not scored, left out of every mean;
- present in only one of them: Dice 0 (a miss or a false alarm, counted in the Dice mean) and HD95 NaN
  (there is no surface to measure to; left out of the HD95 mean, the Dice of 0 shows the failure);
- present in both: Dice by `monai.metrics.compute_dice`, HD95 by `compute_hausdorff_distance`
  (symmetric, 95th percentile of surface distances, in mm using the voxel spacing).
Means are taken per organ over the cases that score it; `mean_dice` is the mean of the organ means.
"""

import csv
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from .errors import LtudaError, write_error
from .io.volumes import (
    is_seg_nrrd, list_volumes, on_grid_of, read_image, read_segmentation, same_geometry, volume_stem,
)
from .manifest import BACKGROUND
from .progress import _clean as json_safe
from .terminology import default_classes, match_class

NAN = float("nan")


def load_class_labels(path, classes, value_map=None):
    """(image, array of class values (z, y, x)) from a `.seg.nrrd` or a plain label map.

    Segments of a `.seg.nrrd` are matched to classes by terminology, then by name; others are ignored.
    A plain label map holds class values, unless `value_map` {file value: class name or "background"}
    translates them; values that are neither are ignored (background).
    """
    path = Path(path)
    if is_seg_nrrd(path):
        image, segments = read_segmentation(path)
        pairs = {}
        for seg in segments:
            cls = match_class(classes, seg["name"], seg["terminology_tag"])
            if cls is not None:
                pairs[seg["index"]] = cls["value"]
    else:
        image = read_image(path)
        if value_map is None:
            pairs = {c["value"]: c["value"] for c in classes}
        else:
            by_name = {c["name"].lower(): c["value"] for c in classes}
            pairs = {}
            for file_value, name in value_map.items():
                if str(name).lower() == BACKGROUND:
                    continue
                if str(name).lower() not in by_name:
                    raise LtudaError(f"label value {file_value} maps to '{name}', which is not a class", path,
                                     f"Use one of: {', '.join(by_name)} or background.")
                pairs[int(file_value)] = by_name[str(name).lower()]
    raw = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(raw.dtype, np.integer):
        raw = np.rint(raw)  # label maps saved as float (common in NIfTI) hold whole numbers
    labels = np.zeros(raw.shape, dtype=np.uint8)
    for file_value, class_value in pairs.items():
        labels[raw == file_value] = class_value
    return image, labels


def _bounding_box(mask: np.ndarray, margin: int = 1):
    slices = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        slices.append(slice(max(0, hits[0] - margin), min(mask.shape[axis], hits[-1] + margin + 1)))
    return tuple(slices)


def score_organ(pred: np.ndarray, truth: np.ndarray, spacing):
    """(Dice, HD95 in mm) of two boolean masks with voxel `spacing` in array axis order (see module docstring)."""
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not (has_pred or has_truth):
        return NAN, NAN
    if not (has_pred and has_truth):
        return 0.0, NAN
    # Only the union's bounding box matters for both metrics; cropping keeps the float tensors small.
    box = _bounding_box(pred | truth)
    y_pred = torch.from_numpy(np.ascontiguousarray(pred[box]))[None, None].float()
    y = torch.from_numpy(np.ascontiguousarray(truth[box]))[None, None].float()
    dice = compute_dice(y_pred, y, include_background=True, ignore_empty=False)
    with warnings.catch_warnings():  # MONAI warns about an argument it passes itself (monai 1.5+)
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=list(spacing))
    return float(dice[0, 0]), float(hd95[0, 0])


def evaluate_case(pred_path, truth_path, classes, truth_value_map=None) -> dict:
    """{"case": stem, "organs": {name: {"dice", "hd95_mm"}}} for one prediction against its truth."""
    pred_image, pred = load_class_labels(pred_path, classes)
    truth_image, truth = load_class_labels(truth_path, classes, truth_value_map)
    if not same_geometry(pred_image, truth_image):
        truth = _on_grid_of(truth, truth_image, pred_image)
    if truth is None:
        raise LtudaError(
            f"prediction grid (size {pred_image.GetSize()}, spacing {_rounded(pred_image.GetSpacing())}) differs from "
            f"the ground truth {Path(truth_path).name} (size {truth_image.GetSize()}, spacing "
            f"{_rounded(truth_image.GetSpacing())})", pred_path,
            "Predict on the image the ground truth was drawn on, or resample one onto the other.",
        )
    spacing = truth_image.GetSpacing()[::-1]  # array axes are (z, y, x)
    organs = {}
    for cls in classes:
        dice, hd95 = score_organ(pred == cls["value"], truth == cls["value"], spacing)
        organs[cls["name"]] = {"dice": dice, "hd95_mm": hd95}
    return {"case": volume_stem(truth_path), "organs": organs}


def _on_grid_of(labels, image, reference):
    """Labels of `image` on `reference`'s grid when it is the same grid stored with other axis flips or
    order (a mask saved LAS for an LPS scan is common); None when the grids really differ."""
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    aligned = on_grid_of(label_image, reference)
    return None if aligned is None else sitk.GetArrayFromImage(aligned)


def _rounded(values):
    return tuple(round(v, 4) for v in values)


def _pairs(pred: Path, truth: Path):
    """[(prediction, truth)] matched by volume stem, and the truths that have no prediction."""
    for path in (pred, truth):
        if not path.exists():
            raise LtudaError("not found", path, "Check the path.")
    truths = list_volumes(truth, include_segmentations=True) if truth.is_dir() else [truth]
    if not truth.is_dir() and not pred.is_dir():
        return [(pred, truth)], []
    if not pred.is_dir():
        raise LtudaError("is a file, but the ground truth is a folder", pred,
                         "Pass a folder of predictions named like the ground-truth files.")
    by_stem = {}
    for path in list_volumes(pred, include_segmentations=True):
        stem = volume_stem(path)
        if stem in by_stem:
            raise LtudaError(f"holds two predictions for case '{stem}' ({by_stem[stem].name}, {path.name})", pred,
                             "Keep one file per case.")
        by_stem[stem] = path
    pairs, missing = [], []
    for t in truths:
        if volume_stem(t) in by_stem:
            pairs.append((by_stem[volume_stem(t)], t))
        else:
            missing.append({"case": volume_stem(t), "message": f"no prediction named '{volume_stem(t)}' in {pred}"})
    return pairs, missing


def _mean(values):
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else NAN


def evaluate(pred, truth, classes, out_dir=None, truth_value_map=None) -> dict:
    """Score a prediction file or folder against a truth file or folder (pairs matched by file stem).

    Returns {"cases": [...evaluate_case...], "mean": {organ: {"dice", "hd95_mm", "cases"}}, "mean_dice",
    "errors": [{"case", "message"}]}. With several cases, a case that fails (missing prediction, other
    grid, unreadable file) is listed in "errors" and the others are still scored. With `out_dir`,
    writes evaluation.json and evaluation.csv there.
    """
    pred, truth = Path(pred), Path(truth)
    pairs, errors = _pairs(pred, truth)
    cases = []
    for pred_path, truth_path in pairs:
        try:
            cases.append(evaluate_case(pred_path, truth_path, classes, truth_value_map))
        except LtudaError as exc:
            if len(pairs) == 1 and not errors:
                raise
            errors.append({"case": volume_stem(truth_path), "message": str(exc)})
    if not cases:
        details = "; ".join(e["message"] for e in errors[:3])
        raise LtudaError(f"no case could be evaluated ({details})", pred,
                         "Name each prediction like its ground-truth file (e.g. case1.seg.nrrd for case1.nii.gz).")
    result = dict(summarise(cases, classes), errors=errors)
    if out_dir is not None:
        write_results(result, out_dir)
    return result


def summarise(cases, classes) -> dict:
    """{"cases", "mean": {organ: {"dice", "hd95_mm", "cases"}}, "mean_dice"} over evaluate_case results."""
    mean = {}
    for cls in classes:
        scores = [c["organs"][cls["name"]] for c in cases]
        mean[cls["name"]] = {
            "dice": _mean([s["dice"] for s in scores]),
            "hd95_mm": _mean([s["hd95_mm"] for s in scores]),
            "cases": sum(not math.isnan(s["dice"]) for s in scores),
        }
    return {"cases": cases, "mean": mean, "mean_dice": _mean([m["dice"] for m in mean.values()])}


def write_results(result: dict, out_dir) -> None:
    """evaluation.json (NaN as null) and evaluation.csv (one row per case and organ, then the means)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(exc, out_dir, "evaluation report") from None

    def cell(value):
        return "" if math.isnan(value) else f"{value:.6g}"

    rows = [["case", "organ", "dice", "hd95_mm"]]
    for case in result["cases"]:
        rows += [[case["case"], organ, cell(s["dice"]), cell(s["hd95_mm"])] for organ, s in case["organs"].items()]
    rows += [["mean", organ, cell(s["dice"]), cell(s["hd95_mm"])] for organ, s in result["mean"].items()]
    rows.append(["mean", "all organs", cell(result["mean_dice"]), ""])
    for name, write in (
        ("evaluation.json", lambda f: json.dump(json_safe(result), f, indent=2)),
        ("evaluation.csv", lambda f: csv.writer(f).writerows(rows)),
    ):
        tmp = out_dir / f".{name}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                write(f)
            os.replace(tmp, out_dir / name)
        except OSError as exc:  # a full disk or a read-only folder: one message, no half-written file left
            raise write_error(exc, out_dir / name, "evaluation report") from None
        finally:
            if tmp.exists():
                tmp.unlink()


def format_table(result: dict) -> str:
    """Per-organ means (Dice, HD95 mm, scored cases) and the overall mean Dice, for the screen."""

    def num(value, digits):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"

    width = max([len("organ")] + [len(name) for name in result["mean"]])
    lines = [f"{'organ':<{width}}  {'Dice':>6}  {'HD95 mm':>8}  {'cases':>5}"]
    for name, s in result["mean"].items():
        lines.append(f"{name:<{width}}  {num(s['dice'], 3):>6}  {num(s['hd95_mm'], 2):>8}  {s['cases']:>5}")
    lines.append(f"{'mean':<{width}}  {num(result['mean_dice'], 3):>6}")
    lines.append(f"({len(result['cases'])} case(s) evaluated)")
    return "\n".join(lines)


def parse_value_map(text: str) -> dict:
    """"5=liver,1=spleen,2=kidney,3=kidney" -> {5: "liver", ...}."""
    value_map = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        value, sep, name = item.partition("=")
        try:
            value_map[int(value)] = name.strip()
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise LtudaError(f"'{item}' in --truth-labels is not VALUE=NAME", fix="Example: --truth-labels 5=liver,1=spleen")
    return value_map


def _classes(args) -> list:
    if getattr(args, "model", None):
        from .model.store import read_model_json  # only this path needs the model code

        return read_model_json(args.model)["classes"]
    if getattr(args, "dataset", None):
        from .manifest import load_manifest

        return load_manifest(args.dataset).classes
    return default_classes()


def run(args, report) -> int:
    """`ltuda evaluate`: the table on stdout; exit 1 if some cases could not be evaluated."""
    classes = _classes(args)
    value_map = parse_value_map(args.truth_labels) if getattr(args, "truth_labels", None) else None
    result = evaluate(args.pred, args.truth, classes, out_dir=getattr(args, "out", None), truth_value_map=value_map)
    print(format_table(result), flush=True)
    for error in result["errors"]:
        report.log(f"not evaluated: {error['case']}: {error['message']}")
    if getattr(args, "out", None):
        report.log(f"wrote {Path(args.out) / 'evaluation.json'} and {Path(args.out) / 'evaluation.csv'}")
    return 1 if result["errors"] else 0
