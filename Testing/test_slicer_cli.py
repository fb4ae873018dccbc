"""The batch-inference Slicer CLI module (LTUDASegmentation/LTUDABatchSegment), outside the Slicer app.

- The XML parses with ctk-cli, follows the Slicer Execution Model parser's rules, and declares
  exactly the options the entry point's argparse parser accepts (names, enumerations, defaults).
- The entry point runs as a subprocess with the command line built the way Slicer's
  vtkSlicerCLIModuleLogic builds it (XML order, `--flag value`, booleans as bare flags only when
  true, empty file/string parameters left out, unchosen directories as "." from the GUI, input
  volumes as Slicer-named temporary .nrrd files written by a real MRML storage node).
- Outputs load in slicer-core (vtkMRMLSegmentationNode + storage node, label map volume node) on
  the input's exact IJK-to-RAS grid, voxel for voxel equal to the label map.
- A folder with a corrupt file: reported, the rest done, exit 1 after finishing; reruns skip
  finished cases unless --redo; a flipped copy of a volume comes back as the same voxels flipped.
"""

import importlib.util
import io
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ctk_cli = pytest.importorskip("ctk_cli")

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "LTUDASegmentation" / "LTUDABatchSegment"
SCRIPT = MODULE_DIR / "LTUDABatchSegment.py"
XML = MODULE_DIR / "LTUDABatchSegment.xml"

# Types that Slicer passes as `--flag value` only when the value is not empty.
_OMIT_WHEN_EMPTY = {"file", "directory", "string", "integer-vector", "float-vector", "double-vector", "string-vector"}
# Types passed as a file written/read by Slicer, only when a node is selected.
_NODE_TYPES = {"image", "geometry", "transform", "table", "measurement", "pointfile"}


def _load_script():
    spec = importlib.util.spec_from_file_location("LTUDABatchSegment_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _load_script()


def xml_module():
    # ctk-cli warns that `reference` (which Slicer supports) is not in CTK's schema yet: expected here.
    logging.getLogger("ctk_cli").setLevel(logging.ERROR)
    return ctk_cli.CLIModule(str(XML))


def slicer_argv(values, gui=True):
    """The command line vtkSlicerCLIModuleLogic builds for this (executable, python-real) CLI.

    `values`: parameter name -> value (a path for image nodes; missing = not selected/default).
    gui=True mimics the module panel, whose empty directory buttons hold "." (QDir().path());
    gui=False mimics slicer.cli.run with a parameter dict (unset directories stay empty).
    Slicer runs `python-real LTUDABatchSegment.py ARGS`; here the interpreter is this Python.
    """
    argv = [sys.executable, str(SCRIPT)]
    for p in xml_module().parameters():
        assert p.index is None, "every parameter uses a longflag (no positional arguments)"
        flag = "--" + p.longflag.lstrip("-")
        value = values.get(p.name)
        if p.typ == "boolean":
            if value is True:
                argv.append(flag)
        elif p.typ in _OMIT_WHEN_EMPTY:
            if p.typ == "directory" and gui and not value:
                value = "."
            if value not in (None, ""):
                argv += [flag, str(value)]
        elif p.typ in _NODE_TYPES:
            if value:
                argv += [flag, str(value)]
        else:  # integer, double, enumerations: always passed, the default when untouched
            argv += [flag, str(p.default if value is None else value)]
    return argv


def run_cli(argv, cwd, timeout=600, env_extra=None):
    env = dict(os.environ, ITK_AUTOLOAD_PATH="")  # Slicer empties it for executable CLIs
    env.setdefault("OMP_NUM_THREADS", "2")
    env.update(env_extra or {})
    return subprocess.run(argv, cwd=str(cwd), capture_output=True, text=True, timeout=timeout, env=env)


def progress_of(stdout):
    """What Slicer's progress bar gets: fractions, comments, and the text left after removing the tags."""
    fractions = [float(v) for v in re.findall(r"<filter-progress>([^<]*)</filter-progress>", stdout)]
    comments = re.findall(r"<filter-comment>([^<]*)</filter-comment>", stdout)
    text = stdout
    for tag in ("filter-progress", "filter-stage-progress", "filter-name", "filter-comment", "filter-time",
                "filter-start", "filter-end"):
        text = re.sub(rf"<{tag}>[^<]*</{tag}>[ \t\n\r]*", "", text)
    return fractions, comments, text


def assert_framed(stdout):
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines[0].startswith("<filter-start>") and lines[-1].startswith("<filter-end>"), stdout
    fractions, _, _ = progress_of(stdout)
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions), "the progress bar never moves backwards"
    return fractions


