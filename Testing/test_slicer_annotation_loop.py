"""The annotation loop in the Slicer module (issue 15), against real MRML (slicer-core).

Proposal files are made here the way `ltuda suggest` writes them: a segmentation whose segments carry
the tag LTUDA.status=proposed, written by Slicer's own segmentation writer. Checked: proposals are added
as NEW segments and every existing segment stays byte-identical; "Mark reviewed"; the review list's
order; the export writes an unreviewed proposal as NOT labelled and a reviewed one as a label;
`--init-from` reaches the train command; the suggest command line and its export; the panel's
handlers; and (once the backend has `ltuda suggest`) the whole loop through the real subprocess.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

import vtk  # noqa: E402

from LTUDASegmentationLib import jobs, synthetic  # noqa: E402
from LTUDASegmentationLib.errors import LTUDAError  # noqa: E402
from LTUDASegmentationLib.organs import organClass  # noqa: E402
from LTUDASegmentationLib.proposals import PROPOSED, REVIEWED, STATUS_TAG, proposalStatus  # noqa: E402
from LTUDASegmentationLib.segments import (_Scratch, addSegmentForOrgan, labelArrayOnVolume,  # noqa: E402
                                           setSegmentFromMask)
from LTUDASegmentationLib.suggestions import SCHEMA  # noqa: E402

ORGANS = ["liver", "spleen", "kidney"]
SHAPE = (12, 40, 40)


def vtkMatrix(volume):
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return matrix


def writeProposalFile(path, volume, masks, status=PROPOSED):
    """A .seg.nrrd like `ltuda suggest` writes: one segment per organ (name, colour, terminology) on the
    volume's grid, tagged LTUDA.status; made with real MRML nodes and Slicer's segmentation writer."""
    scratch = _Scratch()
    try:
        node = scratch.add("vtkMRMLSegmentationNode", "proposal")
        for value, (organ, mask) in enumerate(masks.items(), start=1):
            segmentId = addSegmentForOrgan(node, organClass(organ, value))
            setSegmentFromMask(node, segmentId, mask, vtkMatrix(volume))
            node.GetSegmentation().GetSegment(segmentId).SetTag(STATUS_TAG, status)
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(path))
        assert storage.WriteData(node)
    finally:
        scratch.close()
    return path


def segmentState(volume, segmentationNode):
    """Everything about every segment: id, name, colour, tags, voxels on the volume's grid."""
    seg = segmentationNode.GetSegmentation()
    state = {}
    for i in range(seg.GetNumberOfSegments()):
        segmentId = seg.GetNthSegmentID(i)
        segment = seg.GetSegment(segmentId)
        tags = {}
        for key in (STATUS_TAG, segment.GetTerminologyEntryTagName()):
            value = vtk.reference("")
            if segment.GetTag(key, value):
                tags[key] = str(value)
        state[segmentId] = (segment.GetName(), tuple(segment.GetColor()), tags,
                            labelArrayOnVolume(volume, segmentationNode, {segmentId: 1}).tobytes())
    return state


def masksOf(seed, organs=ORGANS):
    return synthetic.organMasks(SHAPE, organs, seed)


def caseWithProposals(scene, logic, tmp_path, name="caseA", labelled=("liver",), seed=1, flip=False):
    volume, segmentation = synthetic.addSyntheticCase(scene, name, ORGANS, list(labelled), seed=seed, flip=flip)
    logic.addCase(volume, segmentation)
    truth = masksOf(seed)
    path = writeProposalFile(tmp_path / f"{name}.seg.nrrd", volume,
                             {o: truth[o] for o in ORGANS if o not in labelled})
    return volume, segmentation, truth, path


