"""What protext knows about each supported dataset: names, folders in both layouts, published sizes.

Light on purpose (no torch, no PIL): ``--help`` and the template helpers import only this.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset on disk is missing or malformed, or a dataset argument is wrong.

    The message names the path (or argument) at fault and the layout expected. It stays a
    ``ValueError`` for one release, because callers written before ``UserError`` catch that.
    """


IMAGENET_FAMILY: tuple[str, ...] = ("imagenet", "imagenet_a", "imagenet_r", "imagenet_v2", "imagenet_sketch")


@dataclass(frozen=True)
class SplitLayout:
    """Where a split-file dataset lives in CoOp/Dassl's layout and in TPT's.

    Split paths are relative to the image folder: CoOp keeps ``split_file`` in ``coop_folder``
    with the images under ``coop_folder/coop_images``; TPT keeps the images under
    ``tpt_folder/tpt_images`` (its ``path_dict``) and every split file in ``data_splits/``.
    """

    split_file: str
    coop_folder: str
    coop_images: str
    tpt_folder: str
    tpt_images: str
    other_folders: tuple[str, ...] = ()  # further spellings seen in the wild

    @property
    def folders(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.coop_folder, self.tpt_folder, *self.other_folders)))

    @property
    def image_dirs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.coop_images, self.tpt_images, "")))


SPLIT_LAYOUTS: dict[str, SplitLayout] = {
    "caltech101": SplitLayout(
        "split_zhou_Caltech101.json", "caltech-101", "101_ObjectCategories", "Caltech101", "", ("caltech101",)
    ),
    "dtd": SplitLayout("split_zhou_DescribableTextures.json", "dtd", "images", "DTD", "images"),
    "eurosat": SplitLayout("split_zhou_EuroSAT.json", "eurosat", "2750", "eurosat", "", ("EuroSAT",)),
    "food101": SplitLayout("split_zhou_Food101.json", "food-101", "images", "Food101", "images", ("food101",)),
    "oxford_flowers": SplitLayout(
        "split_zhou_OxfordFlowers.json", "oxford_flowers", "jpg", "Flower102", "jpg", ("flower102",)
    ),
    "oxford_pets": SplitLayout("split_zhou_OxfordPets.json", "oxford_pets", "images", "OxfordPets", ""),
    "stanford_cars": SplitLayout("split_zhou_StanfordCars.json", "stanford_cars", "", "StanfordCars", ""),
    "sun397": SplitLayout("split_zhou_SUN397.json", "sun397", "SUN397", "SUN397", ""),
    "ucf101": SplitLayout("split_zhou_UCF101.json", "ucf101", "UCF-101-midframes", "UCF101", ""),
}

#: TPT reads its split files from ``data/data_splits/`` of its checkout; protext looks for that
#: folder under the data root (either spelling), or takes it from ``splits_dir``
SPLITS_FOLDERS: tuple[str, ...] = ("data_splits", "data/data_splits")

#: FGVC Aircraft has the same folder in both layouts (variants.txt, images_variant_*.txt, images/)
AIRCRAFT_FOLDERS: tuple[str, ...] = ("fgvc_aircraft", "fgvc-aircraft-2013b/data", "FGVCAircraft")

#: ImageNet-family image folders relative to the root: CoOp's first, TPT's second, then others
#: (``{partition}`` is ``val`` for the test partition, ``train`` for train)
IMAGENET_DIRS: dict[str, tuple[str, ...]] = {
    "imagenet": (
        "imagenet/images/{partition}",
        "ImageNet/{partition}",
        "imagenet/{partition}",
        "images/{partition}",
        "{partition}",
    ),
    "imagenet_a": ("imagenet-adversarial/imagenet-a", "imagenet-a"),
    "imagenet_r": ("imagenet-rendition/imagenet-r", "imagenet-r"),
    "imagenet_v2": ("imagenetv2/imagenetv2-matched-frequency-format-val", "imagenetv2-matched-frequency-format-val"),
    "imagenet_sketch": (
        "imagenet-sketch/images",
        "ImageNet-Sketch",
        "ImageNet-Sketch/sketch",
        "ImageNet-Sketch/images",
        "imagenet-sketch/sketch",
        "sketch",
        "images",
    ),
}

#: torchvision's folder names (what ``CIFAR10(root, download=True)`` leaves under ``root``)
CIFAR_FOLDERS: dict[str, str] = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}

DATASET_NAMES: tuple[str, ...] = (
    *IMAGENET_FAMILY,
    "caltech101",
    "dtd",
    "eurosat",
    "fgvc_aircraft",
    "food101",
    "oxford_flowers",
    "oxford_pets",
    "stanford_cars",
    "sun397",
    "ucf101",
    *CIFAR_FOLDERS,
)

#: test-partition sizes of the published releases and splits (CoOp's DATASETS.md, the variants' papers)
PUBLISHED_TEST_IMAGES: dict[str, int] = {
    "imagenet": 50000,
    "imagenet_a": 7500,
    "imagenet_r": 30000,
    "imagenet_v2": 10000,
    "imagenet_sketch": 50889,
    "caltech101": 2465,
    "dtd": 1692,
    "eurosat": 8100,
    "fgvc_aircraft": 3333,
    "food101": 30300,
    "oxford_flowers": 2463,
    "oxford_pets": 3669,
    "stanford_cars": 8041,
    "sun397": 19850,
    "ucf101": 3783,
    "cifar10": 10000,
    "cifar100": 10000,
}

#: the class halves of base-to-novel, and the image parts of a dataset
SPLITS: tuple[str, ...] = ("all", "base", "novel")
PARTITIONS: tuple[str, ...] = ("train", "val", "test")

# Names users already type elsewhere (CoOp class names, TPT set ids, folder names).
_ALIASES: dict[str, str] = {
    "i": "imagenet",
    "a": "imagenet_a",
    "r": "imagenet_r",
    "v": "imagenet_v2",
    "k": "imagenet_sketch",
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
    "cifar_10": "cifar10",
    "cifar_100": "cifar100",
}


def canonical_name(name: str) -> str:
    """The canonical key of a dataset name or alias (``DTD`` -> ``dtd``, ``imagenet-a`` -> ``imagenet_a``).

    ``folder`` (a plain image folder) is returned as is; anything unknown is a :class:`DatasetError`.
    """
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key != "folder" and key not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset {name!r}; expected 'folder' or one of {', '.join(DATASET_NAMES)}")
    return key


def is_imagenet_family(name: str) -> bool:
    """True for ImageNet and its four variants (TPT uses crops and flips only, no AugMix, on them)."""
    try:
        return canonical_name(name) in IMAGENET_FAMILY
    except DatasetError:
        return False


def dataset_template(name: str, rule: str = "protext") -> str:
    """The template ``rule`` (``protext``, ``coop`` or ``tpt``; see :mod:`protext.templates`) gives ``name``."""
    from ..templates import template_for

    try:
        key = canonical_name(name)
    except DatasetError:
        key = name  # a name protext cannot read still gets the default template
    return template_for(key, rule)
