"""Organ classes with standard terminology (SNOMED CT codes as Slicer's terminology files use them).

A class is a plain dict, the same shape in `dataset.json` and `model.json`:
    {"name": "liver", "value": 1, "color": [221, 130, 101],
     "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"],
                     "type": ["SCT", "10200004", "Liver"], "type_modifier": None}}
"""

import copy

CATEGORY_ANATOMY = ["SCT", "123037004", "Anatomical Structure"]
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"

# name -> (colour from the DICOM master list, SNOMED CT type code, code meaning)
_ORGANS = {
    "liver": ((221, 130, 101), "10200004", "Liver"),
    "spleen": ((157, 108, 162), "78961009", "Spleen"),
    # Both kidneys are one class, as in the paper; laterality would be a type modifier in Slicer.
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

DEFAULT_ORGANS = ("liver", "spleen", "kidney", "pancreas")

# How many connected components an organ normally has (kidneys: two, as one class).
EXPECTED_COMPONENTS = {"kidney": 2, "adrenal gland": 2}


def known_organs():
    return sorted(_ORGANS)


def organ_class(name: str, value: int) -> dict:
    """The class dict of a known organ; unknown names get a grey colour and no code."""
    key = name.strip().lower()
    if key not in _ORGANS:
        return {"name": name, "value": int(value), "color": [128, 174, 128], "terminology": None}
    color, code, meaning = _ORGANS[key]
    return {
        "name": key,
        "value": int(value),
        "color": list(color),
        "terminology": {"category": list(CATEGORY_ANATOMY), "type": ["SCT", code, meaning], "type_modifier": None},
    }


def default_classes(names=DEFAULT_ORGANS) -> list:
    return [organ_class(n, i + 1) for i, n in enumerate(names)]


def terminology_entry_tag(cls: dict) -> str:
    """Slicer's TerminologyEntry tag: seven '~'-separated parts, coded parts as 'scheme^value^meaning'."""
    term = cls.get("terminology") or {}

    def coded(code):
        return "^".join(code) if code else "^^"

    if not term.get("type"):
        return ""
    return "~".join([
        TERMINOLOGY_CONTEXT,
        coded(term.get("category")),
        coded(term.get("type")),
        coded(term.get("type_modifier")),
        REGION_CONTEXT,
        "^^",
        "^^",
    ])


def parse_terminology_entry_tag(tag: str):
    """(category code, type code, type modifier code) tuples from a TerminologyEntry tag, or None."""
    parts = (tag or "").split("~")
    if len(parts) < 4:
        return None

    def code(text):
        fields = text.split("^")
        return tuple(fields[:3]) if len(fields) >= 2 and fields[1] else None

    return code(parts[1]), code(parts[2]), code(parts[3])


def match_class(classes, name: str = "", terminology_tag: str = ""):
    """The class a segment stands for: by terminology type code first, then by name (case-insensitive)."""
    parsed = parse_terminology_entry_tag(terminology_tag)
    if parsed and parsed[1]:
        for cls in classes:
            term = cls.get("terminology") or {}
            if term.get("type") and term["type"][1] == parsed[1][1]:
                return cls
    wanted = (name or "").strip().lower()
    for cls in classes:
        if cls["name"].lower() == wanted:
            return cls
    return None


def copy_classes(classes) -> list:
    return copy.deepcopy(list(classes))
