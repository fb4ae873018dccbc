"""Reading volumes and segmentations, writing .seg.nrrd and label maps: checked with real files and real tools
(SimpleITK, pynrrd, slicerio, and a headless 3D Slicer MRML scene from slicer-core)."""

import math
import os
import sys
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from ltuda.errors import LtudaError
from ltuda.io.segnrrd import write_label_map, write_seg_nrrd
from ltuda.io.volumes import (
    is_dicom_folder, list_volumes, on_grid_of, read_image, read_segmentation, same_geometry, volume_stem,
)
from ltuda.terminology import default_classes, organ_class

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fuzz import write_dicom_series  # noqa: E402  (the fuzzer's seed series: one writer for both)

IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)
LPS_FLIPPED = (-1, 0, 0, 0, -1, 0, 0, 0, 1)  # what a RAS-stored scan looks like in ITK's LPS space


def _oblique():
    a, b = math.radians(20), math.radians(-10)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple((rz @ rx).flatten())


OBLIQUE = _oblique()


def make_image(size=(20, 16, 12), spacing=(0.8, 0.9, 2.5), origin=(10.0, -20.0, 30.0), direction=IDENTITY, seed=0):
    """A random int16 CT-like volume; `size` is (x, y, z) as in SimpleITK."""
    array = np.random.default_rng(seed).integers(-1000, 1000, size[::-1]).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def make_labels(shape=(12, 16, 20)):
    """Class values: liver box, kidney box, spleen box overlapping nothing; pancreas left empty."""
    labels = np.zeros(shape, np.uint8)
    labels[2:6, 3:9, 4:12] = 1
    labels[7:9, 10:13, 1:4] = 2
    labels[8:10, 2:5, 14:18] = 3
    return labels


def ijk_to_lps(image):
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


# --- volumes -------------------------------------------------------------------------------------


def test_volume_stem(tmp_path):
    assert volume_stem("x/a.seg.nrrd") == "a"
    assert volume_stem("ct.nii.gz") == "ct"
    assert volume_stem("CT.NII.GZ") == "CT"
    assert volume_stem("scan.v2.mha") == "scan.v2"
    assert volume_stem("b.nii") == "b"
    (tmp_path / "series1").mkdir()
    assert volume_stem(tmp_path / "series1") == "series1"


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("direction", [IDENTITY, LPS_FLIPPED, OBLIQUE], ids=["identity", "flipped", "oblique"])
def test_round_trip(tmp_path, suffix, direction):
    image = make_image(direction=direction)
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(path), useCompression=True)
    read = read_image(path)
    assert read.GetDimension() == 3 and same_geometry(read, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))


def test_dicom_series(tmp_path):
    image = make_image(size=(16, 12, 6), spacing=(0.7, 0.7, 3.0), direction=LPS_FLIPPED)
    folder = write_dicom_series(image, tmp_path / "series")
    assert is_dicom_folder(folder) and not is_dicom_folder(tmp_path / "series" / "slice000.dcm")
    read = read_image(folder)
    assert read.GetSize() == image.GetSize()
    assert same_geometry(read, image, tol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))


def test_real_dicom_series(real_ct):
    folder = real_ct / "example_ct_dicom"
    if not folder.is_dir():
        pytest.skip(f"{folder} not available")
    image = read_image(folder)
    assert image.GetSize() == (512, 512, 20) and image.GetPixelID() in (sitk.sitkInt16, sitk.sitkFloat64, sitk.sitkFloat32)
    assert volume_stem(folder) == "example_ct_dicom"
    # Its organ mask is the same grid stored LAS: not the same geometry, but it lines up after reorienting.
    mask = read_image(real_ct / "example_ct_dicom_organs.nii.gz")
    assert not same_geometry(mask, image)
    aligned = on_grid_of(mask, image)
    assert aligned is not None and same_geometry(aligned, image)
    flipped = sitk.GetArrayFromImage(mask)[:, ::-1, :]  # LAS -> LPS flips the rows (y)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(aligned), flipped)


