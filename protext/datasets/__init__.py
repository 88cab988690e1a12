"""Image datasets for evaluation: one builder for every supported dataset, in CoOp's or TPT's layout.

Supported: a plain image folder (one sub-folder per class); the nine CoOp split-file datasets
(``split_zhou_*.json``), FGVC Aircraft (``variants.txt``, ``images_variant_*.txt``); ImageNet val
and its four variants; CIFAR-10 and CIFAR-100 (torchvision's folders). Both folder conventions are
accepted: CoOp/Dassl's (``DATA/dtd/split_zhou_DescribableTextures.json`` beside
``DATA/dtd/images``, ``DATA/imagenet/images/val`` ...) and TPT's (``DATA/DTD/images``,
``DATA/ImageNet/val`` ..., with the split files together in ``DATA/data_splits/``); the root may
also be the dataset's own folder.

Labels and class names:

- split files carry ``[relative path, label, classname]``; the class list is read over all
  partitions of the file (:func:`protext.classlists.split_file_classes`), so train and test agree;
- ImageNet val and -Sketch use the 1000 ImageNet labels (folders named by WordNet id); ImageNet-A
  and -R use 200 labels, the positions of their classes in the ImageNet label order; ImageNet-V2's
  folders are named ``0``..``999`` and hold that ImageNet label (they sort as strings, so folder
  order is *not* label order);
- CIFAR's class names come from the batches' meta file;
- ``split`` keeps the base (first ceil(n/2)) or novel (the rest) labels and renumbers them 0..k-1.

Vocabulary: ``partition`` is the image part (train/val/test), ``split`` the class half
(all/base/novel). ``python -m protext.datasets check --root DATA`` reports what is there.

The names that need torch are imported on first use, so ``--help`` and the template helpers stay fast.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Sequence

from .catalog import (
    DATASET_NAMES,
    PARTITIONS,
    PUBLISHED_TEST_IMAGES,
    SPLITS,
    DatasetError,
    canonical_name,
    dataset_template,
    is_imagenet_family,
)

_LAZY = {
    "ImageDataset": "images",
    "ArrayImageDataset": "images",
    "load_image": "images",
    "build_dataset": "build",
    "DatasetStatus": "status",
    "dataset_status": "status",
    "check": "status",
    "layout_hint": "readers",
}

__all__ = [
    "DATASET_NAMES",
    "PARTITIONS",
    "PUBLISHED_TEST_IMAGES",
    "SPLITS",
    "DatasetError",
    "canonical_name",
    "dataset_template",
    "is_imagenet_family",
    "split_classes",
    *_LAZY,
]


def split_classes(names: Sequence[str] | int, split: str) -> Any:
    """The class names of a half (see :func:`protext.classlists.split_classes`).

    Given an ``int`` (the previous release's signature) it returns the label ``range``, with a
    deprecation warning; use :func:`protext.classlists.split_range` for that.
    """
    from .. import classlists

    if isinstance(names, int):
        warnings.warn(
            "protext.datasets.split_classes(n, split) is deprecated: use protext.classlists.split_range(n, split)",
            DeprecationWarning,
            stacklevel=2,
        )
        return classlists.split_range(names, "novel" if split == "new" else split)
    return classlists.split_classes(names, split)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'protext.datasets' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