# ------------------------------------------------------------------------------------ proposals
@pytest.mark.parametrize("flip", [False, True], ids=["RAS", "LPS"])
def test_proposals_are_added_as_new_segments_and_existing_ones_stay_byte_identical(scene, logic, tmp_path, flip):
    volume, segmentation = synthetic.addSyntheticCase(scene, "caseA", ORGANS, ["liver"], seed=1, flip=flip)
    logic.addCase(volume, segmentation)
    truth = masksOf(1)
    # the spleen proposal also covers part of the user's liver: the liver must not lose a voxel
    spleen = truth["spleen"].copy()
    liverVoxels = np.argwhere(truth["liver"])[:40]
    spleen[tuple(liverVoxels.T)] = True
    # the liver is in the file too (a model proposes what it likes): the case labels it, so it is skipped
    path = writeProposalFile(tmp_path / "caseA.seg.nrrd", volume,
                             {"liver": truth["liver"], "spleen": spleen, "kidney": truth["kidney"]})
    before = segmentState(volume, segmentation)
    volumeBefore = slicer.util.arrayFromVolume(volume).copy()

    added = logic.addProposals(0, path)

    after = segmentState(volume, segmentation)
    assert [organ for organ, _id in added] == ["spleen", "kidney"]
    for segmentId, state in before.items():
        assert after[segmentId] == state, f"the existing segment {segmentId} changed"
    assert (slicer.util.arrayFromVolume(volume) == volumeBefore).all()
    seg = segmentation.GetSegmentation()
    for (organ, segmentId), mask in zip(added, (spleen, truth["kidney"])):
        assert segmentId not in before
        segment = seg.GetSegment(segmentId)
        assert segment.GetName() == f"{organ} (proposed)" and proposalStatus(segment) == PROPOSED
        assert (labelArrayOnVolume(volume, segmentation, {segmentId: 1}) == mask).all()
    assert logic.caseTable()[0]["organs"] == {"liver": "labelled", "spleen": "proposed", "kidney": "proposed"}

    # a second pre-fill adds nothing: the organs are proposed already
    assert logic.addProposals(0, path) == []
    assert segmentState(volume, segmentation) == after


def test_mark_reviewed_turns_a_proposal_into_a_label(scene, logic, tmp_path):
    volume, segmentation, truth, path = caseWithProposals(scene, logic, tmp_path)
    (spleenOrgan, spleenId), (_k, kidneyId) = logic.addProposals(0, path)
    voxels = labelArrayOnVolume(volume, segmentation, {spleenId: 1}).tobytes()

    assert logic.markReviewed("caseA", "spleen") == [spleenId]

    segment = segmentation.GetSegmentation().GetSegment(spleenId)
    assert segment.GetName() == "spleen" and proposalStatus(segment) == REVIEWED
    assert labelArrayOnVolume(volume, segmentation, {spleenId: 1}).tobytes() == voxels
    assert logic.caseTable()[0]["organs"] == {"liver": "labelled", "spleen": "reviewed", "kidney": "proposed"}
    assert logic.labelSummary()["counts"] == {"liver": 1, "spleen": 1, "kidney": 0}
    with pytest.raises(LTUDAError, match="no unreviewed proposal for 'spleen'"):
        logic.markReviewed(0, "spleen")
    with pytest.raises(LTUDAError, match="no organ 'lung'"):
        logic.markReviewed(0, "lung")
    with pytest.raises(LTUDAError, match="no training case 'nope'"):
        logic.markReviewed("nope", "kidney")


def test_export_treats_a_proposal_as_not_labelled_and_a_reviewed_one_as_a_label(scene, logic, tmp_path):
    volume, segmentation, truth, path = caseWithProposals(scene, logic, tmp_path)
    # another case labels spleen and kidney, so training is possible without the proposals
    otherVolume, otherSeg = synthetic.addSyntheticCase(scene, "caseB", ORGANS, ["spleen", "kidney"], seed=2)
    logic.addCase(otherVolume, otherSeg)
    logic.addProposals(0, path)

    def exported(folder):
        manifest = Path(logic.exportTrainingData(str(tmp_path / folder)))
        entry = json.loads(manifest.read_text())["cases"][0]
        labels = slicer.util.arrayFromVolume(readLabel(scene, manifest.parent / entry["label"]))
        return entry, labels

    entry, labels = exported("unreviewed")
    assert entry["labeled"] == ["liver"] and entry["labels"] == {"1": "liver"}
    assert set(np.unique(labels)) == {0, 1}  # no proposal voxel in the label map
    assert (labels == 1).sum() == truth["liver"].sum()

    logic.markReviewed("caseA", "kidney")
    entry, labels = exported("reviewed")
    assert entry["labeled"] == ["liver", "kidney"] and entry["labels"] == {"1": "liver", "3": "kidney"}
    assert ((labels == 3) == truth["kidney"]).all() and not (labels == 2).any()


