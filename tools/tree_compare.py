"""Is a rerun's folder the same as the reference run's? File by file, exactly where the README
promises bytes, otherwise JSON equal but for wall-clock and memory fields (and floats within the
suite's tolerance across process layouts), Markdown with its timing columns masked, safetensors by
header and tensor bytes, and no temporary or resume files left behind (the kill campaign's judge)."""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the suite's float tolerances
from conftest import FLOAT_ATOL, FLOAT_RTOL  # noqa: E402

# Fields that legitimately differ between two runs of the same command: wall clock and memory.
# Provenance is not a result either, as the project's own resume tests treat it: ``command`` and
# ``overwrite`` (a resumed quickstart row is evaluated with overwrite off, a fresh one with it on) and
# ``resumed_at`` (where a resumed TDA stream continued).
VOLATILE_KEY = r"seconds|^timing$|^cost$|peak|^wall|per_second|^command$|^overwrite$|^resumed_at$"
# Markdown columns and lines holding the same kind of values.
VOLATILE_COLUMN = re.compile(r"second|s/img|s / image|^time|peak|mib|gib|memory", re.I)
# Files a finished run must not leave: atomic-write temporaries (.NAME.<pid>-<rand>.tmp) and eval resume logs.
LEFTOVER = re.compile(r"(^\..+\.\d+-[^.]+\.tmp$|\.tmp$|\.resume-[0-9a-f]+)")


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its header alone (no torch, cheap to poll)."""
    try:
        with open(path, "rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            return json.loads(fh.read(size)).get("__metadata__", {})
    except (OSError, struct.error, ValueError):
        return {}


def volatile_keys(extra: str = "") -> re.Pattern[str]:
    """The key pattern of fields two runs of one command may differ in (``extra``: a scenario's own)."""
    return re.compile(VOLATILE_KEY + (f"|{extra}" if extra else ""), re.I)


def strip_volatile(value: Any, volatile: Optional[re.Pattern[str]] = None) -> Any:
    """``value`` without wall-clock, memory and provenance fields (at any depth)."""
    volatile = volatile or volatile_keys()
    if isinstance(value, dict):
        return {k: strip_volatile(v, volatile) for k, v in value.items() if not volatile.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [strip_volatile(v, volatile) for v in value]
    return value


def first_difference(got: Any, want: Any, where: str, tolerant: bool = False) -> Optional[str]:
    """The first place where ``got`` differs from ``want`` (None if equal). Exact, unless ``tolerant``:
    then a float is equal within FLOAT_RTOL/FLOAT_ATOL (ints, strings, lengths and order stay exact)."""
    try:
        import torch
    except ImportError:  # the product needs torch; only a broken environment lands here
        torch = None
    if torch is not None and (isinstance(got, torch.Tensor) or isinstance(want, torch.Tensor)):
        if not (isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)):
            return f"{where}: tensor against {type(got).__name__}/{type(want).__name__}"
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"{where}: {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}"
        same = torch.allclose(got, want, rtol=FLOAT_RTOL, atol=FLOAT_ATOL, equal_nan=True) if tolerant else torch.equal(got, want)
        if not same:
            gap = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
            return f"{where}: tensors differ (max |diff| {gap:.3g})"
        return None
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (got, want))
    if numbers and (isinstance(got, float) or isinstance(want, float)):
        if math.isnan(got) or math.isnan(want):
            return None if math.isnan(got) and math.isnan(want) else f"{where}: {got!r} != {want!r}"
        if got == want or (tolerant and math.isclose(got, want, rel_tol=FLOAT_RTOL, abs_tol=FLOAT_ATOL)):
            return None
        return f"{where}: {got!r} != {want!r}"
    if type(got) is not type(want):
        return f"{where}: {type(got).__name__} {got!r:.60} != {type(want).__name__} {want!r:.60}"
    if isinstance(want, dict):
        if got.keys() != want.keys():
            return f"{where}: keys differ: only here {sorted(set(got) - set(want))}, only in reference {sorted(set(want) - set(got))}"
        for key in want:
            diff = first_difference(got[key], want[key], f"{where}.{key}", tolerant)
            if diff:
                return diff
        return None
    if isinstance(want, (list, tuple)):
        if len(got) != len(want):
            return f"{where}: length {len(got)} != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            diff = first_difference(a, b, f"{where}[{i}]", tolerant)
            if diff:
                return diff
        return None
    return None if got == want else f"{where}: {got!r:.80} != {want!r:.80}"


