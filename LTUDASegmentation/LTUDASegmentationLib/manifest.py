"""Writer of the LTUDA dataset manifest `dataset.json` (schema "ltuda-dataset", version 1).

Written here from the documented schema (LTUDATrainer/CONTRACTS.md) so that the Slicer process
never imports the backend:
{
  "schema": "ltuda-dataset", "version": 1, "name": "...",
  "classes": [{"name", "value" (1..C), "color" [r, g, b] 0-255, "terminology" {...} or null}],
  "cases": [{"id", "image", "label", "labels" {"value": class name or "background"},
             "labeled" [class names], "split" "train"|"val"|"test"}]
}
Paths are relative to the manifest's folder when possible (absolute otherwise; then the backend
needs --allow-outside-paths).
"""

import copy
import json
import os

SCHEMA = "ltuda-dataset"
VERSION = 1


def relativePath(path, root):
    """POSIX-style path of `path` relative to `root`, or the absolute path when that is impossible
    (another drive on Windows)."""
    try:
        return os.path.relpath(str(path), str(root)).replace(os.sep, "/")
    except ValueError:
        return os.path.abspath(str(path))


def isInside(path, root):
    rel = relativePath(path, root)
    return not (os.path.isabs(rel) or rel == ".." or rel.startswith("../"))


def classEntries(organs):
    return [{"name": o["name"], "value": int(o["value"]), "color": [int(c) for c in o["color"]],
             "terminology": copy.deepcopy(o.get("terminology"))} for o in organs]


def caseEntry(caseId, imagePath, labelPath, valueMap, labelled, root, split="train"):
    entry = {"id": caseId, "image": relativePath(imagePath, root)}
    if labelPath is not None:
        entry["label"] = relativePath(labelPath, root)
        entry["labels"] = {str(int(v)): name for v, name in sorted(valueMap.items())}
    entry["labeled"] = list(labelled)
    entry["split"] = split
    return entry


def manifestDocument(name, organs, caseEntries):
    return {"schema": SCHEMA, "version": VERSION, "name": name, "classes": classEntries(organs),
            "cases": list(caseEntries)}


def writeManifest(path, document):
    """Write atomically (temporary file + rename)."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # a failed write (full disk): no half-written manifest left behind
            os.remove(tmp)
    return path
