"""Shared fixtures: a tiny phantom dataset and a tiny trained model, made once per test session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_CT = REPO.parent / "shared" / "data" / "real-ct"
# The Slicer module's Lib (LTUDASegmentationLib), which the slicer_* tests import.
sys.path.insert(0, str(REPO / "LTUDASegmentation"))

# Tests never touch the user's cache. The suite runs as two pytest workers on the two cores CI has
# (`-n 2`), so each test's torch takes one thread (as fast as two for these tiny networks).
os.environ.setdefault("LTUDA_CACHE_DIR", str(Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / "ltuda-test-cache"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_TRAIN_ARGS = ["--preset", "fast", "--epochs-stage1", "1", "--epochs-stage2", "1", "--iterations-per-epoch", "2",
                   "--image-size", "32", "--batch-size", "2", "--val-fraction", "0.5"]


def run_ltuda(*args, check=True, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    """`python -m ltuda ARGS` in a real subprocess (argument list, no shell)."""
    result = subprocess.run([sys.executable, "-m", "ltuda", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"ltuda {' '.join(map(str, args))} exited {result.returncode}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """dataset.json of a small phantom set: 4 single-organ sites x 2 cases + 1 fully labelled test case."""
    from ltuda.data.phantoms import generate_phantoms

    return generate_phantoms(tmp_path_factory.mktemp("phantoms"), cases_per_site=2, test_cases=1, shape=(48, 48), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dataset, tmp_path_factory) -> Path:
    """A model folder from a real (seconds-long) LTUDA training of both stages on the tiny dataset."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    run_ltuda("train", "--dataset", tiny_dataset, "--out", out, *TINY_TRAIN_ARGS, "--progress", "none")
    return out


@pytest.fixture(scope="session")
def real_ct() -> Path:
    if not REAL_CT.is_dir():
        pytest.skip(f"real CT scans not available at {REAL_CT}")
    return REAL_CT


@pytest.fixture
def scene():
    """A real, empty MRML scene (slicer-core), cleared after the test."""
    pytest.importorskip("slicer")
    from slicer_scene import new_scene

    scene = new_scene()
    yield scene
    scene.Clear(1)


@pytest.fixture
def logic(scene, tmp_path, request):
    """The module's logic on `scene`, its folders under tmp_path, set to the test module's ORGANS."""
    from slicer_scene import new_logic

    return new_logic(scene, tmp_path, getattr(request.module, "ORGANS", None))
