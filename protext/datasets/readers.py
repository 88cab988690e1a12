"""Find a dataset under a root in either layout and list its images with labels and class names.

Folder scanning is torchvision's (``make_dataset``, what ``ImageFolder`` uses). The rest is ours on
purpose: torchvision's DTD, Food101, Flowers102, ... read each dataset's own official split, not
CoOp's ``split_zhou_*.json`` that the published numbers use; its FGVCAircraft insists on the
``fgvc-aircraft-2013b/data`` folder; its ImageNet needs the devkit archive and knows no variants.

Every reader returns a :class:`Listing`: what the dataset's own files say is there (``samples``)
and which of those images are not on disk (``missing``). :func:`protext.datasets.build_dataset`
refuses a listing with missing images; :func:`protext.datasets.check` counts them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from ..classlists import ClassListError, read_split_file, split_file_classes
from .catalog import (
    AIRCRAFT_FOLDERS,
    CIFAR_FOLDERS,
    IMAGENET_DIRS,
    SPLIT_LAYOUTS,
    SPLITS_FOLDERS,
    DatasetError,
)
from .cifar import read_cifar


@dataclass
class Listing:
    """The images of one partition of a dataset, as its files list them."""

    name: str
    folder: Path  # the dataset's folder
    layout: str  # "coop", "tpt", "coop/tpt" (the same in both), "torchvision" or "folder"
    classnames: list[str]
    samples: list[tuple[Path, int]]
    source: Path | None = None  # the file listing the samples (split file, variant list, batch)
    image_dir: Path | None = None  # where the listed relative paths start
    missing: list[Path] = field(default_factory=list)
    pixels: np.ndarray | None = None  # in-memory images (CIFAR)


def read_listing(name: str, root: Path, partition: str, splits_dir: Path | None = None) -> Listing:
    """The :class:`Listing` of ``partition`` of dataset ``name`` (canonical) under ``root``."""
    try:
        return _read_listing(name, root, partition, splits_dir)
    except (OSError, UnicodeDecodeError) as err:  # unreadable folders or list files: the user's to fix
        raise DatasetError(f"cannot read {name} under {root}: {err}") from None


def _read_listing(name: str, root: Path, partition: str, splits_dir: Path | None) -> Listing:
    if name == "folder":
        samples, classes = read_class_folders(root)
        return Listing("folder", root, "folder", classes, samples)
    if name in IMAGENET_DIRS:
        return _read_imagenet(name, root, partition)
    if name in SPLIT_LAYOUTS:
        return _read_split_dataset(name, root, partition, splits_dir)
    if name == "fgvc_aircraft":
        return _read_aircraft(root, partition)
    if name in CIFAR_FOLDERS:
        folder = _cifar_folder(name, root)
        classes, samples, pixels = read_cifar(name, folder, partition)
        return Listing(name, folder, "torchvision", classes, samples, samples[0][0] if samples else None, pixels=pixels)
    raise DatasetError(f"unknown dataset {name!r}")


# ------------------------------------------------------------------------------------------------
# layout hints: what to place where (error messages and `check`'s fixes)


def layout_hint(name: str, root: str | Path = "DATA") -> str:
    """One line saying where ``name``'s files go under ``root``, in each layout protext reads."""
    r = str(root).rstrip("/")
    if name == "folder":
        return f"place the images in {r}/<class name>/, one sub-folder per class"
    if name in SPLIT_LAYOUTS:
        lay = SPLIT_LAYOUTS[name]
        coop = "/".join(p for p in (r, lay.coop_folder, lay.coop_images) if p)
        tpt = "/".join(p for p in (r, lay.tpt_folder, lay.tpt_images) if p)
        return (
            f"CoOp layout: {r}/{lay.coop_folder}/{lay.split_file} with the images under {coop}/; "
            f"or TPT's: the images under {tpt}/ and {lay.split_file} in {r}/data_splits/"
        )
    if name == "fgvc_aircraft":
        return f"place fgvc-aircraft-2013b/data as {r}/fgvc_aircraft/ (variants.txt, images_variant_test.txt, images/)"
    if name in CIFAR_FOLDERS:
        archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
        return f"extract {archive} into {r}/ so that {r}/{CIFAR_FOLDERS[name]}/ exists (torchvision's layout)"
    kind = "folders 0..999 (named by label)" if name == "imagenet_v2" else "one folder per WordNet id (n01440764, ...)"
    coop, tpt = (d.format(partition="val") for d in IMAGENET_DIRS[name][:2])
    return f"place {kind} in {r}/{coop}/ (CoOp layout) or {r}/{tpt}/ (TPT's)"


# ------------------------------------------------------------------------------------------------
# class folders (plain folders and the ImageNet family)


def _visible_image(base: str):
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    def valid(path: str) -> bool:
        # hidden files and folders (.DS_Store, .ipynb_checkpoints) are never images of a class
        return has_file_allowed_extension(path, IMG_EXTENSIONS) and "/." not in path[len(base) :].replace(os.sep, "/")

    return valid


