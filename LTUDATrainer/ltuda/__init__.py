"""LTUDA: labeled-to-unlabeled distribution alignment for partially labelled multi-organ segmentation."""

__version__ = "0.1.0"
