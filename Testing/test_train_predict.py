"""Real small trainings and predictions through the `ltuda` command, in subprocesses."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from conftest import TINY_TRAIN_ARGS, run_ltuda
from ltuda.io.volumes import on_grid_of, read_image, read_segmentation
from ltuda.manifest import load_manifest


def _events(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_dataset_check_accepts_the_phantoms(tiny_dataset):
    result = run_ltuda("dataset", "check", tiny_dataset)
    assert "OK" in result.stdout and "liver 2" in result.stdout


def test_dry_run_reports_the_paper_network_and_writes_nothing(tiny_dataset, tmp_path):
    out = tmp_path / "model"
    result = run_ltuda("train", "--dataset", tiny_dataset, "--out", out, "--preset", "paper", "--dry-run")
    report = json.loads(result.stdout)
    assert 13.0e6 <= report["parameters"] <= 13.8e6  # the reference code's U-Net
    assert report["network"]["backbone"] == "reference-unet" and report["settings"]["pbce_scaling"] == "reference"
    assert report["settings"]["stage2_start"] == "best" and report["settings"]["teacher_prototypes"] == "ema"
    assert not out.exists()
    fast = json.loads(run_ltuda("train", "--dataset", tiny_dataset, "--out", out, "--preset", "fast", "--dry-run").stdout)
    assert fast["network"]["backbone"] == "basic-unet" and fast["parameters"] < 1e6


def test_model_folder_contract(tiny_model):
    meta = json.loads((tiny_model / "model.json").read_text())
    assert meta["schema"] == "ltuda-model" and meta["version"] == 1
    assert [c["name"] for c in meta["classes"]] == ["liver", "spleen", "kidney", "pancreas"]
    assert meta["classes"][0]["terminology"]["type"][1] == "10200004"
    assert meta["default_head"] in meta["heads"]
    assert meta["training"]["method"] == "ltuda" and meta["training"]["completed"] is True
    assert meta["training"]["stages"] == [1, 2]
    assert set(meta["validation"]) >= {"mean_dice", "per_organ", "by_head"}
    import torch
    state = torch.load(tiny_model / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    events = _events((tiny_model / "progress.jsonl").read_text())
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert {e["stage"] for e in events if e["event"] == "epoch"} == {1, 2}
    validated = {(e["stage"], e["model"], e["head"]) for e in events if e["event"] == "validation"}
    assert {(2, m, h) for m in ("student", "teacher") for h in meta["heads"]} <= validated  # all heads, both nets


def test_jsonl_stream_is_pure_json_and_ends_with_done(tiny_dataset, tmp_path):
    result = run_ltuda("train", "--dataset", tiny_dataset, "--out", tmp_path / "m", *TINY_TRAIN_ARGS,
                       "--method", "labeled-only", "--progress", "jsonl")
    events = _events(result.stdout)  # every stdout line parses
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and events[-1]["status"] == "completed"
    epoch = next(e for e in events if e["event"] == "epoch")
    assert {"loss", "lr", "images_per_s", "eta_s", "stage", "epoch", "epochs"} <= set(epoch)
    assert "validation" in kinds and "checkpoint" in kinds


def test_sigterm_saves_and_resume_continues(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "ltuda", "train", "--dataset", str(tiny_dataset), "--out", str(out),
            "--preset", "fast", "--epochs-stage1", "3", "--epochs-stage2", "2", "--iterations-per-epoch", "3",
            "--image-size", "32", "--batch-size", "2", "--progress", "jsonl"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(json.loads(line))
        if seen[-1]["event"] == "epoch":
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    seen += _events(rest)
    assert proc.returncode == 130
    assert seen[-1]["event"] == "done" and seen[-1]["status"] == "cancelled"
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "model.json").is_file()
    assert not (out / "train.lock").exists()  # the lock goes with the stopped run
    stopped_at = [(e["stage"], e["epoch"]) for e in seen if e["event"] == "epoch"]
    resumed = _events(run_ltuda("train", "--dataset", tiny_dataset, "--out", out, "--resume", "--progress", "jsonl").stdout)
    assert resumed[0]["resumed"] is True and resumed[-1]["status"] == "completed"
    epochs_after = [(e["stage"], e["epoch"]) for e in resumed if e["event"] == "epoch"]
    assert epochs_after[0] > stopped_at[-1] or epochs_after[0] == stopped_at[-1]  # continues, does not restart
    assert epochs_after[0] != (1, 1) or stopped_at[-1] == (1, 1)
    assert epochs_after[-1] == (2, 2)
    assert json.loads((out / "model.json").read_text())["training"]["completed"] is True
    assert not (out / "train.lock").exists()


def _reoriented(image: sitk.Image, kind: str) -> sitk.Image:
    """The same physical content on a differently oriented voxel grid."""
    if kind == "LPS":
        return image
    if kind == "RAS":
        return sitk.DICOMOrient(image, "RAS")
    # oblique: rotate the grid 20 degrees about the z axis, resample (linear) onto it
    transform = sitk.Euler3DTransform()
    transform.SetRotation(0, 0, np.deg2rad(20))
    direction = np.array(transform.GetMatrix()).reshape(3, 3) @ np.array(image.GetDirection()).reshape(3, 3)
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(image)
    resampler.SetOutputDirection(direction.flatten().tolist())
    resampler.SetDefaultPixelValue(-1000)
    return resampler.Execute(image)


@pytest.mark.parametrize("kind", ["LPS", "RAS", "oblique"])
def test_predictions_keep_the_input_geometry(tiny_model, tiny_dataset, tmp_path, kind):
    test_case = load_manifest(tiny_dataset).split("test")[0]
    image = _reoriented(read_image(test_case.image), kind)
    source = tmp_path / f"ct_{kind}.nrrd"
    sitk.WriteImage(image, str(source))
    out = tmp_path / f"ct_{kind}.seg.nrrd"
    run_ltuda("predict", "--model", tiny_model, "--input", source, "--output", out, "--label-map", tmp_path / "lab.nii.gz")
    labels, segments = read_segmentation(out)
    for name in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(labels, name)(), getattr(image, name)(), atol=1e-5), name
    assert [s["name"] for s in segments] == ["liver", "spleen", "kidney", "pancreas"]
    plain = sitk.ReadImage(str(tmp_path / "lab.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(plain), sitk.GetArrayFromImage(labels))
    seg = slicerio.read_segmentation(str(out))
    assert seg["segments"][0]["terminology"]["type"][1] == "10200004"


def test_ras_and_lps_predictions_are_the_same_voxels(tiny_model, tiny_dataset, tmp_path):
    """A flipped grid of the same scan gives the same segmentation, flipped back (no resampling)."""
    test_case = load_manifest(tiny_dataset).split("test")[0]
    lps = read_image(test_case.image)
    ras = sitk.DICOMOrient(lps, "RAS")
    outputs = {}
    for name, image in (("lps", lps), ("ras", ras)):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nrrd"))
        run_ltuda("predict", "--model", tiny_model, "--input", tmp_path / f"{name}.nrrd", "--output",
                  tmp_path / f"{name}.seg.nrrd", "--no-postprocess")
        outputs[name] = read_segmentation(tmp_path / f"{name}.seg.nrrd")[0]
    back = sitk.DICOMOrient(outputs["ras"], "LPS")
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(outputs["lps"]))


def test_batch_folder_skips_done_and_survives_a_bad_file(tiny_model, tiny_dataset, tmp_path):
    images = Path(tiny_dataset).parent / "images"
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted(images.glob("*.nii.gz"))[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.nii.gz").write_bytes(b"garbage")
    out = tmp_path / "out"
    first = run_ltuda("predict", "--model", tiny_model, "--input", folder, "--output", out, "--progress", "jsonl",
                      check=False)
    assert first.returncode == 1
    events = _events(first.stdout)
    assert events[-1]["event"] == "done" and events[-1]["done"] == 2
    assert len(events[-1]["failed"]) == 1 and "broken.nii.gz" in events[-1]["failed"][0]["message"]
    assert len(list(out.glob("*.seg.nrrd"))) == 2 and not list(out.glob("*.tmp*"))
    (folder / "broken.nii.gz").unlink()
    second = _events(run_ltuda("predict", "--model", tiny_model, "--input", folder, "--output", out,
                               "--progress", "jsonl").stdout)
    assert second[-1]["skipped"] == 2 and second[-1]["done"] == 0


def test_real_ct_predictions_align_voxel_for_voxel(tiny_model, real_ct, tmp_path):
    inputs = [real_ct / "ct_small_3mm.nii.gz", real_ct / "ct_chest_abdomen_1p5mm_lps.nii.gz",
              real_ct / "example_ct_dicom"]
    for source in inputs:
        out = tmp_path / f"{source.name.split('.')[0]}.seg.nrrd"
        run_ltuda("predict", "--model", tiny_model, "--input", source, "--output", out)
        image = read_image(source)
        labels, _ = read_segmentation(out)
        for name in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
            assert np.allclose(getattr(labels, name)(), getattr(image, name)(), atol=1e-4), (source, name)
    # the DICOM series and its organ mask (another tool's, stored LAS) cover the same voxels
    dicom_pred = read_segmentation(tmp_path / "example_ct_dicom.seg.nrrd")[0]
    mask = sitk.ReadImage(str(real_ct / "example_ct_dicom_organs.nii.gz"))
    assert on_grid_of(mask, dicom_pred, tol=1e-3) is not None
