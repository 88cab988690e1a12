"""Which classes a run trains on, and their descriptions as samples.

Without ``--classes``: every class of the description file, in file order. With it: those names
(matched case-insensitively, ``_`` as a space), which the prompts then use; ``--split base|novel``
takes the first ceil(n/2) / the remaining names. What is left out is said: dropped description
classes in a note, selected classes without descriptions in a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from ..presets import Settings
from .config import TrainJobError
from .job import TrainJob
from .pairs import TextPairs

MAX_LISTED = 40
"""Class names listed in a message before the rest is counted (ImageNet has 1,000)."""


@dataclass
class ClassSelection:
    """Descriptions keyed by the class names the prompts will use, and what was left out."""

    descriptions: dict[str, list[str]]
    missing: list[str]  # selected classes with no description
    dropped: list[str]  # description classes not selected
    merged: list[str]  # duplicate selected names merged


def select_classes(descriptions: Mapping[str, list[str]], wanted: Optional[Sequence[str]]) -> ClassSelection:
    """Match the wanted class names (None: all, in file order) to the description file's classes.

    Names match case-insensitively with ``_`` as a space; the prompts use the wanted spelling.
    """
    from ..descriptions import match_classnames, normalize_classname

    if wanted is None:
        return ClassSelection(dict(descriptions), [], [], [])
    unique: dict[str, str] = {}
    merged = []
    for name in wanted:
        key = normalize_classname(name)
        if key in unique:
            merged.append(name)
        else:
            unique[key] = name
    match = match_classnames(list(descriptions), list(unique.values()))
    selected = {name: descriptions[match.mapping[name]] for name in unique.values() if name in match.mapping}
    return ClassSelection(selected, match.missing, match.unused, merged)


def _listing(names: Sequence[str]) -> str:
    """Quoted names, the first :data:`MAX_LISTED` of them, then how many more."""
    shown = ", ".join(f"'{n}'" for n in names[:MAX_LISTED])
    return shown + (f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def read_samples(job: TrainJob, settings: Settings, say: Callable[[str], None]) -> tuple[TextPairs, ClassSelection]:
    """The selected classes' descriptions as training samples; notes on what was left out.

    Raises:
        TrainJobError: a missing or empty description file, a split without a class list, a
            missing class-list file, or no selected class with descriptions.
    """
    from ..classlists import BUILTIN, is_builtin, read_classes, split_classes
    from ..descriptions import read_descriptions

    path = Path(job.descriptions)
    if not path.is_file():
        raise TrainJobError(f"--descriptions {path}: no such file.")
    descriptions = read_descriptions(path)
    if not descriptions:
        raise TrainJobError(
            f"--descriptions {path}: the file holds no descriptions. Generate some with 'python -m protext.gen_descriptions' "
            "or import a CuPL JSON with 'python -m protext.gen_descriptions import FILE.json --out FILE.jsonl'."
        )
    classes = job.class_list()
    if settings.split != "all" and not classes:
        raise TrainJobError(
            f"--split {settings.split} needs --classes with the dataset's class names in label order (a built-in "
            f"list by dataset name: {', '.join(BUILTIN)}; or a CoOp split_zhou_*.json), or a --preset that names "
            "the dataset; the description file's own class order is not the label order."
        )
    if classes and not Path(classes).exists() and not is_builtin(classes):
        raise TrainJobError(f"--classes {classes}: no such file, and not a built-in class list ({', '.join(BUILTIN)}).")
    if classes and not job.classes:
        say(f"classes: {classes}'s built-in list in label order ({settings.split} half, from --preset {job.preset})")
    wanted = split_classes(read_classes(classes), settings.split) if classes else None
    selection = select_classes(descriptions, wanted)
    _report_selection(selection, descriptions, path, settings.split, say)
    if not selection.descriptions:
        raise TrainJobError(f"none of the selected classes has descriptions in {path}; nothing to train on.")
    pairs = TextPairs.from_descriptions(selection.descriptions)
    say(f"{len(pairs)} descriptions of {len(pairs.classnames)} classes from {path}")
    return pairs, selection


def _report_selection(selection: ClassSelection, descriptions: Mapping[str, list[str]], path: Path, split: str,
                      say: Callable[[str], None]) -> None:
    """Say what the selection left out: merged and dropped names in notes, missing classes in a warning."""
    if selection.merged:
        say(f"note: {len(selection.merged)} duplicate class names in --classes merged: {_listing(selection.merged)}")
    if selection.dropped:
        n_texts = sum(len(descriptions[c]) for c in selection.dropped)
        say(
            f"note: {len(selection.dropped)} classes of {path} are not among the selected classes "
            f"(--classes{'/--split' if split != 'all' else ''}); their {n_texts} descriptions are dropped: "
            f"{_listing(selection.dropped)}"
        )
    if selection.missing:
        warnings.warn(
            f"{len(selection.missing)} selected classes have no descriptions in {path} and are not trained on: "
            f"{_listing(selection.missing)}",
            stacklevel=3,
        )