def readLabel(scene, path):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "exported")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


# ---------------------------------------------------------------------------------- review list
def writeSuggestions(folder, rows):
    doc = {"schema": SCHEMA, "model": "m", "model_sha256": "0" * 64, "dataset": "dataset.json",
           "score": "entropy", "rows": rows}
    path = Path(folder) / "suggestions.json"
    path.write_text(json.dumps(doc))
    return path


def row(rank, case, organ, score):
    return {"rank": rank, "case": case, "organ": organ, "label_value": ORGANS.index(organ) + 1, "volume_ml": 1.0,
            "uncertainty": score, "score": score, "segmentation": f"{case}.seg.nrrd"}


def test_review_next_walks_the_ranking_and_skips_what_is_done(scene, logic, tmp_path):
    for name, seed in (("caseA", 1), ("caseB", 2)):
        caseWithProposals(scene, logic, tmp_path, name=name, seed=seed)
        logic.addProposals(name, tmp_path / f"{name}.seg.nrrd")
    # written out of order on purpose: the rank decides
    path = writeSuggestions(tmp_path, [row(3, "caseA", "spleen", 0.2), row(1, "caseB", "kidney", 0.9),
                                       row(2, "caseA", "kidney", 0.5), row(4, "caseB", "spleen", 0.1)])
    assert logic.reviewNext() is None  # no list yet
    logic.loadSuggestions(path)
    rows = logic.reviewRows()
    assert [(r["rank"], r["caseName"], r["organ"], r["status"]) for r in rows] == [
        (1, "caseB", "kidney", "proposed"), (2, "caseA", "kidney", "proposed"),
        (3, "caseA", "spleen", "proposed"), (4, "caseB", "spleen", "proposed")]

    first = logic.reviewNext()
    assert (first["rank"], first["caseName"], first["organ"], first["caseIndex"]) == (1, "caseB", "kidney", 1)
    segment = logic.cases[1].segmentationNode.GetSegmentation().GetSegment(first["segmentId"])
    assert segment.GetName() == "kidney (proposed)"
    logic.markReviewed(first["case"], first["organ"])
    assert logic.reviewNext()["rank"] == 2
    # a deleted proposal is skipped ("missing"); an organ drawn by hand instead counts as labelled
    seg = logic.cases[0].segmentationNode.GetSegmentation()
    seg.RemoveSegment(logic.reviewNext()["segmentId"])
    assert logic.reviewNext()["rank"] == 3
    statuses = [r["status"] for r in logic.reviewRows()]
    assert statuses == ["reviewed", "missing", "proposed", "proposed"]
    logic.markReviewed("caseA", "spleen")
    logic.markReviewed("caseB", "spleen")
    assert logic.reviewNext() is None


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), ("{not json", "cannot be read"), ('{"schema": "other"}', "is not an LTUDA review list"),
    (json.dumps({"schema": SCHEMA, "rows": [{"case": 1}]}), "row #1 lacks its case or organ")])
def test_a_bad_review_list_gets_one_message_naming_the_file(logic, tmp_path, content, message):
    path = tmp_path / "suggestions.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LTUDAError, match=message) as info:
        logic.loadSuggestions(path)
    assert str(path) in str(info.value) and "Pre-fill missing organs" in str(info.value)


# ------------------------------------------------------------------------ commands (argument lists)
def fakeModel(folder, organs=ORGANS):
    """A model folder as far as the module reads it (model.json + a weights file)."""
    folder.mkdir(parents=True)
    classes = [{"name": o, "value": i + 1, "color": [10, 20, 30]} for i, o in enumerate(organs)]
    (folder / "model.json").write_text(json.dumps({"schema": "ltuda-model", "version": 1, "classes": classes}))
    (folder / "model.pt").write_bytes(b"weights")
    return folder


