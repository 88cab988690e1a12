"""Evaluation: zero-shot or test-time adaptation over a dataset, resumable, with calibration and cost.

Use from Python::

    from protext.evaluation import EvalConfig, evaluate

    payload = evaluate(EvalConfig(dataset="dtd", root="data", method="clip", templates="coop"))
    print(payload["metrics"]["top1"], payload["metrics"]["ece"])

:func:`evaluate` checks everything that needs no model first (flags, input files, every output
path), then runs, appending each finished image to a log beside the results file; rerunning the
same call after a kill continues from the log and gives the same results. Under ``torchrun`` the
images are sharded (every ``world_size``-th image per rank) and merged exactly. Rank 0 writes the
results JSON, its markdown summary and reliability diagram (:func:`protext.results.write_results`),
then removes the log.

What a kill costs: finished images are appended (flushed and fsynced per batch) to
``OUT.resume-<fingerprint>.rank<r>.jsonl``; a SIGKILL loses at most the batch in flight, and the
same command rerun skips every finished batch and ends with the same results (a changed command
has another fingerprint, so it uses its own log and leaves the old one alone; the log also records
the images and classes it was started on, and a rerun on changed ones is refused before any model
loads, or starts over with ``overwrite``). Ctrl-C exits 130
and keeps the log. Online methods (TDA) also save their caches every :data:`.loop.STATE_EVERY`
images. Rerunning a finished command returns its result without recomputing anything.

Modules: :mod:`.config` (settings, no torch), :mod:`.preflight`, :mod:`.data`, :mod:`.features`
(class features and templates), :mod:`.adapters` (the bridge to :mod:`protext.tta`), :mod:`.resume`
(the log), :mod:`.loop`, :mod:`.payload`.
"""

from __future__ import annotations

from typing import Any, Optional

from .config import METHODS, PRECISIONS, SPLITS, TEMPLATE_RULES, TTA_METHODS, EvalConfig, EvalError

__all__ = ["EvalConfig", "EvalError", "METHODS", "PRECISIONS", "SPLITS", "TEMPLATE_RULES", "TTA_METHODS", "evaluate",
           "evaluate_many"]


def evaluate_many(config: EvalConfig, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """Several view-feature methods (``config.tta = "zero,tda,mta"``) over one encoding of each
    image's views; ``{method: results payload}`` (see :mod:`.multi`)."""
    from .multi import evaluate_many as run

    return run(config, **kwargs)


def evaluate(config: EvalConfig, *, clip: Any = None, progress: bool = True, command: Optional[str] = None) -> dict[str, Any]:
    """Evaluate ``config`` and write its results; returns the results payload (on every rank).

    Args:
        config: the run's settings (``config.output_path()`` is where results and the log go).
        clip: an already loaded :class:`protext.models.LoadedClip` to use instead of loading
            ``config.model``/``config.pretrained`` (it must be what those name: the results say so).
        progress: allow a progress bar (``config.progress`` must allow it too).
        command: the command line to record (default: a Python call).

    Raises:
        protext.errors.UserError: bad flags, inputs or output paths (before any model loads), or
            bad data found during the run; the message is one line naming the flag or file.
    """
    import os
    import sys
    import time
    from dataclasses import replace

    from .config import WORKERS_PER_CORE, max_workers

    # before any process starts: more loader processes than cores only compete for them (and each
    # holds a copy of the dataset); the number never changes a result, so it is capped, not refused
    cap = max_workers()
    if config.workers > cap:
        if os.environ.get("RANK", "0") == "0":
            print(f"warning: --workers {config.workers} is more than this machine can use; using {cap} "
                  f"({cap // WORKERS_PER_CORE} CPU cores x {WORKERS_PER_CORE}).", file=sys.stderr)
        config = replace(config, workers=cap)

    from ..results import write_results
    from .loop import evaluate_shards
    from .payload import build_payload
    from .resume import remove_logs

    from .preflight import AlreadyDone

    if config.tta and "," in config.tta:
        from .config import EvalError

        raise EvalError(f"--tta {config.tta} names several methods: call protext.evaluation.evaluate_many, which returns "
                        "one result per method.")

    if config.stream_runs is not None or config.scenario is not None:
        from .orders import evaluate_orders

        return evaluate_orders(config, clip=clip, progress=progress, command=command)
    start = time.perf_counter()
    try:
        setup, parts = evaluate_shards(config, clip=clip, progress=progress)
    except AlreadyDone as done:
        # a rerun of a finished run (perhaps killed between writing its results and removing its
        # log): the result stands, nothing is recomputed or rewritten
        remove_logs(done.path, done.payload["settings"]["fingerprint"])
        if os.environ.get("RANK", "0") == "0":
            print(f"note: {done.path} already holds this run's result (same settings and inputs); nothing to do "
                  "(--overwrite recomputes it).", file=sys.stderr)
        return done.payload
    payload = build_payload(setup, parts, command or f"protext.evaluation.evaluate({config!r})", time.perf_counter() - start)
    if setup.ctx.is_main:
        out = config.output_path()
        write_results(payload, out)
        remove_logs(out, setup.fingerprint)
    return payload
