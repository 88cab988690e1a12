"""Checks that run before any model loads, so a run never works for hours and then cannot save.

Every output path is checked: its folder can be created and written, it is not a folder, it is not
one of the run's inputs (``--out ck.safetensors`` with ``--prompts ck.safetensors`` would replace
the checkpoint with a results JSON), and it is not an existing result unless ``--overwrite``.
Every input file named by a flag must exist.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..results import result_files
from .config import EvalConfig


class OutputPathError(UserError):
    """An output path that cannot or must not be written; the message names it and the way out."""


def _existing_folder(path: Path) -> Path:
    """The nearest folder of ``path`` that exists (where a ``mkdir -p`` would start)."""
    folder = path.parent
    while not folder.exists():
        if folder.parent == folder:
            break
        folder = folder.parent
    return folder


def check_writable(path: Path, flag: str) -> None:
    """``path`` can be created or replaced: not a folder, its nearest existing folder writable."""
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder; name a file such as {path / 'results.json'}.")
    folder = _existing_folder(path)
    if not folder.is_dir():
        raise OutputPathError(f"{flag} {path}: {folder} is a file, so the folder cannot be created; choose another path.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {path}: folder {folder} is not writable; choose a writable location.")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(config: EvalConfig) -> Path:
    """Check every file the run will write (results JSON, markdown, reliability PNG, resume logs'
    folder); returns the results path."""
    out = config.output_path()
    flag = "--out" if config.out else "the default results path (--out)"
    inputs = {flag_: Path(p) for flag_, p in config.input_paths().items()}
    for kind, path in result_files(out).items():
        for in_flag, in_path in inputs.items():
            if path.resolve() == in_path.resolve() or _same_file(path, in_path):
                raise OutputPathError(f"{flag} {path} is the run's own input {in_flag}; choose another --out, the input stays untouched.")
        check_writable(path, flag if kind == "json" else f"{flag} (its {kind} file)")
    if out.exists() and not config.overwrite:
        raise OutputPathError(f"{out} already holds a result; pass --overwrite to replace it, or choose another --out.")
    return out


def check_inputs(config: EvalConfig) -> None:
    """Every input file named by a flag exists and is a file (the dataset root is checked by the
    dataset reader, with its layout hint)."""
    for flag, path in config.input_paths().items():
        if flag == "--pretrained":
            continue  # load_clip says what it expected, with the tags it knows
        p = Path(path)
        if flag == "--classes" and not p.suffix and not p.exists():
            continue  # a built-in class list such as 'imagenet'
        if not p.exists():
            raise UserError(f"{flag} {p}: no such file.")
        if p.is_dir():
            raise UserError(f"{flag} {p} is a folder; name a file.")
