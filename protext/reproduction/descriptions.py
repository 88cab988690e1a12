"""CuPL descriptions for a table: gathered from CuPL's release folder, written once per run folder.

CuPL rows score classes by their descriptions and every preset trains on them, so each dataset a
cell needs is read from ``--descriptions`` (CuPL's own file names and keys) before any work starts,
then written as a protext description file under ``OUT/TABLE/descriptions/``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import UserError
from ..evaluation.config import uses_descriptions
from .availability import Availability
from .config import ReproduceConfig, ReproduceError
from .plan import Cell, preset_info
from .run_folder import RunFolder


def cupl_source(dataset: str) -> str:
    """The dataset whose CuPL file describes ``dataset``'s classes (ImageNet's for its variants)."""
    return "imagenet" if dataset.startswith("imagenet") else dataset


def _release_descriptions(folder: str, dataset: str, classes: list[str]) -> dict[str, list[str]]:
    """CuPL's descriptions of ``classes`` from CuPL's release folder (its file names and original
    keys, renamed through protext's documented key map), keyed by the dataset's class names."""
    from ..descriptions.cupl import release_descriptions

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # keys of classes a dataset lacks: CuPL's, not the user's
            return release_descriptions(folder, cupl_source(dataset), classes=classes)
    except UserError as err:
        raise ReproduceError(f"--descriptions: {err}") from None


def classes_of(dataset: str, found: Availability) -> list[str]:
    """A dataset's class names: from its files, or for ImageNet (which trains cross-dataset
    prompts even when only the targets are on disk) the built-in list."""
    if dataset in found.classes:
        return found.classes[dataset]
    from ..classlists import read_classes

    return read_classes("imagenet")


def gather_descriptions(config: ReproduceConfig, cells: list[Cell], found: Availability) -> dict[str, dict[str, list[str]]]:
    """Per dataset that needs them, its CuPL descriptions keyed by its own class names.

    Every class a cell scores or a preset trains on must have descriptions; otherwise the error
    names the CuPL file and the classes. Returns ``{dataset: {class: [description, ...]}}``.
    """
    needed: dict[str, list[str]] = {}
    for cell in cells:
        if cell.dataset in found.present and (uses_descriptions(cell.features) or cell.preset):
            source = preset_info(cell.preset).dataset if cell.preset else cell.dataset
            if source not in needed:  # a source's classes are the same whichever cell asks: read them once
                needed[source] = classes_of(source, found)
    if not needed:
        return {}
    if not config.descriptions:
        raise ReproduceError(
            f"{config.table} needs CuPL descriptions for {', '.join(needed)}: pass --descriptions DIR "
            "(CuPL's release folder, as published at github.com/sarahpratt/CuPL)."
        )
    return {ds: _release_descriptions(config.descriptions, ds, names) for ds, names in needed.items()}


def materialise(release: str, dataset: str, data: dict[str, list[str]], folder: RunFolder) -> Path:
    """Write ``dataset``'s descriptions (every sample, repeats kept) as a protext description file.

    A rerun finds the file and checks it still holds what CuPL's release gives, so a table never
    mixes cells computed from two versions of the descriptions.
    """
    from ..descriptions import read_descriptions
    from ..descriptions.cupl import import_descriptions

    path = folder.path / "descriptions" / f"{dataset}.jsonl"
    if path.exists():
        if read_descriptions(path) != data:
            raise ReproduceError(
                f"{path} differs from CuPL's file for {dataset} in {release}: the descriptions changed since "
                "this run began; pass another --out."
            )
        return path
    import_descriptions(data, path)
    return path
