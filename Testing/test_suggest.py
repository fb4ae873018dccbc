"""The annotation loop's backend: `ltuda suggest` (proposals + ranked review list) and `ltuda train --init-from`.

Real subprocesses, real files, the session's tiny phantom dataset and tiny trained model.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch

from conftest import run_ltuda as _run_ltuda

from ltuda.manifest import load_manifest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ROW_KEYS = {"rank", "case", "organ", "label_value", "volume_ml", "uncertainty", "score", "segmentation"}


def run_ltuda(command, *args, **kwargs):
    """The variant datasets below point into the session's phantom folder."""
    return _run_ltuda(command, "--allow-outside-paths", *args, **kwargs)


def _cli(capsys, *args):
    """`ltuda ARGS` in this process (the same main() as the console script): (exit code, stderr)."""
    from ltuda.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _events(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def _ijk_to_lps(image):
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def _variant(dataset: Path, folder: Path, edit) -> Path:
    """A copy of the manifest in `folder` (paths made absolute), changed by edit(doc)."""
    doc = json.loads(dataset.read_text())
    for case in doc["cases"]:
        for key in ("image", "label", "label_full"):
            if key in case:
                case[key] = str((dataset.parent / case[key]).resolve())
    edit(doc)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dataset.json"
    path.write_text(json.dumps(doc))
    return path


def _label_all(case):
    """The case labels every organ: its full label file, all values mapped."""
    case["label"], case["labels"] = case["label_full"], {"1": "liver", "2": "spleen", "3": "kidney", "4": "pancreas"}
    case["labeled"] = ["liver", "spleen", "kidney", "pancreas"]


def _add_organ(case, organ):
    """The case also labels `organ` (a simulated review): its full label, other organs as background."""
    names = {1: "liver", 2: "spleen", 3: "kidney", 4: "pancreas"}
    keep = set(case["labeled"]) | {organ}
    case["label"] = case["label_full"]
    case["labels"] = {str(v): (n if n in keep else "background") for v, n in names.items()}
    case["labeled"] = [n for n in names.values() if n in keep]


@pytest.fixture(scope="module")
def suggested(tiny_dataset, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("suggest") / "proposals"
    result = run_ltuda("suggest", "--model", tiny_model, "--dataset", tiny_dataset, "--out", out, "--progress", "jsonl")
    return out, result


def test_suggest_writes_tagged_proposals_for_missing_organs_on_the_case_grid(tiny_dataset, suggested):
    out, result = suggested
    manifest = load_manifest(tiny_dataset)
    training = manifest.split("train")
    assert sorted(p.name for p in out.glob("*.seg.nrrd")) == sorted(f"{c.id}.seg.nrrd" for c in training)
    for case in training:
        path = out / f"{case.id}.seg.nrrd"
        missing = [c for c in manifest.classes if c["name"] not in case.labeled]
        seg = slicerio.read_segmentation(str(path))
        assert [s["name"] for s in seg["segments"]] == [c["name"] for c in missing]
        for segment, cls in zip(seg["segments"], missing):
            assert segment["tags"]["LTUDA.status"] == "proposed"
            assert segment["labelValue"] == cls["value"]
            assert segment["terminology"]["type"] == cls["terminology"]["type"]
            np.testing.assert_allclose(np.array(segment["color"]) * 255, cls["color"], atol=1e-3)
        image = sitk.ReadImage(str(case.image))
        assert seg["voxels"].shape == image.GetSize()  # slicerio: (i, j, k)
        np.testing.assert_allclose(seg["ijkToLPS"], _ijk_to_lps(image), atol=1e-5)
        present = set(np.unique(seg["voxels"]).tolist()) - {0}
        assert present <= {c["value"] for c in missing}  # never a labelled organ
        assert present, f"{case.id}: the tiny model proposed nothing at all"
    events = _events(result.stdout)
    assert events[0]["event"] == "start" and events[0]["command"] == "suggest" and events[0]["cases"] == len(training)
    assert [e["event"] for e in events].count("case") == len(training)
    assert events[-1]["event"] == "done" and events[-1]["status"] == "completed" and events[-1]["done"] == len(training)


def test_proposals_read_in_slicer_with_the_proposed_tag(suggested, tiny_dataset):
    slicer = pytest.importorskip("slicer")
    import vtk

    out, _ = suggested
    case = load_manifest(tiny_dataset).split("train")[0]
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(out / f"{case.id}.seg.nrrd"))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == [n for n in ("liver", "spleen", "kidney", "pancreas") if n not in case.labeled]
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        status, term = vtk.reference(""), vtk.reference("")
        assert segment.GetTag("LTUDA.status", status) and str(status) == "proposed"
        assert segment.GetTag("TerminologyEntry", term) and "SCT^" in str(term)


def test_suggestions_json_is_ranked_with_one_row_per_missing_organ(tiny_dataset, tiny_model, suggested):
    out, _ = suggested
    doc = json.loads((out / "suggestions.json").read_text())
    model = json.loads((tiny_model / "model.json").read_text())
    from ltuda.suggest import DEFAULT_SCORE, default_order, run_suggestion

    assert doc["schema"] == "ltuda-suggestions/1" and doc["score"] == DEFAULT_SCORE == "random"  # the benchmark's verdict
    assert doc["order"] == default_order(DEFAULT_SCORE) == "score"
    assert doc["model_sha256"] == model["weights_sha256"]
    assert Path(doc["model"]) == tiny_model.absolute() and Path(doc["dataset"]) == Path(tiny_dataset).absolute()
    manifest = load_manifest(tiny_dataset)
    expected = {(c.id, o) for c in manifest.split("train") for o in manifest.class_names if o not in c.labeled}
    rows = doc["rows"]
    assert {(r["case"], r["organ"]) for r in rows} == expected and len(rows) == len(expected)
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(ROW_KEYS <= set(r) for r in rows)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)  # a fixed shuffle
    values = {c["name"]: c["value"] for c in manifest.classes}
    for row in rows:
        assert row["label_value"] == values[row["organ"]] and row["segmentation"] == f"{row['case']}.seg.nrrd"
        assert 0.0 <= row["uncertainty"] <= 1.0 and row["uncertainty"] == row["uncertainties"]["entropy"]
        assert set(row["uncertainties"]) == {"entropy", "heads", "shift", "error"}
        voxels = slicerio.read_segmentation(str(out / row["segmentation"]))["voxels"]
        image = sitk.ReadImage(str(next(c.image for c in manifest.cases if c.id == row["case"])))
        volume = np.count_nonzero(voxels == row["label_value"]) * np.prod(image.GetSpacing()) / 1000
        assert row["volume_ml"] == pytest.approx(volume, abs=1e-3)
    # Another score or order only re-ranks the same files (nothing is recomputed). Balanced: every organ's
    # best row, then every organ's second ...; within each organ by score.
    summary = run_suggestion(tiny_model, tiny_dataset, out, score="entropy")
    balanced = json.loads((out / "suggestions.json").read_text())
    assert summary["done"] == 0 and balanced["order"] == "balanced" and len(balanced["rows"]) == len(rows)
    tiers = [sum(o["organ"] == r["organ"] for o in balanced["rows"][:i]) for i, r in enumerate(balanced["rows"])]
    assert tiers == sorted(tiers) and tiers[0] == 0 and tiers[-1] > 0
    for organ in manifest.class_names:
        scores = [r["score"] for r in balanced["rows"] if r["organ"] == organ]
        assert scores == sorted(scores, reverse=True)
        assert all(r["score"] == r["uncertainty"] == r["uncertainties"]["entropy"] for r in balanced["rows"])
    summary = run_suggestion(tiny_model, tiny_dataset, out, score="error", order="score")
    assert summary["done"] == 0 and summary["rows"] == len(rows)
    again = json.loads((out / "suggestions.json").read_text())
    assert again["score"] == "error" and again["order"] == "score"
    scores = [r["score"] for r in again["rows"]]
    assert scores == sorted(scores, reverse=True) and scores == [r["uncertainties"]["error"] for r in again["rows"]]
    largest = run_suggestion(tiny_model, tiny_dataset, out, score="volume")
    volumes = [r["volume_ml"] for r in json.loads((out / "suggestions.json").read_text())["rows"]]
    assert largest["rows"] == len(rows) and volumes == sorted(volumes, reverse=True)


