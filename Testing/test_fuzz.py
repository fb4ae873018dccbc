"""Fuzzing sample (issue 14): 50 mutated inputs of every kind through the real commands, and the specific
damaged inputs the full fuzzer found, each ending in a clear error or a correct result."""

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fuzz  # noqa: E402


def test_a_fuzz_sample_of_50_inputs_ends_in_clear_errors_or_correct_results(tiny_model, tmp_path):
    result = fuzz.run_fuzz(tiny_model, inputs=50, seed=7, work=tmp_path)
    counts = result["counts"]
    assert counts["inputs"] == 50
    failures = {k: counts[k] for k in ("tracebacks", "crashes", "hangs", "unclear", "wrong_results", "inputs_modified")}
    assert failures == dict.fromkeys(failures, 0), result["failures"]
    assert counts["clear_errors"] > 0 and counts["correct"] > 0  # both endings are exercised
    assert len(result["per_kind"]) >= 6


def _ct(path):
    image = sitk.GetImageFromArray((np.arange(6 * 10 * 12).reshape(6, 10, 12) % 300 - 100).astype(np.int16))
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith(".gz"))
    return path


def _refused(source) -> str:
    from ltuda.errors import LtudaError
    from ltuda.io.volumes import read_image

    with pytest.raises(LtudaError) as info:
        read_image(source)
    return str(info.value)


def test_a_non_utf8_file_name_is_read(tmp_path):
    """SimpleITK aborted the whole process on such a name (hence a subprocess); now it reads through a link."""
    source = os.fsdecode(bytes(tmp_path) + b"/ct\xff.nrrd")
    _ct(tmp_path / "plain.nrrd").rename(source)
    code = ("import sys, os; from ltuda.io.volumes import read_image; "
            "print(read_image(os.fsdecode(sys.argv[1].encode('utf-8', 'surrogateescape'))).GetSize())")
    result = subprocess.run([sys.executable, "-c", code, source], capture_output=True, text=True, timeout=120,
                            errors="surrogateescape")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(12, 10, 6)"


def test_a_nrrd_header_line_that_crashed_itk_is_refused(tmp_path):
    source = _ct(tmp_path / "ct.nrrd")
    source.write_bytes(source.read_bytes().replace(b"type:", b"x-junk:" + b"y" * 2000 + b"\ntype:", 1))
    assert _refused(source).startswith(f"{source}: has an unknown NRRD header line")


def test_an_absurd_metaimage_ndims_is_refused(tmp_path):
    source = _ct(tmp_path / "ct.mha")
    source.write_bytes(source.read_bytes().replace(b"NDims = 3", b"NDims = 4294967297", 1))
    assert _refused(source).startswith(f"{source}: has an invalid MetaImage NDims")


def test_a_nifti_with_less_data_than_its_header_says_is_refused(tmp_path):
    """ITK pads the missing voxels with zeros and says nothing: that would be silently wrong data."""
    source = _ct(tmp_path / "ct.nii.gz")
    raw = bytearray(gzip.decompress(source.read_bytes()))
    struct.pack_into("<h", raw, 46, 32000)  # dim[3]: 32000 slices promised, 6 present
    source.write_bytes(gzip.compress(bytes(raw)))
    assert _refused(source).startswith(f"{source}: is incomplete: its header promises")


def test_a_nan_orientation_is_refused(tmp_path):
    """ITK reads a NIfTI whose sform holds NaN into a NaN direction; everything after it would be wrong."""
    source = _ct(tmp_path / "ct.nii")
    raw = bytearray(source.read_bytes())
    struct.pack_into("<f", raw, 280, float("nan"))  # srow_x[0]
    source.write_bytes(bytes(raw))
    assert _refused(source).startswith(f"{source}: has an invalid position or orientation")


@pytest.mark.parametrize("edit", [
    lambda doc: doc["network"].update(features=[10**9] * 6),
    lambda doc: doc["classes"][0].update(value=[1]),
    lambda doc: doc["classes"][0].update(terminology=True),
    lambda doc: doc.update(weights="../../etc/passwd"),
    lambda doc: doc["preprocessing"].update(hu_window=[300, -300]),
], ids=["huge-network", "value-list", "terminology-bool", "weights-path", "inverted-window"])
def test_a_damaged_model_json_is_one_message(tiny_model, tmp_path, edit):
    import json

    from ltuda.errors import LtudaError
    from ltuda.model.store import load_model

    doc = json.loads((tiny_model / "model.json").read_text())
    edit(doc)
    (tmp_path / "model.json").write_text(json.dumps(doc))
    with pytest.raises(LtudaError) as info:
        load_model(tmp_path)  # checked before the weights are even read
    assert str(info.value).startswith(f"{tmp_path / 'model.json'}: is damaged: ")


def test_manifest_values_of_the_wrong_type_are_listed_not_crashed_on(tiny_dataset):
    import json

    from ltuda.manifest import parse_manifest

    doc = json.loads(Path(tiny_dataset).read_text())
    doc["classes"][0]["value"] = [1]
    doc["cases"][0]["labels"] = "liver"
    doc["cases"][1]["labeled"] = True
    doc["cases"][2]["labels"] = {str(2**80): "liver"}
    path = Path(tiny_dataset).parent / "fuzzed.json"
    path.write_text(json.dumps(doc))
    try:
        _, problems = parse_manifest(path)
    finally:
        path.unlink()
    text = "\n".join(problems)
    assert "'value' must be a unique integer" in text and "'labels' must map label values" in text
    assert "'labeled' must be a list of class names" in text and "is out of range" in text
