"""Static checks of the Slicer extension that need neither Slicer nor Qt.

The .ui parses and defines every widget the module's Python uses; parameter-node bindings point at
existing, type-compatible fields; the CMake lists name every script and resource that exists (a
file missing there works from source and is absent from the packaged extension); the extension
metadata in CMakeLists.txt and LTUDA.s4ext agree; the module code stays importable on Slicer's
Python 3.9+ and never imports the backend, torch or MONAI into the Slicer process.
"""

import ast
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "LTUDASegmentation"
LIB = MODULE / "LTUDASegmentationLib"
UI = MODULE / "Resources" / "UI" / "LTUDASegmentation.ui"
SCRIPT = MODULE / "LTUDASegmentation.py"
WIDGETS = MODULE / "LTUDASegmentationWidgets"  # the panel's sections: may import qt, unlike the Lib
OWNED_ELSEWHERE = {"LTUDABatchSegment"}  # the CLI module has its own CMakeLists.txt

QT_CLASSES = {"QWidget", "QLabel", "QPushButton", "QRadioButton", "QCheckBox", "QComboBox", "QSpinBox",
              "QLineEdit", "QTableWidget", "QProgressBar", "QPlainTextEdit", "QGroupBox"}


def moduleFiles(pattern):
    return sorted(p for p in MODULE.rglob(pattern)
                  if not OWNED_ELSEWHERE.intersection(p.relative_to(MODULE).parts) and "__pycache__" not in p.parts)


def panelSources():
    """The files that use the .ui's widgets: the module file and the sections package."""
    return [SCRIPT] + sorted(WIDGETS.glob("*.py"))


def uiWidgets():
    root = ET.parse(UI).getroot()
    return root, {w.get("name"): w for w in root.iter("widget")}


def cmakeList(text, name):
    match = re.search(r"set\(\s*" + name + r"\s(.*?)\)", text, re.S)
    assert match, f"{name} not found"
    return [t.replace("${MODULE_NAME}", "LTUDASegmentation") for t in match.group(1).split()]


def cmakeSettings(text):
    return dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', text))


def s4ext():
    values = {}
    for line in (REPO / "LTUDA.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            values[key] = value.strip()
    return values


# ------------------------------------------------------------------------------------------ .ui
def test_ui_parses_with_a_qmrmlwidget_root_and_declared_custom_widgets():
    root, widgets = uiWidgets()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "LTUDASegmentation"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in widgets.values()}
    assert used - QT_CLASSES <= declared, f"undeclared custom widgets: {used - QT_CLASSES - declared}"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    titles = [w.findtext("property[@name='text']/string") for w in widgets.values()
              if w.get("class") == "ctkCollapsibleButton"]
    assert titles == ["Setup", "Organs", "Training cases", "Train", "Segment"]
    for connection in root.iter("connection"):
        assert connection.findtext("receiver") in widgets


def test_every_ui_widget_the_module_uses_exists():
    _root, widgets = uiWidgets()
    allUsed = set()
    for path in panelSources():
        source = path.read_text(encoding="utf-8")
        used = set(re.findall(r"self\.ui\.(\w+)", source)) | set(re.findall(r"(?<![\w.])ui\.(\w+)", source))
        missing = sorted(used - set(widgets))
        assert not missing, f"widgets used in {path.name} but absent from the .ui: {missing}"
        allUsed |= used
    assert len(allUsed) > 30, "no ui references found"


def _parameterNodeFields():
    tree = ast.parse(SCRIPT.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LTUDASegmentationParameterNode")
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_parameter_bindings_point_at_compatible_fields():
    _root, widgets = uiWidgets()
    fields = _parameterNodeFields()
    bound = {}
    for name, widget in widgets.items():
        prop = widget.find("property[@name='SlicerParameterName']")
        if prop is not None:
            assert prop.get("stdset") == "0", f"{name}: SlicerParameterName must be a dynamic property"
            bound[name] = (widget.get("class"), prop.findtext("string"))
    assert len(bound) >= 10
    for name, (cls, field) in bound.items():
        assert field in fields, f"{name} binds to '{field}', which the parameter node lacks"
        annotation = fields[field]
        expected = {"QComboBox": "Choice", "QSpinBox": "int", "QCheckBox": "bool", "QLineEdit": "str",
                    "ctkPathLineEdit": "Path"}.get(cls)
        if cls == "qMRMLNodeComboBox":
            nodeTypes = [s.text for s in widgets[name].iter("string")
                         if s.text and s.text.startswith("vtkMRML")]
            assert nodeTypes == [annotation], f"{name}: nodeTypes {nodeTypes} vs {annotation}"
        else:
            assert expected and expected in annotation, f"{name} ({cls}) cannot show '{field}: {annotation}'"
    assert len(set(f for _c, f in bound.values())) == len(bound), "two widgets bound to one parameter"


def _classes(path):
    return [n for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.ClassDef)]