def scan_class_folders(folder: Path, label_of: dict[str, int]) -> list[tuple[Path, int]]:
    """Images under ``folder/<class>/`` (recursively) for each class folder in ``label_of``.

    torchvision's ``make_dataset`` does the walk, so protext sees the files an ``ImageFolder``
    would, hidden ones aside; an empty class folder is a :class:`DatasetError` naming it.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    valid = _visible_image(str(folder))
    try:
        found = make_dataset(str(folder), class_to_idx=label_of, is_valid_file=valid)
    except FileNotFoundError:
        for cls in sorted(label_of):  # name the first empty folder (error path only)
            try:
                make_dataset(str(folder), class_to_idx={cls: 0}, is_valid_file=valid)
            except FileNotFoundError:
                raise DatasetError(
                    f"class folder {folder / cls} holds no images ({', '.join(IMG_EXTENSIONS)})"
                ) from None
        raise
    return [(Path(p), y) for p, y in found]


def _subfolders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def read_class_folders(folder: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """A plain image folder: one sub-folder per class, sorted; labels are positions in that order."""
    classes = _subfolders(folder)
    if not classes:
        raise DatasetError(f"{folder} has no class sub-folders; {layout_hint('folder', folder)}")
    return scan_class_folders(folder, {c: i for i, c in enumerate(classes)}), classes


@lru_cache(maxsize=1)
def imagenet_facts() -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]:
    """(WordNet ids in label order, ImageNet-A labels, ImageNet-R labels) from the package data."""
    data = json.loads(resources.files("protext").joinpath("data/imagenet_variants.json").read_text())
    return tuple(data["imagenet_wnids"]), tuple(data["imagenet_a_indices"]), tuple(data["imagenet_r_indices"])


_WNID = re.compile(r"n\d{8}")
_NUMBER = re.compile(r"\d+")


def find_imagenet_folder(name: str, root: Path, partition: str = "test") -> tuple[Path | None, str]:
    """The image folder of an ImageNet-family dataset and its layout, or ``(None, "")``."""
    pattern = _NUMBER if name == "imagenet_v2" else _WNID
    sub = "train" if partition == "train" else "val"
    dirs = IMAGENET_DIRS[name]
    layouts = ["coop", "tpt"] + ["other"] * (len(dirs) - 2)
    candidates = [(root / rel.format(partition=sub), layout) for rel, layout in zip(dirs, layouts)]
    candidates.append((root, "folder"))  # root is the image folder itself
    for cand, layout in candidates:
        if cand.is_dir() and any(pattern.fullmatch(d) for d in _subfolders(cand)):
            return cand, layout
    return None, ""


def _imagenet_labels(name: str, classes: list[str], folder: Path) -> tuple[dict[str, int], list[str]]:
    """Label of each class folder, and the class names, for an ImageNet-family dataset."""
    from ..classlists import read_classes

    wnids, a_idx, r_idx = imagenet_facts()
    all_names = read_classes("imagenet")
    if name in ("imagenet_a", "imagenet_r"):
        indices = a_idx if name == "imagenet_a" else r_idx
        known = {wnids[label]: k for k, label in enumerate(indices)}
        names, expected = [all_names[i] for i in indices], f"one of the 200 {name} WordNet ids"
    elif name == "imagenet_v2":
        # Folder k holds ImageNet label k. Sorting the names as strings (0, 1, 10, 100, ...)
        # and enumerating, as a plain ImageFolder does, would scramble the labels.
        known = {str(k): k for k in range(1000)}
        names, expected = all_names, "named 0..999"
    else:
        known = {w: i for i, w in enumerate(wnids)}
        names, expected = all_names, "an ImageNet-1k WordNet id"
    for cls in classes:
        if cls not in known:
            raise DatasetError(f"unexpected folder {folder / cls}: not {expected}; {layout_hint(name)}")
    return {c: known[c] for c in classes}, names


def _read_imagenet(name: str, root: Path, partition: str) -> Listing:
    if name != "imagenet" and partition != "test":
        raise DatasetError(f"{name} is a test set: it has no {partition!r} partition")
    if partition == "val":
        raise DatasetError("imagenet's val images are its test partition (partition='test'); it has no separate val")
    folder, layout = find_imagenet_folder(name, root, partition)
    if folder is None:
        raise DatasetError(f"no {name} image folders found under {root}; {layout_hint(name, root)}")
    label_of, names = _imagenet_labels(name, _subfolders(folder), folder)
    samples = sorted(scan_class_folders(folder, label_of), key=lambda s: (s[1], str(s[0])))
    return Listing(name, folder, layout, names, samples)


# ------------------------------------------------------------------------------------------------
# split-file datasets (CoOp's split_zhou_*.json, beside the images or in TPT's data_splits/)


def find_split_file(name: str, root: Path, splits_dir: Path | None = None) -> tuple[Path | None, str, list[Path]]:
    """(split file, layout, places looked) for a split-file dataset; the file is ``None`` if absent."""
    lay = SPLIT_LAYOUTS[name]
    if splits_dir is not None:
        candidates = [(Path(splits_dir) / lay.split_file, "tpt")]
    else:
        candidates = [(root / lay.split_file, "coop")]
        candidates += [(root / f / lay.split_file, "coop") for f in lay.folders]
        bases = [root, root.parent] if root.name in lay.folders else [root]  # root may be DATA/DTD
        candidates += [(b / s / lay.split_file, "tpt") for b in bases for s in SPLITS_FOLDERS]
    for path, layout in candidates:
        if path.is_file():
            return path, layout, [p for p, _ in candidates]
    return None, "", [p for p, _ in candidates]


def _image_dir_candidates(name: str, root: Path, split_path: Path, layout: str) -> list[tuple[Path, Path]]:
    """(dataset folder, image folder) pairs where the split file's relative paths may start."""
    lay = SPLIT_LAYOUTS[name]
    if layout == "coop":
        datasets, subs = [split_path.parent], (lay.coop_images, lay.tpt_images, "")
    else:
        datasets = [root / f for f in (lay.tpt_folder, *lay.folders)] + [root]
        subs = (lay.tpt_images, lay.coop_images, "")
    pairs = [(d, d / sub if sub else d) for d in dict.fromkeys(datasets) for sub in subs]
    return list(dict.fromkeys(pairs))


