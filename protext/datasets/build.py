"""``build_dataset``: one partition of one dataset, optionally one class half, with its class names."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

from ..classlists import ClassListError, read_classes, split_range
from .catalog import PARTITIONS, SPLITS, DatasetError, canonical_name
from .images import ArrayImageDataset, ImageDataset
from .readers import Listing, layout_hint, read_listing


def build_dataset(
    name: str,
    root: str | os.PathLike,
    *,
    split: str = "all",
    partition: str = "test",
    classes: str | os.PathLike | None = None,
    transform: Callable | None = None,
    splits_dir: str | os.PathLike | None = None,
    subset: str | None = None,
    classnames_file: str | os.PathLike | None = None,
) -> ImageDataset:
    """The ``partition`` (train/val/test) of dataset ``name`` under ``root``, for the class half ``split``.

    ``name`` is one of :data:`DATASET_NAMES` (aliases such as ``DTD``, ``pets``, ``imagenet-a``
    are accepted) or ``"folder"`` for a plain image folder (``root`` holds one sub-folder per class;
    ``partition`` is ignored). ``root`` is the data root in CoOp's or TPT's layout, or the dataset's
    own folder. TPT's split files are found in ``root/data_splits/`` (or ``root/data/data_splits/``),
    or wherever ``splits_dir`` says. ``split`` keeps the base (first ceil(n/2)) or novel labels,
    renumbered from 0. ``classes`` (any file :func:`protext.classlists.read_classes` reads)
    replaces the class names; it lists every class, or only those of ``split``.

    ``subset=`` and ``classnames_file=`` are the deprecated spellings of ``split=`` and
    ``classes=``; ``split="test"`` (a partition) is read as ``partition="test"``, with a warning.

    Raises :class:`DatasetError` naming the file or folder at fault and what to place where.
    """
    split, partition, classes = _legacy_arguments(split, partition, classes, subset, classnames_file)
    if partition not in PARTITIONS:
        raise DatasetError(f"unknown partition {partition!r}; expected one of {', '.join(PARTITIONS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)} (the class halves)")
    key = canonical_name(name)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder; {layout_hint(key, root)}")
    listing = read_listing(key, root, partition, Path(splits_dir) if splits_dir is not None else None)
    _require_images(listing, partition, root)
    dataset_type = ImageDataset if listing.pixels is None else ArrayImageDataset
    extra = {} if listing.pixels is None else {"pixels": listing.pixels}
    dataset = dataset_type(
        name=key,
        root=listing.folder,
        samples=listing.samples,
        classnames=_class_names(listing, classes, split),
        transform=transform,
        partition=partition,
        split=split,
        layout=listing.layout,
        **extra,
    )
    if split != "all":
        keep = split_range(dataset.num_classes, split)
        dataset.keep_labels(keep)
        if not dataset.samples:
            raise DatasetError(
                f"no images of the {split} classes (labels {keep.start}..{keep.stop - 1}) in {listing.folder}"
            )
    return dataset


def _legacy_arguments(split, partition, classes, subset, classnames_file):
    """Map the keywords of the previous release (``split`` = partition, ``subset``, ``classnames_file``)."""
    if split in PARTITIONS:
        warnings.warn(
            f"build_dataset(split={split!r}) names an image partition: use partition={split!r} "
            "(split now means the class half all/base/novel)",
            DeprecationWarning,
            stacklevel=3,
        )
        split, partition = "all", split
    if subset is not None:
        warnings.warn("build_dataset(subset=...) is deprecated: use split=...", DeprecationWarning, stacklevel=3)
        split = subset
    if classnames_file is not None:
        warnings.warn(
            "build_dataset(classnames_file=...) is deprecated: use classes=...", DeprecationWarning, stacklevel=3
        )
        classes = classnames_file
    if split == "new":  # CoOp calls the novel half "new"
        split = "novel"
    return split, partition, classes


def _require_images(listing: Listing, partition: str, root: Path) -> None:
    if listing.missing:
        more = f" (and {len(listing.missing) - 1} more)" if len(listing.missing) > 1 else ""
        raise DatasetError(f"image {listing.missing[0]} listed in {listing.source} does not exist{more}")
    if not listing.samples:
        raise DatasetError(
            f"no images found for {listing.name} partition {partition!r} in {listing.folder}; "
            f"{layout_hint(listing.name, root)}"
        )


def _class_names(listing: Listing, classes: str | os.PathLike | None, split: str) -> list[str]:
    """The dataset's class names, or those of ``classes`` (all of them, or just the ``split`` half)."""
    names = list(listing.classnames)
    if classes is None:
        return names
    try:
        given = read_classes(classes)
    except ClassListError as err:
        raise DatasetError(str(err)) from None
    n, keep = len(names), split_range(len(names), split)
    if len(given) == n:
        return given
    if split != "all" and len(given) == len(keep):
        return names[: keep.start] + given + names[keep.stop :]
    also = f" or {len(keep)} ({split} classes)" if split != "all" else ""
    raise DatasetError(
        f"class list {classes} names {len(given)} classes, but {listing.name} at {listing.folder} has {n}{also}"
    )
