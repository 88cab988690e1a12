"""Class lists: the one reader for every kind of class-list file, and the base/novel halves.

Every command that takes ``--classes`` reads it here, so a file means the same classes everywhere:

- a built-in name (:data:`BUILTIN`): one of the eleven datasets of the published protocols, whose
  class names in label order ship with the package (``protext/data/classnames/``): ``imagenet``
  (CLIP's 1,000 names), ``dtd``, ``eurosat``, ``oxford_pets``, ... A file of that name, if one
  exists, is read instead;
- a ``.txt`` file, one name per line; a line that starts with a WordNet id (CoOp's ImageNet
  ``classnames.txt``: ``n01440764 tench``) loses the id, line by line; blank lines and ``#`` comments
  are skipped;
- a ``.json`` list of names, or ``{"classnames": [...]}``;
- a CoOp/Dassl split file (``split_zhou_*.json``: ``{"train"|"val"|"test": [[path, label, name], ...]}``),
  whose names are taken in label order.

Names come back as written in the file (``_`` kept; :func:`clean_classname` makes the prompt form).
Names that differ only in case, ``_`` or spacing are one class (:func:`class_key`);
:func:`check_distinct_classes` refuses a list that names one class twice.
Base-to-novel follows CoOp: classes sorted by label, base = the first ``ceil(n/2)``, novel = the rest.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Sequence

from .errors import UserError

#: the class halves of the base-to-novel protocol ("all" = every class)
SPLITS = ("all", "base", "novel")
#: the image parts of a CoOp split file
PARTITIONS = ("train", "val", "test")
#: the class lists that ship with the package, by dataset name: the file in ``protext/data/classnames/``
#: (each the dataset's class names in label order, as the published protocols number them)
BUILTIN_FILES = {
    "imagenet": "imagenet.json",
    "caltech101": "caltech101.json",
    "dtd": "dtd.json",
    "eurosat": "eurosat.json",
    "fgvc_aircraft": "aircraft.json",
    "food101": "food101.json",
    "oxford_flowers": "flower102.json",
    "oxford_pets": "pets.json",
    "stanford_cars": "cars.json",
    "sun397": "sun397.json",
    "ucf101": "ucf101.json",
}
#: class lists known by name
BUILTIN = tuple(BUILTIN_FILES)

_WNID = re.compile(r"^n\d{8}\s+")
_SPLIT_ENTRY = "[relative image path, label, classname]"


class ClassListError(UserError):
    """A class list or split file that cannot be read; the message names the file."""


#: the classes whose names coincide in CLIP's ImageNet list (labels 657 and 744 are both 'missile',
#: 836 and 837 both 'sunglasses'): the published protocols use these names as they are
IMAGENET_COINCIDENCES = frozenset({"missile", "sunglasses"})


def class_key(name: str) -> str:
    """What identifies a class name: lowercase, ``_`` as a space, single spaces (the same rule as
    :func:`protext.descriptions.normalize_classname`, tested equal)."""
    return " ".join(name.lower().replace("_", " ").split())


def duplicate_classes(names: Sequence[str]) -> dict[str, list[int]]:
    """Every class key named more than once, with the labels (positions) naming it, in list order."""
    labels: dict[str, list[int]] = {}
    for label, name in enumerate(names):
        labels.setdefault(class_key(name), []).append(label)
    return {key: found for key, found in labels.items() if len(found) > 1}


def check_distinct_classes(names: Sequence[str], source: str, allowed: frozenset[str] = frozenset()) -> None:
    """Refuse a class list that names one class twice, naming ``source`` and the first such name.

    Two labels with one name get the same text features and, in per-class results, one entry:
    the classes merge without a word. ``allowed`` lists class keys that may repeat (CLIP's own
    ImageNet names, :data:`IMAGENET_COINCIDENCES`).

    Raises:
        ClassListError: ``source: classes 3 'Cat' and 7 'cat' are one class ...``.
    """
    for key, labels in duplicate_classes(names).items():
        if key in allowed:
            continue
        shown = " and ".join(f"{label} {names[label]!r}" for label in labels[:3])
        more = f" (and {len(labels) - 3} more)" if len(labels) > 3 else ""
        raise ClassListError(
            f"{source}: classes {shown}{more} are one class name (names that differ only in case, '_' or spacing are "
            "one class), so their results would merge; rename or remove the duplicate."
        )


def clean_classname(name: str) -> str:
    """The form a class name takes inside a prompt: ``_`` as a space, runs of spaces collapsed."""
    return " ".join(name.replace("_", " ").split())


def split_range(n: int, split: str) -> range:
    """Labels of a class half: ``base`` = ``0 .. ceil(n/2)-1``, ``novel`` = the rest, ``all`` = every label."""
    if n < 0:
        raise ValueError(f"number of classes must be >= 0, got {n}")
    if split not in SPLITS:
        raise ClassListError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    half = math.ceil(n / 2)
    return {"all": range(n), "base": range(half), "novel": range(half, n)}[split]


def split_classes(names: Sequence[str], split: str) -> list[str]:
    """The names of a class half (``names`` in label order)."""
    return [names[i] for i in split_range(len(names), split)]


def read_split_file(path: str | os.PathLike) -> dict[str, list[tuple[str, int, str]]]:
    """A CoOp split file as ``{partition: [(relative path, label, classname), ...]}``.

    Every entry is checked: a malformed one is an error naming the file, the partition and the index.
    """
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not any(part in data for part in PARTITIONS):
        raise ClassListError(f"{path}: not a CoOp split file; expected {{\"train\"|\"val\"|\"test\": [{_SPLIT_ENTRY}, ...]}}")
    parts: dict[str, list[tuple[str, int, str]]] = {}
    for part in PARTITIONS:
        items = data.get(part)
        if items is None:
            continue
        if not isinstance(items, list):
            raise ClassListError(f"{path}: '{part}' is not a list of {_SPLIT_ENTRY}")
        entries = []
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
                raise ClassListError(f"{path}: entry {k} of '{part}' is {item!r}; expected {_SPLIT_ENTRY}")
            entries.append((item[0], item[1], item[2]))
        parts[part] = entries
    return parts


def split_file_classes(path: str | os.PathLike) -> list[str]:
    """The class names of a CoOp split file in label order (labels must be ``0 .. n-1``, one name each)."""
    path = Path(path)
    by_label: dict[int, str] = {}
    for part, entries in read_split_file(path).items():
        for _, label, name in entries:
            if by_label.setdefault(label, name) != name:
                raise ClassListError(f"{path}: label {label} is named both {by_label[label]!r} and {name!r}")
    if not by_label:
        raise ClassListError(f"{path}: the split file lists no images, so it names no classes")
    missing = sorted(set(range(max(by_label) + 1)) - set(by_label))
    if missing:
        raise ClassListError(f"{path}: labels {missing[:10]} have no entries, so their class names are unknown")
    return [by_label[i] for i in range(len(by_label))]


def read_classes(spec: str | os.PathLike) -> list[str]:
    """Class names in label order from a built-in name or a file (see the module docstring).

    Raises :class:`ClassListError` naming the file for anything unreadable, empty or malformed.
    """
    path = Path(spec)
    if is_builtin(spec):
        return builtin_classes(str(spec))
    if not path.is_file():
        raise ClassListError(
            f"{spec}: no such file, and not a built-in class list ({', '.join(BUILTIN)}); "
            "expected a .txt (one name per line), a .json list or a CoOp split_zhou_*.json"
        )
    if path.suffix.lower() == ".json":
        names = _names_from_json(path)
    else:
        names = _names_from_text(path)
    if not names:
        raise ClassListError(f"{path}: no class names in the file")
    for i, name in enumerate(names):
        if not name.strip():
            raise ClassListError(f"{path}: class {i} has an empty name")
    return names


def is_builtin(spec: str | os.PathLike | None) -> bool:
    """Whether ``spec`` names a built-in class list (and no file of that name exists)."""
    return spec is not None and str(spec).lower() in BUILTIN_FILES and not Path(spec).exists()


def builtin_classes(name: str) -> list[str]:
    """The shipped class list of dataset ``name`` (:data:`BUILTIN`), names in label order."""
    from importlib import resources

    key = name.lower()
    if key not in BUILTIN_FILES:
        raise ClassListError(f"{name}: not a built-in class list; built-in: {', '.join(BUILTIN)}")
    text = resources.files("protext").joinpath("data", "classnames", BUILTIN_FILES[key]).read_text(encoding="utf-8")
    return [str(n) for n in json.loads(text)]


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClassListError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise ClassListError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ClassListError(f"{path}: cannot be read ({err})") from None


def _names_from_json(path: Path) -> list[str]:
    data = _load_json(path)
    if isinstance(data, dict) and isinstance(data.get("classnames"), list):
        data = data["classnames"]
    if isinstance(data, list):
        if not all(isinstance(name, str) for name in data):
            raise ClassListError(f"{path}: a JSON class list must hold only strings")
        return [name.strip() for name in data]
    if isinstance(data, dict) and any(part in data for part in PARTITIONS):
        return split_file_classes(path)
    raise ClassListError(
        f"{path}: expected a JSON list of class names, {{\"classnames\": [...]}} or a CoOp split file"
    )


def _names_from_text(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ClassListError(f"{path}: cannot be read ({err})") from None
    names = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # CoOp's ImageNet classnames.txt: "n01440764 tench"; a WordNet id is never part of a name
        names.append(_WNID.sub("", line).strip())
    return names