# ---------------------------------------------------------------------------------------------
# XML <-> entry point

def test_xml_parses_and_declares_exactly_the_entry_point_options():
    module = xml_module()
    assert module.title and module.category == "Segmentation" and module.acknowledgements
    params = list(module.parameters())
    flags = {"--" + p.longflag.lstrip("-") for p in params}
    assert flags == cli.parameter_options(), "XML and argparse must declare the same parameters"
    assert len(flags) == len(params), "no duplicate flags"

    parser = cli.build_parser()
    actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    for p in params:
        action = actions["--" + p.longflag.lstrip("-")]
        assert p.name == p.longflag.lstrip("-") == action.dest, "name = longflag = argparse dest"
        if p.typ == "string-enumeration":
            assert tuple(p.elements) == tuple(action.choices) and p.default == action.default
        if p.typ == "boolean":
            # Slicer passes a boolean only when true: absent must mean the XML default, so false.
            assert p.default is False and action.default is False
        if p.typ == "integer":
            assert p.default == action.default
    by_name = {p.name: p for p in params}
    assert by_name["inputVolume"].typ == "image" and by_name["inputVolume"].channel == "input"
    assert by_name["outputLabelMap"].subtype == "label" and by_name["outputLabelMap"].reference == "inputVolume"
    assert by_name["outputSegmentation"].typ == "file" and by_name["outputSegmentation"].fileExtensions == [".seg.nrrd"]
    assert by_name["outputSegmentation"].channel == by_name["outputLabelMap"].channel == "output"
    assert {p.name for p in params if p.typ == "directory"} == {
        "modelDirectory", "inputFolder", "outputFolder", "outputLabelMapFolder"}
    assert [g.advanced for g in module] == [False, False, True]


def test_xml_follows_the_slicer_execution_model_parser_rules():
    """Rules of SlicerExecutionModel's ModuleDescriptionParser that ctk-cli does not check."""
    import xml.etree.ElementTree as ET

    allowed_attributes = {"image": {"multiple", "fileExtensions", "type", "hidden", "reference"},
                          "file": {"multiple", "fileExtensions"}, "directory": {"multiple"},
                          "boolean": {"hidden"}, "integer": {"multiple"}, "string-enumeration": set()}
    root = ET.parse(XML).getroot()
    assert root.tag == "executable"
    for group in root.findall("parameters"):
        assert set(group.attrib) <= {"advanced"}
        assert group.find("label") is not None and group.find("description") is not None
        for element in group:
            if element.tag in ("label", "description"):
                continue
            assert element.tag in allowed_attributes, element.tag
            assert set(element.attrib) <= allowed_attributes[element.tag], (element.tag, element.attrib)
            longflag = element.findtext("longflag").strip().lstrip("-")
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", longflag), "a longflag must be an identifier"
            assert element.find("index") is None and element.find("flag") is None
            for child in ("name", "label", "description"):
                assert (element.findtext(child) or "").strip(), (longflag, child)
            if element.tag == "image":
                assert element.get("type", "scalar") in ("scalar", "label")


def test_numeric_parameters_have_constraints_the_entry_point_enforces():
    """Slicer builds the spin box from <constraints>: without them it offers negative values."""
    numeric = [p for p in xml_module().parameters() if p.typ in ("integer", "float", "double")]
    assert numeric
    for p in numeric:
        c = p.constraints
        assert c is not None, f"{p.name} has no <constraints>"
        assert None not in (c.minimum, c.maximum, c.step), (p.name, c.minimum, c.maximum, c.step)
        assert float(c.minimum) <= float(p.default) <= float(c.maximum), p.name
    batch = {p.name: p for p in numeric}["batchSize"].constraints
    # 0 is the documented "automatic" default; every other value is a number of slices
    assert (int(batch.minimum), int(batch.step)) == (0, 1) and 64 <= int(batch.maximum) <= 4096
    assert cli.MAX_BATCH_SIZE == int(batch.maximum)


