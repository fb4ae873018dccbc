"""3D Dice and HD95 (mm) on masks with known answers, file/folder pairing, outputs, and the `ltuda evaluate` command."""

import argparse
import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_ltuda
from ltuda.errors import LtudaError
from ltuda.cli import add_evaluate_arguments
from ltuda.evaluate import evaluate, evaluate_case, format_table, load_class_labels, run
from ltuda.io.segnrrd import write_label_map, write_seg_nrrd
from ltuda.io.volumes import read_image
from ltuda.progress import SilentReporter
from ltuda.terminology import default_classes, organ_class

CLASSES = default_classes()  # liver 1, spleen 2, kidney 3, pancreas 4
SPACING = (0.7, 0.8, 2.5)  # anisotropic, (x, y, z)


def reference(size=(30, 30, 20), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    image = sitk.Image(size, sitk.sitkInt16)
    image.SetSpacing(SPACING)
    image.SetOrigin((-12.0, 40.0, 7.5))
    image.SetDirection(direction)
    return image


def cube(corner_xyz, side=10, shape=(20, 30, 30), value=1):
    labels = np.zeros(shape, np.uint8)
    x, y, z = corner_xyz
    labels[z:z + side, y:y + side, x:x + side] = value
    return labels


def test_identical_masks(tmp_path):
    labels = cube((5, 5, 5)) + cube((18, 18, 2), side=6, value=3)
    write_seg_nrrd(tmp_path / "pred.seg.nrrd", labels, reference(), CLASSES)
    write_label_map(tmp_path / "truth.nii.gz", labels, reference())
    result = evaluate_case(tmp_path / "pred.seg.nrrd", tmp_path / "truth.nii.gz", CLASSES)
    assert result["case"] == "truth"
    assert result["organs"]["liver"] == {"dice": 1.0, "hd95_mm": 0.0}
    assert result["organs"]["kidney"] == {"dice": 1.0, "hd95_mm": 0.0}
    assert math.isnan(result["organs"]["spleen"]["dice"]) and math.isnan(result["organs"]["spleen"]["hd95_mm"])


@pytest.mark.parametrize("axis", [0, 2], ids=["x", "z"])
def test_shifted_cube_hd95_is_the_shift_in_mm(tmp_path, axis):
    shift = [0, 0, 0]
    shift[axis] = 2
    truth = cube((5, 5, 5))
    pred = cube((5 + shift[0], 5 + shift[1], 5 + shift[2]))
    write_label_map(tmp_path / "truth.nrrd", truth, reference())
    write_label_map(tmp_path / "pred.nrrd", pred, reference())
    liver = evaluate_case(tmp_path / "pred.nrrd", tmp_path / "truth.nrrd", CLASSES)["organs"]["liver"]
    assert liver["hd95_mm"] == pytest.approx(2 * SPACING[axis], abs=1e-4)
    assert liver["dice"] == pytest.approx(0.8)  # 8 of 10 slabs overlap


def test_organ_in_one_mask_only_scores_zero(tmp_path):
    truth = cube((5, 5, 5))  # liver only
    pred = cube((5, 5, 5), value=2)  # spleen only
    write_label_map(tmp_path / "t.nrrd", truth, reference())
    write_label_map(tmp_path / "p.nrrd", pred, reference())
    result = evaluate(tmp_path / "p.nrrd", tmp_path / "t.nrrd", CLASSES)
    organs = result["cases"][0]["organs"]
    assert organs["liver"]["dice"] == 0.0 and math.isnan(organs["liver"]["hd95_mm"])  # missed
    assert organs["spleen"]["dice"] == 0.0 and math.isnan(organs["spleen"]["hd95_mm"])  # false alarm
    assert math.isnan(organs["kidney"]["dice"])  # absent in both: not scored
    assert result["mean"]["liver"]["cases"] == 1 and result["mean"]["kidney"]["cases"] == 0
    assert result["mean_dice"] == 0.0  # kidney and pancreas are left out, not counted as 0 or 1


def test_seg_nrrd_segments_matched_by_terminology_then_name(tmp_path):
    labels = cube((5, 5, 5)) + cube((18, 18, 2), side=6, value=2) + cube((2, 20, 12), side=4, value=3)
    renamed_liver = dict(organ_class("liver", 1), name="Leber")  # other language, same SNOMED code
    spleen_by_name = dict(organ_class("spleen", 2), name="SPLEEN", terminology=None)
    unknown = organ_class("tumour", 3)
    write_seg_nrrd(tmp_path / "p.seg.nrrd", labels, reference(), [renamed_liver, spleen_by_name, unknown])
    image, values = load_class_labels(tmp_path / "p.seg.nrrd", CLASSES)
    assert image.GetSize() == (30, 30, 20)
    np.testing.assert_array_equal(values, np.where(labels == 3, 0, labels))  # the tumour is ignored


def test_truth_value_map(tmp_path):
    truth = cube((5, 5, 5), value=5) + cube((18, 18, 2), side=6, value=2) + cube((2, 20, 12), side=4, value=9)
    pred = cube((5, 5, 5), value=1) + cube((18, 18, 2), side=6, value=3)
    write_label_map(tmp_path / "t.nii.gz", truth.astype(np.float32), reference())  # float labels, as some tools save
    write_seg_nrrd(tmp_path / "p.seg.nrrd", pred, reference(), CLASSES)
    value_map = {"5": "liver", 2: "kidney", 9: "background"}
    organs = evaluate_case(tmp_path / "p.seg.nrrd", tmp_path / "t.nii.gz", CLASSES, value_map)["organs"]
    assert organs["liver"]["dice"] == 1.0 and organs["kidney"]["dice"] == 1.0
    with pytest.raises(LtudaError, match="not a class"):
        load_class_labels(tmp_path / "t.nii.gz", CLASSES, {5: "lung"})


def test_geometry(tmp_path):
    labels = cube((5, 5, 5))
    write_label_map(tmp_path / "t.nrrd", labels, reference())
    other = reference()
    other.SetSpacing((1.0, 1.0, 1.0))
    write_label_map(tmp_path / "p.nrrd", labels, other)
    with pytest.raises(LtudaError) as info:
        evaluate_case(tmp_path / "p.nrrd", tmp_path / "t.nrrd", CLASSES)
    assert str(tmp_path / "p.nrrd") in str(info.value) and "spacing" in str(info.value)
    # The same grid stored with the x axis reversed is the same voxels: scored, not refused.
    flipped = sitk.Flip(sitk.ReadImage(str(tmp_path / "t.nrrd")), [True, False, False])
    sitk.WriteImage(flipped, str(tmp_path / "flipped.nrrd"))
    organs = evaluate_case(tmp_path / "flipped.nrrd", tmp_path / "t.nrrd", CLASSES)["organs"]
    assert organs["liver"] == {"dice": 1.0, "hd95_mm": 0.0}


def _case_folders(tmp_path, names=("a", "b", "c"), predicted=("a", "b")):
    pred_dir, truth_dir = tmp_path / "pred", tmp_path / "truth"
    for i, name in enumerate(names):
        truth = cube((5, 5, 5)) + cube((18, 18, 2), side=6, value=3)
        write_label_map(truth_dir / f"{name}.nii.gz", truth, reference())
        if name in predicted:
            pred = cube((5 + i, 5, 5)) + cube((18, 18, 2), side=6, value=3)  # case a exact, b shifted by 1
            write_seg_nrrd(pred_dir / f"{name}.seg.nrrd", pred, reference(), CLASSES)
    return pred_dir, truth_dir


def test_folders_matched_by_stem(tmp_path):
    pred_dir, truth_dir = _case_folders(tmp_path)
    result = evaluate(pred_dir, truth_dir, CLASSES, out_dir=tmp_path / "out")
    assert [c["case"] for c in result["cases"]] == ["a", "b"]
    assert [e["case"] for e in result["errors"]] == ["c"] and "no prediction" in result["errors"][0]["message"]
    assert result["mean"]["liver"]["dice"] == pytest.approx((1.0 + 0.9) / 2)
    assert result["mean"]["liver"]["hd95_mm"] == pytest.approx(SPACING[0] / 2)
    assert result["mean"]["kidney"]["dice"] == 1.0 and result["mean"]["kidney"]["cases"] == 2
    assert result["mean_dice"] == pytest.approx((0.95 + 1.0) / 2)
    table = format_table(result)
    assert "liver" in table and "0.950" in table and "n/a" in table  # spleen: scored nowhere
    # One file against a folder of predictions picks the one with the same stem.
    single = evaluate(pred_dir, truth_dir / "b.nii.gz", CLASSES)
    assert [c["case"] for c in single["cases"]] == ["b"] and not single["errors"]


def test_folder_errors(tmp_path):
    pred_dir, truth_dir = _case_folders(tmp_path, predicted=())
    with pytest.raises(LtudaError, match="no case could be evaluated"):
        evaluate(pred_dir if pred_dir.exists() else tmp_path, truth_dir, CLASSES)
    with pytest.raises(LtudaError, match="not found"):
        evaluate(tmp_path / "nowhere", truth_dir, CLASSES)
    pred_dir, truth_dir = _case_folders(tmp_path / "dup")
    write_label_map(pred_dir / "a.nrrd", cube((5, 5, 5)), reference())
    with pytest.raises(LtudaError, match="two predictions"):
        evaluate(pred_dir, truth_dir, CLASSES)


def test_run_writes_json_and_csv(tmp_path, capsys):
    pred_dir, truth_dir = _case_folders(tmp_path, predicted=("a", "b", "c"))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.json").write_text(json.dumps({"schema": "ltuda-model", "version": 1, "classes": CLASSES[:3]}))
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    args = parser.parse_args(["--pred", str(pred_dir), "--truth", str(truth_dir), "--model", str(model_dir),
                              "--out", str(tmp_path / "out")])
    assert run(args, SilentReporter()) == 0
    assert "mean" in capsys.readouterr().out
    doc = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert list(doc["mean"]) == ["liver", "spleen", "kidney"]  # the model's classes
    assert doc["mean"]["spleen"]["dice"] is None  # NaN is written as null
    rows = list(csv.DictReader((tmp_path / "out" / "evaluation.csv").open()))
    assert len(rows) == 3 * 3 + 3 + 1  # cases x organs, one mean per organ, the overall mean
    assert rows[0] == {"case": "a", "organ": "liver", "dice": "1", "hd95_mm": "0"}
    assert rows[-1]["case"] == "mean" and float(rows[-1]["dice"]) == pytest.approx(doc["mean_dice"])


def test_command_line(tmp_path):
    pred_dir, truth_dir = _case_folders(tmp_path)
    out = run_ltuda("evaluate", "--pred", pred_dir, "--truth", truth_dir, "--out", tmp_path / "out", check=False)
    assert out.returncode == 1  # case c has no prediction
    assert "liver" in out.stdout and "c" in out.stderr and "Traceback" not in out.stderr
    assert (tmp_path / "out" / "evaluation.csv").is_file()
    bad = run_ltuda("evaluate", "--pred", tmp_path / "missing", "--truth", truth_dir, check=False)
    assert bad.returncode == 1 and "missing" in bad.stderr and "Traceback" not in bad.stderr


def test_real_scan_mask_stored_las(tmp_path, real_ct):
    """A prediction on the DICOM grid scored against TotalSegmentator's LAS-stored mask of the same scan."""
    dicom, mask_path = real_ct / "example_ct_dicom", real_ct / "example_ct_dicom_organs.nii.gz"
    if not (dicom.is_dir() and mask_path.is_file()):
        pytest.skip("example DICOM series not available")
    value_map = {5: "liver", 1: "spleen", 2: "kidney", 3: "kidney", 7: "pancreas"}
    image = read_image(dicom)
    mask = sitk.DICOMOrient(read_image(mask_path), "LPS")
    raw = sitk.GetArrayFromImage(mask)
    pred = np.zeros(raw.shape, np.uint8)
    for value, name in value_map.items():
        pred[raw == value] = next(c["value"] for c in CLASSES if c["name"] == name)
    write_seg_nrrd(tmp_path / "example_ct_dicom.seg.nrrd", pred, image, CLASSES)
    result = evaluate(tmp_path / "example_ct_dicom.seg.nrrd", mask_path, CLASSES, truth_value_map=value_map)
    scored = {k: v for k, v in result["cases"][0]["organs"].items() if not math.isnan(v["dice"])}
    assert scored and all(v == {"dice": 1.0, "hd95_mm": 0.0} for v in scored.values())