def test_widget_signal_handlers_exist():
    """Every handler a class connects (Qt signal or VTK observer) is a method of that class."""
    checked = 0
    for path in panelSources():
        for cls in _classes(path):
            if path == SCRIPT and cls.name != "LTUDASegmentationWidget":
                continue
            methods = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
            source = ast.unparse(cls)
            handlers = set(re.findall(r"\.connect\((?:'[^']*', )?self\.(\w+)\)", source))
            handlers |= set(re.findall(r"addObserver\([^)]*, self\.(\w+)\)", source))
            assert handlers <= methods, f"{path.name} {cls.name}: handlers without a method: {handlers - methods}"
            checked += bool(handlers)
    assert checked >= 6  # the widget and its five sections


def test_each_panel_section_has_its_own_class_and_the_widget_only_composes_them():
    """Setup, Organs, Cases, Train, Segment: one class each, outside the Qt-free Lib; the module
    widget connects no widget of the .ui itself."""
    sections = {cls.name for path in sorted(WIDGETS.glob("*section.py")) for cls in _classes(path)}
    assert sections == {"SetupSection", "OrgansSection", "CasesSection", "TrainSection", "SegmentSection"}
    widget = next(c for c in _classes(SCRIPT) if c.name == "LTUDASegmentationWidget")
    source = ast.unparse(widget)
    assert not re.search(r"\bui\.\w+\.\w+\.connect\(", source), "the widget wires .ui widgets itself"
    assert widget.end_lineno - widget.lineno < 200, "the widget class grew back"
    for name in sections:
        assert f"{name}(" in source, f"the widget does not compose {name}"


