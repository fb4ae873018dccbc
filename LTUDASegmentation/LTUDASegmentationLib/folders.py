"""Import a folder of image/label files the way public datasets ship them.

Recognised layouts (first match wins):
- MSD: imagesTr/ + labelsTr/ with the same file names (macOS "._" junk files are skipped);
- images/ + labels/ (also image/label, imgs/masks, volumes/segmentations) with the same file names;
- KiTS: one folder per case holding imaging.nii.gz and segmentation.nii.gz;
- LiTS: volume-N.nii and segmentation-N.nii side by side;
- flat: NAME.ext next to NAME_label.ext / NAME_seg.ext / NAME_mask.ext / NAME-label.ext / NAME.seg.nrrd.
The label value -> organ map ("1=liver, 2=liver") says what each value means; values not listed must
not occur (map them to 'background' to ignore them).
"""

import os
import re

from .cases import fileStem
from .errors import LTUDAError
from .organs import BACKGROUND, findOrgan

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_PAIR_FOLDERS = [("imagesTr", "labelsTr"), ("images", "labels"), ("image", "label"), ("imgs", "masks"),
                 ("volumes", "segmentations"), ("images", "masks")]
_LABEL_SUFFIXES = ("_label", "_labels", "_seg", "_segmentation", "_mask", "-label", "-seg", "_gt")


def _isVolume(name):
    lower = name.lower()
    return not name.startswith(".") and lower.endswith(VOLUME_EXTENSIONS)


def _volumes(folder):
    try:
        return sorted(n for n in os.listdir(folder) if _isVolume(n) and os.path.isfile(os.path.join(folder, n)))
    except OSError:
        return []


def _findSubfolder(folder, name):
    for entry in os.listdir(folder):
        if entry.lower() == name.lower() and os.path.isdir(os.path.join(folder, entry)):
            return os.path.join(folder, entry)
    return None


def findImageLabelPairs(folder):
    """[(case name, image path, label path)] found in `folder`; raises LTUDAError when none."""
    folder = os.path.abspath(str(folder))
    if not os.path.isdir(folder):
        raise LTUDAError(f"The folder {folder} does not exist.")
    for imagesName, labelsName in _PAIR_FOLDERS:
        images, labels = _findSubfolder(folder, imagesName), _findSubfolder(folder, labelsName)
        if images and labels:
            labelFiles = {fileStem(n): n for n in _volumes(labels)}
            pairs = []
            for name in _volumes(images):
                stem = fileStem(name)
                # MSD test images are named like the labels; nnU-Net adds a _0000 channel suffix.
                label = labelFiles.get(stem) or labelFiles.get(re.sub(r"_0000$", "", stem))
                if label:
                    pairs.append((re.sub(r"_0000$", "", stem), os.path.join(images, name), os.path.join(labels, label)))
            if pairs:
                return pairs
    pairs = []
    for entry in sorted(os.listdir(folder)):  # KiTS
        sub = os.path.join(folder, entry)
        if os.path.isdir(sub):
            files = {n.lower(): n for n in _volumes(sub)}
            image = next((files[k] for k in ("imaging.nii.gz", "imaging.nii") if k in files), None)
            label = next((files[k] for k in ("segmentation.nii.gz", "segmentation.nii") if k in files), None)
            if image and label:
                pairs.append((entry, os.path.join(sub, image), os.path.join(sub, label)))
    if pairs:
        return pairs
    files = _volumes(folder)
    stems = {fileStem(n): n for n in files}
    used = set()
    for name in files:  # LiTS
        match = re.match(r"^volume-(\d+)$", fileStem(name), re.IGNORECASE)
        if match and f"segmentation-{match.group(1)}" in stems:
            pairs.append((fileStem(name), os.path.join(folder, name),
                          os.path.join(folder, stems[f"segmentation-{match.group(1)}"])))
    if pairs:
        return pairs
    for name in files:  # flat NAME + NAME_label
        stem = fileStem(name)
        if name in used or any(stem.lower().endswith(s) for s in _LABEL_SUFFIXES) or name.lower().endswith(".seg.nrrd"):
            continue
        for candidate in [stem + s for s in _LABEL_SUFFIXES]:
            if candidate in stems:
                pairs.append((stem, os.path.join(folder, name), os.path.join(folder, stems[candidate])))
                used.add(stems[candidate])
                break
        else:
            if stem + ".seg.nrrd" in files:
                pairs.append((stem, os.path.join(folder, name), os.path.join(folder, stem + ".seg.nrrd")))
    if not pairs:
        raise LTUDAError(
            f"No image/label pairs found in {folder}. Expected imagesTr/ + labelsTr/ (MSD), images/ + labels/, "
            "one folder per case with imaging + segmentation (KiTS), volume-N + segmentation-N (LiTS), or "
            "NAME.nii.gz next to NAME_label.nii.gz.")
    return pairs


def parseValueMap(text, organs):
    """{label value: organ name or 'background'} from text like "1=liver, 2=liver; 3: background".
    Raises LTUDAError naming the first bad entry."""
    entries = [e.strip() for e in re.split(r"[,;\n]+", text or "") if e.strip()]
    if not entries:
        raise LTUDAError("Give the label value -> organ map, e.g. '1=liver, 2=liver' for LiTS (tumour inside the "
                         "liver counts as liver) or '1=spleen' for MSD Spleen.")
    valueMap = {}
    names = ", ".join(o["name"] for o in organs) or "(no organs defined)"
    for entry in entries:
        match = re.match(r"^(\d+)\s*[=:]\s*(.+)$", entry)
        if not match:
            raise LTUDAError(f"'{entry}' is not of the form VALUE=ORGAN (for example 1=liver).")
        value, target = int(match.group(1)), match.group(2).strip()
        if value == 0:
            raise LTUDAError("Label value 0 is background in every label map; map only the values 1 and above.")
        if target.lower() == BACKGROUND:
            valueMap[value] = BACKGROUND
            continue
        organ = findOrgan(organs, target)
        if organ is None:
            raise LTUDAError(f"'{target}' (label {value}) is not one of the organs ({names}). Add it in the Organs "
                             "section first, or map the value to 'background'.")
        valueMap[value] = organ["name"]
    return valueMap
