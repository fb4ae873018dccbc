"""Training cases that label no organ (a hospital's own scans): LTUDA learns from them, the supervised-only
methods leave them out, and validation never holds them out."""

import json

import pytest

from conftest import TINY_TRAIN_ARGS, run_ltuda
from ltuda.data.phantoms import generate_phantoms
from ltuda.manifest import load_manifest
from ltuda.train.trainer import split_validation


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_phantoms(tmp_path_factory.mktemp("unlabelled"), cases_per_site=2, test_cases=1, shape=(48, 48),
                             seed=0, unlabelled_cases=2)


def test_validation_never_holds_out_a_case_that_labels_nothing(dataset):
    manifest = load_manifest(dataset)
    for seed in range(5):
        train, val = split_validation(manifest, 0.5, seed)
        assert all(c.labeled for c in val) and len(val) == 4  # one of the two cases of each site
        assert sorted(c.id for c in train if not c.labeled) == ["local_000", "local_001"]


@pytest.mark.parametrize("method, used", [("ltuda", 2), ("labeled-only", 0)])
def test_ltuda_learns_from_unlabelled_cases_and_labelled_only_leaves_them_out(dataset, tmp_path, method, used):
    out = tmp_path / method
    run_ltuda("train", "--dataset", dataset, "--out", out, "--method", method, *TINY_TRAIN_ARGS, "--progress", "none")
    cases = json.loads((out / "model.json").read_text())["training"]["cases"]
    assert cases == {"train": 4 + used, "val": 4, "unlabelled": used}
    log = (out / "train.log").read_text()
    expected = ("2 case(s) label no organ: ltuda learns from them through pseudo-labels" if used else
                "2 case(s) label no organ; labeled-only learns from labels only, so they are not used")
    assert expected in log
    if used:  # the teacher's pseudo-labels are also scored per site and phase (the manifest gives both)
        last = json.loads((out / "model.json").read_text())["pseudo_label_quality"][-1]
        assert {"local contrast", "local native"} <= set(last["by_group"])
        assert set(last["by_group"]["local native"]) <= set(last["per_organ"])
