"""Reading volumes: CT images (NIfTI, NRRD, MHA/MHD, DICOM series folders) and Slicer `.seg.nrrd` files.

Every image comes back as a 3D scalar SimpleITK image in LPS physical space (as ITK always uses), and
every bad input raises an LtudaError naming the file and how to fix it.
"""

import gzip
import os
import re
import shutil
import struct
import zlib
import tempfile
from contextlib import contextmanager
from pathlib import Path

import nrrd
import numpy as np
import SimpleITK as sitk

from ..errors import LtudaError

# Longest first where one ends another (".seg.nrrd" before ".nrrd", ".nii.gz" before ".nii").
VOLUME_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SEG_SUFFIX = ".seg.nrrd"

_READ_FIX = "Pass a 3D volume (.nii.gz, .nii, .nrrd, .mha) or a folder holding one DICOM series; re-export the file if it is damaged."

# Coordinates of NRRD spaces in LPS (ITK's physical space): RAS flips the first two axes.
_SPACE_TO_LPS = {
    "left-posterior-superior": np.diag([1.0, 1.0, 1.0]),
    "lps": np.diag([1.0, 1.0, 1.0]),
    "right-anterior-superior": np.diag([-1.0, -1.0, 1.0]),
    "ras": np.diag([-1.0, -1.0, 1.0]),
}


def volume_stem(path) -> str:
    """File name without its volume suffix ("a.seg.nrrd" -> "a", "ct.nii.gz" -> "ct"); a folder's name."""
    path = Path(path)
    if path.is_dir():
        return path.name
    lower = path.name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


@contextmanager
def itk_path(path):
    """`path` as a str SimpleITK can take. SimpleITK aborts the whole process (a C++ std::logic_error) on
    a name that is not valid UTF-8, which Linux file names may be: such a path is reached through a
    symlink with a plain name (same suffix, so ITK picks the same format) in a temporary folder."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        yield text
        return
    lower = Path(path).name.lower()
    suffix = next((s for s in VOLUME_SUFFIXES if lower.endswith(s)), Path(path).suffix)
    suffix = suffix if suffix.isascii() and suffix.isprintable() else ""
    folder = tempfile.mkdtemp(prefix="ltuda-path-")
    link = os.path.join(folder, "file" + suffix)
    os.symlink(os.path.abspath(text), link)
    try:
        yield link
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # removes the link, never its target


def is_seg_nrrd(path) -> bool:
    return Path(path).name.lower().endswith(SEG_SUFFIX)


def _dicom_series(folder: Path) -> list:
    """File names of each DICOM series directly in `folder`, largest series first."""
    # ITK warns "No Series were found" on every non-DICOM folder: expected here, so keep stderr quiet.
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    with itk_path(folder) as safe:
        try:
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(safe)
            series = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(safe, sid) for sid in ids]
        except RuntimeError:
            return []
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
    # Names come back under `safe`, which is gone now: put the real folder back in front.
    series = [[os.path.join(str(folder), os.path.basename(name)) for name in names] for names in series]
    return sorted(series, key=len, reverse=True)


def is_dicom_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and bool(_dicom_series(path))


def list_volumes(folder, include_segmentations: bool = False) -> list:
    """Volume files and DICOM-series subfolders directly inside `folder`, sorted by name.

    `.seg.nrrd` files are segmentations, not images: listed only with `include_segmentations`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LtudaError("folder not found", folder, "Pass an existing folder of volumes.")
    found = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if is_dicom_folder(entry):
                found.append(entry)
        elif entry.name.lower().endswith(VOLUME_SUFFIXES):
            if include_segmentations or not is_seg_nrrd(entry):
                found.append(entry)
    return found