def test_list_volumes(tmp_path):
    for name in ("b.nii.gz", "a.nrrd", "c.mha", "seg.seg.nrrd", ".hidden.nrrd"):
        sitk.WriteImage(make_image(size=(4, 4, 3)), str(tmp_path / name))
    (tmp_path / "notes.txt").write_text("not a volume")
    (tmp_path / "empty").mkdir()
    write_dicom_series(make_image(size=(4, 4, 3)), tmp_path / "dicom")
    assert [p.name for p in list_volumes(tmp_path)] == ["a.nrrd", "b.nii.gz", "c.mha", "dicom"]
    assert "seg.seg.nrrd" in [p.name for p in list_volumes(tmp_path, include_segmentations=True)]
    with pytest.raises(LtudaError, match="missing"):
        list_volumes(tmp_path / "missing")


def test_on_grid_of():
    image = make_image()
    flipped = sitk.Flip(image, [True, False, True])  # same voxels and grid, stored with x and z reversed
    assert not same_geometry(flipped, image)
    aligned = on_grid_of(flipped, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(aligned), sitk.GetArrayFromImage(image))
    assert on_grid_of(make_image(spacing=(1, 1, 1)), image) is None


def test_same_geometry():
    image = make_image()
    assert same_geometry(image, make_image(seed=1))
    assert not same_geometry(image, make_image(size=(20, 16, 11)))
    assert not same_geometry(image, make_image(spacing=(0.8, 0.9, 2.6)))
    assert not same_geometry(image, make_image(origin=(10.0, -20.0, 31.0)))
    assert not same_geometry(image, make_image(direction=LPS_FLIPPED))


def _expect_error(path, *words):
    with pytest.raises(LtudaError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message
    assert "Traceback" not in message
    return message


def test_read_errors(tmp_path):
    _expect_error(tmp_path / "missing.nii.gz", "not found")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b this is not a gzip stream" * 10)
    _expect_error(corrupt, "cannot be read")
    truncated = tmp_path / "truncated.nrrd"
    sitk.WriteImage(make_image(), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:600])
    _expect_error(truncated, "cannot be read")
    flat = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(flat))
    _expect_error(flat, "2D")
    series = tmp_path / "series4d.nrrd"
    sitk.WriteImage(sitk.JoinSeries([make_image(size=(4, 4, 3))] * 3), str(series))
    _expect_error(series, "4D")
    rgb = tmp_path / "vector.nrrd"
    sitk.WriteImage(sitk.Image([4, 4, 3], sitk.sitkVectorFloat32, 3), str(rgb))
    _expect_error(rgb, "3 values per voxel")
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    _expect_error(folder, "DICOM")


def test_single_frame_4d_is_squeezed(tmp_path):
    path = tmp_path / "one_frame.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([make_image(size=(4, 5, 3))]), str(path))
    image = read_image(path)
    assert image.GetSize() == (4, 5, 3)


# --- writing ----------------------------------------------------------------------------------------


def _segment_ids(classes):
    return [c["name"].replace(" ", "_") for c in classes]


@pytest.mark.parametrize("direction", [IDENTITY, LPS_FLIPPED, OBLIQUE], ids=["identity", "flipped", "oblique"])
def test_seg_nrrd_with_slicerio(tmp_path, direction):
    slicerio = pytest.importorskip("slicerio")
    reference = make_image(direction=direction)
    labels = make_labels()
    classes = default_classes() + [organ_class("inferior vena cava", 5)]
    path = write_seg_nrrd(tmp_path / "case.seg.nrrd", labels, reference, classes)
    assert sorted(os.listdir(tmp_path)) == ["case.seg.nrrd"]  # no temporary file left behind

    seg = slicerio.read_segmentation(str(path))
    np.testing.assert_allclose(seg["ijkToLPS"], ijk_to_lps(reference), atol=1e-6)
    np.testing.assert_array_equal(seg["voxels"], labels.transpose(2, 1, 0))  # slicerio: (i, j, k)
    segments = seg["segments"]
    assert [s["name"] for s in segments] == [c["name"] for c in classes]
    assert [s["id"] for s in segments] == _segment_ids(classes)
    for s, cls in zip(segments, classes):
        assert s["labelValue"] == cls["value"] and s["layer"] == 0
        np.testing.assert_allclose(np.array(s["color"]) * 255, cls["color"], atol=1e-3)
        assert s["terminology"]["type"] == cls["terminology"]["type"]
        assert s["terminology"]["category"] == cls["terminology"]["category"]
    pancreas = segments[3]
    assert pancreas["extent"] == [0, -1, 0, -1, 0, -1]  # empty, still listed
    assert segments[0]["extent"] == [4, 11, 3, 8, 2, 5]


