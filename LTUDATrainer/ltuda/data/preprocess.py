"""Preprocessing as in the paper: HU window, axial slices in a canonical orientation, fixed slice size.

Volumes are reoriented to LPS (a pure axis permutation/flip, no resampling), so an axial slice of a
RAS, LPS or oblique scan looks the same to the network; predictions are oriented back onto the
input's own voxel grid, so they align with it exactly.
"""

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..errors import LtudaError
from ..io.volumes import on_grid_of, read_image, read_segmentation
from ..manifest import BACKGROUND, Case
from ..terminology import match_class

CANONICAL_ORIENTATION = "LPS"


@dataclass
class Preprocessing:
    hu_window: tuple = (-325.0, 325.0)
    image_size: int = 256
    orientation: str = CANONICAL_ORIENTATION

    def to_json(self) -> dict:
        return {"hu_window": list(self.hu_window), "image_size": self.image_size, "orientation": self.orientation}

    @classmethod
    def from_json(cls, doc: dict) -> "Preprocessing":
        return cls(tuple(doc["hu_window"]), int(doc["image_size"]), doc.get("orientation", CANONICAL_ORIENTATION))


def to_canonical(image: sitk.Image) -> sitk.Image:
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def from_canonical(labels: np.ndarray, reference: sitk.Image) -> np.ndarray:
    """Labels computed on the canonical grid of `reference`, back on reference's own voxel grid."""
    canonical = to_canonical(reference)
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(canonical)
    original = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reference.GetDirection())
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, original))


def canonical_axes(image: sitk.Image):
    """How `to_canonical` rearranges `image`'s (z, y, x) array: (order, flips) such that
    `oriented_view(array, order, flips)` equals `to_canonical(image)`'s array, without the copy.

    Found by orienting a small probe with the same direction and distinct axis lengths, so it is
    DICOMOrient's own choice (ties of oblique axes included), not a re-derivation of it.
    """
    probe_array = np.arange(2 * 3 * 5, dtype=np.int16).reshape(2, 3, 5)
    probe = sitk.GetImageFromArray(probe_array)
    probe.SetDirection(image.GetDirection())
    moved = sitk.GetArrayFromImage(to_canonical(probe))
    for order in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            if np.array_equal(oriented_view(probe_array, order, flips), moved):
                return order, flips
    raise AssertionError("DICOMOrient is not an axis permutation with flips")  # pragma: no cover


def oriented_view(array: np.ndarray, order, flips) -> np.ndarray:
    """`array` with its axes permuted by `order`, then flipped where `flips` says: a view, no copy."""
    view = array.transpose(order)
    return view[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]