def _itk_reason(exc: Exception) -> str:
    """The useful last line of an ITK exception, without source locations and object addresses."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1] if lines else "unknown error"
    reason = re.sub(r"^(sitk|itk)::ERROR:\s*", "", reason)
    return re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", reason)


def _as_3d_scalar(image: sitk.Image, path) -> sitk.Image:
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        raise LtudaError(
            f"has {components} values per voxel (a colour, vector, multi-channel or 4D image), not a 3D scalar volume",
            path, "Export a single-channel 3D CT volume.",
        )
    if "vector" in image.GetPixelIDTypeAsString():
        image = sitk.VectorIndexSelectionCast(image, 0)
    size = list(image.GetSize())
    if image.GetDimension() == 4 and size[3] == 1:  # a 3D volume stored as one time point
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    if image.GetDimension() != 3:
        raise LtudaError(
            f"is a {image.GetDimension()}D image of size {tuple(size)}, not a 3D volume", path,
            "Pass a 3D CT volume (for a time series, export the one frame to segment).",
        )
    _check_geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection(), path, _READ_FIX)
    return image


def _check_geometry(spacing, origin, direction, path, fix):
    """A voxel grid that can be placed in space: positive finite spacing, finite origin, invertible axes.
    (ITK accepts a NaN direction from a damaged header, and everything after it would be wrong.)"""
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    if not (np.all(np.isfinite(spacing)) and np.all(np.asarray(spacing) > 0)):
        raise LtudaError(f"has an invalid voxel spacing {tuple(round(float(v), 6) for v in spacing)}", path, fix)
    if not (np.all(np.isfinite(origin)) and np.all(np.isfinite(direction))) or abs(np.linalg.det(direction)) < 1e-6:
        raise LtudaError("has an invalid position or orientation (origin or direction) in its header", path, fix)


# Every field name teem's NRRD reader knows. ITK hands a header to teem, which crashes the process on
# some long unknown lines: headers are checked here first, and anything else is refused in our words.
_NRRD_FIELDS = {
    "dimension", "type", "sizes", "spacings", "thicknesses", "axis mins", "axismins", "axis maxs", "axismaxs",
    "centers", "centerings", "labels", "units", "kinds", "min", "max", "old min", "oldmin", "old max", "oldmax",
    "endian", "encoding", "line skip", "lineskip", "byte skip", "byteskip", "content", "sample units",
    "sampleunits", "data file", "datafile", "space", "space dimension", "space units", "space origin",
    "space directions", "measurement frame", "block size", "blocksize", "number",
}
_MAX_HEADER_LINE = 4096


def _check_nrrd_header(path: Path):
    """Refuse a NRRD header ITK/teem could choke on: unknown fields, overlong lines, no end of header."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if not head.startswith(b"NRRD000"):
        raise LtudaError("is not a NRRD file (it does not start with NRRD000x)", path, _READ_FIX)
    end = head.find(b"\n\n")
    if end < 0 and not path.name.lower().endswith(".nhdr"):
        raise LtudaError("has a NRRD header without an end (no blank line within 1 MB)", path, _READ_FIX)
    for number, line in enumerate(head[:end if end >= 0 else len(head)].split(b"\n")[1:], start=2):
        line = line.rstrip(b"\r")
        if not line or line.startswith(b"#"):
            continue
        if len(line) > _MAX_HEADER_LINE:
            raise LtudaError(f"has a NRRD header line {number} of {len(line)} characters", path, _READ_FIX)
        if b":=" in line:  # key/value pair: free text, teem keeps it
            continue
        field, sep, _ = line.partition(b": ")
        if not sep or field.decode("latin-1").lower() not in _NRRD_FIELDS:
            shown = line[:60].decode("utf-8", "replace")
            raise LtudaError(f"has an unknown NRRD header line {number} ('{shown}')", path, _READ_FIX)


_MET_TYPES = {f"MET_{t}" for t in ("CHAR", "UCHAR", "SHORT", "USHORT", "INT", "UINT", "LONG", "ULONG", "LONG_LONG",
                                    "ULONG_LONG", "FLOAT", "DOUBLE")}
_MET_TYPES |= {f"{t}_ARRAY" for t in _MET_TYPES}


