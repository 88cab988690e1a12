"""Kill campaign: interrupt every protext command at observed points and check that reruns lose nothing.

For each command (``gen_descriptions`` against a fake OpenAI server and with ``--backend templates``,
``train``, ``eval`` zero-shot / ZERO / TDA, ``reproduce``, ``quickstart`` and ``torchrun -m
protext.eval``) the campaign

1. runs it once uninterrupted: the reference outputs;
2. for every kind of kill and N times: empties the run folder, starts the command in its own session,
   waits until its files show a chosen amount of progress (a line count, an epoch in the checkpoint,
   a finished cell; never a bare sleep), sends the signal to the process itself (or to one torchrun
   rank, the torchrun agent, or the whole process group), checks the exit status and stderr and that
   no process of the run survives, then reruns the identical command to completion;
3. compares every rerun's outputs with the reference, file by file (same names, no temporary or
   resume files left, JSON equal but for wall-clock and memory fields, tensors and JSONL bytes equal);
4. prints a table and writes every trial to JSON.

Every run of one command uses the same paths, process layout and thread count (``OMP_NUM_THREADS=1``),
so the comparison is exact, floats included. The one cross-layout check (the uninterrupted torchrun
result against one process) compares floats within ``tests/conftest.py``'s FLOAT_RTOL/FLOAT_ATOL.

Usage (from the repository root; about 15-20 minutes on 2 busy CPU cores with ``--kills 2``)::

    python tools/kill_campaign.py --kills 2 --json kill_campaign.json
    python tools/kill_campaign.py --only train,eval-tda --kills 3
    python tools/kill_campaign.py --kills 3,torchrun=1      # fewer torchrun trials

Exit status 0 when every trial passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
sys.path.insert(0, str(TESTS))  # the test helpers: synthetic datasets, fake LLM server, tolerances
from conftest import FLOAT_ATOL, FLOAT_RTOL, SHARED  # noqa: E402  (one definition of data and tolerances)

TINY = ["--model", "tiny-clip", "--pretrained", "random"]
PROGRESS_TIMEOUT = 600.0  # safety net for a hung run on a loaded machine, never a measure of speed
EXIT_TIMEOUT = 120.0  # a signalled process must be gone by then
RUN_TIMEOUT = 900.0  # one whole command
POLL = 0.02  # seconds between looks at the files: short, so a kill lands close to the chosen point

# Fields that legitimately differ between two runs of the same command: wall clock and memory.
# Provenance is not a result either, as the project's own resume tests treat it: ``command`` and
# ``overwrite`` (a resumed quickstart row is evaluated with overwrite off, a fresh one with it on) and
# ``resumed_at`` (where a resumed TDA stream continued).
VOLATILE_KEY = r"seconds|^timing$|^cost$|peak|^wall|per_second|^command$|^overwrite$|^resumed_at$"
# Markdown columns and lines holding the same kind of values.
VOLATILE_COLUMN = re.compile(r"second|s/img|s / image|^time|peak|mib|gib|memory", re.I)
# Files a finished run must not leave: atomic-write temporaries (.NAME.<pid>-<rand>.tmp) and eval resume logs.
LEFTOVER = re.compile(r"(^\..+\.\d+-[^.]+\.tmp$|\.tmp$|\.resume-[0-9a-f]+)")
TRACEBACK = "Traceback (most recent call last)"


# ------------------------------------------------------------------------------------------------
# data types


@dataclass(frozen=True)
class Kill:
    """One kind of interruption: whom the signal goes to, and which signal."""

    target: str  # "process" (the command's own pid), "rank", "agent" (torchrun's pid) or "group"
    signum: int

    @property
    def label(self) -> str:
        name = signal.Signals(self.signum).name
        return name if self.target == "process" else f"{self.target} {name}"


@dataclass
class Scenario:
    """One command of the campaign and how to watch and judge it.

    ``progress`` reads a monotone count from the files under the run folder (lines, epochs, cells);
    kills are placed at counts between ``min_progress`` and the reference run's final count.
    ``after_kill`` checks the interrupted run's files against the reference (nothing lost or
    altered at the kill); ``finished`` checks a finished run for duplicates.
    """

    name: str
    argv: list[str]
    run_dir: Path
    progress: Callable[[Path], int]
    kills: list[Kill]
    min_progress: int = 1
    after_kill: Optional[Callable[[Path, Path], list[str]]] = None
    finished: Optional[Callable[[Path], list[str]]] = None
    torchrun: bool = False
    exact_bytes: tuple[str, ...] = ()  # outputs whose very bytes the README promises
    volatile: str = ""  # extra key pattern of fields that differ in any two fresh runs of this command
    total: int = 0  # the reference run's final progress, set after it ran


@dataclass
class Trial:
    """What happened in one kill-and-rerun."""

    command: str
    kill: str
    index: int
    kill_at: int  # the progress count the kill waited for
    progress_at_kill: int = -1
    killed: bool = False  # False: the run ended before the chosen point (the rerun is still judged)
    kill_rc: Optional[int] = None
    rerun_rc: Optional[int] = None
    equal: bool = False
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------
# progress read from files


def count_lines(path: Path) -> int:
    """Complete lines in ``path`` (0 when absent)."""
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def eval_records(folder: Path) -> int:
    """Image records in every eval resume log under ``folder`` (a log's first line is its header)."""
    total = 0
    for log in folder.rglob("*.resume-*.jsonl"):
        total += max(0, count_lines(log) - 1)
    return total


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its header alone (no torch, cheap to poll)."""
    try:
        with open(path, "rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            return json.loads(fh.read(size)).get("__metadata__", {})
    except (OSError, struct.error, ValueError):
        return {}


def train_progress(checkpoint: Path, cache_dir: Path) -> Callable[[Path], int]:
    """1 once a target chunk is cached, then 1 + the checkpoint's ``epochs_done``."""

    def progress(run_dir: Path) -> int:
        done = int(safetensors_metadata(checkpoint).get("epochs_done", "0") or 0)
        cached = any(cache_dir.glob("*.safetensors"))
        return (1 if cached else 0) + done

    return progress


def quickstart_progress(run_dir: Path) -> int:
    """The checkpoint, then each finished row's result file."""
    rows = [p for p in (run_dir / "results").glob("*.json") if p.name != "summary.json"]
    return int((run_dir / "checkpoints" / "example.safetensors").exists()) + len(rows)


def reproduce_progress(table: str) -> Callable[[Path], int]:
    """Trained prompts plus finished cells of ``table``."""

    def progress(run_dir: Path) -> int:
        trained = len(list((run_dir / "prompts").glob("*/text-only-*.safetensors")))
        cells = len(list((run_dir / table / "cells").glob("*.json")))
        return trained + cells

    return progress


# ------------------------------------------------------------------------------------------------
# processes


def _live_processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every live (non-zombie) process, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if fields[0] != "Z":
            found.append((int(entry.name), int(fields[1]), int(fields[2])))
    return found


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    return [pid for pid, _, group in _live_processes() if group == pgid]


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (torchrun's ranks)."""
    return sorted(child for child, parent, _ in _live_processes() if parent == pid)


def child_env(run_dir: Path) -> dict[str, str]:
    """One thread per process (same arithmetic in every run), this checkout first on the path, and the
    target cache inside the run folder, so every run starts cold and its cache is compared too."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "PROTEXT_TARGET_CACHE": str(run_dir / "target-cache"),
        "OPENAI_API_KEY": "sk-kill-campaign-fake",  # the fake server accepts anything; never a real key
    }


def start(sc: Scenario, logs: Path, tag: str) -> subprocess.Popen:
    """Start the command in its own session (so a group kill reaches every process it made, and only those)."""
    logs.mkdir(parents=True, exist_ok=True)
    out = open(logs / f"{tag}.out", "wb")
    err = open(logs / f"{tag}.err", "wb")
    try:
        return subprocess.Popen(sc.argv, cwd=sc.run_dir, env=child_env(sc.run_dir), stdout=out, stderr=err,
                                start_new_session=True)
    finally:  # the child holds its own copies
        out.close()
        err.close()


def reap(proc: subprocess.Popen, timeout: float) -> Optional[int]:
    """Wait for ``proc``; on timeout kill its whole group and return None."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        proc.wait()
        return None


def kill_group(pgid: int) -> None:
    """SIGKILL every process of the group, ignoring a group already gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_group_gone(pgid: int, timeout: float) -> list[int]:
    """Poll until no process of the group lives; return the survivors at the deadline."""
    deadline = time.monotonic() + timeout
    left = group_members(pgid)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = group_members(pgid)
    return left


def run_to_end(sc: Scenario, logs: Path, tag: str) -> tuple[Optional[int], int]:
    """Run the command to completion; return its exit status (None: timed out) and the highest progress seen."""
    proc = start(sc, logs, tag)
    seen = 0
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen = max(seen, sc.progress(sc.run_dir))
            time.sleep(POLL * 5)
    finally:
        rc = reap(proc, max(1.0, deadline - time.monotonic()))
    return rc, max(seen, sc.progress(sc.run_dir))


def tracebacks(text: str) -> list[str]:
    """Each traceback block's frames plus its last line, so the caller can tell whose code raised."""
    blocks = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(TRACEBACK):
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or lines[j].startswith("\t")):
                j += 1
            blocks.append("\n".join(lines[i : j + 1]))
    return blocks


def judge_stderr(err: str, trial: Trial, expect_hint: bool) -> None:
    """No traceback from protext; with SIGINT, the one-line resume hint."""
    for block in tracebacks(err):
        last = block.splitlines()[-1]
        if "/protext/" in block:
            trial.problems.append(f"traceback from protext: {last}")
        else:  # torchrun's own agent raises SignalException on SIGINT: torch's behaviour, noted only
            trial.notes.append(f"traceback outside protext: {last}")
    if expect_hint:
        hints = [ln for ln in err.splitlines() if ln.startswith("interrupted:")]
        if not hints:
            trial.problems.append("SIGINT: no 'interrupted: ... rerun ...' line on stderr")
        elif not all("rerun" in h for h in hints):
            trial.problems.append(f"SIGINT: hint without 'rerun': {hints[0]!r}")


# ------------------------------------------------------------------------------------------------
# comparison


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


# ------------------------------------------------------------------------------------------------
# per-command checks of an interrupted or finished run


def gen_prefix_check(out_rel: str) -> Callable[[Path, Path], list[str]]:
    """A killed generation's file is a byte prefix of the uninterrupted one (one request at a time, so
    units land in order): nothing written was lost or altered; a torn tail is a prefix too."""

    def check(run_dir: Path, reference: Path) -> list[str]:
        path = run_dir / out_rel
        if not path.exists():
            return []
        got, want = path.read_bytes(), (reference / out_rel).read_bytes()
        if want.startswith(got):
            return []
        at = next(i for i, (x, y) in enumerate(zip(got, want)) if x != y) if len(got) <= len(want) else len(want)
        return [f"after kill: {out_rel} is not a prefix of the uninterrupted file (first differing byte {at})"]

    return check


def gen_unique_check(out_rel: str) -> Callable[[Path], list[str]]:
    """A finished description file holds no unit twice."""

    def check(run_dir: Path) -> list[str]:
        from protext.descriptions import read_cache

        contents = read_cache(run_dir / out_rel)
        return [f"{out_rel}: {contents.rewritten_units} units written twice"] if contents.rewritten_units else []

    return check


def train_pair_check(checkpoint_rel: str) -> Callable[[Path, Path], list[str]]:
    """The resume state is written before the checkpoint: the state is at the checkpoint's epoch or one past it."""

    def check(run_dir: Path, reference: Path) -> list[str]:
        from protext.training import load_resume_state

        ckpt = run_dir / checkpoint_rel
        state = ckpt.with_name(ckpt.name.replace(".safetensors", ".resume.pt"))
        if not ckpt.exists():
            return [] if not state.exists() or load_resume_state(state)["epoch"] <= 1 else [
                f"after kill: resume state at epoch {load_resume_state(state)['epoch']} but no checkpoint"]
        done = int(safetensors_metadata(ckpt).get("epochs_done", "-1"))
        epoch = load_resume_state(state)["epoch"] if state.exists() else None
        if epoch is None or epoch not in (done, done + 1):
            return [f"after kill: checkpoint after epoch {done}, resume state at {epoch}"]
        return []

    return check


def eval_log_check(run_dir: Path, reference: Path) -> list[str]:
    """Resume logs of a killed eval: every complete record names a distinct image."""
    problems = []
    for log in sorted(run_dir.rglob("*.resume-*.jsonl")):
        seen: set[int] = set()
        for line in log.read_bytes().split(b"\n")[1:]:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the torn last line a kill may leave: cut off by the rerun
            if record.get("i") in seen:
                problems.append(f"after kill: {log.name} holds image {record['i']} twice")
                break
            seen.add(record.get("i"))
    return problems


def eval_unique_check(out_rel: str) -> Callable[[Path], list[str]]:
    """A finished result holds each image once, in order."""

    def check(run_dir: Path) -> list[str]:
        index = json.loads((run_dir / out_rel).read_text())["predictions"]["index"]
        return [] if index == sorted(set(index)) else [f"{out_rel}: image indices duplicated or out of order"]

    return check


# ------------------------------------------------------------------------------------------------
# inputs and scenarios


SINGLE = [Kill("process", signal.SIGKILL), Kill("process", signal.SIGINT)]
TORCHRUN = [Kill("rank", signal.SIGKILL), Kill("agent", signal.SIGKILL), Kill("group", signal.SIGKILL),
            Kill("group", signal.SIGINT)]
COMMANDS = ["gen-openai", "gen-templates", "train", "eval-zeroshot", "eval-zero", "eval-tda", "reproduce",
            "quickstart", "torchrun"]


def make_inputs(work: Path) -> dict[str, Path]:
    """Everything the commands read, made once under ``work/inputs`` (never inside a run folder)."""
    import numpy as np
    from PIL import Image

    from synthetic_datasets import make_tree

    inputs = work / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    dtd = json.loads((SHARED / "classnames" / "dtd.json").read_text())
    imagenet = json.loads((SHARED / "classnames" / "imagenet.json").read_text())
    (inputs / "llm_classes.json").write_text(json.dumps(dtd[:20]))  # 20 classes x 5 queries = 100 requests
    (inputs / "template_classes.json").write_text(json.dumps(imagenet[:200]))
    # six DTD classes of the real CuPL file, imported the way a user would
    texture = json.loads((SHARED / "cupl" / "texture_prompts_full.json").read_text())
    wanted = {name.lower() for name in dtd[:6]}
    (inputs / "texture6.json").write_text(json.dumps({k: v for k, v in texture.items() if k.lower() in wanted}))
    subprocess.run([sys.executable, "-m", "protext.gen_descriptions", "import", str(inputs / "texture6.json"),
                    "--out", str(inputs / "texture6.jsonl")], cwd=inputs, env=child_env(inputs), check=True,
                   capture_output=True)
    # a plain folder of noise images: 6 classes x 24 (enough that an eval is killed mid-way)
    rng = np.random.default_rng(7)
    for c in range(6):
        for i in range(24):
            path = inputs / "folder" / f"class{c}" / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(path)
    # reproduce: DTD and EuroSAT in CoOp's layout, and CuPL's release with one description per class
    make_tree(inputs / "tree", ["dtd", "eurosat"], per_class=2, classes_per_dataset=3, shared=SHARED)
    (inputs / "cupl").mkdir(exist_ok=True)
    for path in (SHARED / "cupl").glob("*.json"):
        data = json.loads(path.read_text())
        (inputs / "cupl" / path.name).write_text(json.dumps({k: v[:1] for k, v in data.items()}))
    return {"inputs": inputs}


def scenarios(work: Path, server_url: str, names: list[str]) -> list[Scenario]:
    """The campaign's commands, each with its run folder under ``work`` and its progress measure."""
    inputs = work / "inputs"
    py = [sys.executable, "-m"]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    eval_common = ["--dataset", "folder", "--root", str(inputs / "folder"), *TINY, "--workers", "0", "--no-progress",
                   "--save-logits", "--seed", "0", "--batch-size", "8"]
    found: list[Scenario] = []

    def add(name: str, argv_for: Callable[[Path], list[str]], progress: Callable[[Path], int], **kw: Any) -> None:
        if name in names:
            run_dir = work / name / "run"
            found.append(Scenario(name, argv_for(run_dir), run_dir, progress, **kw))

    add("gen-openai",
        lambda d: [*py, "protext.gen_descriptions", "--classes", str(inputs / "llm_classes.json"), "--out", str(d / "d.jsonl"),
                   "--base-url", server_url, "--model", "fake-model", "--n-per-query", "5", "--seed", "0",
                   "--concurrency", "1", "--timeout", "600", "--no-progress"],
        lambda d: count_lines(d / "d.jsonl"), kills=SINGLE, after_kill=gen_prefix_check("d.jsonl"),
        finished=gen_unique_check("d.jsonl"))
    add("gen-templates",
        lambda d: [*py, "protext.gen_descriptions", "--backend", "templates", "--classes",
                   str(inputs / "template_classes.json"), "--out", str(d / "d.jsonl"), "--no-progress"],
        lambda d: count_lines(d / "d.jsonl"), kills=SINGLE, after_kill=gen_prefix_check("d.jsonl"),
        finished=gen_unique_check("d.jsonl"))
    add("train",
        lambda d: [*py, "protext.train", "--descriptions", str(inputs / "texture6.jsonl"), *TINY, "--depth", "2",
                   "--epochs", "12", "--warmup-epochs", "2", "--lr", "0.01", "--batch-size", "16",
                   "--cache-dir", str(d / "cache"), "--out", str(d / "p.safetensors"), "--resume", "--quiet"],
        train_progress(work / "train" / "run" / "p.safetensors", work / "train" / "run" / "cache"),
        kills=SINGLE, after_kill=train_pair_check("p.safetensors"), exact_bytes=("p.safetensors",))
    add("eval-zeroshot", lambda d: [*py, "protext.eval", *eval_common, "--out", str(d / "r.json")],
        eval_records, kills=SINGLE, after_kill=eval_log_check, finished=eval_unique_check("r.json"))
    add("eval-zero", lambda d: [*py, "protext.eval", *eval_common, "--tta", "zero", "--tta-views", "4", "--out", str(d / "r.json")],
        eval_records, kills=SINGLE, after_kill=eval_log_check, finished=eval_unique_check("r.json"))
    add("eval-tda",
        lambda d: [*py, "protext.eval", *eval_common, "--tta", "tda", "--tda-alpha", "2", "--tda-beta", "5",
                   "--out", str(d / "r.json")],
        eval_records, kills=SINGLE, after_kill=eval_log_check, finished=eval_unique_check("r.json"))
    add("reproduce",
        lambda d: [*py, "protext.reproduce", "protext-text-only", "--root", str(inputs / "tree"), "--out", str(d),
                   "--descriptions", str(inputs / "cupl"), *TINY, "--limit", "4", "--epochs", "2", "--depth", "2",
                   "--tta-views", "2", "--workers", "0", "--no-progress"],
        reproduce_progress("protext-text-only"), kills=SINGLE)
    add("quickstart",
        lambda d: [*py, "protext.quickstart", *TINY, "--epochs", "2", "--tta-views", "5", "--device", "cpu",
                   "--workdir", str(d)],
        # the quickstart writes its own example photos: a fresh folder's photos have fresh modification
        # times, which the image-listing fingerprint covers, so that one hash differs in any two fresh runs
        quickstart_progress, kills=SINGLE, volatile="^listing_sha256$")
    add("torchrun",
        lambda d: [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "protext.eval", *eval_common, "--tta", "zero",
                   "--tta-views", "4", "--out", str(d / "r.json")],
        eval_records, kills=TORCHRUN, after_kill=eval_log_check, finished=eval_unique_check("r.json"), torchrun=True)
    return found


# ------------------------------------------------------------------------------------------------
# the campaign


def kill_points(total: int, low: int, n: int, rng: random.Random) -> list[int]:
    """``n`` progress counts in [low, total-1], one drawn from each of n equal strata (early to late)."""
    high = max(low, total - 1)
    span = high - low + 1
    return [low + min(span - 1, int((i + rng.random()) * span / n)) for i in range(n)]


def deliver(proc: subprocess.Popen, kill: Kill, rng: random.Random, trial: Trial) -> bool:
    """Send the signal; False when there was nobody to send it to (the trial then says why)."""
    if kill.target == "group":
        os.killpg(proc.pid, kill.signum)
        return True
    if kill.target == "rank":
        ranks = children(proc.pid)
        if len(ranks) < 2:
            trial.problems.append(f"torchrun agent has {len(ranks)} ranks, expected 2")
            return False
        victim = rng.choice(ranks)
        trial.notes.append(f"killed rank process {ranks.index(victim)} of {len(ranks)}")
        os.kill(victim, kill.signum)
        return True
    os.kill(proc.pid, kill.signum)  # "process" and "agent": the command's own pid, no shell in between
    return True


def judge_kill_exit(sc: Scenario, kill: Kill, rc: Optional[int], err: str, trial: Trial) -> None:
    """The exit status and stderr each kind of kill must give."""
    if rc is None:
        trial.problems.append(f"{kill.label}: the run did not exit within {EXIT_TIMEOUT:.0f}s")
        return
    if kill.signum == signal.SIGKILL and kill.target in ("process", "agent", "group"):
        if rc != -signal.SIGKILL:
            trial.problems.append(f"{kill.label}: exit status {rc}, expected {-signal.SIGKILL}")
    elif kill.target == "rank":
        if rc == 0:
            trial.problems.append("rank SIGKILL: torchrun exited 0 after losing a rank")
        trial.notes.append(f"torchrun exit status {rc}")
    elif kill.signum == signal.SIGINT and not sc.torchrun:
        if rc != 130:
            ignored = " (SIGINT ignored: started with SIG_IGN?)" if rc == 0 else ""
            trial.problems.append(f"SIGINT: exit status {rc}, expected 130{ignored}")
    elif kill.signum == signal.SIGINT:  # the whole torchrun group: ranks print the hint, the agent's status is torch's
        if rc == 0:
            trial.problems.append("group SIGINT: torchrun exited 0")
        trial.notes.append(f"torchrun exit status {rc}")
    judge_stderr(err, trial, expect_hint=kill.signum == signal.SIGINT)


def run_trial(sc: Scenario, reference: Path, kill: Kill, index: int, at: int, rng: random.Random, logs: Path) -> Trial:
    """Kill one run at progress ``at``, rerun it to completion, and judge both."""
    trial = Trial(sc.name, kill.label, index, at)
    began = time.monotonic()
    shutil.rmtree(sc.run_dir, ignore_errors=True)
    sc.run_dir.mkdir(parents=True)
    tag = f"{kill.label.replace(' ', '-')}-{index}"
    proc = start(sc, logs, f"{tag}-killed")
    try:
        deadline = time.monotonic() + PROGRESS_TIMEOUT
        while proc.poll() is None and sc.progress(sc.run_dir) < at and time.monotonic() < deadline:
            time.sleep(POLL)
        trial.progress_at_kill = sc.progress(sc.run_dir)
        if proc.poll() is None and trial.progress_at_kill < at:
            trial.problems.append(f"no progress to {at} within {PROGRESS_TIMEOUT:.0f}s (at {trial.progress_at_kill})")
            kill_group(proc.pid)
        elif proc.poll() is None:
            trial.killed = deliver(proc, kill, rng, trial)
        else:
            trial.notes.append(f"the run ended (status {proc.returncode}) before progress {at}: no kill")
        rc = reap(proc, EXIT_TIMEOUT)
    finally:
        if proc.poll() is None:
            kill_group(proc.pid)
            proc.wait()
    trial.kill_rc = rc
    left = wait_group_gone(proc.pid, 60.0)
    if left:
        trial.problems.append(f"{kill.label}: processes of the run still alive 60s later: {left}")
        kill_group(proc.pid)
    if trial.killed:
        judge_kill_exit(sc, kill, rc, (logs / f"{tag}-killed.err").read_text(errors="replace"), trial)
        if sc.after_kill:
            trial.problems.extend(sc.after_kill(sc.run_dir, reference))

    rerun_rc, _ = run_to_end(sc, logs, f"{tag}-rerun")
    trial.rerun_rc = rerun_rc
    rerun_err = (logs / f"{tag}-rerun.err").read_text(errors="replace")
    if rerun_rc != 0:
        tail = [ln for ln in rerun_err.splitlines() if ln.strip()][-1:] or [""]
        trial.problems.append(f"rerun exit status {rerun_rc}: {tail[0][:200]}")
    else:
        judge_stderr(rerun_err, trial, expect_hint=False)
        differences = compare_trees(sc.run_dir, reference, sc.exact_bytes, volatile_keys(sc.volatile))
        if sc.finished:
            differences.extend(sc.finished(sc.run_dir))
        trial.equal = not differences
        trial.problems.extend(differences)
    if trial.problems:  # keep the evidence: the next trial empties the run folder
        shutil.copytree(sc.run_dir, logs.parent / f"failed-{tag}", dirs_exist_ok=True)
    trial.seconds = round(time.monotonic() - began, 1)
    return trial


def cross_layout_check(work: Path) -> Optional[str]:
    """The uninterrupted torchrun result against the one-process eval-zero result: predictions and
    metrics equal, floats within the stated tolerance (2 ranks x 1 thread sum in another order)."""
    one = work / "eval-zero" / "reference" / "r.json"
    two = work / "torchrun" / "reference" / "r.json"
    if not (one.exists() and two.exists()):
        return None
    a, b = json.loads(two.read_text()), json.loads(one.read_text())
    return first_difference({k: a[k] for k in ("predictions", "metrics")}, {k: b[k] for k in ("predictions", "metrics")},
                            "torchrun vs 1 process", tolerant=True) or "equal"


def parse_kills(text: str) -> tuple[int, dict[str, int]]:
    """``"3"`` or ``"3,torchrun=1,quickstart=2"``: the default count and per-command overrides."""
    default, per = 3, {}
    for part in text.split(","):
        if "=" in part:
            name, value = part.split("=", 1)
            if name not in COMMANDS:
                raise argparse.ArgumentTypeError(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
            per[name] = int(value)
        else:
            default = int(part)
    if default < 0 or any(v < 0 for v in per.values()):
        raise argparse.ArgumentTypeError("kill counts cannot be negative")
    return default, per


def table(trials: list[Trial], scenario_order: list[Scenario]) -> list[dict[str, Any]]:
    """One row per command and kind of kill."""
    rows = []
    for sc in scenario_order:
        for kill in sc.kills:
            mine = [t for t in trials if t.command == sc.name and t.kill == kill.label]
            failed = [t for t in mine if t.problems]
            rows.append({
                "command": sc.name,
                "signal": kill.label,
                "kills": sum(t.killed for t in mine),
                "runs": len(mine),
                "equal_reruns": sum(t.equal for t in mine),
                "failures": len(failed),
                "first_failure": failed[0].problems[0] if failed else "",
            })
    return rows


def print_table(rows: list[dict[str, Any]], setup_failures: dict[str, str], layout: Optional[str]) -> None:
    print("\n| command | signal | kills | equal reruns | failures | first failure |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        kills = f"{r['kills']}" if r["kills"] == r["runs"] else f"{r['kills']} (of {r['runs']} runs)"
        print(f"| {r['command']} | {r['signal']} | {kills} | {r['equal_reruns']}/{r['runs']} | {r['failures']} | "
              f"{r['first_failure'][:160]} |")
    for name, why in setup_failures.items():
        print(f"| {name} | (reference run) | 0 | 0/0 | 1 | {why[:160]} |")
    if layout is not None:
        print(f"\ncross-layout (torchrun 2x1 thread vs 1 process, rtol {FLOAT_RTOL:g}, atol {FLOAT_ATOL:g}): {layout}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=parse_kills, default=(3, {}), metavar="N[,CMD=N...]",
                        help="kills per command and kind of kill, with per-command overrides [3]")
    parser.add_argument("--only", default=",".join(COMMANDS), help=f"commands to run, comma-separated [{','.join(COMMANDS)}]")
    parser.add_argument("--work", type=Path, default=None, help="working folder (kept) [a temporary folder, removed]")
    parser.add_argument("--json", type=Path, default=Path("kill_campaign.json"), help="report file [kill_campaign.json]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points [0]")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in COMMANDS]
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {', '.join(COMMANDS)}")
    default_kills, per_kills = args.kills

    # A shell without job control starts background jobs with SIGINT ignored, and an ignored signal
    # stays ignored across fork and exec: the commands would then never see our SIGINT. A handled
    # SIGINT here is reset to the default in every child, which then installs Python's own handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    began = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="kill-campaign-"))
    work.mkdir(parents=True, exist_ok=True)
    from fake_openai_server import FakeOpenAIServer

    trials: list[Trial] = []
    setup_failures: dict[str, str] = {}
    # a small delay per answer stretches 100 requests over seconds, so kills land between and inside units
    with FakeOpenAIServer(delay=0.03) as server:
        print(f"kill campaign in {work}: preparing inputs", flush=True)
        make_inputs(work)
        order = scenarios(work, server.url, names)
        for sc in order:
            logs, reference = work / sc.name / "logs", work / sc.name / "reference"
            shutil.rmtree(sc.run_dir, ignore_errors=True)
            shutil.rmtree(reference, ignore_errors=True)
            sc.run_dir.mkdir(parents=True)
            t0 = time.monotonic()
            rc, seen = run_to_end(sc, logs, "reference")
            if rc != 0:
                err = (logs / "reference.err").read_text(errors="replace").strip().splitlines()
                setup_failures[sc.name] = f"uninterrupted run exited {rc}: {err[-1] if err else ''}"
                print(f"{sc.name}: reference run FAILED ({setup_failures[sc.name]})", flush=True)
                continue
            sc.total = seen
            shutil.copytree(sc.run_dir, reference)
            print(f"{sc.name}: reference in {time.monotonic() - t0:.0f}s, progress {seen}; $ {' '.join(sc.argv)}", flush=True)
            n = per_kills.get(sc.name, default_kills)
            for kill in sc.kills:
                rng = random.Random(f"{args.seed}:{sc.name}:{kill.label}")  # the same points on every campaign
                for i, at in enumerate(kill_points(sc.total, sc.min_progress, n, rng)):
                    trial = run_trial(sc, reference, kill, i, at, rng, logs)
                    trials.append(trial)
                    verdict = "ok" if not trial.problems else f"FAIL: {trial.problems[0]}"
                    print(f"  {sc.name} {kill.label} #{i}: kill at {trial.progress_at_kill}/{sc.total} "
                          f"(wanted {at}), status {trial.kill_rc}, rerun {trial.rerun_rc}, {trial.seconds:.0f}s: {verdict}",
                          flush=True)
    layout = cross_layout_check(work)
    rows = table(trials, order)
    print_table(rows, setup_failures, layout)
    wall = time.monotonic() - began
    command = " ".join([Path(sys.executable).name, "tools/kill_campaign.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"\n{len(trials)} trials, {sum(t.killed for t in trials)} kills, wall {wall / 60:.1f} min; $ {command}")
    report = {"command": command, "wall_seconds": round(wall, 1), "work": str(work), "seed": args.seed,
              "tolerance": {"rtol": FLOAT_RTOL, "atol": FLOAT_ATOL, "used_for": "cross-layout check only"},
              "table": rows, "setup_failures": setup_failures, "cross_layout": layout,
              "commands": {sc.name: sc.argv for sc in order}, "trials": [asdict(t) for t in trials]}
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"report: {args.json}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    failed = bool(setup_failures) or any(t.problems for t in trials) or (layout not in (None, "equal"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
