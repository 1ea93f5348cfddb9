"""Datasets: built-in digits, image folders, MNIST idx files, vector files; seeded splits.

Every loader returns a :class:`Dataset` held in memory (the data sets this tool targets are
small enough): ``x`` float32 images (N, C, H, W) in [0, 1] or vectors (N, D), ``y`` int64 class ids
0..C-1, ``classes`` the original class names.
"""

from .dataset import (
    Dataset,
    apply_split,
    class_group,
    concat_labelled,
    split_dataset,
    split_validation,
)
from .loaders import IMAGE_EXTENSIONS, load_dataset, load_image_files

__all__ = [
    "IMAGE_EXTENSIONS",
    "Dataset",
    "apply_split",
    "class_group",
    "concat_labelled",
    "load_dataset",
    "load_image_files",
    "split_dataset",
    "split_validation",
]
