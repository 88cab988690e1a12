"""Image datasets for evaluation behind one small builder.

Supported: a plain image folder (one sub-folder per class), the ten cross datasets in the CoOp
layout (``split_zhou_*.json``; FGVC Aircraft with ``variants.txt`` and ``images_variant_*.txt``),
ImageNet val and its four variants. Both folder conventions found on disk are accepted, CoOp/Dassl's
(``<root>/dtd/images``, ``<root>/imagenet/images/val`` ...) and TPT's (``<root>/DTD``,
``<root>/ImageNet/val`` ...), and ``root`` may be the dataset folder itself or its parent.

Labels and class names:
- split files carry ``[relative path, label, classname]``; the class list is gathered over all
  splits of the file so that train and test agree on the label space;
- ImageNet val and -Sketch use the 1000 ImageNet labels (folders named by WordNet id); ImageNet-A
  and -R use 200 labels, the positions of their classes in the ImageNet label order; ImageNet-V2's
  folders are named ``0``..``999`` and hold that ImageNet label (they sort as strings, so folder
  order is *not* label order);
- ``subset`` keeps the base (first ceil(n/2)) or novel (the rest) labels and relabels them 0..k-1.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch.utils.data
from PIL import Image

from .presets import DATASETS as PRESET_DATASETS
from .presets import cross_dataset_template

__all__ = [
    "DATASET_NAMES",
    "DatasetError",
    "ImageDataset",
    "build_dataset",
    "dataset_template",
    "is_imagenet_family",
    "split_classes",
]

DATASET_NAMES: tuple[str, ...] = (
    "imagenet",
    "imagenet_a",
    "imagenet_r",
    "imagenet_v2",
    "imagenet_sketch",
    *(name for name in PRESET_DATASETS if name != "imagenet"),
)
_IMAGENET_FAMILY = frozenset(DATASET_NAMES[:5])
SPLITS: tuple[str, ...] = ("train", "val", "test")
SUBSETS: tuple[str, ...] = ("all", "base", "novel")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

# Names users already type elsewhere (CoOp class names, TPT set ids, folder names).
_ALIASES: dict[str, str] = {
    "imagenetv2": "imagenet_v2",
    "imagenet_adversarial": "imagenet_a",
    "imagenet_rendition": "imagenet_r",
    "imagenetsketch": "imagenet_sketch",
    "imagenet_s": "imagenet_sketch",
    "caltech": "caltech101",
    "caltech_101": "caltech101",
    "describabletextures": "dtd",
    "describable_textures": "dtd",
    "aircraft": "fgvc_aircraft",
    "fgvcaircraft": "fgvc_aircraft",
    "food_101": "food101",
    "flower102": "oxford_flowers",
    "flowers102": "oxford_flowers",
    "oxfordflowers": "oxford_flowers",
    "pets": "oxford_pets",
    "oxfordpets": "oxford_pets",
    "cars": "stanford_cars",
    "stanfordcars": "stanford_cars",
    "ucf_101": "ucf101",
    "sun_397": "sun397",
}



class DatasetError(ValueError):
    """A dataset on disk is missing or malformed; the message names the path and the layout expected."""


# ----------------------------------------------------------------------------------------------
# Public helpers
# ----------------------------------------------------------------------------------------------


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    return _ALIASES.get(key, key)


def dataset_template(name: str) -> str:
    """The cross-dataset prompt template of PRESETS.md (``"a photo of a {}."`` unless listed)."""
    return cross_dataset_template(_canonical(name))


def is_imagenet_family(name: str) -> bool:
    """True for ImageNet and its four variants (TPT uses crops and flips only, no AugMix, on them)."""
    return _canonical(name) in _IMAGENET_FAMILY


def split_classes(n: int, subset: str) -> range:
    """Labels of a class subset: ``base`` = first ceil(n/2), ``novel`` = the rest, ``all`` = 0..n-1."""
    if n < 0:
        raise ValueError(f"number of classes must be >= 0, got {n}")
    subset = "novel" if subset == "new" else subset  # CoOp calls the novel half "new"
    half = math.ceil(n / 2)
    if subset == "all":
        return range(n)
    if subset == "base":
        return range(half)
    if subset == "novel":
        return range(half, n)
    raise ValueError(f"unknown class subset {subset!r}; expected one of {SUBSETS}")


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------


@dataclass
class ImageDataset(torch.utils.data.Dataset):
    """A list of (image path, label) with class names; items are (image, label).

    The image is an RGB PIL image, passed through ``transform`` when one is set.
    """

    name: str
    root: Path
    samples: list[tuple[Path, int]]
    classnames: list[str]
    transform: Callable | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read image {path}: {e}") from e
        return (self.transform(image) if self.transform is not None else image), label

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, root={str(self.root)!r}, images={len(self.samples)}, "
            f"classes={len(self.classnames)})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def build_dataset(
    name: str,
    root: str | Path,
    split: str = "test",
    subset: str = "all",
    classnames_file: str | Path | None = None,
    transform: Callable | None = None,
) -> ImageDataset:
    """Build the ``split`` of dataset ``name`` found under ``root``.

    ``name`` is one of ``DATASET_NAMES`` (common aliases such as ``dtd``/``DTD``, ``pets``,
    ``imagenet-a`` are accepted) or ``"folder"`` for a plain image folder (``split`` is ignored
    there: ``root`` is the folder whose sub-folders are the classes). ``subset`` is
    ``all``/``base``/``novel``. ``classnames_file`` (.txt, one name per line, or a .json list)
    replaces the class names; it may list all classes or only those of ``subset``.

    Raises ``DatasetError`` naming the file or folder at fault and the expected layout.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    split_classes(0, subset)  # validates ``subset`` before touching the disk
    root = Path(root).expanduser()
    canonical = "folder" if name == "folder" else _canonical(name)
    if canonical != "folder" and canonical not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected 'folder' or one of {', '.join(DATASET_NAMES)}")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder ({_layout_hint(canonical)})")

    if canonical == "folder":
        samples, classnames = _read_class_folders(root, _layout_hint("folder"))
        data_root = root
    elif canonical in _IMAGENET_FAMILY:
        data_root, samples, classnames = _read_imagenet(canonical, root, split)
    elif canonical == "fgvc_aircraft":
        data_root, samples, classnames = _read_aircraft(root, split)
    else:
        data_root, samples, classnames = _read_coop_split(canonical, root, split)

    if not samples:
        raise DatasetError(
            f"no images found for {canonical} split {split!r} in {data_root} ({_layout_hint(canonical)})"
        )

    n = len(classnames)
    keep = split_classes(n, subset)
    if classnames_file is not None:
        names = _read_classnames_file(Path(classnames_file))
        if len(names) == n:
            classnames = names
        elif subset != "all" and len(names) == len(keep):
            classnames = classnames[: keep.start] + names + classnames[keep.stop :]
        else:
            extra = f" or {len(keep)} ({subset} classes)" if subset != "all" else ""
            raise DatasetError(
                f"class names file {classnames_file} lists {len(names)} names, but {canonical} at {data_root} "
                f"has {n} classes{extra}"
            )
    if subset != "all":
        samples = [(p, y - keep.start) for p, y in samples if y in keep]
        classnames = classnames[keep.start : keep.stop]
        if not samples:
            raise DatasetError(
                f"no images of the {subset} classes (labels {keep.start}..{keep.stop - 1}) in {data_root}"
            )
    return ImageDataset(
        name=canonical, root=data_root, samples=samples, classnames=list(classnames), transform=transform
    )