def _check_meta_header(path: Path):
    """Refuse a MetaImage (.mha/.mhd) header that ITK's MetaIO could crash on (absurd NDims, counts that do
    not match it, non-numbers), before handing the file over."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    fields = {}
    for line in head.split(b"\n"):
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            continue
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    if "ElementDataFile" not in fields:
        raise LtudaError("is not a MetaImage file (no ElementDataFile line in its header)", path, _READ_FIX)

    def numbers(key, count, kind=float):
        try:
            values = [kind(v) for v in fields[key].split()]
        except ValueError:
            values = []
        if len(values) != count or not all(np.isfinite(values)):
            raise LtudaError(f"has an invalid MetaImage header field {key} ('{fields[key][:40]}')", path, _READ_FIX)
        return values

    ndims = numbers("NDims", 1, int)[0] if "NDims" in fields else -1
    if not 1 <= ndims <= 5:
        raise LtudaError(f"has an invalid MetaImage NDims ('{fields.get('NDims', '')[:40]}')", path, _READ_FIX)
    if "DimSize" not in fields or min(numbers("DimSize", ndims, int)) < 1:
        raise LtudaError("has an invalid MetaImage DimSize", path, _READ_FIX)
    for key, count in (("ElementSpacing", ndims), ("ElementSize", ndims), ("Offset", ndims), ("Position", ndims),
                       ("Origin", ndims), ("CenterOfRotation", ndims), ("TransformMatrix", ndims * ndims),
                       ("Rotation", ndims * ndims), ("Orientation", ndims * ndims)):
        if key in fields:
            numbers(key, count)
    for key in ("ElementNumberOfChannels", "CompressedDataSize", "HeaderSize"):
        if key in fields and not -1 <= numbers(key, 1, int)[0] < 2**62:
            raise LtudaError(f"has an invalid MetaImage header field {key}", path, _READ_FIX)
    if fields.get("ElementType") not in _MET_TYPES:
        raise LtudaError(f"has an unknown MetaImage ElementType ('{fields.get('ElementType', '')[:40]}')", path,
                         _READ_FIX)


def _check_nifti_length(path: Path):
    """Refuse a NIfTI file whose voxel data is shorter than its header says: ITK pads the missing part with
    zeros and reports nothing, which would be silently wrong data."""
    gz = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            header = f.read(352)
        if gz:  # the gzip trailer holds the data's length (mod 2**32)
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                available = struct.unpack("<I", f.read(4))[0]
        else:
            available = path.stat().st_size
    except (OSError, EOFError, zlib.error, struct.error):
        return  # unreadable: ITK's own message follows
    if len(header) < 348:
        return
    for endian in "<>":
        if struct.unpack_from(endian + "i", header, 0)[0] == 348:
            break
    else:
        return  # NIfTI-2 or not NIfTI: left to ITK
    dims = struct.unpack_from(endian + "8h", header, 40)
    bitpix = struct.unpack_from(endian + "h", header, 72)[0]
    offset = struct.unpack_from(endian + "f", header, 108)[0]
    if not (1 <= dims[0] <= 7) or any(n < 1 for n in dims[1:dims[0] + 1]) or bitpix <= 0 or not offset >= 0:
        return  # ITK refuses these itself
    expected = int(offset) + int(np.prod([int(n) for n in dims[1:dims[0] + 1]], dtype=object)) * bitpix // 8
    if gz and expected >= 2**32:
        return  # the trailer wraps: cannot tell
    if available < expected:
        raise LtudaError(f"is incomplete: its header promises {expected} bytes of data, the file holds {available}",
                         path, _READ_FIX)


class ImageHeader:
    """What a volume's header promises, read without its voxels: size (x, y, z...) and bytes per voxel."""

    def __init__(self, size, bytes_per_voxel: int, files: list):
        self.size, self.bytes_per_voxel, self.files = tuple(int(n) for n in size), int(bytes_per_voxel), files

    @property
    def voxels(self) -> int:
        return int(np.prod(self.size, dtype=object))

    @property
    def nbytes(self) -> int:
        return self.voxels * self.bytes_per_voxel


def read_header(path) -> ImageHeader:
    """The header of a volume file or of a DICOM series folder's largest series (LtudaError if unreadable)."""
    path = Path(path)
    if not path.exists():
        raise LtudaError("file not found", path, "Check the path.")
    if path.is_dir():
        files = _dicom_series(path)
        if not files:
            raise LtudaError("is a folder without a DICOM series", path, _READ_FIX)
        files = files[0]
    else:
        files = [str(path)]
        lower = path.name.lower()
        if lower.endswith((".nrrd", ".nhdr")):
            _check_nrrd_header(path)
        elif lower.endswith((".nii", ".nii.gz")):
            _check_nifti_length(path)
        elif lower.endswith((".mha", ".mhd")):
            _check_meta_header(path)
    reader = sitk.ImageFileReader()
    with itk_path(files[0]) as safe:
        reader.SetFileName(safe)
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise LtudaError(f"cannot be read as an image ({_itk_reason(exc)})", path, _READ_FIX) from None
    size = list(reader.GetSize())
    if len(files) > 1:  # a series: one slice per file
        size = size[:2] + [len(files)]
    if any(n < 1 for n in size):
        raise LtudaError(f"has an empty size {tuple(size)} in its header", path, _READ_FIX)
    try:  # a 1x1 image of the file's pixel type knows its component size
        component = sitk.Image([1, 1], reader.GetPixelID(), reader.GetNumberOfComponents()).GetSizeOfPixelComponent()
    except RuntimeError:
        component = 8
    bytes_per_voxel = component * max(1, reader.GetNumberOfComponents())
    return ImageHeader(size, bytes_per_voxel, files)