# ----------------------------------------------------------------------------------------- CMake
def test_module_cmake_lists_every_script_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    scripts = cmakeList(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmakeList(text, "MODULE_PYTHON_RESOURCES")
    onDisk = [p.relative_to(MODULE).as_posix() for p in moduleFiles("*.py")]
    assert sorted(scripts) == sorted(onDisk)
    resourceFiles = [p.relative_to(MODULE).as_posix() for p in sorted((MODULE / "Resources").rglob("*"))
                     if p.is_file()]
    assert sorted(resources) == sorted(resourceFiles)
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_backend_files_shipped_with_the_extension_are_all_listed():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = cmakeList(text, "LTUDA_BACKEND_SCRIPTS")
    backend = REPO / "LTUDATrainer"
    onDisk = sorted(p.relative_to(backend).as_posix() for p in (backend / "ltuda").rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    assert sorted(listed) == onDisk, ("LTUDASegmentation/CMakeLists.txt LTUDA_BACKEND_SCRIPTS is out of date: "
                                      f"missing {sorted(set(onDisk) - set(listed))}, "
                                      f"gone {sorted(set(listed) - set(onDisk))}")
    assert "DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/LTUDABackend" in text
    # the folder the module looks for at run time is the one CMake installs
    assert '"LTUDABackend"' in (LIB / "backend.py").read_text(encoding="utf-8")


def test_lib_reload_list_is_complete():
    namespace = {}
    exec((LIB / "__init__.py").read_text(encoding="utf-8"), namespace)
    modules = {p.stem for p in LIB.glob("*.py")} - {"__init__", "probe"}
    assert set(namespace["SUBMODULES"]) == modules
    order = namespace["SUBMODULES"]
    for name in order:  # reload order: a module after the Lib modules it imports
        imports = re.findall(r"^from \.(\w+) import", (LIB / f"{name}.py").read_text(encoding="utf-8"), re.M)
        for dep in imports:
            assert order.index(dep) < order.index(name), f"{name} imports {dep}, which reloads later"


# ------------------------------------------------------------------------------ extension metadata
def test_extension_metadata_is_consistent():
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^project\(LTUDA\)", top, re.M) and (REPO / "LTUDA.s4ext").is_file()
    order = ["cmake_minimum_required", "project(", "EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS",
             "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS",
             "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(LTUDASegmentation)",
             "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    positions = [top.index(token) for token in order]
    assert positions == sorted(positions), "top-level CMakeLists.txt is not in the conventional order"
    modules = sorted(p.parent.relative_to(REPO).as_posix() for p in REPO.glob("LTUDASegmentation/**/CMakeLists.txt"))
    assert modules == sorted(re.findall(r"^add_subdirectory\((\S+)\)", top, re.M)), "a module folder is not built"
    cmake, desc = cmakeSettings(top), s4ext()
    assert desc["depends"] == cmake["EXTENSION_DEPENDS"] == "PyTorch"
    assert desc["category"] == cmake["EXTENSION_CATEGORY"] == "Segmentation"
    for key, cmakeKey in (("homepage", "HOMEPAGE"), ("contributors", "CONTRIBUTORS"),
                          ("description", "DESCRIPTION"), ("iconurl", "ICONURL"),
                          ("screenshoturls", "SCREENSHOTURLS")):
        assert desc[key] == cmake["EXTENSION_" + cmakeKey], key
    assert desc["scm"] == "git" and desc["build_subdirectory"] == "." and desc["enabled"] == "1"
    assert desc["scmurl"].endswith(".git") and "\n" not in desc["description"]
    icon = cmake["EXTENSION_ICONURL"].split("/main/", 1)[1]
    assert (REPO / icon).is_file()
    header = (REPO / icon).read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (128, 128)
    assert "Apache License" in (REPO / "LICENSE").read_text(encoding="utf-8")[:200]


# Extensions Index catalog entry, schema v1.0.1 (Slicer/Schemas, used by the 5.10 index): required
# keys, every allowed key (the schema has "additionalProperties": false) and its JSON type.
CATALOG_SCHEMA = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
CATALOG_TYPES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                 "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}


def test_extensions_index_catalog_entry_matches_the_cmake_metadata():
    import json

    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    project = re.search(r"^project\((\w+)\)", top, re.M).group(1)
    path = REPO / f"{project}.json"  # the index requires the file name to be the project name
    assert path.is_file(), f"{path.name} (Extensions Index catalog entry) is missing"
    entry = json.loads(path.read_text(encoding="utf-8"))
    assert CATALOG_REQUIRED <= set(entry) <= set(CATALOG_TYPES), set(entry) ^ set(CATALOG_TYPES)
    for key, value in entry.items():
        assert type(value) is CATALOG_TYPES[key], (key, value)
    assert entry["$schema"] == CATALOG_SCHEMA
    assert all(isinstance(d, str) for d in entry["build_dependencies"])
    assert entry.get("scm_type", "git") == "git" and entry["tier"] in (1, 3, 5)
    cmake, desc = cmakeSettings(top), s4ext()
    assert entry["category"] == cmake["EXTENSION_CATEGORY"] == desc["category"]
    depends = cmake["EXTENSION_DEPENDS"]
    assert entry["build_dependencies"] == ([] if depends == "NA" else depends.split()) == ["PyTorch"]
    assert entry["scm_url"] == desc["scmurl"] and entry["scm_revision"] == desc["scmrevision"]
    assert entry["build_subdirectory"] == desc["build_subdirectory"] == "."
    # the icon and screenshot URLs name files of this repository on the branch the index builds
    for url in [cmake["EXTENSION_ICONURL"]] + cmake["EXTENSION_SCREENSHOTURLS"].split():
        prefix = entry["scm_url"][:-len(".git")].replace("https://github.com/", "https://raw.githubusercontent.com/")
        assert url.startswith(f"{prefix}/{entry['scm_revision']}/"), url
        assert (REPO / url.split(f"/{entry['scm_revision']}/", 1)[1]).is_file(), f"{url}: no such file here"


def test_module_docstring_is_true_about_torch_in_slicer():
    """PyTorchUtils.installTorch ends with `import torch` in Slicer's own process: the module's
    docstring may not promise that Slicer never imports torch without naming that exception."""
    source = SCRIPT.read_text(encoding="utf-8")
    doc = " ".join(ast.get_docstring(ast.parse(source)).split())
    assert "installTorch" in source
    claims = re.search(r"never imports? torch", doc)
    if claims:
        assert "installTorch" in doc and "Install" in doc, doc


def test_module_texts():
    source = SCRIPT.read_text(encoding="utf-8")
    assert "Partially labelled" in source and "5.10" in source
    for field in ("categories", "contributors", "helpText", "acknowledgementText"):
        assert re.search(rf"self\.parent\.{field} = ", source), field
    assert "MINIMUM_SLICER_VERSION = (5, 10)" in source


# -------------------------------------------------------------------------------- Python support
def allModulePython():
    return moduleFiles("*.py")


@pytest.mark.parametrize("path", allModulePython(), ids=lambda p: p.relative_to(MODULE).as_posix())
def test_python39_syntax_and_no_backend_imports(path):
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 9))
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.AnnAssign, ast.arg)) and node.annotation is not None:
            annotations.append(node.annotation)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            annotations.append(node.returns)
        for annotation in annotations:
            assert not any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(annotation)), \
                f"{path.name}:{annotation.lineno}: 'X | Y' annotations fail on Python 3.9"
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            assert not isinstance(node.args[1], ast.BinOp), f"{path.name}:{node.lineno}: isinstance(x, A | B)"
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]] if node.level == 0 else []
        else:
            continue
        forbidden = {"torch", "monai", "ltuda"}.intersection(names)
        assert not forbidden, f"{path.name}:{node.lineno} imports {forbidden} into the Slicer process"


