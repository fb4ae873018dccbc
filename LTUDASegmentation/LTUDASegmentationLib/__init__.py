"""Helper package of the LTUDASegmentation module: everything testable without Qt.

Submodules (import them directly): organs, cases, folders, segments, manifest, export, runner,
progress, backend, gpus (how many training processes), probe (run as a script by the backend's Python), settings, models, jobs,
results, synthetic, proposals (model proposals in segmentations), suggestions (the review list),
annotation (the annotation loop's steps), logic, nrrdfile (the export writer thread's NRRD writer).
None of them imports torch, MONAI or the `ltuda` backend package.
"""

# Order matters for reloading in Slicer ("Reload" button): dependencies first.
SUBMODULES = ["errors", "nrrdfile", "organs", "settings", "progress", "runner", "manifest", "cases", "folders", "segments",
              "export", "backend", "gpus", "models", "jobs", "results", "synthetic", "proposals", "suggestions",
              "annotation", "logic"]