def test_xml_flag_prints_the_description():
    result = run_cli([sys.executable, str(SCRIPT), "--xml"], MODULE_DIR, timeout=60)
    assert result.returncode == 0, result.stderr
    parsed = ctk_cli.CLIModule(stream=io.StringIO(result.stdout))
    assert [p.name for p in parsed.parameters()] == [p.name for p in xml_module().parameters()]


def test_slicer_style_booleans_and_gui_directories_parse(tmp_path):
    parser = cli.build_parser()
    argv = slicer_argv({"modelDirectory": tmp_path, "redo": True, "noPostprocess": False}, gui=True)[2:]
    args = parser.parse_args(argv)
    assert args.redo is True and args.noPostprocess is False, "bare flag = true, absent = false"
    assert args.inputFolder == args.outputFolder == args.outputLabelMapFolder == "."
    assert args.head == "auto" and args.device == "auto" and args.batchSize == 0
    assert parser.parse_args(["--redo", "false", "--noPostprocess", "true"]).redo is False
    assert parser.parse_args(["--noPostprocess"]).noPostprocess is True
    # "." from an empty directory button means "not chosen": nothing to do is a usage error.
    with pytest.raises(cli.UsageError, match="nothing to segment"):
        cli.plan_jobs(args)


def test_backend_is_found_next_to_an_installed_module(tmp_path):
    lib = tmp_path / "lib" / "Slicer-5.10"
    script = lib / "cli-modules" / "LTUDABatchSegment.py"
    candidates = cli.backend_candidates(script)
    assert lib / "qt-scripted-modules" / "LTUDABackend" in candidates  # where LTUDASegmentation installs ltuda
    assert cli.source_tree_backend(SCRIPT) == REPO / "LTUDATrainer"
    assert (cli.source_tree_backend(SCRIPT) / "ltuda" / "__init__.py").is_file()


@pytest.mark.parametrize("values, message", [
    ({}, "no model folder"),
    ({"modelDirectory": "MISSING"}, "model folder not found"),
    ({"modelDirectory": "MODEL", "inputVolume": "ct.nrrd"}, "no output for the input volume"),
    ({"modelDirectory": "MODEL", "inputVolume": "missing.nrrd", "outputSegmentation": "x.seg.nrrd"},
     "input volume not found"),
    ({"modelDirectory": "MODEL", "inputVolume": "ct.nrrd", "outputSegmentation": "x.nrrd"}, "must end in .seg.nrrd"),
    ({"modelDirectory": "MODEL", "outputLabelMap": "x.nrrd"}, "no input"),
    ({"modelDirectory": "MODEL", "inputFolder": "cts"}, "needs an output folder"),
    ({"modelDirectory": "MODEL", "inputFolder": "cts", "outputFolder": "cts"}, "must differ from the input folder"),
    ({"modelDirectory": "MODEL", "outputFolder": "segs"}, "no input folder"),
    ({"modelDirectory": "MODEL", "batchSize": -1}, "--batchSize -1"),
    ({"modelDirectory": "MODEL", "batchSize": 100000}, "--batchSize 100000"),
])
def test_bad_parameters_fail_fast_with_one_line(tmp_path, values, message):
    (tmp_path / "MODEL").mkdir()
    (tmp_path / "cts").mkdir()
    (tmp_path / "ct.nrrd").write_bytes(b"")
    result = run_cli(slicer_argv(values, gui=True), tmp_path, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert_framed(result.stdout)
    assert "Traceback" not in result.stderr


def test_bad_command_line_is_exit_2(tmp_path):
    result = run_cli(slicer_argv({"modelDirectory": tmp_path, "head": "nonsense"}), tmp_path, timeout=60)
    assert result.returncode == 2 and "invalid choice" in result.stderr


# ---------------------------------------------------------------------------------------------
# Phantom volumes written as Slicer writes input nodes, read back as Slicer reads outputs

try:  # slicer-core (real MRML without the application); the XML/argument tests above run without it
    import slicer
    import vtk
    from vtk.util import numpy_support
except ImportError:  # pragma: no cover
    slicer = None

needsSlicer = pytest.mark.skipif(slicer is None, reason="slicer-core (`import slicer`) is not installed")

ORGAN_NAMES = ["liver", "spleen", "kidney", "pancreas"]


def phantom_array(shape=(10, 36, 40), seed=0):
    """CT-like int16 volume (k, j, i): air, a body, a liver-like and a spleen-like blob (HU)."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    volume = np.full(shape, -1000.0)
    volume[(i / 0.9) ** 2 + (j / 0.7) ** 2 < 1] = 20
    volume[((i + 0.35) / 0.35) ** 2 + ((j + 0.1) / 0.3) ** 2 + (k / 1.2) ** 2 < 1] = 60
    volume[((i - 0.45) / 0.15) ** 2 + ((j - 0.25) / 0.15) ** 2 < 1] = 45
    return (volume + rng.normal(0, 8, shape)).round().astype(np.int16)


def ijk_to_ras(spacing=(0.8, 0.8, 2.5), origin=(0.0, 0.0, 0.0), rotate=(), columns=None):
    """A 4x4 IJK-to-RAS matrix: scaled (optionally permuted) axes, rotations [(axis, degrees)], origin."""
    m = np.diag(list(spacing) + [1.0])
    if columns is not None:  # permute/flip the voxel axes, e.g. [(1, 1), (2, -1), (0, 1)]
        m[:3, :3] = np.stack([sign * np.eye(3)[axis] * spacing[n] for n, (axis, sign) in enumerate(columns)], axis=1)
    for axis, degrees in rotate:
        c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
        r = np.eye(4)
        a, b = [(1, 2), (0, 2), (0, 1)][axis]
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        m = r @ m
    m[:3, 3] = origin
    return m


def vtk_matrix(array):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r][c]))
    return m


def numpy_matrix(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def write_volume_node(scene, array, matrix, path):
    """A scalar volume node written by a volume storage node, as Slicer writes a CLI's input."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    image.GetPointData().GetScalars().DeepCopy(
        numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True, array_type=vtk.VTK_SHORT))
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(vtk_matrix(matrix))
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetUseCompression(0)
    assert storage.WriteData(node), path
    return node