# ----------------------------------------------------------------------------------------------
# Layout descriptions (for error messages)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SplitLayout:
    split_file: str
    folders: tuple[str, ...]  # dataset folder names under the parent root: CoOp's first, then TPT's
    image_dirs: tuple[str, ...]  # where split paths are relative to, inside the dataset folder


_SPLIT_LAYOUTS: dict[str, _SplitLayout] = {
    "caltech101": _SplitLayout(
        "split_zhou_Caltech101.json", ("caltech-101", "Caltech101", "caltech101"), ("101_ObjectCategories", "")
    ),
    "dtd": _SplitLayout("split_zhou_DescribableTextures.json", ("dtd", "DTD"), ("images", "")),
    "eurosat": _SplitLayout("split_zhou_EuroSAT.json", ("eurosat", "EuroSAT"), ("2750", "")),
    "food101": _SplitLayout("split_zhou_Food101.json", ("food-101", "Food101", "food101"), ("images", "")),
    "oxford_flowers": _SplitLayout(
        "split_zhou_OxfordFlowers.json", ("oxford_flowers", "Flower102", "flower102"), ("jpg", "")
    ),
    "oxford_pets": _SplitLayout("split_zhou_OxfordPets.json", ("oxford_pets", "OxfordPets"), ("images", "")),
    "stanford_cars": _SplitLayout("split_zhou_StanfordCars.json", ("stanford_cars", "StanfordCars"), ("",)),
    "sun397": _SplitLayout("split_zhou_SUN397.json", ("sun397", "SUN397"), ("SUN397", "")),
    "ucf101": _SplitLayout("split_zhou_UCF101.json", ("ucf101", "UCF101"), ("UCF-101-midframes", "")),
}

