"""The dataset manifest `dataset.json`: organ classes and partially labelled cases.

Schema (version 1), paths relative to the manifest's folder:
{
  "schema": "ltuda-dataset", "version": 1, "name": "my-data",
  "classes": [{"name": "liver", "value": 1, "color": [221, 130, 101], "terminology": {...}}, ...],
  "cases": [{
      "id": "lits_000",
      "image": "images/lits_000.nii.gz",
      "label": "labels/lits_000.nii.gz",          # NIfTI, NRRD, MHA or Slicer .seg.nrrd
      "labels": {"1": "liver", "2": "liver"},     # label value in the file -> class name or "background"
      "labeled": ["liver"],                      # optional: defaults to the classes named in "labels"
      "split": "train"                           # optional: "train", "val" or "test"
  }]
}
For a `.seg.nrrd` label, "labels" may be left out: segments are matched to classes by terminology,
then by name. Classes a case does not label are unknown there, not background; a case that labels
every class is also background-labelled.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from .errors import LtudaError, ManifestProblems, write_error
from .terminology import copy_classes

SCHEMA = "ltuda-dataset"
VERSION = 1
BACKGROUND = "background"
SPLITS = ("train", "val", "test")


@dataclass
class Case:
    id: str
    image: Path
    label: Optional[Path]
    labeled: List[str]
    value_map: Dict[int, str] = field(default_factory=dict)
    split: str = "train"
    extra: dict = field(default_factory=dict)
    # Optional: every organ of this case, in the manifest's class values, for diagnostics and the
    # oracle benchmark row only (never trained on as labels).
    label_full: Optional[Path] = None

    def is_seg_nrrd(self) -> bool:
        return self.label is not None and self.label.name.lower().endswith(".seg.nrrd")


@dataclass
class Manifest:
    path: Path
    name: str
    classes: List[dict]
    cases: List[Case]

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def class_names(self) -> List[str]:
        return [c["name"] for c in self.classes]

    def split(self, name: str) -> List[Case]:
        return [c for c in self.cases if c.split == name]


def _resolve(root: Path, text, allow_outside: bool, what: str, case_id: str, problems: list):
    if not isinstance(text, str) or not text:
        problems.append(f"case '{case_id}': '{what}' must be a file path")
        return None
    path = Path(text)
    resolved = (path if path.is_absolute() else root / path).resolve()
    if not allow_outside:
        try:
            resolved.relative_to(root.resolve())
        except ValueError:
            problems.append(
                f"case '{case_id}': {what} path '{text}' points outside the dataset folder {root}; "
                "move the file into it or pass --allow-outside-paths"
            )
            return None
    return resolved


def _parse_classes(raw, problems) -> List[dict]:
    if not isinstance(raw, list) or not raw:
        problems.append("'classes' must be a non-empty list of organ classes")
        return []
    classes, seen_names, seen_values = [], set(), set()
    for i, cls in enumerate(raw):
        if not isinstance(cls, dict) or not isinstance(cls.get("name"), str) or not cls.get("name"):
            problems.append(f"class #{i + 1} needs a 'name'")
            continue
        name = cls["name"]
        value = cls.get("value", i + 1)
        if name.lower() == BACKGROUND:
            problems.append("'background' is implicit (value 0); do not list it as a class")
        if name in seen_names:
            problems.append(f"class '{name}' is listed twice")
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 255 or value in seen_values:
            problems.append(f"class '{name}': 'value' must be a unique integer in 1..255")
            continue
        color = cls.get("color", [128, 128, 128])
        if not (isinstance(color, list) and len(color) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in color)):
            problems.append(f"class '{name}': 'color' must be three integers 0..255")
        term = cls.get("terminology")
        if term is not None and not (isinstance(term, dict) and all(
                code is None or (isinstance(code, list) and all(isinstance(part, str) for part in code))
                for code in term.values())):
            problems.append(f"class '{name}': 'terminology' must map category/type/type_modifier to code lists")
        seen_names.add(name)
        seen_values.add(value)
        classes.append({"name": name, "value": value, "color": color, "terminology": cls.get("terminology")})
    values = sorted(c["value"] for c in classes)
    if values and values != list(range(1, len(values) + 1)):
        problems.append("class values must be 1..C without gaps (they are the model's output labels)")
    return sorted(classes, key=lambda c: c["value"])


def _parse_case(i, raw, root, class_names, allow_outside, problems) -> Optional[Case]:
    if not isinstance(raw, dict):
        problems.append(f"case #{i + 1} must be an object")
        return None
    case_id = str(raw.get("id") or f"case{i + 1:03d}")
    image = _resolve(root, raw.get("image"), allow_outside, "image", case_id, problems)
    label = None
    if raw.get("label") is not None:
        label = _resolve(root, raw.get("label"), allow_outside, "label", case_id, problems)
    value_map = {}
    labels = raw.get("labels") or {}
    if not isinstance(labels, dict):
        problems.append(f"case '{case_id}': 'labels' must map label values to class names, e.g. {{\"1\": \"liver\"}}")
        labels = {}
    for key, target in labels.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            problems.append(f"case '{case_id}': label value '{key}' is not an integer")
            continue
        if not 0 <= value < 2**31:
            problems.append(f"case '{case_id}': label value {key[:30]} is out of range (0 .. 2147483647)")
            continue
        if target != BACKGROUND and target not in class_names:
            problems.append(
                f"case '{case_id}': label value {value} maps to '{target}', which is not a class "
                f"(classes: {', '.join(class_names)}; or 'background')"
            )
            continue
        value_map[value] = target
    labeled = raw.get("labeled")
    if labeled is None:
        labeled = sorted({t for t in value_map.values() if t != BACKGROUND}, key=class_names.index)
    if not isinstance(labeled, list) or not all(isinstance(n, str) for n in labeled):
        problems.append(f"case '{case_id}': 'labeled' must be a list of class names")
        labeled = []
    unknown = [n for n in labeled if n not in class_names]
    if unknown:
        problems.append(f"case '{case_id}': 'labeled' names unknown classes {unknown}")
    split = raw.get("split", "train")
    if not isinstance(split, str) or split not in SPLITS:
        problems.append(f"case '{case_id}': split '{split}' must be one of {', '.join(SPLITS)}")
    if label is None and labeled and split != "test":
        problems.append(f"case '{case_id}': it labels {labeled} but has no 'label' file")
    if label is not None and not value_map and not label.name.lower().endswith(".seg.nrrd"):
        problems.append(
            f"case '{case_id}': 'labels' (label value -> class) is required for a plain label map such as {label.name}"
        )
    label_full = None
    if raw.get("label_full") is not None:
        label_full = _resolve(root, raw.get("label_full"), allow_outside, "label_full", case_id, problems)
    extra = {k: v for k, v in raw.items()
             if k not in ("id", "image", "label", "labels", "labeled", "split", "label_full")}
    return Case(case_id, image, label, [n for n in labeled if n in class_names], value_map, split, extra, label_full)


def load_manifest(path, allow_outside_paths: bool = False) -> Manifest:
    """Parse and structurally validate a manifest; raises ManifestProblems listing every problem."""
    manifest, problems = parse_manifest(path, allow_outside_paths)
    if problems:
        raise ManifestProblems(problems)
    return manifest


def parse_manifest(path, allow_outside_paths: bool = False):
    """(Manifest of the usable parts, list of problems); raises LtudaError only if unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise LtudaError("dataset manifest not found", path, "Pass the dataset.json file or the folder holding it.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LtudaError(f"is not valid JSON ({exc})", path, "Fix the syntax of the manifest.") from None
    except RecursionError:
        raise LtudaError("is nested too deeply to be a dataset manifest", path, "Fix the structure of the manifest.") from None
    problems = []
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        raise LtudaError(f"is not an LTUDA dataset manifest (expected \"schema\": \"{SCHEMA}\")", path)
    if raw.get("version") != VERSION:
        raise LtudaError(
            f"manifest version {repr(raw.get('version'))[:80]} is not supported (this ltuda reads version {VERSION})",
            path, "Re-export the dataset with this version of LTUDA.",
        )
    classes = _parse_classes(raw.get("classes"), problems)
    names = [c["name"] for c in classes]
    cases = []
    raw_cases = raw.get("cases") or []
    if not isinstance(raw_cases, list):
        problems.append("'cases' must be a list of cases")
        raw_cases = []
    for i, raw_case in enumerate(raw_cases):
        case = _parse_case(i, raw_case, path.parent, names, allow_outside_paths, problems)
        if case is not None:
            cases.append(case)
    ids = [c.id for c in cases]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"case id '{dup}' is used more than once")
    training = [c for c in cases if c.split != "test"]
    if not training:
        problems.append("no training cases (every case is in the 'test' split, or 'cases' is empty)")
    for name in names:
        if training and not any(name in c.labeled for c in training):
            problems.append(f"class '{name}' is labelled by no training case; label it in at least one case or remove it")
    manifest = Manifest(path, str(raw.get("name") or path.parent.name), classes, cases)
    return manifest, [f"{path}: {p}" for p in problems]


def case_to_json(case: Case, root: Path) -> dict:
    def rel(p):
        try:
            return Path(os.path.relpath(p, root)).as_posix()
        except ValueError:  # another drive on Windows
            return str(p)

    out = {"id": case.id, "image": rel(case.image)}
    if case.label is not None:
        out["label"] = rel(case.label)
    if case.value_map:
        out["labels"] = {str(k): v for k, v in sorted(case.value_map.items())}
    out["labeled"] = list(case.labeled)
    out["split"] = case.split
    if case.label_full is not None:
        out["label_full"] = rel(case.label_full)
    out.update(case.extra)
    return out


def write_manifest(path, classes, cases, name: str = "") -> Path:
    """Write a manifest atomically; case paths are stored relative to its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema": SCHEMA,
        "version": VERSION,
        "name": name or path.parent.name,
        "classes": copy_classes(classes),
        "cases": [case_to_json(c, path.parent) for c in cases],
    }
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(doc, indent=2) + "\n"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(exc, path, "dataset manifest", len(text.encode())) from None
    return path