def test_suggest_resumes_redoes_changed_cases_and_skips_fully_labelled_ones(tiny_dataset, tiny_model, suggested,
                                                                             tmp_path):
    out, _ = suggested
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.seg.nrrd")}
    again = run_ltuda("suggest", "--model", tiny_model, "--dataset", tiny_dataset, "--out", out, "--progress", "jsonl")
    done = _events(again.stdout)[-1]
    assert done["done"] == 0 and done["skipped"] == len(before)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.seg.nrrd")} == before

    # One case now labels everything, another gained an organ: in a fresh folder, only what is missing.
    cases = load_manifest(tiny_dataset).split("train")
    full, grown = cases[0], cases[2]
    grown_organ = next(n for n in ("liver", "spleen", "kidney", "pancreas") if n not in grown.labeled)

    def edit(doc):
        by_id = {c["id"]: c for c in doc["cases"]}
        _label_all(by_id[full.id])
        _add_organ(by_id[grown.id], grown_organ)

    dataset = _variant(tiny_dataset, tmp_path / "data", edit)
    target = tmp_path / "proposals"
    result = run_ltuda("suggest", "--model", tiny_model, "--dataset", dataset, "--out", target,
                       "--cases", f"{full.id},{grown.id}", "--progress", "jsonl")
    assert sorted(p.name for p in target.glob("*.seg.nrrd")) == [f"{grown.id}.seg.nrrd"]
    names = [s["name"] for s in slicerio.read_segmentation(str(target / f"{grown.id}.seg.nrrd"))["segments"]]
    assert grown_organ not in names and len(names) == 4 - len(grown.labeled) - 1
    assert _events(result.stdout)[-1]["cases"] == 1
    # The old folder's file for `grown` has an organ the case now labels: redone, the others kept.
    redo = run_ltuda("suggest", "--model", tiny_model, "--dataset", dataset, "--out", out, "--progress", "jsonl")
    assert [e["case_id"] for e in _events(redo.stdout) if e["event"] == "case"] == [grown.id]
    rows = json.loads((out / "suggestions.json").read_text())["rows"]
    assert not any(r["case"] == full.id for r in rows) and not any(r["case"] == grown.id and r["organ"] == grown_organ
                                                                     for r in rows)


