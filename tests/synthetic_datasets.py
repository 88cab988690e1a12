"""Synthetic dataset trees for every dataset protext reads, in CoOp's and in TPT's layout.

A test builds a tree with :func:`make_tree` (or the :func:`make_dataset_tree` fixture) and gets back,
for each dataset, what a correct reader must return: the class names in label order and every
image of every partition with its label. These expectations are written here from the published
layouts (CoOp/Dassl's ``DATASETS.md`` and TPT's ``data/datautils.py`` / ``fewshot_datasets.py``),
not from protext's own tables, so a wrong reader disagrees with them.

Layouts (``DATA`` is the root a user passes as ``--root``):

- ``coop``: each dataset in its CoOp folder with its ``split_zhou_*.json`` beside the images
  (``DATA/dtd/split_zhou_DescribableTextures.json`` + ``DATA/dtd/images/<class>/...``), ImageNet in
  ``DATA/imagenet/images/val``, the variants in ``imagenet-adversarial/imagenet-a``,
  ``imagenet-rendition/imagenet-r``, ``imagenetv2/imagenetv2-matched-frequency-format-val``,
  ``imagenet-sketch/images``;
- ``tpt``: TPT's folder names (``DATA/DTD/images``, ``DATA/OxfordPets/<images>``, ``DATA/ImageNet/val``,
  ``DATA/imagenet-a``, ``DATA/ImageNet-Sketch`` ...) and the nine split files together in
  ``DATA/data_splits/`` (TPT keeps them in ``data/data_splits/`` of its checkout);
- FGVC Aircraft (``fgvc_aircraft/``: ``variants.txt``, ``images_variant_*.txt``, ``images/``) and
  CIFAR (torchvision's ``cifar-10-batches-py`` / ``cifar-100-python``) look the same in both.

Class names are the real ones, read at test time from ``../shared/classnames/*.json`` (CIFAR's from
the CuPL files in ``../shared/cupl``, whose keys are the CIFAR meta names with ``_`` as space); they
are never copied into the repository.

Every image is a tiny solid-colour PNG (whatever its extension: PIL reads by content) whose colour
encodes a unique image id, so a test can tell from the pixels which image a reader returned:
:func:`image_id` decodes it. ``classes_per_dataset`` limits the classes that get images (spread
over the label range, first and last included) so ImageNet's 1000 classes cost little; the label
space and names stay complete (split files still name every class through its train entries, as
CoOp's do; CIFAR's meta names all classes).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED  # the one definition of where the shared data is ($PROTEXT_SHARED honoured)

PARTITIONS = ("train", "val", "test")
LAYOUTS = ("coop", "tpt")


@dataclass(frozen=True)
class _SplitSpec:
    """A dataset read through a CoOp split file: file name, folders and image naming per layout."""

    split_file: str
    coop_folder: str
    coop_images: str  # image folder inside the CoOp dataset folder ("" = the folder itself)
    tpt_folder: str
    tpt_images: str  # TPT's path_dict image folder
    names_file: str


SPLIT_DATASETS: dict[str, _SplitSpec] = {
    "caltech101": _SplitSpec(
        "split_zhou_Caltech101.json", "caltech-101", "101_ObjectCategories", "Caltech101", "", "caltech101.json"
    ),
    "dtd": _SplitSpec("split_zhou_DescribableTextures.json", "dtd", "images", "DTD", "images", "dtd.json"),
    "eurosat": _SplitSpec("split_zhou_EuroSAT.json", "eurosat", "2750", "eurosat", "", "eurosat.json"),
    "food101": _SplitSpec("split_zhou_Food101.json", "food-101", "images", "Food101", "images", "food101.json"),
    "oxford_flowers": _SplitSpec(
        "split_zhou_OxfordFlowers.json", "oxford_flowers", "jpg", "Flower102", "jpg", "flower102.json"
    ),
    "oxford_pets": _SplitSpec("split_zhou_OxfordPets.json", "oxford_pets", "images", "OxfordPets", "", "pets.json"),
    "stanford_cars": _SplitSpec("split_zhou_StanfordCars.json", "stanford_cars", "", "StanfordCars", "", "cars.json"),
    "sun397": _SplitSpec("split_zhou_SUN397.json", "sun397", "SUN397", "SUN397", "", "sun397.json"),
    "ucf101": _SplitSpec("split_zhou_UCF101.json", "ucf101", "UCF-101-midframes", "UCF101", "", "ucf101.json"),
}

# ImageNet family: (CoOp image folder, TPT image folder), relative to DATA
IMAGENET_FOLDERS: dict[str, tuple[str, str]] = {
    "imagenet": ("imagenet/images/val", "ImageNet/val"),
    "imagenet_a": ("imagenet-adversarial/imagenet-a", "imagenet-a"),
    "imagenet_r": ("imagenet-rendition/imagenet-r", "imagenet-r"),
    "imagenet_v2": ("imagenetv2/imagenetv2-matched-frequency-format-val", "imagenetv2-matched-frequency-format-val"),
    "imagenet_sketch": ("imagenet-sketch/images", "ImageNet-Sketch"),
}
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}

ALL_DATASETS: tuple[str, ...] = (
    *IMAGENET_FOLDERS,
    *SPLIT_DATASETS,
    "fgvc_aircraft",
    *CIFAR_FOLDERS,
)


@dataclass
class SyntheticImage:
    """One generated image: where it is (``None`` inside a CIFAR batch), its label and its id."""

    path: Path | None
    label: int
    id: int


@dataclass
class SyntheticDataset:
    """What a correct reader returns for one generated dataset."""

    name: str
    layout: str
    root: Path  # what the user passes as --root
    folder: Path  # the dataset's own folder (where its images are)
    classnames: list[str]  # every class, label order, as the reader must name them
    images: dict[str, list[SyntheticImage]] = field(default_factory=dict)  # partition -> images
    split_file: Path | None = None

    def labels(self, partition: str = "test") -> list[int]:
        return [im.label for im in self.images[partition]]


# ------------------------------------------------------------------------------------------------
# pixels


def image_id(image: Image.Image) -> int:
    """The id :func:`write_image` encoded in an image's colour."""
    r, g, b = image.convert("RGB").getpixel((0, 0))
    return (r << 16) | (g << 8) | b