def unoriented_view(array: np.ndarray, order, flips) -> np.ndarray:
    """The inverse of `oriented_view`: canonical-grid values back on the original grid (a view)."""
    view = array[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    return view.transpose(np.argsort(order))


def normalise_hu(volume: torch.Tensor, hu_window) -> torch.Tensor:
    """Clip to the window and map it to [-1, 1] (the paper: [-325, 325] HU, divided by 325)."""
    low, high = hu_window
    centre, half = (high + low) / 2.0, (high - low) / 2.0
    return (volume.clamp(low, high) - centre) / half


def resize_slices(slices: torch.Tensor, size, labels: bool = False) -> torch.Tensor:
    """[N, H, W] or [N, C, H, W] slices to `size`; nearest for labels, antialiased bilinear for images."""
    squeeze = slices.dim() == 3
    x = slices[:, None] if squeeze else slices
    size = (size, size) if isinstance(size, int) else tuple(size)
    if labels:
        out = F.interpolate(x.float(), size=size, mode="nearest").to(slices.dtype)
    else:
        shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        out = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    return out[:, 0] if squeeze else out


def check_image_values(array: np.ndarray, path, slab: int = 64) -> None:
    # Slab by slab: a whole-volume isfinite() mask alone is 1 byte per voxel (0.4 GB for a 1500-slice CT).
    if not np.issubdtype(array.dtype, np.integer):
        for start in range(0, array.shape[0], slab):
            if not np.isfinite(array[start:start + slab]).all():
                raise LtudaError("the image contains NaN or infinite values", path,
                                 "Re-export the volume from its source.")
    if float(array.max()) == float(array.min()):
        raise LtudaError(
            f"the image is constant ({float(array.min()):g} everywhere)", path,
            "Check that the right file is referenced; a blank volume cannot be segmented.",
        )


def _label_to_class_values(case: Case, classes, image: sitk.Image) -> np.ndarray:
    """The case's label file as an array of class values (0 = background or not labelled)."""
    name_to_value = {c["name"]: c["value"] for c in classes}
    if case.is_seg_nrrd():
        label_image, segments = read_segmentation(case.label)
        value_map = {}
        for seg in segments:
            cls = match_class(classes, seg["name"], seg.get("terminology_tag", ""))
            if cls is None:
                raise LtudaError(
                    f"segment '{seg['name']}' matches no class ({', '.join(name_to_value)})", case.label,
                    "Rename the segment to an organ name, set its terminology, or remove it.",
                )
            value_map[seg["index"]] = cls["name"]
    else:
        label_image = read_image(case.label)
        value_map = case.value_map
    on_image_grid = on_grid_of(label_image, image)  # a label stored with other axis flips is fine
    if on_image_grid is None:
        raise LtudaError(
            f"label geometry (size {label_image.GetSize()}, spacing {tuple(round(s, 4) for s in label_image.GetSpacing())}) "
            f"does not match the image {case.image.name} (size {image.GetSize()}, spacing "
            f"{tuple(round(s, 4) for s in image.GetSpacing())})",
            case.label, "Resample the label onto the image grid (e.g. Slicer's Resample Scalar/Vector/DWI Volume).",
        )
    raw = sitk.GetArrayFromImage(on_image_grid)
    values = np.unique(raw)
    undeclared = [int(v) for v in values if v != 0 and int(v) not in value_map]
    if undeclared:
        raise LtudaError(
            f"label value(s) {undeclared} are not declared in the manifest", case.label,
            "Map each value to a class or to \"background\" in the case's \"labels\".",
        )
    lut = np.zeros(int(values.max()) + 1 if values.size else 1, dtype=np.uint8)
    for value, target in value_map.items():
        if 0 <= value < lut.size and target != BACKGROUND:
            lut[value] = name_to_value[target]
    out = lut[raw]
    present = set(np.unique(out).tolist())
    for name in case.labeled:
        if name_to_value[name] not in present:
            raise LtudaError(
                f"the label is empty for '{name}', which the manifest says this case labels", case.label,
                f"Draw '{name}' in this case or remove it from the case's \"labeled\" list.",
            )
    unlabeled_painted = [n for n in name_to_value if n not in case.labeled and name_to_value[n] in present]
    if unlabeled_painted:
        raise LtudaError(
            f"the label contains {unlabeled_painted} but the manifest's \"labeled\" list does not name them",
            case.label, "Add them to \"labeled\" (then they must be complete) or map their values to \"background\".",
        )
    return out


@dataclass
class PreparedCase:
    """One case on the canonical grid, preprocessed: image in [-1, 1], labels as class values."""

    id: str
    image: np.ndarray  # float16 [Z, S, S]
    labels: np.ndarray  # uint8 [Z, S, S], class values; meaningful only for `labeled` classes
    labeled: list = field(default_factory=list)  # class values labelled in this case


def load_case(case: Case, classes, prep: Preprocessing, with_labels: bool = True) -> PreparedCase:
    """Read, check and preprocess one case (raises LtudaError naming the file on any problem)."""
    image = read_image(case.image)
    array = sitk.GetArrayViewFromImage(image)
    check_image_values(array, case.image)
    labels = None
    if with_labels and case.label is not None:
        labels = _label_to_class_values(case, classes, image)
    canonical = to_canonical(image)
    volume = torch.from_numpy(sitk.GetArrayFromImage(canonical).astype(np.float32))
    volume = resize_slices(normalise_hu(volume, prep.hu_window), prep.image_size)
    if labels is not None:
        label_image = sitk.GetImageFromArray(labels)
        label_image.CopyInformation(image)
        canon_labels = torch.from_numpy(sitk.GetArrayFromImage(to_canonical(label_image)))
        labels = resize_slices(canon_labels, prep.image_size, labels=True).numpy().astype(np.uint8)
    else:
        labels = np.zeros(volume.shape, dtype=np.uint8)
    value_of = {c["name"]: c["value"] for c in classes}
    return PreparedCase(case.id, volume.numpy().astype(np.float16), labels, [value_of[n] for n in case.labeled])


def foreground_slice_range(labels: np.ndarray, margin_fraction: float = 0.1):
    """Slices around the labelled foreground (the paper drops non-abdominal slices)."""
    rows = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    if rows.size == 0:
        return 0, labels.shape[0]
    margin = max(2, int(math.ceil(margin_fraction * labels.shape[0])))
    return max(0, int(rows[0]) - margin), min(labels.shape[0], int(rows[-1]) + margin + 1)