def _pick_image_dir(pairs: list[tuple[Path, Path]], relative: list[str]) -> tuple[Path, Path]:
    """The pair holding most of the first listed images (ties, or none found: the preferred, first, one)."""
    probe = relative[:20]
    scores = [sum((image_dir / rel).is_file() for rel in probe) if image_dir.is_dir() else 0 for _, image_dir in pairs]
    return pairs[scores.index(max(scores))]


def _read_split_dataset(name: str, root: Path, partition: str, splits_dir: Path | None) -> Listing:
    lay = SPLIT_LAYOUTS[name]
    split_path, layout, looked = find_split_file(name, root, splits_dir)
    if split_path is None:
        shown = ", ".join(map(str, looked[:4])) + (", ..." if len(looked) > 4 else "")
        raise DatasetError(f"{lay.split_file} not found (looked in {shown}); {layout_hint(name, root)}")
    try:
        parts = read_split_file(split_path)
        classnames = split_file_classes(split_path)
    except ClassListError as err:
        raise DatasetError(str(err)) from None
    if partition not in parts:
        raise DatasetError(f"split file {split_path} has no {partition!r} list (it has {', '.join(parts)})")
    entries = parts[partition]
    if not entries:
        raise DatasetError(f"split file {split_path} lists no images under {partition!r}")
    candidates = _image_dir_candidates(name, root, split_path, layout)
    dataset_dir, image_dir = _pick_image_dir(candidates, [e[0] for e in entries])
    samples = [(image_dir / rel, label) for rel, label, _ in entries]
    missing = [p for p, _ in samples if not os.path.isfile(p)]
    return Listing(name, dataset_dir, layout, classnames, samples, split_path, image_dir, missing)


# ------------------------------------------------------------------------------------------------
# FGVC Aircraft (the same folder in CoOp's and TPT's layouts) and CIFAR


def find_aircraft_folder(root: Path) -> Path | None:
    return next((c for c in [root, *(root / f for f in AIRCRAFT_FOLDERS)] if (c / "variants.txt").is_file()), None)


def _read_aircraft(root: Path, partition: str) -> Listing:
    folder = find_aircraft_folder(root)
    if folder is None:
        raise DatasetError(f"variants.txt not found under {root}; {layout_hint('fgvc_aircraft', root)}")
    variants_path = folder / "variants.txt"
    classnames = [line.strip() for line in variants_path.read_text().splitlines() if line.strip()]
    label_of = {c: i for i, c in enumerate(classnames)}
    list_path = folder / f"images_variant_{partition}.txt"
    if not list_path.is_file():
        raise DatasetError(f"variant list {list_path} not found; {layout_hint('fgvc_aircraft', root)}")
    samples: list[tuple[Path, int]] = []
    for lineno, line in enumerate(list_path.read_text().splitlines(), start=1):
        image_id, _, variant = line.strip().partition(" ")
        if not image_id:
            continue
        if variant not in label_of:
            raise DatasetError(
                f"{list_path} line {lineno}: variant {variant!r} is not in {variants_path}; "
                "expected '<image id> <variant>' per line"
            )
        samples.append((folder / "images" / f"{image_id}.jpg", label_of[variant]))
    if not samples:
        raise DatasetError(f"variant list {list_path} lists no images")
    missing = [p for p, _ in samples if not os.path.isfile(p)]
    return Listing("fgvc_aircraft", folder, "coop/tpt", classnames, samples, list_path, folder / "images", missing)


def _cifar_folder(name: str, root: Path) -> Path:
    """``root/cifar-10-batches-py`` (or ``root`` itself when it is that folder): the one holding the meta file."""
    sub = CIFAR_FOLDERS[name]
    meta = "batches.meta" if name == "cifar10" else "meta"
    for cand in (root / sub, root):
        if (cand / meta).is_file():
            return cand
    raise DatasetError(f"{root / sub / meta} not found; {layout_hint(name, root)}")