def runUntilStarted(job):
    while job.status == jobs.EXPORTING:
        job.process()
    return job.runner.args


def test_continue_training_passes_init_from_to_the_train_command(scene, logic, tmp_path):
    for name, labelled, seed in (("a", ["liver", "spleen"], 1), ("b", ["kidney"], 2)):
        logic.addCase(*synthetic.addSyntheticCase(scene, name, ORGANS, labelled, seed=seed))
    parent = fakeModel(tmp_path / "parent")
    job = logic.train(str(tmp_path / "child"), initFrom=str(parent), device="cpu", checkBackend=False)
    try:
        args = runUntilStarted(job)
    finally:
        logic.stopAll()
    assert args[1:4] == ["-m", "ltuda", "train"]
    assert args[args.index("--init-from") + 1] == str(parent)
    assert args[args.index("--out") + 1] == str(tmp_path / "child")
    # the registry shows a fine-tuned model's lineage (written by the backend into model.json)
    from LTUDASegmentationLib.models import readModel

    doc = json.loads((parent / "model.json").read_text())
    doc["lineage"] = {"parent": "/models/first", "parent_sha256": "ab" * 32,
                      "labels_added": [{"case": "a", "organ": "kidney"}]}
    (parent / "model.json").write_text(json.dumps(doc))
    assert "Fine-tuned from /models/first with 1 label(s) added" in readModel(parent).summary()
    # the parent is never the output; a folder that is no model is refused with its reason
    with pytest.raises(LTUDAError, match="Continue training writes a new model"):
        logic.train(str(parent), initFrom=str(parent), checkBackend=False, overwrite=True)
    with pytest.raises(LTUDAError, match="not an LTUDA model folder"):
        logic.train(str(tmp_path / "c2"), initFrom=str(tmp_path), checkBackend=False)


def test_suggest_exports_the_cases_and_runs_ltuda_suggest_on_the_chosen_ones(scene, logic, tmp_path):
    """The module half of 'Pre-fill': what it exports and the argument list it runs (the backend's
    answer is checked by the end-to-end test below)."""
    logic.addCase(*synthetic.addSyntheticCase(scene, "liverOnly", ORGANS, ["liver"], seed=1))
    logic.addCase(*synthetic.addSyntheticCase(scene, "spleenOnly", ORGANS, ["spleen"], seed=2))
    logic.addCase(*synthetic.addSyntheticCase(scene, "nothing", ORGANS, [], seed=3))
    model = fakeModel(tmp_path / "model")
    before = [segmentState(c.volumeNode, c.segmentationNode) for c in logic.cases]
    job = logic.suggest(model=str(model), cases=["nothing"], device="cpu", checkBackend=False, keepWorkFiles=True)
    try:
        args = runUntilStarted(job)
    finally:
        logic.stopAll()
    assert args[1:4] == ["-m", "ltuda", "suggest"]
    value = lambda flag: args[args.index(flag) + 1]  # noqa: E731
    assert value("--model") == str(model) and value("--cases") == "nothing" and value("--device") == "cpu"
    assert value("--progress") == "jsonl" and value("--out").startswith(job.workDir)
    manifest = json.loads(Path(value("--dataset")).read_text())
    # the chosen case labels nothing: cases labelling liver and spleen come along so that every class of
    # the manifest is labelled somewhere (the backend checks that); kidney is labelled nowhere: left out
    assert [c["name"] for c in manifest["classes"]] == ["liver", "spleen"]
    assert [(c["id"], c["labeled"]) for c in manifest["cases"]] == [
        ("nothing", []), ("liverOnly", ["liver"]), ("spleenOnly", ["spleen"])]
    assert [segmentState(c.volumeNode, c.segmentationNode) for c in logic.cases] == before

    with pytest.raises(LTUDAError, match="no training case 'ghost'"):
        logic.suggest(model=str(model), cases=["ghost"], checkBackend=False)
    logic.clearCases()
    logic.addCase(*synthetic.addSyntheticCase(scene, "bare", ORGANS, [], seed=4))
    with pytest.raises(LTUDAError, match="at least one training case that labels an organ"):
        logic.suggest(model=str(model), checkBackend=False)