@pytest.mark.parametrize("direction", [IDENTITY, LPS_FLIPPED, OBLIQUE], ids=["identity", "flipped", "oblique"])
def test_seg_nrrd_in_slicer(tmp_path, direction):
    slicer = pytest.importorskip("slicer")
    import vtk

    reference = make_image(direction=direction)
    labels = make_labels()
    classes = default_classes()
    path = write_seg_nrrd(tmp_path / "case.seg.nrrd", labels, reference, classes)

    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    assert ids == _segment_ids(classes)
    for segment_id, cls in zip(ids, classes):
        segment = segmentation.GetSegment(segment_id)
        assert segment.GetName() == cls["name"]
        np.testing.assert_allclose(np.array(segment.GetColor()) * 255, cls["color"], atol=1e-3)
        tag = vtk.reference("")
        assert segment.GetTag("TerminologyEntry", tag)
        assert f"SCT^{cls['terminology']['type'][1]}^" in str(tag)

    # Export every segment on the segmentation's own reference geometry, as Slicer's "Export to labelmap" does.
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(labelmap)
    exported = vtk.vtkStringArray()
    for segment_id in ids:
        exported.InsertNextValue(segment_id)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.ExportSegmentsToLabelmapNode(node, exported, labelmap, None, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(labelmap), labels)  # segment i exported as value i
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetIJKToRASMatrix(matrix)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps(reference)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), ras, atol=1e-5)

    empty = slicer.vtkOrientedImageData()
    node.GetBinaryLabelmapRepresentation("pancreas", empty)
    assert empty.GetScalarRange()[1] == 0 or empty.GetNumberOfPoints() == 0


@pytest.mark.parametrize("direction", [IDENTITY, LPS_FLIPPED, OBLIQUE], ids=["identity", "flipped", "oblique"])
def test_read_segmentation_of_written_file(tmp_path, direction):
    reference = make_image(direction=direction)
    labels = make_labels()
    classes = default_classes()
    image, segments = read_segmentation(write_seg_nrrd(tmp_path / "a.seg.nrrd", labels, reference, classes))
    assert same_geometry(image, reference, tol=1e-6)
    assert image.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)  # segment k is class k here
    assert [s["index"] for s in segments] == [1, 2, 3, 4]
    assert [s["name"] for s in segments] == [c["name"] for c in classes]
    assert segments[0]["color"] == classes[0]["color"]
    assert "SCT^10200004^Liver" in segments[0]["terminology_tag"]


def test_read_multi_layer_segmentation(tmp_path):
    """A 4D (layer, i, j, k) file in RAS space with overlapping segments, as Slicer writes them."""
    data = np.zeros((2, 6, 5, 4), np.uint8)  # NRRD axis order: layer fastest, then i, j, k
    data[0, 1:4, 1:3, 0:2] = 1  # segment "a", layer 0
    data[0, 4:6, 3:5, 2:4] = 2  # segment "b", layer 0
    data[1, 2:5, 2:4, 1:3] = 1  # segment "c", layer 1: overlaps "a" and "b"
    directions = np.array([[np.nan] * 3, [-0.5, 0, 0], [0, 0, 0.7], [0, -2.0, 0]])  # RAS steps of i, j, k
    header = {
        "type": "uint8", "dimension": 4, "space": "right-anterior-superior", "sizes": list(data.shape),
        "space directions": directions, "kinds": ["list", "domain", "domain", "domain"], "encoding": "gzip",
        "space origin": np.array([5.0, -6.0, 7.0]),
    }
    for i, (name, layer, value, color) in enumerate([("a", 0, 1, "1 0 0"), ("b", 0, 2, "0 1 0"),
                                                     ("c", 1, 1, "0 0 1"), ("empty", 1, 2, "0.5 0.5 0.5")]):
        header.update({f"Segment{i}_ID": f"Segment_{i}", f"Segment{i}_Name": name, f"Segment{i}_Layer": str(layer),
                       f"Segment{i}_LabelValue": str(value), f"Segment{i}_Color": color,
                       f"Segment{i}_Tags": "Segmentation.Status:inprogress|"})
    path = tmp_path / "layers.seg.nrrd"
    nrrd.write(str(path), data, header)

    image, segments = read_segmentation(path)
    assert [s["name"] for s in segments] == ["a", "b", "c", "empty"]
    assert segments[2]["color"] == [0, 0, 255] and segments[3]["terminology_tag"] == ""
    assert image.GetSize() == (6, 5, 4)
    np.testing.assert_allclose(image.GetSpacing(), (0.5, 0.7, 2.0))
    np.testing.assert_allclose(image.GetOrigin(), (-5.0, 6.0, 7.0))  # RAS -> LPS
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), [[1, 0, 0], [0, 0, 1], [0, 1, 0]], atol=1e-12)
    expected = np.zeros((6, 5, 4), np.uint8)
    expected[1:4, 1:3, 0:2] = 1
    expected[4:6, 3:5, 2:4] = 2
    expected[2:5, 2:4, 1:3] = 3  # the later segment wins where they overlap
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected.transpose(2, 1, 0))
    # Physical points agree: voxel (1, 2, 3) of the file sits at origin + i*di + j*dj + k*dk (RAS).
    ras = np.array([5.0, -6.0, 7.0]) + 1 * directions[1] + 2 * directions[2] + 3 * directions[3]
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((1, 2, 3)), ras * [-1, -1, 1])