def read_image(path) -> sitk.Image:
    """A 3D scalar image from a volume file or a DICOM series folder (the largest series if several).

    The header is read first: a volume larger than the memory available (often a damaged header
    with absurd sizes) is refused with its size, instead of being allocated.
    """
    from ..memory import check_fits  # here: memory.py imports errors only, volumes must stay importable alone

    path = Path(path)
    header = read_header(path)
    check_fits(header.nbytes, f"reading this {' x '.join(map(str, header.size))} volume", path,
               "Check that the file is not damaged (its header gives this size), or use a machine with more memory.")
    with itk_path(path) as safe:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames([os.path.join(safe, os.path.basename(name)) for name in header.files])
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(safe)
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise LtudaError(f"cannot be read as an image ({_itk_reason(exc)})", path, _READ_FIX) from None
    return _as_3d_scalar(image, path)


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """Same voxel grid: size, spacing, origin and direction (relative tolerance for large coordinates)."""
    if a.GetSize() != b.GetSize():
        return False
    return all(
        np.allclose(x, y, rtol=tol, atol=tol)
        for x, y in ((a.GetSpacing(), b.GetSpacing()), (a.GetOrigin(), b.GetOrigin()), (a.GetDirection(), b.GetDirection()))
    )


def on_grid_of(image: sitk.Image, reference: sitk.Image, tol: float = 1e-4):
    """`image` on `reference`'s voxel grid when both are the same grid stored with other axis flips or order
    (e.g. a mask saved LAS for an LPS scan): reoriented, never resampled. None when the grids differ."""
    if same_geometry(image, reference, tol):
        return image
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reference.GetDirection())
    try:
        reoriented = sitk.DICOMOrient(image, orientation)
    except RuntimeError:
        return None
    return reoriented if same_geometry(reoriented, reference, tol) else None


def _reference_padding(header: dict, shape_ijk, ijk_to_lps: np.ndarray):
    """(pad before, pad after, full-grid origin) in IJK that restores the grid Slicer cropped on save, or None.

    Slicer may save only the box around the segments (offset "Segmentation_ReferenceImageExtentOffset"
    within the full grid); the "Reference image geometry" conversion parameter keeps the full grid, i.e.
    the image it was drawn on. Padding back makes the labels line up voxel-for-voxel with that image.
    """
    geometry = None
    for param in header.get("Segmentation_ConversionParameters", "").split("&"):
        name, _, rest = param.partition("|")
        if name == "Reference image geometry":
            geometry = rest.split("|")[0]
    try:
        values = [float(v) for v in geometry.split(";") if v.strip()]
        offset = np.array([int(v) for v in header.get("Segmentation_ReferenceImageExtentOffset", "0 0 0").split()])
    except (AttributeError, ValueError):
        return None
    if len(values) != 22 or offset.shape != (3,):
        return None
    reference = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.array(values[:16]).reshape(4, 4)  # IJK -> RAS, made LPS
    extent = np.array(values[16:], dtype=int).reshape(3, 2)
    file_origin = reference @ np.append(offset, 1.0)
    if not (np.allclose(reference[:3, :3], ijk_to_lps[:3, :3], atol=1e-4)
            and np.allclose(file_origin[:3], ijk_to_lps[:3, 3], atol=1e-3)):
        return None
    before = offset - extent[:, 0]
    after = extent[:, 1] - (offset + np.asarray(shape_ijk) - 1)
    if (before < 0).any() or (after < 0).any() or not (before.any() or after.any()):
        return None
    return before, after, (reference @ np.append(extent[:, 0], 1.0))[:3]


def _segment_fields(header: dict, i: int) -> dict:
    return {key[len(f"Segment{i}_"):]: value for key, value in header.items() if key.startswith(f"Segment{i}_")}


def _terminology_tag(tags: str) -> str:
    for tag in (tags or "").split("|"):
        key, _, value = tag.partition(":")
        if key == "TerminologyEntry":
            return value
    return ""