def test_suggest_output_is_on_the_grid_of_ras_and_lps_volumes(tiny_dataset, tiny_model, tmp_path):
    case = load_manifest(tiny_dataset).split("train")[1]
    folder = tmp_path / "ras"
    folder.mkdir()
    lps_image = sitk.ReadImage(str(case.image))
    sitk.WriteImage(sitk.DICOMOrient(lps_image, "RAS"), str(folder / "ras.nii.gz"))
    sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(case.label)), "RAS"), str(folder / "ras_label.nii.gz"))

    def edit(doc):
        original = next(c for c in doc["cases"] if c["id"] == case.id)
        doc["cases"].append({**original, "id": "ras", "image": "ras.nii.gz", "label": "ras_label.nii.gz"})

    dataset = _variant(tiny_dataset, folder, edit)
    out = tmp_path / "out"
    run_ltuda("suggest", "--model", tiny_model, "--dataset", dataset, "--out", out, "--cases", f"{case.id},ras",
              "--progress", "none")
    ras_image = sitk.ReadImage(str(folder / "ras.nii.gz"))
    assert ras_image.GetDirection() != lps_image.GetDirection()
    ras = slicerio.read_segmentation(str(out / "ras.seg.nrrd"))
    lps = slicerio.read_segmentation(str(out / f"{case.id}.seg.nrrd"))
    np.testing.assert_allclose(ras["ijkToLPS"], _ijk_to_lps(ras_image), atol=1e-5)
    np.testing.assert_allclose(lps["ijkToLPS"], _ijk_to_lps(lps_image), atol=1e-5)
    # The same proposal in space: the RAS file's voxels, oriented back to LPS, are the LPS file's.
    back = sitk.GetImageFromArray(ras["voxels"].transpose(2, 1, 0).copy())
    back.CopyInformation(ras_image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.DICOMOrient(back, "LPS")),
                                  lps["voxels"].transpose(2, 1, 0))


