"""Which settings make a run another run: the default results name and the resume fingerprint.

Both are hashes of settings, and they leave out different ones: the name leaves out only what can
never change a result (where it is written, how many workers), so a smoke run with ``--limit 10``
never takes the full run's name; the fingerprint also leaves out ``--limit`` for the episodic
methods, so a longer rerun reuses the images a shorter one finished. Torch-free like :mod:`.flags`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..classlists import BUILTIN as BUILTIN_CLASS_LISTS
from .flags import ONLINE_METHODS, EvalError, uses_descriptions

if TYPE_CHECKING:
    from .config import EvalConfig

#: settings that do not change any image's result: left out of the resume fingerprint, so a rerun
#: with more workers, another --out or --limit still reuses the finished images. ``limit`` is in it
#: for the online methods all the same: their stream is a permutation of the first ``limit`` images,
#: so another limit is another stream (see :func:`fingerprint`)
NOT_IN_FINGERPRINT = ("out", "overwrite", "workers", "progress", "limit")
#: settings that cannot change a result, so they do not change the default results name either
#: (``limit`` does: a smoke run of 10 images must not take the name of the full run)
NOT_IN_NAME = ("out", "overwrite", "workers", "progress")
#: settings that name a file or folder: the default results name hashes the absolute path, so the
#: same relative path run from two folders (two different inputs) gets two names
PATH_SETTINGS = ("root", "classes", "descriptions", "prompts", "pretrained")


def output_path(config: "EvalConfig") -> Path:
    """``--out``, or ``results/DATASET-SPLIT-METHOD[-TTA]-MODEL-WEIGHTS[-SOURCE]-HASH.json``.

    The default name reads like CLIP_benchmark's (dataset, model and weights in the name) and
    ends in a hash of everything that changes a result (:func:`identity`), so two runs that
    could give different results never share a name: two image folders, a checkpoint and its
    CoOp export, another template or TTA setting. The same command gets the same name, so a
    rerun finds its own log or finished result. SOURCE is the checkpoint's or description
    file's name; a plain folder's name is added to ``folder``.
    """
    if config.out:
        return Path(config.out)
    dataset = config.dataset if config.dataset != "folder" else f"folder_{Path(config.root).expanduser().resolve().name}"
    parts = [dataset, config.split, config.method, config.tta, config.model, weights_name(config.pretrained)]
    source = source_file(config)
    if source:
        parts.append(Path(source).name)
    digest = hashlib.sha256(json.dumps(identity(config), sort_keys=True, default=str).encode()).hexdigest()
    name = "-".join(name_part(part) for part in parts if part)
    return Path("results") / f"{name}-{digest[:10]}.json"


def identity(config: "EvalConfig") -> dict[str, Any]:
    """Every setting that can change a result, with file and folder settings made absolute
    (the default results name is a hash of this)."""
    out = {k: v for k, v in asdict(config).items() if k not in NOT_IN_NAME}
    for key in PATH_SETTINGS:
        value = out.get(key)
        if key == "pretrained" and value and not Path(value).suffix and not Path(value).exists():
            continue  # an open_clip tag ('openai'), not a file
        if key == "classes" and value and str(value).lower() in BUILTIN_CLASS_LISTS and not Path(value).exists():
            continue  # a built-in class list
        if value:
            out[key] = str(Path(value).expanduser().resolve())
    return out


def source_file(config: "EvalConfig") -> Optional[str]:
    """The file the class features come from, for the default results name: the checkpoint or
    the descriptions (None for templates, and for flags :func:`~.validation.validate` refuses)."""
    try:
        if config.uses_checkpoint():
            return config.prompts
    except EvalError:
        return None
    return config.descriptions if uses_descriptions(config.method) else None


def input_paths(config: "EvalConfig") -> dict[str, str]:
    """Files the run reads, by flag (an output may never be one of them); their contents are in the
    fingerprint (:func:`fingerprint`'s ``file_digests``)."""
    named = {"--prompts": config.prompts, "--descriptions": config.descriptions, "--classes": config.classes}
    if config.pretrained and Path(config.pretrained).suffix:
        named["--pretrained"] = config.pretrained
    return {flag: path for flag, path in named.items() if path}


def fingerprint(config: "EvalConfig", file_digests: dict[str, str]) -> str:
    """A hash of every setting that changes an image's result, and of the input files' contents.

    The images themselves (the folder's listing) and the class names are not in it: the
    resume log records them and a rerun on other images is refused (:mod:`.resume`), rather
    than silently starting a new log beside the old one.
    """
    settings = {k: v for k, v in asdict(config).items() if k not in NOT_IN_FINGERPRINT}
    if config.tta in ONLINE_METHODS:
        settings["limit"] = config.limit  # the stream is a permutation of the first `limit` images
    blob = json.dumps({"settings": settings, "files": file_digests}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def name_part(text: str) -> str:
    """One readable part of a results file name: safe characters only, at most 40 of them (the hash
    after the parts keeps names apart, so shortening loses nothing)."""
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip("._")[:40] or "_"


def weights_name(pretrained: str) -> str:
    """A weights file by its name; an open_clip tag as is (it has no folder part, so its name is itself)."""
    return Path(pretrained).name
