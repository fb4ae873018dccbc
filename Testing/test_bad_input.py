"""Bad input: one readable message naming the file and the fix, a non-zero exit, no traceback,
and input files left exactly as they were."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TINY_TRAIN_ARGS, run_ltuda
from ltuda.terminology import default_classes


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _write(image_array, path, spacing=(1.0, 1.0, 2.0), pixel=None):
    image = sitk.GetImageFromArray(image_array if pixel is None else image_array.astype(pixel))
    if image.GetDimension() == 3:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def _dataset(tmp_path, cases, classes=None) -> Path:
    doc = {"schema": "ltuda-dataset", "version": 1, "name": "bad", "classes": classes or default_classes(["liver", "spleen"]),
           "cases": cases}
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    return tmp_path / "dataset.json"


def _good_pair(tmp_path, name, organ_value=1, shape=(8, 32, 32)):
    rng = np.random.default_rng(len(name))
    image = (rng.normal(40, 20, shape)).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[2:6, 8:20, 8:20] = organ_value
    _write(image, tmp_path / f"{name}.nii.gz")
    _write(label, tmp_path / f"{name}_seg.nii.gz")
    return {"id": name, "image": f"{name}.nii.gz", "label": f"{name}_seg.nii.gz", "labels": {str(organ_value): "liver"}}


def _check_fails(tmp_path, *args, expect):
    before = _digest(tmp_path)
    result = run_ltuda(*args, check=False)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for text in expect:
        assert text in result.stderr, result.stderr
    assert _digest(tmp_path) == before  # nothing was modified
    return result.stderr


def test_dataset_check_lists_every_problem_at_once(tmp_path):
    liver = _good_pair(tmp_path, "liver1")
    spleen = _good_pair(tmp_path, "spleen1")
    spleen["labels"] = {"1": "spleen"}
    # 1) size mismatch 2) undeclared value 3) empty label 4) NaN image 5) constant image 6) missing file
    mismatch = _good_pair(tmp_path, "mismatch")
    _write(np.zeros((8, 16, 16), np.uint8), tmp_path / "mismatch_seg.nii.gz")
    undeclared = _good_pair(tmp_path, "undeclared", organ_value=3)
    undeclared["labels"] = {"1": "liver"}
    empty = _good_pair(tmp_path, "empty")
    _write(np.zeros((8, 32, 32), np.uint8), tmp_path / "empty_seg.nii.gz")
    nan = dict(_good_pair(tmp_path, "nan"), image="nan.nrrd")  # NRRD keeps NaN (the NIfTI reader zeroes it)
    _write(np.full((8, 32, 32), np.nan, np.float32), tmp_path / "nan.nrrd")
    constant = _good_pair(tmp_path, "constant")
    _write(np.full((8, 32, 32), 7, np.int16), tmp_path / "constant.nii.gz")
    missing = dict(_good_pair(tmp_path, "missing"), image="nowhere.nii.gz")
    corrupt = _good_pair(tmp_path, "corrupt")
    (tmp_path / "corrupt.nii.gz").write_bytes(b"not a volume at all")
    manifest = _dataset(tmp_path, [liver, spleen, mismatch, undeclared, empty, nan, constant, missing, corrupt])
    stderr = _check_fails(tmp_path, "dataset", "check", manifest, expect=[
        "mismatch_seg.nii.gz", "does not match",
        "undeclared_seg.nii.gz", "label value(s) [3]",
        "empty_seg.nii.gz", "empty",
        "nan.nrrd", "NaN",
        "constant.nii.gz", "constant",
        "nowhere.nii.gz",
        "corrupt.nii.gz",
    ])
    assert "9 problem(s)" in stderr or "8 problem(s)" in stderr or "7 problem(s)" in stderr


def test_class_labelled_by_no_case_and_outside_paths(tmp_path):
    liver = _good_pair(tmp_path, "liver1")
    outside = dict(_good_pair(tmp_path, "liver2"), image="../elsewhere.nii.gz")
    manifest = _dataset(tmp_path, [liver, outside])
    _check_fails(tmp_path, "dataset", "check", manifest, expect=[
        "class 'spleen' is labelled by no training case", "outside the dataset folder", "--allow-outside-paths"])


def test_full_labels_outside_the_dataset_folder_are_refused(tmp_path):
    liver = dict(_good_pair(tmp_path, "liver1"), label_full="../elsewhere.nii.gz")
    spleen = _good_pair(tmp_path, "spleen1")
    manifest = _dataset(tmp_path, [liver, spleen])
    _check_fails(tmp_path, "dataset", "check", manifest, expect=["label_full", "outside the dataset folder"])


@pytest.mark.parametrize("shape", [(32, 32), (2, 8, 32, 32)], ids=["2d", "4d"])
def test_2d_and_4d_images_are_refused(tmp_path, shape):
    case = _good_pair(tmp_path, "liver1")
    array = np.random.default_rng(0).normal(0, 50, shape).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "liver1.nii.gz"))
    spleen = dict(_good_pair(tmp_path, "spleen1"), labels={"1": "spleen"})
    manifest = _dataset(tmp_path, [case, spleen])
    _check_fails(tmp_path, "dataset", "check", manifest, expect=["liver1.nii.gz", "3D"])


def test_train_refuses_an_existing_model_without_overwrite(tiny_dataset, tiny_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    _check_fails(tmp_path, "train", "--dataset", tiny_dataset, "--out", copy, *TINY_TRAIN_ARGS,
                 expect=["already holds a model", "--overwrite"])


@pytest.mark.parametrize("flag, value, expect", [
    ("--image-size", "40", "multiple of 16"),
    ("--pseudo-uncertain-below", "0.7", "outside [0, 0.5]"),
    ("--dice-weight", "-1", "negative"),
    ("--pseudo-gate", "1.5", "outside [0, 1)"),
    ("--pseudo-dice-gate", "-0.1", "outside [0, 1)"),
], ids=["image-size", "uncertain", "dice", "gate", "dice-gate"])
def test_out_of_range_settings_are_refused(tiny_dataset, tmp_path, flag, value, expect):
    _check_fails(tmp_path, "train", "--dataset", tiny_dataset, "--out", tmp_path / "model", *TINY_TRAIN_ARGS, flag, value,
                 expect=[flag, expect])


def test_corrupt_and_foreign_checkpoints_are_refused(tiny_model, tiny_dataset, tmp_path):
    image = next(Path(tiny_dataset).parent.joinpath("images").glob("test_*.nii.gz"))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model, corrupt)
    data = (corrupt / "model.pt").read_bytes()
    (corrupt / "model.pt").write_bytes(data[: len(data) // 2])
    _check_fails(tmp_path, "predict", "--model", corrupt, "--input", image, "--output", tmp_path / "a.seg.nrrd",
                 expect=["model.pt: is damaged or incomplete", "Restore it from a backup"])
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_model, foreign)
    torch.save({"payload": Path("/")}, foreign / "model.pt")  # an arbitrary pickled object: never unpickled
    _check_fails(tmp_path, "predict", "--model", foreign, "--input", image, "--output", tmp_path / "b.seg.nrrd",
                 expect=["model.pt: holds Python objects", "not loaded, for safety"])
    other_version = tmp_path / "other"
    shutil.copytree(tiny_model, other_version)
    meta = json.loads((other_version / "model.json").read_text())
    meta["version"] = 99
    (other_version / "model.json").write_text(json.dumps(meta))
    _check_fails(tmp_path, "predict", "--model", other_version, "--input", image, "--output", tmp_path / "c.seg.nrrd",
                 expect=["model.json", "format 99", "Retrain"])


def test_unknown_head_and_existing_output(tiny_model, tiny_dataset, tmp_path):
    image = next(Path(tiny_dataset).parent.joinpath("images").glob("test_*.nii.gz"))
    _check_fails(tmp_path, "predict", "--model", tiny_model, "--input", image, "--output", tmp_path / "x.seg.nrrd",
                 "--head", "magic", expect=["unknown head 'magic'", "proto-unlabeled"])
    existing = tmp_path / "exists.seg.nrrd"
    existing.write_text("keep me")
    _check_fails(tmp_path, "predict", "--model", tiny_model, "--input", image, "--output", existing,
                 expect=["exists.seg.nrrd", "already exists", "--overwrite"])
    assert existing.read_text() == "keep me"


def test_jsonl_errors_end_the_stream(tmp_path):
    result = run_ltuda("predict", "--model", tmp_path / "nope", "--input", tmp_path, "--output", tmp_path / "o.seg.nrrd",
                       "--progress", "jsonl", check=False)
    assert result.returncode == 1
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events and events[-1]["event"] == "error" and "nope" in events[-1]["message"]
