"""Reader of `suggestions.json`, the ranked review list `ltuda suggest` writes next to its proposals.

{"schema": "ltuda-suggestions/1", "model", "model_sha256", "dataset", "score",
 "rows": [{"rank", "case", "organ", "label_value", "volume_ml", "uncertainty", "score", "segmentation"}]}
Rows are returned sorted by rank (1 = review first). Unknown fields are kept, so a newer backend
does not break the module.
"""

import json
import os

from .errors import LTUDAError

SCHEMA = "ltuda-suggestions/1"
FILE_NAME = "suggestions.json"


def suggestionsPath(pathOrFolder):
    path = os.path.abspath(str(pathOrFolder))
    return os.path.join(path, FILE_NAME) if os.path.isdir(path) else path


def readSuggestions(pathOrFolder):
    """The document with its rows sorted by rank; LTUDAError naming the file and the fix otherwise."""
    path = suggestionsPath(pathOrFolder)
    fix = "Run 'Pre-fill missing organs' (ltuda suggest) again to write it."
    if not os.path.isfile(path):
        raise LTUDAError(f"The review list {path} does not exist. {fix}")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise LTUDAError(f"The review list {path} cannot be read ({exc}). {fix}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise LTUDAError(f"{path} is not an LTUDA review list (expected \"schema\": \"{SCHEMA}\"). {fix}")
    rows = doc.get("rows")
    if not isinstance(rows, list):
        raise LTUDAError(f"{path} has no list of rows. {fix}")
    clean = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("case"), str) or not isinstance(row.get("organ"), str):
            raise LTUDAError(f"{path}: row #{i + 1} lacks its case or organ. {fix}")
        rank = row.get("rank", i + 1)
        clean.append(dict(row, rank=int(rank) if isinstance(rank, (int, float)) else i + 1))
    clean.sort(key=lambda r: r["rank"])
    doc = dict(doc, rows=clean)
    doc["path"] = path
    doc["folder"] = os.path.dirname(path)
    return doc