def _stomach_dataset(tiny_dataset, folder):
    """A dataset whose one organ is one no tiny model segments."""
    def edit(doc):
        doc["classes"] = [{"name": "stomach", "value": 1, "color": [200, 100, 50]}]
        for case in doc["cases"]:
            case.pop("label_full", None)
            case["labels"] = {"1": "stomach"}
            case["labeled"] = ["stomach"] if case["split"] != "test" else []
    return _variant(tiny_dataset, folder, edit)


def test_suggest_bad_model_or_dataset_one_clear_message(tiny_dataset, tiny_model, tmp_path, capsys):
    stomach = _stomach_dataset(tiny_dataset, tmp_path / "stomach")
    first = load_manifest(tiny_dataset).split("train")[0]

    def drop_image(doc):
        doc["cases"][0]["image"] = str(tmp_path / "gone.nii.gz")

    missing = _variant(tiny_dataset, tmp_path / "missing", drop_image)
    out = tmp_path / "out"
    result = run_ltuda("suggest", "--model", tiny_model, "--dataset", stomach, "--out", out, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr and result.stderr.count("error:") == 1
    assert (f"{tiny_model}: segments liver, spleen, kidney, pancreas, none of the dataset's organs (stomach)"
            in result.stderr)
    assert not out.exists()
    for args, expected in (
        (["--model", tiny_model, "--dataset", missing], f"case '{first.id}': image {tmp_path / 'gone.nii.gz'} not found"),
        (["--model", tmp_path, "--dataset", tiny_dataset], "is not an LTUDA model folder"),
        (["--model", tiny_model, "--dataset", tiny_dataset, "--cases", "nobody"], "--cases names case(s) not in the dataset: nobody"),
    ):
        code, err = _cli(capsys, "suggest", "--allow-outside-paths", *args, "--out", out)
        assert code == 1, err
        assert expected in err and "Traceback" not in err and err.count("error:") == 1
        assert not out.exists()  # nothing written before the input is known to be good


def _parameters(path):
    from ltuda.model.network import LTUDANet, NetworkConfig

    doc = json.loads((path / "model.json").read_text())
    net = LTUDANet(NetworkConfig.from_json(doc["network"]))
    net.load_state_dict(torch.load(path / "model.pt", weights_only=True))
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def test_init_from_starts_from_the_parent_and_records_the_lineage(tiny_dataset, tiny_model, tmp_path):
    case = load_manifest(tiny_dataset).split("train")[3]
    organ = next(n for n in ("liver", "spleen", "kidney", "pancreas") if n not in case.labeled)

    def edit(doc):
        _add_organ(next(c for c in doc["cases"] if c["id"] == case.id), organ)

    dataset = _variant(tiny_dataset, tmp_path / "reviewed", edit)
    child = tmp_path / "child"
    # lr 0: a run that starts from the parent ends with the parent's parameters; a fresh one cannot.
    result = run_ltuda("train", "--dataset", dataset, "--out", child, "--init-from", tiny_model, "--lr", "0",
                       "--progress", "jsonl")
    assert _events(result.stdout)[-1]["status"] == "completed"
    parent, mine = _parameters(tiny_model), _parameters(child)
    assert parent.keys() == mine.keys()
    for name in parent:
        torch.testing.assert_close(mine[name], parent[name], msg=name)
    doc = json.loads((child / "model.json").read_text())
    parent_doc = json.loads((tiny_model / "model.json").read_text())
    assert "lineage" not in parent_doc and parent_doc["dataset_labels"]  # a first model has no parent
    assert doc["lineage"] == {"parent": str(tiny_model.resolve()), "parent_sha256": parent_doc["weights_sha256"],
                              "labels_added": [{"case": case.id, "organ": organ}]}
    assert doc["dataset_labels"][case.id] == sorted(case.labeled + [organ], key=["liver", "spleen", "kidney", "pancreas"].index)
    # the shorter schedule: a quarter of the parent's epochs, at least one
    assert doc["training"]["epochs"] == {"1": 1, "2": 1} and doc["training"]["config"]["pseudo_rampup_epochs"] == 0
    # ... which a run from scratch (same seed, lr 0) would not have: its start is a new initialisation.
    from ltuda.model.network import LTUDANet, NetworkConfig

    torch.manual_seed(doc["training"]["seed"])
    fresh = LTUDANet(NetworkConfig.from_json(doc["network"]))
    assert not torch.equal(fresh.linear_head.weight, parent["linear_head.weight"])


def test_init_from_refuses_an_incompatible_model_clearly(tiny_dataset, tiny_model, tmp_path, capsys):
    stomach = _stomach_dataset(tiny_dataset, tmp_path / "stomach")
    for args, expected in (
        (["--dataset", stomach], f"{tiny_model}: segments liver (1), spleen (2), kidney (3), pancreas (4); "
                                 "the dataset's organs are stomach (1)"),
        (["--dataset", tiny_dataset, "--image-size", "64"], f"{tiny_model}: has another network"),
        (["--dataset", tiny_dataset, "--preset", "paper"], "the parent was trained with the fast preset"),
        (["--dataset", tiny_dataset, "--resume"], "--init-from and --resume do not go together"),
    ):
        out = tmp_path / "child"
        code, err = _cli(capsys, "train", "--allow-outside-paths", *args, "--out", out, "--init-from", tiny_model)
        assert code == 1, err
        assert expected in err and "Traceback" not in err and err.count("error:") == 1
        assert not out.exists()
    code, err = _cli(capsys, "train", "--dataset", tiny_dataset, "--out", tmp_path / "x", "--init-from", tmp_path / "none")
    assert code == 1 and "--init-from: model folder not found" in err


def test_annotation_loop_benchmark_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "annotation_loop.py"), "--smoke", "--out",
                             str(tmp_path / "results"), "--work", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((tmp_path / "results" / "annotation_loop.json").read_text())
    assert set(doc["strategies"]) >= {"uncertainty", "random", "largest"}
    rounds = doc["rounds"]
    for strategy in doc["strategies"].values():
        assert len(strategy["dice_by_round"]) == rounds + 1  # round 0: the initial model
        assert all(len(seed) == rounds + 1 for seed in strategy["per_seed"])
        assert all(0.0 <= d <= 1.0 for d in strategy["dice_by_round"])
    assert doc["reviews_per_round"] >= 1
    for fraction in doc["voxels_changed_fraction"].values():
        assert fraction >= 0.0
    assert "| random |" in (tmp_path / "results" / "annotation_loop.md").read_text()


