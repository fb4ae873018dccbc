"""Organ classes: names, colours and standard terminology (SNOMED CT codes as Slicer uses them).

An organ is a plain dict, the same shape as a class of the LTUDA dataset manifest and model.json:
    {"name": "liver", "value": 1, "color": [221, 130, 101],
     "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"],
                     "type": ["SCT", "10200004", "Liver"], "type_modifier": None}}
Colours are 0-255 integers here (Slicer segments use 0-1 floats; see colorToFloat).

This module is pure Python: no Slicer, Qt or VTK import, so it runs in tests and in the Slicer process.
"""

import copy
import json
import re

CATEGORY_ANATOMY = ["SCT", "123037004", "Anatomical Structure"]
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"
BACKGROUND = "background"

# name -> (colour of the DICOM master list, SNOMED CT type code, code meaning)
KNOWN_ORGANS = {
    "liver": ((221, 130, 101), "10200004", "Liver"),
    "spleen": ((157, 108, 162), "78961009", "Spleen"),
    "kidney": ((185, 102, 83), "64033007", "Kidney"),
    "pancreas": ((249, 180, 111), "15776009", "Pancreas"),
    "stomach": ((216, 132, 105), "69695003", "Stomach"),
    "gallbladder": ((139, 150, 98), "28231008", "Gallbladder"),
    "esophagus": ((211, 171, 143), "32849002", "Esophagus"),
    "aorta": ((224, 97, 76), "15825003", "Aorta"),
    "inferior vena cava": ((0, 151, 206), "64131007", "Inferior vena cava"),
    "duodenum": ((255, 253, 229), "38848004", "Duodenum"),
    "adrenal gland": ((249, 186, 150), "23451007", "Adrenal gland"),
}

# The preset of the LTUDA paper (and of the Segment panel's "Reset" button).
DEFAULT_ORGAN_NAMES = ("liver", "spleen", "kidney", "pancreas")

# Words that qualify a segment name without changing the organ ("left kidney", "Kidney_R").
_QUALIFIERS = {"left", "right", "l", "r", "lt", "rt"}

_FALLBACK_COLORS = [(128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79),
                    (220, 245, 20), (78, 63, 0), (255, 250, 220), (230, 220, 70), (200, 200, 235)]


class OrganError(ValueError):
    """An organ list that cannot be used, with a message for a person."""


def knownOrganNames():
    return sorted(KNOWN_ORGANS)


def organClass(name, value, color=None, terminology="auto"):
    """The organ dict for `name`. Known organs get their standard colour and code; others a grey-ish
    colour and no terminology. `terminology="auto"` looks the code up by name; pass a dict or None to set it."""
    key = normalizeName(name)
    known = KNOWN_ORGANS.get(key)
    if terminology == "auto":
        if known:
            terminology = {"category": list(CATEGORY_ANATOMY), "type": ["SCT", known[1], known[2]], "type_modifier": None}
        else:
            terminology = None
    if color is None:
        color = known[0] if known else _FALLBACK_COLORS[(int(value) - 1) % len(_FALLBACK_COLORS)]
    return {
        "name": key if known else str(name).strip(),
        "value": int(value),
        "color": [int(c) for c in color],
        "terminology": copy.deepcopy(terminology),
    }


def defaultOrgans(names=DEFAULT_ORGAN_NAMES):
    return [organClass(n, i + 1) for i, n in enumerate(names)]


def renumber(organs):
    """Copy of the list with values 1..C in list order (the model's output labels)."""
    out = copy.deepcopy(list(organs))
    for i, organ in enumerate(out):
        organ["value"] = i + 1
    return out


def validateOrgans(organs):
    """Problems of an organ list, one readable sentence each (empty list: usable)."""
    problems = []
    if not organs:
        problems.append("No organs are defined: add the organs the model should learn (Organs section).")
        return problems
    seen = set()
    for organ in organs:
        name = str(organ.get("name", "")).strip()
        if not name:
            problems.append("An organ has no name: give every organ a name.")
            continue
        if name.lower() == BACKGROUND:
            problems.append("'background' is implicit; do not add it as an organ.")
        if name.lower() in seen:
            problems.append(f"The organ '{name}' is listed twice: remove one of them.")
        seen.add(name.lower())
    if len(organs) > 255:
        problems.append("At most 255 organs can be learnt by one model.")
    return problems


def colorToFloat(color):
    return [max(0.0, min(1.0, c / 255.0)) for c in color[:3]]


def colorFromFloat(color):
    return [int(round(max(0.0, min(1.0, float(c))) * 255)) for c in color[:3]]


def terminologyTag(organ):
    """Slicer's TerminologyEntry tag (seven '~'-separated parts, coded parts 'scheme^value^meaning'),
    or '' when the organ has no type code."""
    term = organ.get("terminology") or {}
    if not term.get("type"):
        return ""

    def coded(code):
        return "^".join(str(c) for c in code) if code else "^^"

    return "~".join([
        TERMINOLOGY_CONTEXT,
        coded(term.get("category") or CATEGORY_ANATOMY),
        coded(term.get("type")),
        coded(term.get("type_modifier")),
        REGION_CONTEXT,
        "^^",
        "^^",
    ])


def parseTerminologyTag(tag):
    """(category, type, type modifier) code tuples (scheme, value, meaning) of a tag, or None.
    A part without a code value is None."""
    parts = (tag or "").split("~")
    if len(parts) < 4:
        return None

    def code(text):
        fields = text.split("^")
        return tuple(fields[:3]) if len(fields) >= 2 and fields[1] else None

    return code(parts[1]), code(parts[2]), code(parts[3])


def normalizeName(name):
    """Lower case, '_' and '-' as spaces, single spaces."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]+", " ", str(name or ""))).strip().lower()


def _withoutQualifiers(name):
    words = [w for w in normalizeName(name).split(" ") if w and w not in _QUALIFIERS]
    return " ".join(words)


def matchOrgan(organs, segmentName="", terminologyTagText=""):
    """The organ a segment stands for, or None: by terminology type code first, then by name
    (case-insensitive; 'left'/'right' qualifiers ignored, so 'Kidney left' is the organ 'kidney')."""
    parsed = parseTerminologyTag(terminologyTagText)
    if parsed and parsed[1]:
        for organ in organs:
            term = organ.get("terminology") or {}
            if term.get("type") and str(term["type"][1]) == parsed[1][1]:
                return organ
    wanted = normalizeName(segmentName)
    for organ in organs:
        if normalizeName(organ["name"]) == wanted:
            return organ
    stripped = _withoutQualifiers(segmentName)
    if stripped and stripped != wanted:
        for organ in organs:
            if normalizeName(organ["name"]) == stripped:
                return organ
    return None


def findOrgan(organs, name):
    key = normalizeName(name)
    for organ in organs:
        if normalizeName(organ["name"]) == key:
            return organ
    return None


def organsToJson(organs):
    return json.dumps(organs)


def organsFromJson(text):
    """Organ list from its JSON text (parameter node / settings); raises OrganError when unusable."""
    try:
        raw = json.loads(text)
    except (TypeError, ValueError):
        raise OrganError("The stored organ list is not valid JSON.") from None
    if not isinstance(raw, list):
        raise OrganError("The stored organ list is not a list.")
    organs = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not item.get("name"):
            raise OrganError(f"Stored organ #{i + 1} has no name.")
        organs.append(organClass(item["name"], item.get("value", i + 1), item.get("color"),
                                 item.get("terminology", "auto")))
    return renumber(organs)
