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
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
sys.path.insert(0, str(TESTS))  # the test helpers: synthetic datasets, fake LLM server, tolerances
from conftest import FLOAT_ATOL, FLOAT_RTOL  # noqa: E402  (one definition of the tolerances)
from process_groups import children, kill_group, reap, wait_group_gone  # noqa: E402  (beside this script)
from kill_scenarios import (  # noqa: E402
    COMMANDS, Kill, Scenario, Trial, child_env, make_inputs, scenarios,
)
from tree_compare import compare_trees, first_difference, volatile_keys  # noqa: E402

PROGRESS_TIMEOUT = 600.0  # safety net for a hung run on a loaded machine, never a measure of speed
EXIT_TIMEOUT = 120.0  # a signalled process must be gone by then
RUN_TIMEOUT = 900.0  # one whole command
POLL = 0.02  # seconds between looks at the files: short, so a kill lands close to the chosen point

TRACEBACK = "Traceback (most recent call last)"


# ------------------------------------------------------------------------------------------------
# running a command


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