def test_read_cropped_slicer_segmentation(tmp_path):
    """Slicer can save only the box around the segments; it is padded back to the reference grid."""
    slicer = pytest.importorskip("slicer")
    from vtk.util import numpy_support

    reference = make_image(direction=LPS_FLIPPED)
    labels = np.zeros((12, 16, 20), np.uint8)
    labels[3:5, 4:7, 5:9] = 1
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    geometry = slicer.vtkOrientedImageData()
    geometry.SetDimensions(*reference.GetSize())
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps(reference)
    geometry.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ras))
    geometry.AllocateScalars(3, 1)  # VTK_UNSIGNED_CHAR
    geometry.GetPointData().GetScalars().DeepCopy(numpy_support.numpy_to_vtk(labels.ravel(), deep=True))
    segment = slicer.vtkSegment()
    segment.SetName("liver")
    segment.AddRepresentation("Binary labelmap", geometry)
    node.GetSegmentation().AddSegment(segment, "liver")
    node.GetSegmentation().SetConversionParameter(
        "Reference image geometry", slicer.vtkSegmentationConverter.SerializeImageGeometry(geometry))
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetCropToMinimumExtent(True)
    path = tmp_path / "cropped.seg.nrrd"
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    assert nrrd.read_header(str(path))["sizes"].tolist() == [4, 3, 2]  # Slicer did crop

    image, segments = read_segmentation(path)
    assert same_geometry(image, reference, tol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    assert [s["name"] for s in segments] == ["liver"]


def test_read_segmentation_errors(tmp_path):
    with pytest.raises(LtudaError, match="not found"):
        read_segmentation(tmp_path / "missing.seg.nrrd")
    bad = tmp_path / "bad.seg.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: what\n\n")
    with pytest.raises(LtudaError) as info:
        read_segmentation(bad)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_write_label_map(tmp_path, suffix):
    reference = make_image(direction=OBLIQUE)
    labels = make_labels()
    path = tmp_path / f"labels{suffix}"
    path.write_text("old content")  # replaced atomically
    write_label_map(path, labels, reference)
    assert sorted(os.listdir(tmp_path)) == [path.name]
    image = read_image(path)
    assert same_geometry(image, reference, tol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)


def test_write_label_map_refuses_detached_header(tmp_path):
    with pytest.raises(LtudaError, match="single-file"):
        write_label_map(tmp_path / "labels.mhd", make_labels(), make_image())
    assert not list(tmp_path.iterdir())


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    import ltuda.io.segnrrd as segnrrd

    target = tmp_path / "x.seg.nrrd"
    target.write_text("previous result")

    def crash(filename, *args, **kwargs):  # a disk that fills up half-way through the write
        open(filename, "wb").write(b"NRRD0004\ntype: uint8\n")
        raise OSError("No space left on device")

    monkeypatch.setattr(segnrrd.nrrd, "write", crash)
    with pytest.raises(OSError):
        write_seg_nrrd(target, make_labels(), make_image(), default_classes())
    assert sorted(os.listdir(tmp_path)) == ["x.seg.nrrd"] and target.read_text() == "previous result"
    with pytest.raises(ValueError, match="shape"):
        write_seg_nrrd(target, np.zeros((3, 3, 3), np.uint8), make_image(), default_classes())