def _colour(ident: int) -> tuple[int, int, int]:
    if not 0 <= ident < 1 << 24:
        raise ValueError(f"image id {ident} does not fit in 24 bits")
    return (ident >> 16) & 255, (ident >> 8) & 255, ident & 255


def write_image(path: Path, ident: int, size: tuple[int, int] = (4, 4)) -> Path:
    """A solid-colour lossless image encoding ``ident`` (PNG bytes: JPEG would blur the id)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, _colour(ident)).save(path, format="PNG")
    return path


class _Ids:
    def __init__(self) -> None:
        self.next = 1  # 0 stays free: a black image is never a generated one

    def __call__(self) -> int:
        self.next += 1
        return self.next - 1


# ------------------------------------------------------------------------------------------------
# class names and the classes that get images


def shared_classnames(name: str, shared: Path = SHARED) -> list[str]:
    """The real class names of ``name`` in label order, read from ``../shared`` (fails loudly if absent)."""
    if not shared.is_dir():
        pytest.fail(f"{shared} is missing: synthetic datasets take their class names from the shared folder")
    if name in SPLIT_DATASETS:
        return json.loads((shared / "classnames" / SPLIT_DATASETS[name].names_file).read_text())
    if name == "fgvc_aircraft":
        return json.loads((shared / "classnames" / "aircraft.json").read_text())
    if name in CIFAR_FOLDERS:
        keys = json.loads((shared / "cupl" / f"{name}_prompts_full.json").read_text())
        return [k.replace(" ", "_") for k in keys]  # the batches' meta spells them with "_"
    imagenet = json.loads((shared / "classnames" / "imagenet.json").read_text())
    if name in ("imagenet_a", "imagenet_r"):
        facts = json.loads((shared / "classnames" / "imagenet_variants.json").read_text())
        return [imagenet[i] for i in facts[f"{name}_indices"]]
    return imagenet


def spread(n: int, k: int | None) -> list[int]:
    """``k`` labels spread over ``0..n-1`` (first and last included); every label when ``k`` is None."""
    if k is None or k >= n:
        return list(range(n))
    if k < 1:
        raise ValueError(f"classes_per_dataset must be at least 1, got {k}")
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _slug(name: str) -> str:
    """A folder-safe form of a class name (real folders never hold '/' or spaces)."""
    return name.replace("/", "-").replace(" ", "_")


# ------------------------------------------------------------------------------------------------
# split-file datasets


def _relative_path(name: str, cls: str, partition: str, k: int, ident: int) -> str:
    """The path a CoOp split file lists for an image, as in the real file of that dataset."""
    slug = _slug(cls)
    if name == "oxford_flowers":
        return f"image_{ident:05d}.jpg"
    if name == "oxford_pets":
        return f"{slug}_{ident}.jpg"
    if name == "stanford_cars":
        folder = "cars_test" if partition == "test" else "cars_train"
        return f"{folder}/{ident:05d}.jpg"
    if name == "sun397":
        return f"{slug[0]}/{slug}/sun_{ident:08d}.jpg"
    if name == "ucf101":
        return f"{slug}/v_{slug}_g{k + 1:02d}_c{ident:05d}.jpg"
    if name == "eurosat":
        folder = cls.replace(" ", "")
        return f"{folder}/{folder}_{ident}.jpg"
    if name == "caltech101":
        return f"{slug}/image_{ident:04d}.jpg"
    return f"{slug}/{slug}_{ident:04d}.jpg"  # dtd, food101


def _make_split_dataset(name, data, layout, per_class, picks, ids, shared) -> SyntheticDataset:
    spec = SPLIT_DATASETS[name]
    names = shared_classnames(name, shared)
    if layout == "coop":
        folder_name, image_sub = spec.coop_folder, spec.coop_images
    else:
        folder_name, image_sub = spec.tpt_folder, spec.tpt_images
    folder = data / folder_name
    image_dir = folder / image_sub if image_sub else folder
    split: dict[str, list] = {}
    out = SyntheticDataset(name, layout, data, folder, list(names))
    for partition in PARTITIONS:
        # train names every class (so the label space is complete); val/test only the picked ones
        labels = range(len(names)) if partition == "train" else picks
        entries, images = [], []
        for label in labels:
            for k in range(per_class):
                ident = ids()
                rel = _relative_path(name, names[label], partition, k, ident)
                entries.append([rel, label, names[label]])
                images.append(SyntheticImage(write_image(image_dir / rel, ident), label, ident))
        split[partition] = entries
        out.images[partition] = images
    splits_dir = folder if layout == "coop" else data / "data_splits"
    splits_dir.mkdir(parents=True, exist_ok=True)
    out.split_file = splits_dir / spec.split_file
    out.split_file.write_text(json.dumps(split))
    return out


def _make_aircraft(data, layout, per_class, picks, ids, shared) -> SyntheticDataset:
    names = shared_classnames("fgvc_aircraft", shared)
    folder = data / "fgvc_aircraft"
    out = SyntheticDataset("fgvc_aircraft", layout, data, folder, list(names))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "variants.txt").write_text("".join(f"{n}\n" for n in names))
    for partition in PARTITIONS:
        labels = range(len(names)) if partition == "train" else picks
        lines, images = [], []
        for label in labels:
            for _ in range(per_class):
                ident = ids()
                lines.append(f"{ident:07d} {names[label]}\n")
                images.append(SyntheticImage(write_image(folder / "images" / f"{ident:07d}.jpg", ident), label, ident))
        (folder / f"images_variant_{partition}.txt").write_text("".join(lines))
        out.images[partition] = images
    return out


# ------------------------------------------------------------------------------------------------
# ImageNet family


def imagenet_wnids(shared: Path = SHARED) -> list[str]:
    return json.loads((shared / "classnames" / "imagenet_variants.json").read_text())["imagenet_wnids"]


def _make_imagenet(name, data, layout, per_class, picks, ids, shared) -> SyntheticDataset:
    names = shared_classnames(name, shared)
    wnids = imagenet_wnids(shared)
    if name in ("imagenet_a", "imagenet_r"):
        facts = json.loads((shared / "classnames" / "imagenet_variants.json").read_text())
        folder_of = [wnids[i] for i in facts[f"{name}_indices"]]  # label k of the 200 -> its wnid
    elif name == "imagenet_v2":
        folder_of = [str(i) for i in range(1000)]  # folder k holds ImageNet label k
    else:
        folder_of = wnids
    folder = data / IMAGENET_FOLDERS[name][0 if layout == "coop" else 1]
    out = SyntheticDataset(name, layout, data, folder, list(names))
    images = []
    for label in picks:
        for k in range(per_class):
            ident = ids()
            filename = f"ILSVRC2012_val_{ident:08d}.JPEG" if name == "imagenet" else f"{ident:08d}_{k}.JPEG"
            images.append(SyntheticImage(write_image(folder / folder_of[label] / filename, ident), label, ident))
    out.images["test"] = images
    if name == "imagenet" and layout == "coop":
        # CoOp's imagenet folder also holds classnames.txt ("n01440764 tench" lines)
        (data / "imagenet" / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(wnids, names)))
    return out


# ------------------------------------------------------------------------------------------------
# CIFAR (torchvision's python-pickle layout)


def _pickle(path: Path, obj: dict) -> None:
    # protocol 2 and str keys, as the released batches load under encoding="latin1"
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _cifar_batch(labels: Sequence[int], ident_of: Sequence[int]) -> np.ndarray:
    """Rows of 3072 bytes (1024 R, 1024 G, 1024 B of a 32x32 image), each a solid colour encoding its id."""
    rows = np.zeros((len(labels), 3, 1024), dtype=np.uint8)
    for i, ident in enumerate(ident_of):
        rows[i] = np.array(_colour(ident), dtype=np.uint8)[:, None]
    return rows.reshape(len(labels), 3072)


def _make_cifar(name, data, per_class, picks, ids, shared) -> SyntheticDataset:
    names = shared_classnames(name, shared)
    folder = data / CIFAR_FOLDERS[name]
    folder.mkdir(parents=True, exist_ok=True)
    out = SyntheticDataset(name, "torchvision", data, folder, list(names))
    label_key = "labels" if name == "cifar10" else "fine_labels"
    for partition in ("train", "test"):
        labels = [label for label in picks for _ in range(per_class)]
        idents = [ids() for _ in labels]
        batch = {"batch_label": f"{partition} batch", label_key: labels, "data": _cifar_batch(labels, idents),
                 "filenames": [f"synthetic_{i}.png" for i in idents]}
        if name == "cifar100":
            batch["coarse_labels"] = [label // 5 for label in labels]
            filename = partition
        else:
            filename = "test_batch" if partition == "test" else "data_batch_1"
        _pickle(folder / filename, batch)
        out.images[partition] = [SyntheticImage(None, y, i) for y, i in zip(labels, idents)]
    if name == "cifar10":
        _pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072})
    else:
        _pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": [f"coarse_{i}" for i in range(20)]})
    return out


# ------------------------------------------------------------------------------------------------
# the tree


def make_tree(
    root: str | Path,
    datasets: Iterable[str] | None = None,
    layout: str = "coop",
    per_class: int = 1,
    classes_per_dataset: int | None = None,
    shared: Path = SHARED,
) -> dict[str, SyntheticDataset]:
    """Generate ``datasets`` (default: every supported one) under ``root`` in ``layout``.

    ``per_class`` images per class and partition; ``classes_per_dataset`` limits the classes that
    get images (see the module docstring). Returns ``{name: SyntheticDataset}``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    names = list(ALL_DATASETS if datasets is None else datasets)
    unknown = [n for n in names if n not in ALL_DATASETS]
    if unknown:
        raise ValueError(f"unknown synthetic datasets {unknown}; known: {ALL_DATASETS}")
    data = Path(root)
    data.mkdir(parents=True, exist_ok=True)
    ids = _Ids()
    out: dict[str, SyntheticDataset] = {}
    for name in names:
        picks = spread(len(shared_classnames(name, shared)), classes_per_dataset)
        if name in SPLIT_DATASETS:
            out[name] = _make_split_dataset(name, data, layout, per_class, picks, ids, shared)
        elif name == "fgvc_aircraft":
            out[name] = _make_aircraft(data, layout, per_class, picks, ids, shared)
        elif name in CIFAR_FOLDERS:
            out[name] = _make_cifar(name, data, per_class, picks, ids, shared)
        else:
            out[name] = _make_imagenet(name, data, layout, per_class, picks, ids, shared)
    return out


@pytest.fixture
def make_dataset_tree(tmp_path_factory, shared_dir):
    """A factory: ``make_dataset_tree(datasets=..., layout="coop"|"tpt", per_class=1, classes_per_dataset=None)``.

    Each call builds a fresh tree under its own temporary folder and returns :func:`make_tree`'s result.
    """

    def make(
        datasets: Iterable[str] | None = None,
        layout: str = "coop",
        per_class: int = 1,
        classes_per_dataset: int | None = None,
    ) -> dict[str, SyntheticDataset]:
        root = tmp_path_factory.mktemp(f"data-{layout}")
        return make_tree(root, datasets, layout, per_class, classes_per_dataset, shared=shared_dir)

    return make


def noise_folder(root: Path, names: Sequence[str], per_class: int, seed: int, shape: tuple[int, int]) -> Path:
    """``root/NAME/I.png``: ``per_class`` images of seeded uniform noise (``shape`` = (height, width))
    for each class of ``names``, drawn class by class from one ``default_rng(seed)``; returns ``root``."""
    rng = np.random.default_rng(seed)
    for name in names:
        for i in range(per_class):
            path = root / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)
    return root