def test_suggest_stops_on_a_stop_file_and_a_rerun_finishes(tiny_dataset, tiny_model, tmp_path):
    from ltuda.progress import Reporter
    from ltuda.suggest import run_suggestion

    out = tmp_path / "proposals"

    class StopAfterFirstCase(Reporter):
        """Asks for a stop (OUT/STOP, as the module's Cancel may) once the first case is written."""

        def __init__(self):
            super().__init__()
            self.events = []

        def emit(self, event, **fields):
            self.events.append((event, fields))
            if event == "case":
                (out / "STOP").write_text("")

        def log(self, text):
            pass

    report = StopAfterFirstCase()
    summary = run_suggestion(tiny_model, tiny_dataset, out, report=report, allow_outside_paths=True)
    assert summary["status"] == "cancelled" and summary["done"] == 1
    assert report.events[-1][0] == "done" and report.events[-1][1]["status"] == "cancelled"
    assert len(list(out.glob("*.seg.nrrd"))) == 1 and not (out / "STOP").exists()
    assert len(json.loads((out / "suggestions.json").read_text())["rows"]) == 4 - len(load_manifest(tiny_dataset).split("train")[0].labeled)
    again = run_suggestion(tiny_model, tiny_dataset, out, allow_outside_paths=True)
    assert again["status"] == "completed" and again["skipped"] == 1 and again["done"] == again["cases"] - 1