def read_volume_node(scene, path, label=False):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if label else "vtkMRMLScalarVolumeNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    assert storage.ReadData(node), path
    return node


def voxels(node):
    dims = node.GetImageData().GetDimensions()
    flat = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())
    return flat.reshape(dims[2], dims[1], dims[0])


def read_segmentation_as_labels(scene, path):
    """(segmentation node, its segments exported to a label map node on the reference geometry)."""
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(segmentation), path
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
        segmentation, labels, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    return segmentation, labels


def assert_aligned_segmentation(scene, seg_path, input_node, label_path=None):
    """The .seg.nrrd loads as a segmentation on the input's exact grid (and equals the label map)."""
    segmentation, labels = read_segmentation_as_labels(scene, seg_path)
    seg = segmentation.GetSegmentation()
    names = [seg.GetNthSegment(n).GetName() for n in range(seg.GetNumberOfSegments())]
    assert names == ORGAN_NAMES
    liver = seg.GetSegment(seg.GetSegmentIdBySegmentName("liver"))
    tag = liver.GetTerminology() if hasattr(liver, "GetTerminology") else ""
    if tag:
        assert "SCT^10200004^Liver" in tag
    assert labels.GetImageData().GetDimensions() == input_node.GetImageData().GetDimensions()
    assert np.allclose(numpy_matrix(labels), numpy_matrix(input_node), atol=1e-4), "IJK-to-RAS of the input"
    if label_path is not None:
        plain = read_volume_node(scene, label_path, label=True)
        assert np.allclose(numpy_matrix(plain), numpy_matrix(input_node), atol=1e-4)
        assert np.array_equal(voxels(plain), voxels(labels)), "label map = segmentation, voxel for voxel"
    return voxels(labels)


def slicer_temp_name(folder, node_id, suffix=".nrrd", pid="BCDEF"):
    """Slicer's temporary file for a node: <temp>/<pid as letters>_<node ID with digits as letters>."""
    letters = node_id.translate(str.maketrans("0123456789", "ABCDEFGHIJ"))
    return Path(folder) / f"{pid}_{letters}{suffix}"


# ---------------------------------------------------------------------------------------------
# Runs

SINGLE_CASES = {
    # oblique, anisotropic, both outputs, everything else as the GUI leaves it
    "oblique-both-outputs": dict(matrix=ijk_to_ras((0.8, 0.9, 2.5), (12, -30, 55), rotate=[(2, 30), (0, 20)]),
                                 segmentation=True, labelmap=True, options={}),
    # RAS-aligned axes (flipped against LPS), label map only, every advanced option set
    "ras-labelmap-only": dict(matrix=ijk_to_ras((0.7, 0.7, 3.0), (-10, 5, -40)), segmentation=False, labelmap=True,
                              options={"noPostprocess": True, "head": "linear", "device": "cpu", "batchSize": 4}),
}