# Image folders of the ImageNet family, relative to the root, tried in order ("" = root itself).
_IMAGENET_DIRS: dict[str, tuple[str, ...]] = {
    "imagenet": ("imagenet/images/{split}", "ImageNet/{split}", "imagenet/{split}", "images/{split}", "{split}", ""),
    "imagenet_a": ("imagenet-adversarial/imagenet-a", "imagenet-a", ""),
    "imagenet_r": ("imagenet-rendition/imagenet-r", "imagenet-r", ""),
    "imagenet_v2": (
        "imagenetv2/imagenetv2-matched-frequency-format-val",
        "imagenetv2-matched-frequency-format-val",
        "",
    ),
    "imagenet_sketch": (
        "imagenet-sketch/images",
        "ImageNet-Sketch",
        "ImageNet-Sketch/sketch",
        "ImageNet-Sketch/images",
        "imagenet-sketch/sketch",
        "sketch",
        "images",
        "",
    ),
}
_AIRCRAFT_FOLDERS = ("fgvc_aircraft", "fgvc-aircraft-2013b/data", "FGVCAircraft")


def _layout_hint(name: str) -> str:
    if name == "folder":
        return "expected <root>/<class name>/<image>, one sub-folder per class"
    if name in _SPLIT_LAYOUTS:
        lay = _SPLIT_LAYOUTS[name]
        coop_images = "/".join(p for p in (lay.folders[0], lay.image_dirs[0]) if p)
        return (
            f"expected the CoOp layout <root>/{lay.folders[0]}/{lay.split_file} with images under "
            f"<root>/{coop_images}/, or TPT's <root>/{lay.folders[1]}/ holding the images and "
            f"{lay.split_file}; <root> may also be the dataset folder itself"
        )
    if name == "fgvc_aircraft":
        return (
            "expected <root>/fgvc_aircraft/ holding variants.txt, images_variant_{train,val,test}.txt and "
            "images/<id>.jpg (CoOp and TPT); <root> may also be that folder itself"
        )
    if name in _IMAGENET_DIRS:
        kind = (
            "folders 0..999 named by label" if name == "imagenet_v2" else "one folder per WordNet id (n01440764, ...)"
        )
        where = ", ".join(f"<root>/{d}" for d in _IMAGENET_DIRS[name] if d)
        return f"expected {kind} in one of {where}, or in <root> itself"
    return "see the protext.datasets documentation"


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------


def _is_image(filename: str) -> bool:
    return os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS


def _subfolders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    """Images under ``folder`` (recursively, like torchvision's ImageFolder), in a stable order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(f) and not f.startswith("."))
    return found


def _read_class_folders(folder: Path, hint: str) -> tuple[list[tuple[Path, int]], list[str]]:
    """One sub-folder per class, sorted; labels are positions in that order."""
    classes = _subfolders(folder)
    if not classes:
        raise DatasetError(f"{folder} has no class sub-folders ({hint})")
    samples: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        images = _images_in(folder / cls)
        if not images:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DatasetError(f"class folder {folder / cls} holds no images ({extensions}); {hint}")
        samples.extend((p, label) for p in images)
    return samples, classes


@lru_cache(maxsize=1)
def _imagenet_facts() -> tuple[tuple[str, ...], dict[str, int], tuple[int, ...], tuple[int, ...]]:
    """(wnids in label order, wnid -> label, ImageNet-A labels, ImageNet-R labels) from package data."""
    text = resources.files("protext").joinpath("data/imagenet_variants.json").read_text()
    data = json.loads(text)
    wnids = tuple(data["imagenet_wnids"])
    label_of = {w: i for i, w in enumerate(wnids)}
    return wnids, label_of, tuple(data["imagenet_a_indices"]), tuple(data["imagenet_r_indices"])


def _imagenet_classnames() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


_WNID = re.compile(r"n\d{8}")
_V2_FOLDER = re.compile(r"\d+")


def _read_imagenet(name: str, root: Path, split: str) -> tuple[Path, list[tuple[Path, int]], list[str]]:
    if name != "imagenet" and split == "train":
        raise DatasetError(f"{name} is a test set; it has no train split (root {root})")
    sub = "train" if split == "train" else "val"
    pattern = _V2_FOLDER if name == "imagenet_v2" else _WNID
    hint = _layout_hint(name)
    tried: list[Path] = []
    folder: Path | None = None
    for rel in _IMAGENET_DIRS[name]:
        cand = root / rel.format(split=sub) if rel else root
        tried.append(cand)
        if cand.is_dir() and any(pattern.fullmatch(d) for d in _subfolders(cand)):
            folder = cand
            break
    if folder is None:
        looked = ", ".join(map(str, tried))
        raise DatasetError(f"no {name} image folders found under {root} (looked in {looked}); {hint}")

    wnids, wnid_to_label, a_idx, r_idx = _imagenet_facts()
    all_names = _imagenet_classnames()
    if name == "imagenet_a" or name == "imagenet_r":
        indices = a_idx if name == "imagenet_a" else r_idx
        position = {wnids[label]: k for k, label in enumerate(indices)}
        classnames = [all_names[label] for label in indices]
    else:
        classnames = all_names

    samples: list[tuple[Path, int]] = []
    for cls in _subfolders(folder):
        if name == "imagenet_v2":
            if not _V2_FOLDER.fullmatch(cls) or not 0 <= int(cls) < 1000:
                raise DatasetError(f"unexpected folder {folder / cls}: ImageNet-V2 folders are named 0..999; {hint}")
            # Folder k holds ImageNet label k. Sorting the names as strings (0, 1, 10, 100, ...)
            # and enumerating, as a plain ImageFolder does, would scramble the labels.
            label = int(cls)
        elif name in ("imagenet_a", "imagenet_r"):
            if cls not in position:
                raise DatasetError(f"unexpected folder {folder / cls}: not one of the 200 {name} WordNet ids; {hint}")
            label = position[cls]
        else:
            if cls not in wnid_to_label:
                raise DatasetError(f"unexpected folder {folder / cls}: not an ImageNet-1k WordNet id; {hint}")
            label = wnid_to_label[cls]
        images = _images_in(folder / cls)
        if not images:
            raise DatasetError(f"class folder {folder / cls} holds no images; {hint}")
        samples.extend((p, label) for p in images)
    samples.sort(key=lambda s: (s[1], str(s[0])))
    return folder, samples, classnames


def _find_dataset_dir(root: Path, folders: tuple[str, ...], required: str) -> Path | None:
    """The dataset folder holding ``required``: ``root`` itself or one of ``folders`` under it."""
    for cand in [root, *(root / f for f in folders)]:
        if (cand / required).is_file():
            return cand
    return None


def _read_coop_split(name: str, root: Path, split: str) -> tuple[Path, list[tuple[Path, int]], list[str]]:
    lay = _SPLIT_LAYOUTS[name]
    hint = _layout_hint(name)
    dataset_dir = _find_dataset_dir(root, lay.folders, lay.split_file)
    if dataset_dir is None:
        looked = ", ".join(str(p / lay.split_file) for p in [root, *(root / f for f in lay.folders)])
        raise DatasetError(f"split file {lay.split_file} not found (looked for {looked}); {hint}")
    split_path = dataset_dir / lay.split_file
    entries, names = _parse_split_json(split_path, split)
    if not entries:
        raise DatasetError(f"split file {split_path} lists no images under {split!r}")

    # Split paths are relative to the image folder, which CoOp keeps in a sub-folder and TPT's
    # users often flatten: take the first candidate that holds the first listed image.
    candidates = [dataset_dir / d if d else dataset_dir for d in lay.image_dirs]
    if "" not in lay.image_dirs:
        candidates.append(dataset_dir)
    first = entries[0][0]
    image_dir = next((c for c in candidates if (c / first).is_file()), None)
    if image_dir is None:
        looked = ", ".join(str(c / first) for c in candidates)
        raise DatasetError(f"image {first} listed in {split_path} does not exist (looked for {looked}); {hint}")
    samples = [(image_dir / rel, label) for rel, label in entries]
    _check_exist(samples, split_path)
    return dataset_dir, samples, names


def _parse_split_json(path: Path, split: str) -> tuple[list[tuple[str, int]], list[str]]:
    """Entries ``(relative path, label)`` of ``split`` and the class names over all splits."""
    expected = 'a JSON object {"train"|"val"|"test": [[relative image path, label, classname], ...]}'
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"malformed split file {path}: {e}; expected {expected}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read split file {path}: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"malformed split file {path}: top level is {type(data).__name__}; expected {expected}")
    if split not in data:
        raise DatasetError(f"split file {path} has no {split!r} list (keys: {sorted(data)}); expected {expected}")

    label_names: dict[int, str] = {}
    wanted: list[tuple[str, int]] = []
    for key, items in data.items():
        if key not in SPLITS:
            continue
        if not isinstance(items, list):
            raise DatasetError(f"malformed split file {path}: {key!r} is not a list; expected {expected}")
        for k, item in enumerate(items):
            ok = (
                isinstance(item, (list, tuple))
                and len(item) == 3
                and isinstance(item[0], str)
                and isinstance(item[1], int)
                and not isinstance(item[1], bool)
                and item[1] >= 0
                and isinstance(item[2], str)
            )
            if not ok:
                raise DatasetError(
                    f"malformed split file {path}: entry {k} of {key!r} is {item!r}; expected {expected}"
                )
            label_names.setdefault(item[1], item[2])
            if key == split:
                wanted.append((item[0], item[1]))
    n = max(label_names) + 1 if label_names else 0
    missing = [y for y in range(n) if y not in label_names]
    if missing:
        raise DatasetError(
            f"split file {path}: labels {missing[:10]} have no entries, so their class names are unknown"
        )
    return wanted, [label_names[y] for y in range(n)]


def _check_exist(samples: list[tuple[Path, int]], listed_in: Path) -> None:
    missing = [p for p, _ in samples if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(f"image {missing[0]} listed in {listed_in} does not exist{more}")


def _read_aircraft(root: Path, split: str) -> tuple[Path, list[tuple[Path, int]], list[str]]:
    hint = _layout_hint("fgvc_aircraft")
    dataset_dir = _find_dataset_dir(root, _AIRCRAFT_FOLDERS, "variants.txt")
    if dataset_dir is None:
        looked = ", ".join(str(p / "variants.txt") for p in [root, *(root / f for f in _AIRCRAFT_FOLDERS)])
        raise DatasetError(f"variants.txt not found (looked for {looked}); {hint}")
    variants_path = dataset_dir / "variants.txt"
    classnames = [line.strip() for line in variants_path.read_text().splitlines() if line.strip()]
    label_of = {c: i for i, c in enumerate(classnames)}
    list_path = dataset_dir / f"images_variant_{split}.txt"
    if not list_path.is_file():
        raise DatasetError(f"split file {list_path} not found; {hint}")
    samples: list[tuple[Path, int]] = []
    for lineno, line in enumerate(list_path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        image_id, _, variant = line.partition(" ")
        if variant not in label_of:
            raise DatasetError(
                f"{list_path} line {lineno}: variant {variant!r} is not in {variants_path}; "
                "expected '<image id> <variant>' per line"
            )
        samples.append((dataset_dir / "images" / f"{image_id}.jpg", label_of[variant]))
    _check_exist(samples, list_path)
    return dataset_dir, samples, classnames


_WNID_PREFIX = re.compile(r"^n\d{8}\s+")


def _read_classnames_file(path: Path) -> list[str]:
    """Class names from a .json list or a text file with one name per line.

    Lines of the form ``n01440764 tench`` (CoOp's ImageNet ``classnames.txt``) drop the WordNet id.
    """
    if not path.is_file():
        raise DatasetError(f"class names file {path} not found; expected a .txt (one name per line) or a .json list")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"malformed class names file {path}: {e}; expected a JSON list of strings") from e
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DatasetError(f"malformed class names file {path}: expected a JSON list of strings")
        return names
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and all(_WNID_PREFIX.match(line) for line in lines):
        lines = [_WNID_PREFIX.sub("", line) for line in lines]
    return lines
