"""`ltuda dataset check`: read every file of a dataset up front and report every problem at once."""

from .data.preprocess import Preprocessing, load_case
from .errors import LtudaError
from .manifest import parse_manifest


def check_dataset(path, allow_outside_paths: bool = False):
    """(manifest, problems): the manifest's own problems, then each case's file problems.

    Each case is fully read and checked the way training reads it (geometry, label values, empty
    labels, NaN or constant images, 2D/4D images, unreadable files); nothing is written.
    """
    manifest, problems = parse_manifest(path, allow_outside_paths)
    prep = Preprocessing(image_size=32)  # the checks do not depend on the slice size; keep it cheap
    for case in manifest.cases:
        if case.image is None:
            continue
        try:
            load_case(case, manifest.classes, prep, with_labels=case.split != "test" or case.label is not None)
        except LtudaError as exc:
            problems.append(f"case '{case.id}': {exc}")
    return manifest, problems