@needsSlicer
@pytest.mark.parametrize("case", sorted(SINGLE_CASES))
def test_single_volume_as_slicer_runs_it(tiny_model, scene, tmp_path, case):
    spec = SINGLE_CASES[case]
    slicer_tmp = tmp_path / "slicer-temp"
    slicer_tmp.mkdir()
    input_node = write_volume_node(scene, phantom_array(), spec["matrix"],
                                   slicer_temp_name(slicer_tmp, "vtkMRMLScalarVolumeNode1"))
    label_path = slicer_temp_name(slicer_tmp, "vtkMRMLLabelMapVolumeNode2")
    seg_path = tmp_path / "results" / "ct.seg.nrrd"
    values = dict(spec["options"], modelDirectory=tiny_model,
                  inputVolume=slicer_temp_name(slicer_tmp, "vtkMRMLScalarVolumeNode1"),
                  outputSegmentation=seg_path if spec["segmentation"] else None,
                  outputLabelMap=label_path if spec["labelmap"] else None)
    argv = slicer_argv(values, gui=True)
    assert "--inputFolder" in argv and argv[argv.index("--inputFolder") + 1] == "."  # as the GUI passes it
    result = run_cli(argv, tmp_path, env_extra={"LTUDA_BACKEND_PATH": str(REPO / "LTUDATrainer")})
    assert result.returncode == 0, result.stderr + result.stdout
    fractions = assert_framed(result.stdout)
    assert fractions[-1] == 1.0 and len(fractions) >= 3
    _, comments, text = progress_of(result.stdout)
    assert any("segmenting" in c for c in comments)
    assert "Summary: 1 case(s): 1 done" in text and f"LTUDA backend: {REPO / 'LTUDATrainer'}" in text
    assert label_path.is_file()
    if spec["segmentation"]:
        assert_aligned_segmentation(scene, seg_path, input_node, label_path)
    else:
        plain = read_volume_node(scene, label_path, label=True)
        assert np.allclose(numpy_matrix(plain), numpy_matrix(input_node), atol=1e-4)
        assert voxels(plain).shape == voxels(input_node).shape
        assert set(np.unique(voxels(plain))) <= set(range(len(ORGAN_NAMES) + 1))
        assert not seg_path.exists() and not list(tmp_path.rglob("*.tmp*"))
    if spec["segmentation"]:  # a second run replaces the output, as every Slicer CLI output is
        again = run_cli(argv, tmp_path)
        assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("broken", ["input", "model"])
