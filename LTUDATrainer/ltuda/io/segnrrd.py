"""Writing results: Slicer `.seg.nrrd` segmentations and plain label maps, always atomically.

A `.seg.nrrd` is a NRRD label map plus `SegmentN_*` fields (ID, name, colour, terminology, label
value, layer, extent) that 3D Slicer's segmentation storage node reads; with one segment per class
and the reference image's exact grid, the result opens in Slicer aligned with its CT.
"""

import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import nrrd
import numpy as np
import SimpleITK as sitk

from ..errors import DISK_FULL, READ_ONLY, LtudaError, failed_write_cause, write_error
from ..terminology import terminology_entry_tag
from .volumes import VOLUME_SUFFIXES, itk_path

# Conversion parameter holding the full grid, so Slicer's editor keeps editing on the CT's grid.
REFERENCE_GEOMETRY = "Reference image geometry"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@contextmanager
def _atomic_path(path: Path, suffix: str, what: str, needed: int, check_space: bool = False):
    """A temporary name in the target's folder (same file system) that replaces `path` on success.

    Readers never see a half-written output, and a failed write leaves the old file alone. A full
    disk or a read-only folder becomes one message naming `what` and `path` (`needed`: an upper
    bound of the bytes to write). `check_space`: refuse up front when less than `needed` is free,
    for writers that do not report a full disk (SimpleITK's gzip writers can leave a truncated file).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(exc, path, what) from None
    if check_space:
        cause = failed_write_cause(path.parent, needed)
        if cause is not None:
            raise write_error(cause, path, what, needed)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in DISK_FULL + READ_ONLY:
            raise write_error(exc, path, what, needed) from None
        raise
    except RuntimeError:  # SimpleITK does not say why: find out
        cause = failed_write_cause(path.parent, needed)
        if cause is None:
            raise
        raise write_error(cause, path, what, needed) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _check_shape(labels: np.ndarray, reference: sitk.Image) -> np.ndarray:
    labels = np.asarray(labels)
    expected = tuple(reference.GetSize())[::-1]
    if labels.shape != expected:
        raise ValueError(f"labels have shape {labels.shape}, the reference grid is {expected} (z, y, x)")
    return labels


def _ijk_to_lps(reference: sitk.Image) -> np.ndarray:
    matrix = np.eye(4)
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    matrix[:3, :3] = direction * np.array(reference.GetSpacing())  # column i: step along voxel axis i
    matrix[:3, 3] = reference.GetOrigin()
    return matrix


def _extent(mask: np.ndarray) -> str:
    """Voxel bounding box "i0 i1 j0 j1 k0 k1" of a (z, y, x) mask; "0 -1 0 -1 0 -1" when empty, as Slicer writes."""
    if not mask.any():
        return "0 -1 0 -1 0 -1"
    bounds = []
    for axis in (2, 1, 0):  # i (x), j (y), k (z)
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        bounds += [int(hits[0]), int(hits[-1])]
    return " ".join(map(str, bounds))


def _fmt(values) -> str:
    return " ".join(f"{v:.10g}" for v in values)


def write_seg_nrrd(path, labels, reference: sitk.Image, classes, tags=None, fields=None) -> Path:
    """Write class-value labels (z, y, x) on `reference`'s grid as a Slicer `.seg.nrrd` (one segment per class).

    `tags`: {key: value} added to every segment's tags (e.g. {"LTUDA.status": "proposed"}), stored the way
    Slicer stores segment tags: `key:value|` pairs in `SegmentN_Tags`. `fields`: extra NRRD header fields
    ({name: text}), which Slicer ignores.
    """
    path = Path(path)
    labels = _check_shape(labels, reference).astype(np.uint8, copy=False)
    matrix = _ijk_to_lps(reference)
    ras = np.eye(4)
    ras[:3] = _LPS_TO_RAS @ matrix[:3]
    size = reference.GetSize()
    geometry = ";".join(f"{v:.10g}" for v in ras.flatten()) + ";" + ";".join(f"0;{n - 1}" for n in size) + ";"
    header = {
        "type": "uint8",
        "dimension": 3,
        "space": "left-posterior-superior",
        "sizes": list(size),
        "space directions": matrix[:3, :3].T,  # NRRD: one row per voxel axis
        "kinds": ["domain"] * 3,
        "encoding": "gzip",
        "space origin": matrix[:3, 3],
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        "Segmentation_ConversionParameters": f"{REFERENCE_GEOMETRY}|{geometry}|&",
    }
    extra_tags = "".join(f"{key}:{value}|" for key, value in (tags or {}).items())
    for i, cls in enumerate(classes):
        tag = terminology_entry_tag(cls)
        header.update({
            f"Segment{i}_ID": cls["name"].replace(" ", "_"),
            f"Segment{i}_Name": cls["name"],
            f"Segment{i}_NameAutoGenerated": "0",
            f"Segment{i}_Color": _fmt(c / 255.0 for c in cls["color"]),
            f"Segment{i}_ColorAutoGenerated": "0",
            f"Segment{i}_Tags": (f"TerminologyEntry:{tag}|" if tag else "") + extra_tags,
            f"Segment{i}_LabelValue": str(int(cls["value"])),
            f"Segment{i}_Layer": "0",
            f"Segment{i}_Extent": _extent(labels == cls["value"]),
        })
    header.update(fields or {})
    for key, value in header.items():
        if isinstance(value, str) and not value.isascii():  # pynrrd writes headers in ASCII only
            raise LtudaError(f"cannot be written: the header field {key} is not plain ASCII text ({value[:60]!r})",
                             path, "Use class names and terminology codes in plain ASCII (model.json / dataset.json).")
    with _atomic_path(path, ".seg.nrrd", "segmentation", labels.nbytes) as tmp:
        # Level 1: label maps compress almost as well as at 9, several times faster.
        nrrd.write(str(tmp), labels, header, index_order="C", compression_level=1)
    return path


def write_label_map(path, labels, reference: sitk.Image) -> Path:
    """Write labels (z, y, x) as a plain compressed label map on `reference`'s grid (.nrrd, .nii.gz, .mha...)."""
    path = Path(path)
    lower = path.name.lower()
    if lower.endswith((".mhd", ".nhdr")):
        # A detached header names its data file, which a rename would break: keep outputs single-file.
        raise LtudaError("detached-header formats (.mhd, .nhdr) are not written", path,
                         "Use a single-file format: .nrrd, .nii.gz or .mha.")
    suffix = next((s for s in VOLUME_SUFFIXES if lower.endswith(s)), path.suffix)
    image = sitk.GetImageFromArray(_check_shape(labels, reference))
    image.CopyInformation(reference)
    try:
        with _atomic_path(path, suffix, "label map", labels.nbytes, check_space=True) as tmp:
            with itk_path(tmp) as safe:
                sitk.WriteImage(image, safe, useCompression=True)
    except RuntimeError as exc:  # neither a full disk nor a read-only folder
        raise LtudaError(f"cannot be written ({str(exc).strip().splitlines()[-1]})", path,
                         "Use a .nrrd, .nii.gz or .mha file name in a writable folder.") from None
    return path