def test_suggest_progress_stream_is_read_like_predict():
    from LTUDASegmentationLib.progress import ProgressState

    state = ProgressState()
    state.feed('{"event": "start", "command": "suggest", "cases": 4, "device": "cpu"}')
    state.feed('{"event": "progress", "fraction": 0.5, "case": "a.nrrd", "case_id": "a", "stage": "segmenting"}')
    assert state.fraction() == 0.5 and state.statusText() == "Proposing missing organs (segmenting): 50%"
    state.feed('{"event": "case", "index": 3, "cases": 4, "input": "c.nrrd", "case_id": "c", "output": "c.seg.nrrd"}')
    state.feed('{"event": "done", "status": "completed", "rows": 7}')
    assert state.fraction() == 1.0 and state.casesDone == 3 and state.outputs == ["c.seg.nrrd"]


# ------------------------------------------------------------------ end to end with the real backend
HAS_SUGGEST = importlib.util.find_spec("ltuda.suggest") is not None


@pytest.mark.skipif(not HAS_SUGGEST, reason="the backend has no `ltuda suggest` yet (branch issue15-backend)")
def test_prefill_review_and_export_through_the_real_ltuda_suggest(scene, logic, tiny_dataset, tiny_model, tmp_path):
    """logic.suggest on the tiny phantom cases (file cases: loaded into the scene for their proposals)
    with the tiny model, in a real subprocess; then review and export."""
    doc = json.loads(Path(tiny_dataset).read_text())
    logic.setOrgans(["liver", "spleen", "kidney", "pancreas"])
    root = Path(tiny_dataset).parent
    for case in [c for c in doc["cases"] if c.get("split", "train") != "test"]:
        logic.addFileCase(root / case["image"], root / case["label"], {int(k): v for k, v in case["labels"].items()},
                          name=case["id"])
    chosen = [logic.cases[0].name, logic.cases[2].name]
    job = logic.suggest(model=str(tiny_model), cases=chosen, device="cpu", waitForCompletion=True)
    assert job.status == jobs.COMPLETED, job.message
    assert job.added, job.skipped
    assert {name for name, _o, _i in job.added} <= set(chosen)
    table = {r["name"]: r["organs"] for r in logic.caseTable()}
    for name in chosen:
        assert "proposed" in table[name].values(), table[name]
        assert list(table[name].values()).count("labelled") == 1
    rows = logic.reviewRows()
    assert rows and [r["rank"] for r in rows] == sorted(r["rank"] for r in rows)
    first = logic.reviewNext()
    assert first["status"] == "proposed" and first["caseName"] in chosen
    logic.markReviewed(first["case"], first["organ"])
    assert {r["name"]: r["organs"] for r in logic.caseTable()}[first["caseName"]][first["organ"]] == "reviewed"
    manifest = json.loads(Path(logic.exportTrainingData(str(tmp_path / "export"))).read_text())
    labeled = {c["id"]: c["labeled"] for c in manifest["cases"]}
    assert first["organ"] in labeled[first["caseName"]] and len(labeled[first["caseName"]]) == 2
    other = [n for n in chosen if n != first["caseName"]][0]
    assert len(labeled[other]) == 1  # its proposals are unreviewed: still one organ


# ----------------------------------------------------------------------------------- the panel
from test_slicer_module import moduleFile, pumpProbe  # noqa: E402,F401  (the module with stand-ins for Qt)