def mask_markdown(text: str) -> str:
    """Markdown with wall-clock columns and lines blanked (the numbers themselves are in the JSON beside it)."""
    out, masked_cols = [], set()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|"):
            cells = line.strip().strip("|").split("|")
            following = lines[i + 1] if i + 1 < len(lines) else ""
            if following.startswith("|") and set(following.replace("|", "").strip()) <= set("-: "):
                masked_cols = {j for j, c in enumerate(cells) if VOLATILE_COLUMN.search(c.strip())}
            elif masked_cols and not set(line.replace("|", "").strip()) <= set("-: "):
                cells = ["S" if j in masked_cols else c for j, c in enumerate(cells)]
            out.append("|" + "|".join(cells) + "|")
            continue
        masked_cols = set()
        out.append(re.sub(r"\d+(\.\d+)?", "N", line) if VOLATILE_COLUMN.search(line) else line)
    return "\n".join(out)


def compare_file(got: Path, want: Path, rel: str, exact_bytes: bool = False,
                 volatile: Optional[re.Pattern[str]] = None) -> Optional[str]:
    """The first difference between two versions of one output file, by kind (``exact_bytes``: the
    product promises these very bytes)."""
    a, b = got.read_bytes(), want.read_bytes()
    if a == b:
        return None
    suffix = got.suffix
    if suffix == ".json":
        try:
            return first_difference(strip_volatile(json.loads(a), volatile), strip_volatile(json.loads(b), volatile), rel)
        except ValueError as err:
            return f"{rel}: not JSON ({err})"
    if suffix == ".md":
        return None if mask_markdown(a.decode()) == mask_markdown(b.decode()) else f"{rel}: markdown differs beyond timings"
    if suffix == ".jsonl":  # the bytes are the promise (order included): name the first differing line
        la, lb = a.split(b"\n"), b.split(b"\n")
        for i, (x, y) in enumerate(zip(la, lb)):
            if x != y:
                return f"{rel}: line {i + 1} differs: {x[:80]!r} != {y[:80]!r}"
        return f"{rel}: {len(la) - 1} lines != {len(lb) - 1} in reference"
    if suffix == ".safetensors":
        return compare_safetensors(got, want, rel, exact_bytes)
    if suffix == ".pt":
        return compare_torch_pickle(got, want, rel)
    if suffix == ".png":  # a plot of volatile data (seconds) would differ legitimately: say so, and it fails
        return f"{rel}: image bytes differ"
    return f"{rel}: bytes differ"


def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's parsed header and its raw tensor bytes."""
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def compare_safetensors(got: Path, want: Path, rel: str, exact_bytes: bool) -> Optional[str]:
    """Bytes differ. A file whose bytes are promised (a trained checkpoint) fails; any other (a target
    cache) is equal when its header says the same in another key order (safetensors writes metadata
    from a hash map: the order varies between any two processes, killed or not) and its tensor bytes
    are identical. Otherwise name the metadata field or tensor that differs."""
    from safetensors.torch import load_file

    (ha, da), (hb, db) = split_safetensors(got.read_bytes()), split_safetensors(want.read_bytes())
    if ha == hb and da == db:
        return f"{rel}: bytes differ only in header key order" if exact_bytes else None
    ma, mb = safetensors_metadata(got), safetensors_metadata(want)
    meta = first_difference(strip_volatile({k: _maybe_json(v) for k, v in ma.items()}),
                            strip_volatile({k: _maybe_json(v) for k, v in mb.items()}), f"{rel} metadata")
    tensors = first_difference(load_file(str(got)), load_file(str(want)), f"{rel} tensor")
    return meta or tensors or f"{rel}: bytes differ (metadata other than wall clock, tensors equal)"


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def compare_torch_pickle(got: Path, want: Path, rel: str) -> Optional[str]:
    """A torch-saved file (training resume state): equal after dropping wall-clock fields."""
    import torch

    a = torch.load(got, map_location="cpu", weights_only=False)  # files this campaign's own runs wrote
    b = torch.load(want, map_location="cpu", weights_only=False)
    return first_difference(strip_volatile(a), strip_volatile(b), rel)


def compare_trees(got_root: Path, want_root: Path, exact_bytes: tuple[str, ...] = (),
                  volatile: Optional[re.Pattern[str]] = None) -> list[str]:
    """Every difference between a finished run folder and the reference: lost, left over, extra or
    changed files (``exact_bytes``: relative paths whose bytes are promised)."""
    got = {p.relative_to(got_root).as_posix() for p in got_root.rglob("*") if p.is_file()}
    want = {p.relative_to(want_root).as_posix() for p in want_root.rglob("*") if p.is_file()}
    problems = [f"lost: {rel}" for rel in sorted(want - got)]
    for rel in sorted(got - want):
        kind = "left over" if LEFTOVER.search(Path(rel).name) else "extra file"
        problems.append(f"{kind}: {rel}")
    for rel in sorted(got & want):
        diff = compare_file(got_root / rel, want_root / rel, rel, rel in exact_bytes, volatile)
        if diff:
            problems.append(diff)
    return problems
