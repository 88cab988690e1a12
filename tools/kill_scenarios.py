"""What the kill campaign runs, how it watches each command and what it checks after a kill.

One :class:`Scenario` per command (its flags, run folder, the monotone progress count read from its
files, the kinds of kill it takes, the checks of an interrupted and of a finished run), the inputs
they read (made once), and the data types of a trial. :mod:`kill_campaign` runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
sys.path.insert(0, str(TESTS))  # the test helpers: synthetic datasets, fake LLM server
from conftest import SHARED  # noqa: E402  (one definition of the data)
from tree_compare import safetensors_metadata  # noqa: E402  (beside this script)

TINY = ["--model", "tiny-clip", "--pretrained", "random"]


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
