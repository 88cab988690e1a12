"""CuPL description files: the ``{classname: [description, ...]}`` JSON format, its import into the
JSONL cache, and CuPL's own release folder with its original class keys.

CuPL (Pratt et al., ICCV'23) released one JSON file per dataset (``texture_prompts_full.json``,
``cal_prompts_full.json``, ...). Some of its keys are not the dataset's class names: every Stanford
Cars key puts the year last (``Dodge Dakota Crew Cab 2010`` for ``2010 Dodge Dakota Crew Cab``),
126 of SUN397's keys are phrased differently (``apse (indoor)`` for ``indoor apse``), and a few of
Caltech101, Flowers102 and UCF101 too. :func:`release_descriptions` reads such a folder as it was
released, renaming keys through ``cupl_key_map.json`` (shipped with the package, derived from the
real files by ``tools/derive_cupl_key_map.py``: it holds class names only, never descriptions).
Keys that still match no class are reported, never dropped silently.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..atomic import atomic_write
from ..errors import UserError
from .cache import DescriptionWriteError, fsync_dir, writer_lock
from .cache_format import (
    Description,
    DescriptionFileError,
    DescriptionFileMissing,
    PathLike,
    encode_unit,
    normalize_classname,
)
from .matching import match_classnames

__all__ = [
    "DescriptionOutputError",
    "ImportSummary",
    "ReleaseKeyError",
    "ReleaseReading",
    "check_import_output",
    "import_cupl",
    "import_descriptions",
    "load_cupl_json",
    "read_release",
    "read_source",
    "release_dataset",
    "release_datasets",
    "release_descriptions",
]


class DescriptionOutputError(UserError, FileExistsError):
    """An output description file that must not be written (it holds descriptions, or is a folder)."""


class ReleaseKeyError(UserError):
    """A CuPL file (a release file, or one checked against a class list) that lacks descriptions for some classes."""


def load_cupl_json(json_path: PathLike) -> dict[str, list[str]]:
    """Load a CuPL/ProText description file ``{classname: [description, ...]}`` and check its shape.

    Raises :class:`DescriptionFileError` naming the file (and line, for bad JSON).
    """
    json_path = Path(json_path)
    if not json_path.exists():
        raise DescriptionFileMissing(f"description file not found: {json_path}")
    if json_path.is_dir():
        raise DescriptionFileMissing(f"description file is a directory: {json_path}")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DescriptionFileError(json_path, None, f"not UTF-8 ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise DescriptionFileError(json_path, err.lineno, f"malformed JSON ({err.msg})") from None
    shape = 'expected a CuPL file: a JSON object {"classname": ["description", ...], ...}'
    if not isinstance(data, dict):
        raise DescriptionFileError(json_path, None, f"{shape}, got a JSON {type(data).__name__}")
    for name, descs in data.items():
        if not name.strip():
            raise DescriptionFileError(json_path, None, "empty class name")
        if not isinstance(descs, list) or not all(isinstance(d, str) for d in descs):
            raise DescriptionFileError(
                json_path, None, f"{shape}; class {name!r} does not hold a list of strings"
            )
    return data


# --------------------------------------------------------------------------------------------------
# import into the JSONL cache


@dataclass
class ImportSummary:
    """What an import wrote: every description is a sample, repeats included."""

    out: Path
    descriptions: int = 0
    repeats: int = 0  # descriptions that their class already held (kept: repeats are samples)
    classes: int = 0
    empty_skipped: int = 0  # blank descriptions in the source (nothing to train on)

    def line(self, source: object) -> str:
        """One line for a command to print."""
        text = (
            f"imported {self.descriptions} descriptions of {self.classes} classes from {source} into {self.out} "
            f"({self.repeats} repeats, kept as samples)"
        )
        return text + (f"; skipped {self.empty_skipped} blank descriptions" if self.empty_skipped else "")


def check_import_output(out_path: Path, source: Optional[Path] = None) -> None:
    """Refuse an --out that is a folder, or the very file being imported (nothing is read or written)."""
    if out_path.is_dir():
        raise DescriptionOutputError(f"output is a directory: {out_path}")
    if source is not None and out_path.exists() and source.exists() and out_path.samefile(source):
        raise DescriptionOutputError(f"--out {out_path} is the file being imported; write the JSONL to another file")


def import_descriptions(
    data: Mapping[str, Sequence[str]], out_path: PathLike, *, model: str = "cupl", overwrite: bool = False
) -> ImportSummary:
    """Write ``{classname: [description, ...]}`` as a description JSONL file; return the counts.

    Every non-blank description is one line (whitespace-stripped, which CLIP's tokenizer does
    anyway), repeats included, in the source order; each class is one unit. The output appears
    atomically (temporary file + rename) under the file's writer lock, so a failed import leaves
    nothing behind and a running generation of the same file is never replaced. Refuses to replace
    a non-empty ``out_path`` unless ``overwrite`` is set.
    """
    out_path = Path(out_path)
    check_import_output(out_path)
    summary = ImportSummary(out=out_path)
    units = []
    for name, descs in data.items():
        texts = [d.strip() for d in descs if d.strip()]
        summary.empty_skipped += len(descs) - len(texts)
        summary.repeats += len(texts) - len(set(texts))
        if texts:
            units.append([Description(name, t, "", model) for t in texts])
    summary.descriptions = sum(len(u) for u in units)
    summary.classes = len({normalize_classname(u[0].classname) for u in units})
    payload = b"".join(encode_unit(unit) for unit in units)

    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DescriptionWriteError(f"--out: cannot create the folder of {out_path} ({err.strerror or err})") from None
    with writer_lock(out_path):
        if out_path.stat().st_size > 0 and not overwrite:
            raise DescriptionOutputError(
                f"{out_path} already holds descriptions; refusing to overwrite it (pass --overwrite to replace it)"
            )
        atomic_write(out_path, lambda tmp: Path(tmp).write_bytes(payload))
        fsync_dir(out_path.parent)
    return summary


def import_cupl(json_path: PathLike, out_path: PathLike, model: str = "cupl", *, overwrite: bool = False) -> int:
    """Convert a CuPL JSON file into a description JSONL file; return the number of lines written.

    See :func:`import_descriptions`; the source is checked before anything is written.
    """
    check_import_output(Path(out_path), Path(json_path))
    return import_descriptions(load_cupl_json(json_path), out_path, model=model, overwrite=overwrite).descriptions


# --------------------------------------------------------------------------------------------------
# CuPL's release folder and its original keys


@lru_cache(maxsize=1)
def _key_map() -> dict[str, Any]:
    text = resources.files("protext.descriptions").joinpath("cupl_key_map.json").read_text(encoding="utf-8")
    return json.loads(text)["datasets"]


def release_datasets() -> list[str]:
    """The datasets whose CuPL release file protext knows (protext's dataset names)."""
    return list(_key_map())


def release_dataset(name: str) -> str:
    """protext's name of a dataset, from it or an alias (``cars``, ``texture``, ``flower102``, ...)."""
    wanted = normalize_classname(name).replace(" ", "_")
    for dataset, entry in _key_map().items():
        if wanted == dataset or wanted in entry["aliases"]:
            return dataset
    raise ReleaseKeyError(f"no CuPL release file is known for dataset {name!r}; known: {', '.join(release_datasets())}")


@dataclass
class ReleaseReading:
    """A CuPL release file read for one dataset, with every key accounted for."""

    dataset: str
    file: Path
    descriptions: dict[str, list[str]] = field(default_factory=dict)  # class -> descriptions, class order
    renamed: dict[str, str] = field(default_factory=dict)  # original key -> class, through the key map
    extra_keys: list[str] = field(default_factory=list)  # keys the map documents as classes the dataset lacks
    unmatched_keys: list[str] = field(default_factory=list)  # keys matching no class and not in the map
    missing: list[str] = field(default_factory=list)  # classes no key provides

    def report(self) -> str:
        """What was renamed, left out or missing, in a few lines."""
        lines = [f"{self.file}: {len(self.descriptions)} classes of {self.dataset}, {len(self.renamed)} keys renamed by the key map"]
        if self.extra_keys:
            lines.append(f"  left out {len(self.extra_keys)} keys that are not classes of {self.dataset}: {self.extra_keys}")
        if self.unmatched_keys:
            lines.append(f"  left out {len(self.unmatched_keys)} keys that match no class: {_head(self.unmatched_keys)}")
        if self.missing:
            lines.append(f"  {len(self.missing)} classes have no descriptions: {_head(self.missing)}")
        return "\n".join(lines)


def _head(names: Sequence[str], n: int = 10) -> str:
    return repr(list(names[:n]))[:-1] + (", ...]" if len(names) > n else "]")


def read_release(folder: PathLike, dataset: str, *, classes: Optional[Sequence[str]] = None) -> ReleaseReading:
    """Read ``dataset``'s file from CuPL's release ``folder`` (original or re-keyed keys).

    ``folder`` may also be the release file itself (any file name).

    A key is renamed through the package's key map when the map lists it, otherwise matched to a
    class name case-insensitively with ``_`` as space. ``classes`` (default: the dataset's class
    list shipped in the key map, label order) are the names the result is keyed by.
    """
    name = release_dataset(dataset)
    entry = _key_map()[name]
    path = Path(folder) if Path(folder).is_file() else Path(folder) / entry["file"]
    if not Path(folder).exists():
        raise DescriptionFileMissing(f"CuPL release folder not found: {folder}")
    if not path.is_file():
        raise DescriptionFileMissing(f"{folder}: no {entry['file']} (CuPL's release file for {name})")
    data = load_cupl_json(path)
    wanted = list(dict.fromkeys(classes if classes is not None else entry["classes"]))
    class_of: dict[str, str] = {}
    for cls in wanted:
        class_of.setdefault(normalize_classname(cls), cls)
    reading = ReleaseReading(dataset=name, file=path)
    found: dict[str, str] = {}  # class -> the key that provided it
    for key, texts in data.items():
        target = class_of.get(normalize_classname(key))
        if target is None and key in entry["keys"]:
            target = class_of.get(normalize_classname(entry["keys"][key]))
            if target is not None:
                reading.renamed[key] = target
        if target is None:
            (reading.extra_keys if key in entry["extra_keys"] else reading.unmatched_keys).append(key)
            continue
        if target in found:
            raise ReleaseKeyError(f"{path}: keys {found[target]!r} and {key!r} both name class {target!r}")
        found[target] = key
        reading.descriptions[target] = [t.strip() for t in texts if t.strip()]
    reading.missing = [cls for cls in wanted if cls not in found]
    reading.descriptions = {cls: reading.descriptions[cls] for cls in wanted if cls in found}
    return reading


def release_descriptions(
    folder: PathLike, dataset: str, *, classes: Optional[Sequence[str]] = None
) -> dict[str, list[str]]:
    """``{class: [description, ...]}`` for ``dataset`` from CuPL's own release folder.

    Classes come in label order, keyed by the dataset's class names whatever key the file uses;
    repeats are kept (they are samples). Keys that name no class are left out with a warning that
    lists them. Raises :class:`ReleaseKeyError` (naming the file and the classes) if any class has
    no descriptions, and :class:`DescriptionFileMissing` if the folder or the file is absent.
    """
    reading = read_release(folder, dataset, classes=classes)
    if reading.missing:
        raise ReleaseKeyError(
            f"{reading.file}: no descriptions for {len(reading.missing)} of {len(reading.missing) + len(reading.descriptions)} "
            f"classes of {reading.dataset}: {_head(reading.missing)}; keys that match no class: {_head(reading.unmatched_keys)}"
        )
    if reading.extra_keys or reading.unmatched_keys:
        warnings.warn(reading.report(), stacklevel=2)
    return reading.descriptions


# --------------------------------------------------------------------------------------------------
# a source as ``import`` names it


def read_source(
    source: PathLike, *, dataset: Optional[str] = None, classes: Optional[Sequence[str]] = None, classes_name: str = ""
) -> dict[str, list[str]]:
    """``{class: [description, ...]}`` from a CuPL file, or from CuPL's release (folder or file) for ``dataset``.

    With ``classes``, every class must have descriptions: a release is read through the key map
    (:func:`release_descriptions`), a plain file's keys are matched case-insensitively with ``_`` as
    space (:func:`~protext.descriptions.matching.match_classnames`), and a class with no key raises
    :class:`ReleaseKeyError` listing the missing classes and the unmatched keys (``classes_name``
    names the class list in that message). A folder without ``dataset`` raises
    :class:`DescriptionFileMissing`.
    """
    source = Path(source)
    if dataset:
        return release_descriptions(source, dataset, classes=classes)
    if source.is_dir():
        raise DescriptionFileMissing(f"{source} is a folder: pass --dataset NAME to read CuPL's release file for NAME")
    data = load_cupl_json(source)
    match = match_classnames(data, classes or [])
    if match.missing:
        raise ReleaseKeyError(
            f"{source} has no descriptions for {len(match.missing)} of {len(classes or [])} classes of "
            f"{classes_name}; nothing written. missing: {match.missing[:20]}; unmatched keys in the file: "
            f"{match.unused[:20]} (CuPL's own keys: add --dataset NAME to rename them)"
        )
    return data
