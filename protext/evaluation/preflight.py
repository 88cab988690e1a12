"""Checks that run before any model loads, so a run never works for hours and then cannot save.

Every output path is checked (the results JSON and the markdown summary and reliability diagram
written beside it): its folder can be created and written, it is not a folder, it is not one of
the run's inputs (``--out ck.safetensors`` with ``--prompts ck.safetensors`` would replace the
checkpoint with a results JSON), and it does not exist already unless ``--overwrite``, or unless it
is this very run's (its finished result, or the files a killed run wrote before its JSON).
Every input file named by a flag must exist, and a ``--classes`` file must not name one class twice.
None of this imports torch: the command runs it before loading anything heavy.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from ..classlists import IMAGENET_COINCIDENCES, check_distinct_classes, is_builtin, read_classes
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


def _same_run(out: Path, config: EvalConfig, fingerprint: str, inputs: Optional[dict[str, Any]]) -> tuple[Optional[dict[str, Any]], str]:
    """The payload in ``out`` if it was produced by these settings and inputs, else None and what
    ``out`` holds instead (for the refusal)."""
    try:
        payload = json.loads(out.read_text())
        stored = payload["settings"]
        ours = {k: v for k, v in asdict(config).items() if k not in _IRRELEVANT}
        theirs = {k: v for k, v in stored.items() if k not in _IRRELEVANT}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, "a file that is not a protext result"
    if json.dumps(ours, sort_keys=True, default=str) != json.dumps(theirs, sort_keys=True, default=str):
        return None, "a result of other settings"
    if stored.get("fingerprint") != fingerprint:
        return None, "this command's result on other contents of its input files (--prompts/--descriptions/--classes/--pretrained)"
    if inputs is not None and payload.get("inputs") != inputs:
        from .resume import describe_input_change

        return None, f"this command's result on other images or classes ({describe_input_change(payload.get('inputs'), inputs, config)})"
    return payload, ""


def _result_files(config: EvalConfig, flag: str) -> dict[str, Path]:
    """The files the run writes, refused where two of them are one file (``--out r.md`` would have
    the results JSON overwrite the markdown summary it has just written)."""
    files = result_files(config.output_path())
    seen: dict[Path, str] = {}
    for kind, path in files.items():
        key = Path(path).expanduser().absolute()
        if key in seen:
            raise OutputPathError(f"{flag} {files['json']}: its {kind} file and its {seen[key]} file would both be {path}; "
                                  "name the results file FILE.json.")
        seen[key] = kind
    return files


def check_outputs(config: EvalConfig, fingerprint: Optional[str] = None, inputs: Optional[dict[str, Any]] = None,
                  log_exists: bool = False) -> Path:
    """Check every file the run will write (results JSON, markdown, reliability PNG, resume logs'
    folder); returns the results path.

    Args:
        config: the run's settings.
        fingerprint: the run's fingerprint (None: a finished result is never recognised as this run's).
        inputs: the run's images and classes (:func:`protext.evaluation.data.input_identity`);
            a finished result on other inputs is not this run's.
        log_exists: this run has a resume log, so a markdown summary or diagram beside the results
            is the one its killed run wrote just before the results JSON (write_results writes the
            JSON last), not someone else's file.

    Raises:
        AlreadyDone: the results file already holds the result of these settings and inputs (a
            rerun of a finished command; ``fingerprint`` given), so nothing needs to run.
        OutputPathError: a path that cannot or must not be written, or an existing file that
            would be replaced without ``--overwrite``; the message names the file.
    """
    out = config.output_path()
    flag = "--out" if config.out else "the default results path (--out)"
    inputs_named = {flag_: Path(p) for flag_, p in config.input_paths().items()}
    files = _result_files(config, flag)
    for kind, path in files.items():
        for in_flag, in_path in inputs_named.items():
            if same_file(path, in_path):
                raise OutputPathError(f"{flag} {path} is the run's own input {in_flag}; choose another --out, the input stays untouched.")
        # one writability probe for every command: a file created and removed where the output goes
        check_output_file(path, flag if kind == "json" else f"{flag} (its {kind} file)")
    if config.overwrite:
        return out
    if out.exists():
        done, holds = _same_run(out, config, fingerprint, inputs) if fingerprint else (None, "a result of other settings")
        if done is not None:
            raise AlreadyDone(out, done)
        raise OutputPathError(f"{out} already holds {holds}; pass --overwrite to replace it, or choose another --out.")
    for kind, path in files.items():
        # the summary and the diagram are outputs too: never replaced silently (only the JSON was
        # protected before, so `--out notes.json` replaced an unrelated notes.md)
        if kind != "json" and (path.exists() or path.is_symlink()) and not log_exists:
            raise OutputPathError(
                f"{flag} {out} would replace {path} (its {kind} file), which already exists; pass --overwrite to "
                "replace it, or choose another --out."
            )
    return out


def check_inputs(config: EvalConfig) -> None:
    """Every input file named by a flag exists and is a file, and a ``--classes`` file names every
    class once (the dataset root is checked by the dataset reader, with its layout hint)."""
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
    if config.classes and not is_builtin(config.classes):
        check_classes(read_classes(config.classes), config, f"--classes {config.classes}")


def check_classes(names: list[str], config: EvalConfig, source: str) -> None:
    """Refuse a class list that names one class twice (per-class results would merge the two).

    CLIP's own ImageNet names coincide twice ('missile', 'sunglasses'); the published protocol
    keeps them, so on the ImageNet family those two are accepted (results keep them apart by label).
    """
    from ..datasets.catalog import DatasetError, canonical_name, is_imagenet_family

    try:
        imagenet = is_imagenet_family(canonical_name(config.dataset))
    except DatasetError:
        imagenet = False
    check_distinct_classes(names, source, allowed=IMAGENET_COINCIDENCES if imagenet else frozenset())
