"""Training cases that label no organ (a hospital's own scans): LTUDA learns from them, the supervised-only
methods leave them out, and validation never holds them out."""

import json
import types

import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN_ARGS, run_ltuda
from ltuda.data.phantoms import generate_phantoms
from ltuda.data.slices import SlicePool
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


# ----- where their slices go in a batch -----

def _pool(unlabelled_cases: int) -> SlicePool:
    """4 single-organ sites and cases that label nothing; a slice's pixel value // 10 says its dataset."""
    cases = []
    for dataset in range(4 + unlabelled_cases):
        site = min(dataset, 4)  # every case that labels nothing is one dataset
        labels = np.zeros((6, 8, 8), np.uint8)
        labels[:, 2:5, 2:5] = site + 1 if site < 4 else 0
        image = (10 * site + np.arange(6, dtype=np.float16))[:, None, None] * np.ones((1, 8, 8), np.float16)
        cases.append(types.SimpleNamespace(image=image, labels=labels, labeled=[site + 1] if site < 4 else []))
    return SlicePool(cases, 4)


def _datasets(batch) -> list:
    return (batch[0][:, 0, 0, 0] // 10).long().tolist()


def test_in_batch_unlabelled_slices_take_places_of_labelled_sites():
    pool, generator = _pool(2), torch.Generator().manual_seed(0)
    drawn = [_datasets(pool.batch(4, generator, "in-batch")) for _ in range(200)]
    assert all(len(set(d)) == 4 for d in drawn)  # 4 of the 5 datasets, each once
    with_unlabelled = sum(4 in d for d in drawn)
    assert 130 <= with_unlabelled <= 190  # in 4 batches out of 5, each time in a labelled site's place


@pytest.mark.parametrize("batch_size, added", [(4, 1), (8, 2), (2, 1)])
def test_added_unlabelled_slices_leave_every_labelled_place_to_the_labelled_sites(batch_size, added):
    pool, generator = _pool(2), torch.Generator().manual_seed(0)
    for _ in range(50):
        images, labels, labeled = pool.batch(batch_size, generator, "added")
        drawn = _datasets((images, labels, labeled))
        assert drawn[batch_size:] == [4] * added and not labeled[batch_size:].any()  # after the labelled places
        labelled_part = drawn[:batch_size]
        assert 4 not in labelled_part and len(set(labelled_part)) == min(batch_size, 4)  # the sites in turn


def test_without_unlabelled_cases_added_is_the_same_draw_as_in_batch():
    """Every run without such cases (the toy protocol, its finished benchmark rows) trains the same."""
    pool = _pool(0)
    first, second = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(10):
        assert torch.equal(pool.batch(4, first, "in-batch")[0], pool.batch(4, second, "added")[0])


@pytest.mark.parametrize("flag, recorded", [([], "added"), (["--unlabelled-slices", "in-batch"], "in-batch")])
def test_training_records_where_the_unlabelled_slices_went(dataset, tmp_path, flag, recorded):
    out = tmp_path / "model"
    run_ltuda("train", "--dataset", dataset, "--out", out, "--method", "cda", *TINY_TRAIN_ARGS, *flag,
              "--progress", "none")
    training = json.loads((out / "model.json").read_text())["training"]
    assert training["config"]["unlabelled_slices"] == recorded and training["cases"]["unlabelled"] == 2
    wrong = run_ltuda("train", "--dataset", dataset, "--out", tmp_path / "wrong", "--unlabelled-slices", "extra",
                      check=False)
    assert wrong.returncode != 0 and "--unlabelled-slices" in wrong.stderr and "Traceback" not in wrong.stderr