def test_panel_review_list_next_mark_reviewed_prefill_and_continue_training(scene, moduleFile, tmp_path):  # noqa: F811
    import unittest

    widget = moduleFile.LTUDASegmentationWidget()
    widget.setup()
    ui, logic, messages, loop = widget.ui, widget.logic, moduleFile.testMessages, widget.annotationLoop
    logic.setOrgans(ORGANS)
    for name, seed in (("caseA", 1), ("caseB", 2)):
        caseWithProposals(scene, logic, tmp_path, name=name, seed=seed)
        logic.addProposals(name, tmp_path / f"{name}.seg.nrrd")
    logic.loadSuggestions(writeSuggestions(tmp_path, [row(1, "caseB", "kidney", 0.9), row(2, "caseA", "spleen", 0.5),
                                                      row(3, "caseA", "kidney", 0.2)]))
    widget.casesSection.refreshCases()  # the case table and the review list
    assert ui.reviewTableWidget.setRowCount.call_args.args == (3,)
    texts = [c.args[0] for c in sys.modules["qt"].QTableWidgetItem.call_args_list if c.args]
    assert texts.count("proposed") == 4 and texts.count("to review") == 3  # case table cells, review list
    assert logic.caseTable()[0]["organs"] == {"liver": "labelled", "spleen": "proposed", "kidney": "proposed"}
    widget.updateButtonStates()
    assert ui.reviewNextButton.enabled is True

    # Next: the top row opens in the Segment Editor with its segment selected
    editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
    loop.onReviewNext()
    top = logic.reviewRows()[0]
    editor.setSegmentationNode.assert_called_with(logic.cases[1].segmentationNode)
    editor.setCurrentSegmentID.assert_called_with(top["segmentId"])
    # a click on the third row opens that one; Mark reviewed acts on it
    loop.onReviewRowClicked(2, 0)
    editor.setCurrentSegmentID.assert_called_with(logic.reviewRows()[2]["segmentId"])
    loop.onMarkReviewed()
    assert [r["status"] for r in logic.reviewRows()] == ["proposed", "proposed", "reviewed"]
    assert logic.caseTable()[0]["organs"]["kidney"] == "reviewed"
    assert "is now a label" in ui.prefillStatusLabel.text

    # pre-fill: no model -> disabled and says why; 'selected case only' without a selection -> a message
    ui.modelComboBox.currentData = None
    widget.updateButtonStates()
    assert ui.prefillButton.enabled is False and "Train a model first" in ui.prefillButton.toolTip
    model = fakeModel(tmp_path / "model")
    ui.modelComboBox.currentData = str(model)
    widget.updateButtonStates()
    assert ui.prefillButton.enabled is True
    widget._parameterNode.prefillSelectedOnly = True
    loop._startPrefill()
    assert "Select the case to pre-fill" in messages["error"][-1]
    # ... with a selection it starts in the background; Cancel stops it while it exports
    ui.casesTableWidget.currentRow.return_value = 0
    widget._parameterNode.device = "cpu"
    loop.onPrefill()
    pumpProbe(widget)
    job = logic.suggestionJob
    assert job is not None and job.status == jobs.EXPORTING, messages["error"][-1:]
    widget.updateButtonStates()
    assert ui.cancelPrefillButton.enabled is True and ui.prefillButton.enabled is False
    loop.onCancelPrefill()
    assert job.status == jobs.CANCELLED and ui.prefillStatusLabel.text == job.message

    # continue training: fine-tunes the selected model into a new folder (--init-from); spleen is
    # labelled nowhere but in a proposal, so it needs a review first
    widget.trainSection.onContinueTraining()
    assert "No case labels 'spleen'" in messages["error"][-1] and logic.trainingJob is None
    logic.markReviewed("caseA", "spleen")
    widget.trainSection.onContinueTraining()
    train = logic.trainingJob
    try:
        assert train is not None, messages["error"][-1:]
        args = runUntilStarted(train)
        assert args[args.index("--init-from") + 1] == str(model) and train.modelDir != str(model)
    finally:
        logic.stopAll()

    # the in-Slicer self-test's annotation-loop step
    result = unittest.TextTestRunner(verbosity=0).run(moduleFile.LTUDASegmentationTest("test_AnnotationLoop"))
    assert result.wasSuccessful(), [str(e[1]) for e in result.errors + result.failures]
    widget.cleanup()
