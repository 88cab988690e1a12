"""Checks that run before any model loads, so a run never works for hours and then cannot save.

Every output path is checked: its folder can be created and written, it is not a folder, it is not
one of the run's inputs (``--out ck.safetensors`` with ``--prompts ck.safetensors`` would replace
the checkpoint with a results JSON), and it is not an existing result unless ``--overwrite``.
Every input file named by a flag must exist.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from ..preflight import OutputPathError, check_output_file, same_file
from ..results import result_files
from .config import EvalConfig


class AlreadyDone(Exception):
    """The results file holds this very run's result (same settings, same inputs): nothing to do."""

    def __init__(self, path: Path, payload: dict[str, Any]) -> None:
        super().__init__(str(path))
        self.path, self.payload = path, payload


#: settings that may differ between two runs with the same result
_IRRELEVANT = ("out", "overwrite", "progress", "workers", "fingerprint")


def _same_run(out: Path, config: EvalConfig, fingerprint: str) -> Optional[dict[str, Any]]:
    """The payload in ``out`` if it was produced by these settings and inputs, else None."""
    try:
        payload = json.loads(out.read_text())
        stored = payload["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ours = {k: v for k, v in asdict(config).items() if k not in _IRRELEVANT}
    theirs = {k: v for k, v in stored.items() if k not in _IRRELEVANT}
    same = stored.get("fingerprint") == fingerprint and json.dumps(ours, sort_keys=True, default=str) == json.dumps(theirs, sort_keys=True, default=str)
    return payload if same else None


def check_outputs(config: EvalConfig, fingerprint: Optional[str] = None) -> Path:
    """Check every file the run will write (results JSON, markdown, reliability PNG, resume logs'
    folder); returns the results path.

    Raises:
        AlreadyDone: the results file already holds the result of these settings and inputs (a
            rerun of a finished command; ``fingerprint`` given), so nothing needs to run.
        OutputPathError: a path that cannot or must not be written.
    """
    out = config.output_path()
    flag = "--out" if config.out else "the default results path (--out)"
    inputs = {flag_: Path(p) for flag_, p in config.input_paths().items()}
    for kind, path in result_files(out).items():
        for in_flag, in_path in inputs.items():
            if same_file(path, in_path):
                raise OutputPathError(f"{flag} {path} is the run's own input {in_flag}; choose another --out, the input stays untouched.")
        # one writability probe for every command: a file created and removed where the output goes
        check_output_file(path, flag if kind == "json" else f"{flag} (its {kind} file)")
    if out.exists() and not config.overwrite:
        done = _same_run(out, config, fingerprint) if fingerprint else None
        if done is not None:
            raise AlreadyDone(out, done)
        raise OutputPathError(f"{out} already holds a result of other settings; pass --overwrite to replace it, or choose another --out.")
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
