"""Which datasets are under a data root, how complete they are, and what to place where for the rest."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from .catalog import (
    AIRCRAFT_FOLDERS,
    CIFAR_FOLDERS,
    DATASET_NAMES,
    IMAGENET_DIRS,
    PUBLISHED_TEST_IMAGES,
    SPLIT_LAYOUTS,
    DatasetError,
    canonical_name,
)
from .readers import Listing, find_split_file, layout_hint, read_listing

STATES = ("found", "incomplete", "missing")


@dataclass(frozen=True)
class DatasetStatus:
    """What :func:`dataset_status` found for one dataset's test partition.

    Attributes:
        name: canonical dataset name.
        state: ``found`` (every image its files list is there), ``incomplete`` (some of it is
            there, but it cannot be read as it is) or ``missing`` (nothing of it under the root).
        layout: ``coop``, ``tpt``, ``coop/tpt`` (the same in both), ``torchvision``, ``other``
            or ``folder`` (the root is the image folder); ``""`` when missing.
        folder: the dataset's folder, when found.
        images: test images on disk (for list-file datasets: listed and present).
        listed: test images its split file or variant list names (``None`` for folder datasets).
        published: the test-partition size of the published release.
        classes: number of classes, when known.
        problem: what is wrong (``""`` when found).
        fix: one line saying exactly what to place where (``""`` when found).
    """

    name: str
    state: str
    layout: str = ""
    folder: Path | None = None
    images: int = 0
    listed: int | None = None
    published: int = 0
    classes: int | None = None
    problem: str = ""
    fix: str = ""

    @property
    def found(self) -> bool:
        return self.state == "found"

    def note(self) -> str:
        """A remark on the counts, e.g. a split file that lists fewer images than the published one."""
        counted = self.listed if self.listed is not None else self.images
        if self.found and counted != self.published:
            listed = " listed" if self.listed is not None else ""
            return f"{counted} test images{listed}; the published test set has {self.published}"
        return ""


def dataset_status(name: str, root: str | os.PathLike, *, splits_dir: str | os.PathLike | None = None) -> DatasetStatus:
    """Found / incomplete / missing for dataset ``name`` under ``root``, with counts and a one-line fix."""
    key = canonical_name(name)
    if key == "folder":
        raise DatasetError("'folder' has no fixed layout to check; name one of the supported datasets")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data root {root} does not exist or is not a folder")
    splits = Path(splits_dir) if splits_dir is not None else None
    published = PUBLISHED_TEST_IMAGES[key]
    try:
        listing = read_listing(key, root, "test", splits)
    except DatasetError as err:
        if not _anything_present(key, root, splits):
            problem, fix = f"nothing of it under {root}", layout_hint(key, root)
            return DatasetStatus(key, "missing", published=published, problem=problem, fix=fix)
        fix = _fix_for_partial(key, root, splits)
        return DatasetStatus(key, "incomplete", published=published, problem=str(err), fix=fix)
    listed = None if listing.source is None or listing.pixels is not None else len(listing.samples)
    status = DatasetStatus(
        key,
        "found",
        layout=listing.layout,
        folder=listing.folder,
        images=len(listing.samples) - len(listing.missing),
        listed=listed,
        published=published,
        classes=len(listing.classnames),
    )
    if listing.missing:
        return _incomplete_images(status, listing)
    if not listing.samples:
        problem = f"no test images in {listing.folder}"
        return replace(status, state="incomplete", problem=problem, fix=layout_hint(key, root))
    return status


def check(
    root: str | os.PathLike, *, datasets: Iterable[str] | None = None, splits_dir: str | os.PathLike | None = None
) -> list[DatasetStatus]:
    """:func:`dataset_status` of every supported dataset (or of ``datasets``) under ``root``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"--root {root} does not exist or is not a folder")
    names = DATASET_NAMES if datasets is None else [canonical_name(n) for n in datasets]
    return [dataset_status(n, root, splits_dir=splits_dir) for n in names]


def _incomplete_images(status: DatasetStatus, listing: Listing) -> DatasetStatus:
    missing = listing.missing
    where = listing.image_dir if listing.image_dir is not None else listing.folder
    problem = (
        f"{len(missing)} of {len(listing.samples)} test images listed in {listing.source} "
        f"are not on disk (first: {missing[0]})"
    )
    fix = f"place the images listed in {listing.source} under {where}/ (its paths are relative to that folder)"
    return replace(status, state="incomplete", problem=problem, fix=fix)


def _fix_for_partial(key: str, root: Path, splits: Path | None) -> str:
    """The fix when some of a dataset is there: a split-file dataset without its split file gets told where it goes."""
    if key in SPLIT_LAYOUTS and find_split_file(key, root, splits)[0] is None:
        lay = SPLIT_LAYOUTS[key]
        folder = next(f for f in lay.folders if (root / f).is_dir())
        coop = f"in {root / folder}/ (CoOp layout)"
        tpt = f"in {splits if splits is not None else root / 'data_splits'}/ (TPT's layout)"
        # the folder that is there tells the layout, unless both layouts spell it the same way
        where = coop if folder != lay.tpt_folder else tpt if folder != lay.coop_folder else f"{coop} or {tpt}"
        return f"place {lay.split_file} (linked from CoOp's DATASETS.md) {where}"
    return layout_hint(key, root)


def _anything_present(key: str, root: Path, splits: Path | None) -> bool:
    """Whether any trace of the dataset (its split file or one of its folders) is under ``root``."""
    if key in SPLIT_LAYOUTS:
        if find_split_file(key, root, splits)[0] is not None:
            return True
        return any((root / f).is_dir() for f in SPLIT_LAYOUTS[key].folders)
    if key == "fgvc_aircraft":
        return any((root / f).is_dir() for f in AIRCRAFT_FOLDERS)
    if key in CIFAR_FOLDERS:
        return (root / CIFAR_FOLDERS[key]).is_dir()
    return any((root / d.format(partition="val")).is_dir() for d in IMAGENET_DIRS[key][:2])