def test_lib_imports_no_qt_at_module_level():
    for path in LIB.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not {"qt", "ctk", "slicer.util"}.intersection(names), f"{path.name} imports Qt at load time"


@pytest.mark.parametrize("path", panelSources(), ids=lambda p: p.name)
def test_module_imports_exist_in_the_lib(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("LTUDASegmentationLib."):
            target = LIB / (node.module.split(".", 1)[1] + ".py")
            defined = set()
            for top in ast.parse(target.read_text(encoding="utf-8")).body:
                if isinstance(top, (ast.FunctionDef, ast.ClassDef)):
                    defined.add(top.name)
                elif isinstance(top, ast.Assign):
                    defined |= {t.id for t in top.targets if isinstance(t, ast.Name)}
                elif isinstance(top, (ast.Import, ast.ImportFrom)):
                    defined |= {(a.asname or a.name).split(".")[0] for a in top.names}
            missing = {a.name for a in node.names} - defined
            assert not missing, f"{node.module} lacks {missing}"


def _python39():
    import shutil
    import subprocess

    import glob
    import os

    candidates = [shutil.which("python3.9"), "/usr/bin/python3.9"]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))
    for candidate in candidates:
        if candidate:
            try:
                out = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
                                     capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.SubprocessError):
                continue
            if out.stdout.strip() == "True":
                return candidate
    return None


def test_pure_lib_modules_run_on_python39():
    """Slicer's oldest supported Python: compile everything, import the Qt-free Lib modules, run a job,
    and probe a 3.9 interpreter without the backend packages as an 'external Python'."""
    import json
    import subprocess

    python = _python39()
    if python is None:
        pytest.skip("no Python 3.9 interpreter on this machine")
    code = f"""
import glob, json, os, sys, tempfile, py_compile
os.chdir({str(MODULE)!r})
for f in ["LTUDASegmentation.py"] + glob.glob("LTUDASegmentationLib/*.py") + glob.glob("LTUDASegmentationWidgets/*.py"):
    py_compile.compile(f, doraise=True, cfile=os.path.join(tempfile.mkdtemp(), "x.pyc"))
sys.path.insert(0, ".")
import importlib
for m in ["errors", "organs", "settings", "progress", "runner", "manifest", "cases", "folders", "backend",
          "models", "jobs", "export"]:
    importlib.import_module("LTUDASegmentationLib." + m)
from LTUDASegmentationLib import jobs
from LTUDASegmentationLib.runner import ProcessRunner
from LTUDASegmentationLib.backend import Backend
script = os.path.join(tempfile.mkdtemp(), "s.py")
open(script, "w").write('print(\\'{{"event": "done", "status": "completed"}}\\')')
job = jobs.BackendJob(ProcessRunner([sys.executable, script])).start()
probe = Backend(sys.executable).probe()
print(json.dumps([job.wait(timeout=60), probe.missing(), probe.missingMessage()]))
"""
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    status, missing, message = json.loads(result.stdout.strip().splitlines()[-1])
    assert status == "completed"
    if "ltuda" in missing:  # a bare 3.9: the external-Python message says what to install there
        assert "Install them into that environment" in message
