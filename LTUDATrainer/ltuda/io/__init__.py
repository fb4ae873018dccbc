"""Reading and writing volumes: CT images (NIfTI, NRRD, MHA, DICOM series), label maps and Slicer `.seg.nrrd`."""