def test_bad_volume_or_model_is_one_clear_line(tiny_model, tmp_path, broken):
    volume = tmp_path / "BCDEF_vtkMRMLScalarVolumeNodeB.nrrd"
    model = tmp_path / "model"
    model.mkdir()
    if broken == "input":
        volume.write_bytes(b"NRRD0004\ntype: short\nthis is not a volume\n")
        for item in Path(tiny_model).iterdir():
            if item.is_file():
                (model / item.name).write_bytes(item.read_bytes())
    else:
        sitk = pytest.importorskip("SimpleITK")
        sitk.WriteImage(sitk.GetImageFromArray(phantom_array()), str(volume))
        (model / "model.json").write_text("{not json", encoding="utf-8")
    result = run_cli(slicer_argv({"modelDirectory": model, "inputVolume": volume,
                                  "outputSegmentation": tmp_path / "out.seg.nrrd"}), tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(volume if broken == "input" else model / "model.json") in lines[0]
    assert_framed(result.stdout)
    assert not (tmp_path / "out.seg.nrrd").exists() and not list(tmp_path.glob("*.tmp*"))


BATCH_VOLUMES = {
    # name: (IJK-to-RAS, stored as)
    "axial": (ijk_to_ras((0.8, 0.8, 2.5), (100, 80, -20)), ".nrrd"),
    "oblique": (ijk_to_ras((0.9, 0.7, 3.0), (5, 5, 5), rotate=[(2, -25), (1, 15)]), ".nrrd"),
    "sagittal": (ijk_to_ras((0.8, 0.8, 2.0), (0, 0, 0), columns=[(1, -1), (2, -1), (0, 1)]), ".nii.gz"),
}


def flipped_copy(array, matrix):
    """The same physical image stored with its i and k voxel axes reversed."""
    dims = np.array([array.shape[2], array.shape[1], array.shape[0]])
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    flip[0, 3], flip[2, 3] = dims[0] - 1, dims[2] - 1
    return array[::-1, :, ::-1].copy(), matrix @ flip


@needsSlicer
def test_folder_batch_skips_redoes_and_survives_a_bad_file(tiny_model, tiny_dataset, scene, tmp_path):
    from ltuda.manifest import load_manifest

    inputs, outputs, labelmaps = tmp_path / "cts", tmp_path / "segs", tmp_path / "labels"
    inputs.mkdir()
    # The project's own phantom (the fully labelled test case the tiny model never trained on) ...
    shutil.copyfile(load_manifest(tiny_dataset).split("test")[0].image, inputs / "phantom.nii.gz")
    nodes = {"phantom": read_volume_node(scene, inputs / "phantom.nii.gz")}
    # ... and small volumes of other orientations and spacings, written as Slicer writes volume nodes.
    for n, (name, (matrix, suffix)) in enumerate(sorted(BATCH_VOLUMES.items())):
        nodes[name] = write_volume_node(scene, phantom_array(seed=n), matrix, inputs / f"{name}{suffix}")
    array, matrix = flipped_copy(phantom_array(seed=9), BATCH_VOLUMES["oblique"][0])
    nodes["flipped"] = write_volume_node(scene, array, matrix, inputs / "flipped.nrrd")
    nodes["unflipped"] = write_volume_node(scene, phantom_array(seed=9), BATCH_VOLUMES["oblique"][0],
                                           inputs / "unflipped.nrrd")
    (inputs / "broken.nrrd").write_bytes(b"NRRD0004\ngarbage\n")
    cases = len(nodes) + 1

    # 1. Folder mode as the GUI runs it (no input volume, unchosen label map folder = ".")
    first = run_cli(slicer_argv({"modelDirectory": tiny_model, "inputFolder": inputs, "outputFolder": outputs}), tmp_path)
    assert first.returncode == 1, "failed cases make the run fail, after finishing the others"
    assert "broken.nrrd" in first.stderr and f"1 of {cases} case(s) failed" in first.stderr
    assert "Traceback" not in first.stderr
    fractions = assert_framed(first.stdout)
    assert fractions[-1] == 1.0
    _, _, text = progress_of(first.stdout)
    assert f"Summary: {cases} case(s): {cases - 1} done, 0 skipped (already done), 1 failed;" in text
    assert re.search(r"\d+\.\d\d s per case", text)
    assert sorted(p.name for p in outputs.iterdir()) == sorted(f"{name}.seg.nrrd" for name in nodes)
    for name, node in nodes.items():
        assert_aligned_segmentation(scene, outputs / f"{name}.seg.nrrd", node)

    # 2. Rerun (slicer.cli.run style: unset directories are left out): finished cases are skipped.
    (inputs / "broken.nrrd").unlink()
    second = run_cli(slicer_argv({"modelDirectory": tiny_model, "inputFolder": inputs, "outputFolder": outputs},
                                 gui=False), tmp_path)
    assert second.returncode == 0, second.stderr
    assert f"0 done, {len(nodes)} skipped (already done), 0 failed" in progress_of(second.stdout)[2]

    # 3. --redo (a bare flag) recomputes everything, also writing label maps; all aligned.
    third = run_cli(slicer_argv({"modelDirectory": tiny_model, "inputFolder": inputs, "outputFolder": outputs,
                                 "outputLabelMapFolder": labelmaps, "redo": True}), tmp_path)
    assert third.returncode == 0, third.stderr
    assert f"{len(nodes)} done, 0 skipped" in progress_of(third.stdout)[2]
    labels = {name: assert_aligned_segmentation(scene, outputs / f"{name}.seg.nrrd", node, labelmaps / f"{name}.nrrd")
              for name, node in nodes.items()}
    assert not list(tmp_path.rglob("*.tmp*")), "outputs are written atomically"
    # The flipped copy of a volume comes back as the same voxels, flipped: aligned in physical space.
    assert np.array_equal(labels["flipped"][::-1, :, ::-1], labels["unflipped"])