def read_segmentation(path):
    """A Slicer `.seg.nrrd` as (uint8 label image in LPS, segments).

    Voxel value k (1..N) is segment k of the list; segments are dicts {"index": k, "id", "name",
    "color": [r, g, b] 0-255, "terminology_tag"}, empty ones included. Overlapping segments (the 4D
    multi-layer form) are flattened: where they overlap, the later segment wins.
    """
    path = Path(path)
    if not path.is_file():
        raise LtudaError("file not found", path, "Check the path.")
    fix = "Re-save the segmentation from 3D Slicer as a .seg.nrrd file."
    try:
        data, header = nrrd.read(str(path), index_order="C")
    except Exception as exc:  # pynrrd raises many types (NRRDError, ValueError, zlib.error...) for damaged files
        raise LtudaError(f"cannot be read as a NRRD file ({exc})", path, fix) from None
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space not in _SPACE_TO_LPS:
        raise LtudaError(f"uses the NRRD space '{space}', which is not a patient space (LPS or RAS)", path, fix)
    to_lps = _SPACE_TO_LPS[space]
    directions = np.asarray(header.get("space directions", np.eye(data.ndim)), dtype=float)
    if data.ndim == 4:  # [z, y, x, layer]: the layer axis is the first (fastest) NRRD axis
        data, directions = np.moveaxis(data, -1, 0), directions[1:]
    elif data.ndim == 3:
        data = data[None]
    else:
        raise LtudaError(f"is a {data.ndim}D NRRD file, not a 3D segmentation", path, fix)
    if directions.shape != (3, 3) or not np.isfinite(directions).all():
        raise LtudaError("has no valid 'space directions' for its three spatial axes", path, fix)
    axes = directions @ to_lps  # row i: step of voxel axis i in LPS (to_lps is diagonal)
    spacing = np.linalg.norm(axes, axis=1)
    try:
        origin = to_lps @ np.asarray(header.get("space origin", np.zeros(3)), dtype=float).reshape(3)
    except (TypeError, ValueError):
        raise LtudaError("has no valid 'space origin'", path, fix) from None
    _check_geometry(spacing, origin, (axes / np.where(spacing > 0, spacing, 1)[:, None]).T, path, fix)

    segments, layers_of, values_of = [], [], []
    i = 0
    while f"Segment{i}_ID" in header or f"Segment{i}_Name" in header:
        fields = _segment_fields(header, i)
        # Files from Slicer before 4.11 have no LabelValue/Layer: one binary layer per segment.
        try:
            layers_of.append(int(fields.get("Layer", i if data.shape[0] > 1 else 0)))
            values_of.append(int(fields.get("LabelValue", 1)))
        except (TypeError, ValueError):
            raise LtudaError(f"segment {i} has a Layer or LabelValue that is not a whole number", path, fix) from None
        try:
            color = [int(round(float(c) * 255)) for c in fields.get("Color", "").split()][:3]
        except (ValueError, OverflowError):
            color = []
        segments.append({
            "index": i + 1,
            "id": fields.get("ID", f"Segment_{i + 1}"),
            "name": fields.get("Name", fields.get("ID", f"Segment_{i + 1}")),
            "color": [min(255, max(0, c)) for c in color] if len(color) == 3 else [128, 128, 128],
            "terminology_tag": _terminology_tag(fields.get("Tags", "")),
        })
        i += 1
    if len(segments) > 255:
        raise LtudaError(f"has {len(segments)} segments; at most 255 are supported", path, "Remove unused segments.")

    labels = np.zeros(data.shape[1:], dtype=np.uint8)
    for seg, layer, value in zip(segments, layers_of, values_of):
        if not 0 <= layer < data.shape[0]:
            raise LtudaError(f"segment '{seg['name']}' is on layer {layer}, but the file has {data.shape[0]}", path, fix)
        labels[data[layer] == value] = seg["index"]

    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3], ijk_to_lps[:3, 3] = axes.T, origin
    padding = _reference_padding(header, labels.shape[::-1], ijk_to_lps)
    if padding is not None:
        before, after, origin = padding
        labels = np.pad(labels, list(zip(before[::-1], after[::-1])))

    image = sitk.GetImageFromArray(labels)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(origin.tolist())
    image.SetDirection((axes / spacing[:, None]).T.flatten().tolist())
    return image, segments
