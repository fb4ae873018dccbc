"""Bounded prediction memory (issue 14): slab-wise post-processing and copy-free reorientation give the same
result as the whole-volume operations, and a volume too big for memory is refused up front."""

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_ltuda
from ltuda.data.preprocess import canonical_axes, oriented_view, to_canonical, unoriented_view
from ltuda.predict import keep_largest_components
from ltuda.terminology import EXPECTED_COMPONENTS

# kidney: kept as two components (EXPECTED_COMPONENTS)
CLASSES = [{"name": "liver", "value": 1}, {"name": "kidney", "value": 2}, {"name": "spleen", "value": 3}]


def whole_volume_reference(labels, classes):
    """The whole-volume clean-up as predict did it before slabs: SimpleITK on the full volume at once."""
    out = np.zeros_like(labels)
    for cls in classes:
        mask = labels == cls["value"]
        if not mask.any():
            continue
        ranked = sitk.GetArrayFromImage(sitk.RelabelComponent(
            sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))), sortByObjectSize=True))
        count = EXPECTED_COMPONENTS.get(cls["name"].lower(), 1)
        out[(ranked > 0) & (ranked <= count)] = cls["value"]
    return out


def _volumes():
    rng = np.random.default_rng(0)
    for trial in range(12):
        shape = tuple(int(n) for n in rng.integers(4, 18, 3))
        labels = rng.choice(4, size=shape, p=[0.4, 0.2, 0.2, 0.2]).astype(np.uint8)
        if trial % 3 == 0:  # big components that cross many slabs
            labels = ((rng.random(shape) < 0.55) * 2).astype(np.uint8)
        if trial % 4 == 0:
            labels[rng.random(shape) < 0.1] = 9  # a value that is no class: background afterwards
        yield labels
    ties = np.zeros((8, 8, 8), np.uint8)  # equal sizes: the first in raster order wins, as in SimpleITK
    ties[0, 0, 5] = ties[7, 7, 0] = ties[3, 3, 3] = ties[5, 0, 0] = 1
    ties[1, 1, 1] = ties[6, 1, 1] = ties[1, 6, 6] = 2
    yield ties


@pytest.mark.parametrize("slab", [1, 2, 5, 1000])
def test_slab_post_processing_equals_the_whole_volume(slab):
    assert EXPECTED_COMPONENTS["kidney"] == 2
    for labels in _volumes():
        expected = whole_volume_reference(labels, CLASSES)
        got = keep_largest_components(labels.copy(), CLASSES, slab=slab)
        assert np.array_equal(got, expected), (labels.shape, slab)


def _directions():
    yield np.eye(3)
    yield np.diag([-1.0, -1.0, 1.0])  # RAS-stored
    yield np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], dtype=float)  # sagittal acquisition
    rotation = sitk.VersorTransform((0.3, 0.2, 0.9), 0.7)  # oblique
    yield np.array(rotation.GetMatrix()).reshape(3, 3)


@pytest.mark.parametrize("direction", list(_directions()), ids=["lps", "ras", "sagittal", "oblique"])
def test_canonical_views_equal_dicom_orient_both_ways(direction):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = sitk.GetImageFromArray(array)
    image.SetDirection(direction.flatten().tolist())
    order, flips = canonical_axes(image)
    canonical = oriented_view(sitk.GetArrayViewFromImage(image), order, flips)
    assert np.array_equal(canonical, sitk.GetArrayFromImage(to_canonical(image)))
    assert np.array_equal(unoriented_view(canonical, order, flips), array)


def test_a_volume_too_big_for_memory_is_refused_with_the_estimate(tiny_model, tmp_path):
    """A header promising 100000 x 100000 x 1000 voxels: refused before anything is allocated."""
    source = tmp_path / "huge.nhdr"
    (tmp_path / "huge.raw").write_bytes(b"\0" * 1024)
    source.write_text("NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
                      "sizes: 100000 100000 1000\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
                      "kinds: domain domain domain\nendian: little\nencoding: raw\nspace origin: (0,0,0)\n"
                      "data file: huge.raw\n\n")
    result = run_ltuda("predict", "--model", tiny_model, "--input", source, "--output", tmp_path / "out.seg.nrrd",
                       "--device", "cpu", check=False)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{source}: segmenting this 100000 x 100000 x 1000 volume needs about " in result.stderr
    assert "of memory, but only " in result.stderr
    assert not (tmp_path / "out.seg.nrrd").exists()
