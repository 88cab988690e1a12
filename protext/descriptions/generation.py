"""Running a description generation: ask an LLM (or templates) for class descriptions, resumably.

For every unit that :func:`~protext.descriptions.planning.plan_units` plans (one class x one
query) it asks an OpenAI-compatible chat server for ``n_per_query`` short visual descriptions (the
CuPL recipe) and appends them to ``config.out``. A unit's lines are written in one ``write`` +
``fsync``, so a rerun of the same call after a crash or SIGKILL skips completed units and redoes
only the rest. The client (:mod:`.llm_client`) is imported only when a run asks a server.

Python use::

    from protext.descriptions import GenConfig, generate
    report = generate(GenConfig(classes=["beagle", "tabby cat"], out=Path("llm_data/pets.jsonl"),
                                backend="templates"))
    print(report.summary())
"""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Optional

from .cache import DescriptionWriteError, append_descriptions, repair_torn_tail, writer_lock
from .cache_format import Description, unit_key
from .cache_reader import read_records
from .planning import GenConfig, GenerationError, Unit, plan_units, resolve_api_key, server_url, unique_classes
from .queries import format_query
from .redaction import make_redactor

__all__ = [
    "RunReport",
    "generate",
    # the plan's, read here by the command and tests:
    "GenConfig",
    "GenerationError",
    "unique_classes",
]


@dataclass
class RunReport:
    """What a run did, for the summary and for callers."""

    out: Path
    classes_total: int = 0
    classes_complete: int = 0
    units_total: int = 0
    units_cached: int = 0  # complete before this run started
    units_written: int = 0
    descriptions_written: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # classname -> first error
    requests: int = 0  # HTTP requests sent (0 for the templates backend)
    retries: int = 0
    reasked: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_reported: bool = False
    adaptations: list[str] = field(default_factory=list)
    fatal: Optional[str] = None

    def summary(self) -> str:
        """The end-of-run summary a command prints."""
        lines = [
            f"descriptions: {self.out}",
            f"  descriptions written: {self.descriptions_written} "
            f"({self.units_written} units; {self.units_cached} of {self.units_total} units were already cached)",
            f"  classes complete: {self.classes_complete}/{self.classes_total}",
        ]
        if self.requests:
            lines.append(
                f"  requests: {self.requests}; retries: {self.retries} by the client (429/5xx/timeouts), "
                f"{self.reasked} re-asked unusable answers"
            )
        if self.tokens_reported:
            lines.append(f"  tokens: {self.prompt_tokens} prompt + {self.completion_tokens} completion")
        elif self.requests:
            lines.append("  tokens: not reported by the server")
        lines.extend(f"  server quirk: {a}" for a in self.adaptations)
        if self.failed:
            lines.append(f"  FAILED classes: {len(self.failed)} (rerun the same command to retry them)")
            lines.extend(f"    {name}: {reason}" for name, reason in self.failed.items())
        if self.fatal:
            lines.append(f"  STOPPED: {self.fatal}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# resuming


def _cached_keys(config: GenConfig) -> set[tuple[str, str, str]]:
    """Keys of the units already in the output (after cutting off a crash-damaged tail)."""
    if not config.out.exists() or config.out.stat().st_size == 0:
        return set()
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # the repair warning must show on every resumed run
        repair_torn_tail(config.out)
    records = read_records(config.out)
    others = sorted({r.get("model", "") for r in records} - {config.model_name})
    if others:
        raise GenerationError(
            f"--out: {config.out} already holds descriptions from model(s) {others}, not "
            f"{config.model_name!r}; write this model's descriptions to another file"
        )
    return {unit_key(r["classname"], r.get("prompt", ""), r.get("model", "")) for r in records}


def _todo(config: GenConfig, report: RunReport) -> list[Unit]:
    """The units still to do; fills in the report's totals."""
    units = plan_units(config)
    cached = _cached_keys(config)
    todo = [u for u in units if unit_key(u.classname, u.query, config.model_name) not in cached]
    report.classes_total = len(config.classes)
    report.units_total = len(units)
    report.units_cached = len(units) - len(todo)
    pending = {u.classname for u in todo}
    report.classes_complete = sum(1 for name in config.classes if name not in pending)
    return todo


# --------------------------------------------------------------------------------------------------
# the run


Sampler = Callable[[Unit], Awaitable[list[str]]]


class _Progress:
    """tqdm bar over classes, with requests in flight and failures (silent when not a terminal)."""

    def __init__(self, enabled: bool, total: int, initial: int, in_flight: Callable[[], int]) -> None:
        from tqdm import tqdm

        # disable=None lets tqdm switch itself off when stderr is not a terminal (CI logs, pipes).
        self.bar = tqdm(total=total, initial=initial, unit="class", desc="classes",
                        disable=None if enabled else True, dynamic_ncols=True)
        self.in_flight = in_flight
        self.failed = 0

    def refresh(self) -> None:
        self.bar.set_postfix_str(f"in flight {self.in_flight()}, failed {self.failed}", refresh=True)

    def class_done(self) -> None:
        self.bar.update(1)
        self.refresh()

    def close(self) -> None:
        self.refresh()
        self.bar.close()


class _Runner:
    """Workers draining the unit queue; a unit is appended to the file as soon as it is sampled."""

    def __init__(self, config: GenConfig, todo: list[Unit], report: RunReport, in_flight: Callable[[], int]) -> None:
        self.config, self.report = config, report
        self.queue: asyncio.Queue[Unit] = asyncio.Queue()
        for unit in todo:
            self.queue.put_nowait(unit)
        self.remaining = {name: 0 for name in config.classes}
        for unit in todo:
            self.remaining[unit.classname] += 1
        self.progress = _Progress(config.progress, report.classes_total, report.classes_complete, in_flight)
        self.tasks: list[asyncio.Task[None]] = []

    def finish(self, unit: Unit, error: Optional[str]) -> None:
        report = self.report
        if error is not None and unit.classname not in report.failed:
            report.failed[unit.classname] = error
            self.progress.failed += 1
        self.remaining[unit.classname] -= 1
        if self.remaining[unit.classname] == 0 and unit.classname not in report.failed:
            report.classes_complete += 1
            self.progress.class_done()
        else:
            self.progress.refresh()

    async def worker(self, sampler: Sampler) -> None:
        from .llm_client import FatalAPIError

        while self.report.fatal is None:
            try:
                unit = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                texts = await sampler(unit)
            except FatalAPIError as err:
                if self.report.fatal is None:
                    self.report.fatal = str(err)
                # Every other request would fail the same way: stop the other workers now rather
                # than let each wait out its own timeouts. A unit is written only after its sampler
                # returns, so a cancelled one leaves nothing half-written.
                for task in self.tasks:
                    if task is not asyncio.current_task():
                        task.cancel()
                return
            except Exception as err:  # noqa: BLE001 - any unit failure is reported, not raised
                self.finish(unit, str(err) or type(err).__name__)
                continue
            records = [Description(unit.classname, t, unit.query, self.config.model_name) for t in texts]
            # Synchronous on purpose: a unit's write is never interleaved with another's.
            append_descriptions(self.config.out, records)
            self.report.units_written += 1
            self.report.descriptions_written += len(records)
            self.finish(unit, None)

    async def run(self, sampler: Sampler) -> None:
        workers = min(self.config.concurrency, max(self.queue.qsize(), 1))
        self.tasks = [asyncio.create_task(self.worker(sampler)) for _ in range(workers)]
        try:
            results = await asyncio.gather(*self.tasks, return_exceptions=True)
        finally:
            for task in self.tasks:  # only left running when this call itself is cancelled (Ctrl-C)
                task.cancel()
            self.progress.close()
        for result in results:  # a worker cancelled by a fatal error is expected; anything else is a bug
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result


async def _templates_sample(unit: Unit) -> list[str]:
    return [format_query(unit.query, unit.classname)]


async def _run_openai(config: GenConfig, api_key: str, todo: list[Unit], report: RunReport) -> None:
    import openai

    from .llm_client import DescriptionSampler, SamplingSettings

    client = openai.AsyncOpenAI(
        api_key=api_key, base_url=config.base_url, max_retries=config.max_retries, timeout=config.timeout
    )
    settings = SamplingSettings(
        model=str(config.model), temperature=config.temperature, max_tokens=config.max_tokens,
        seed=config.seed, system_prompt=config.system_prompt,
    )
    llm = DescriptionSampler(
        client, settings, concurrency=config.concurrency, attempts=config.attempts, redact=make_redactor(api_key)
    )

    async def sample(unit: Unit) -> list[str]:
        return await llm(unit.query, config.n_per_query)

    try:
        await _Runner(config, todo, report, lambda: llm.stats.in_flight).run(sample)
    finally:
        await client.close()
    stats = llm.stats
    report.requests, report.retries, report.reasked = stats.requests, stats.retries, stats.reasked
    report.prompt_tokens, report.completion_tokens = stats.prompt_tokens, stats.completion_tokens
    report.tokens_reported, report.adaptations = stats.tokens_reported, list(stats.adaptations)


def generate(config: GenConfig) -> RunReport:
    """Run one generation (blocking): every unit not already in ``config.out``.

    Bad settings and files raise :class:`~protext.errors.UserError` subclasses before any request;
    an unreachable server is found with one connection attempt before the first request. A unit
    that fails marks its class failed and the others go on; an error every request would hit
    (authentication, unknown model, lost connection) stops the run (``report.fatal``). Units
    already written always stay. Holds the output's writer lock throughout.
    """
    config.check()
    config = GenConfig(**{**config.__dict__, "classes": unique_classes(config.classes)})
    api_key = resolve_api_key(config) if config.backend == "openai" else ""
    report = RunReport(out=config.out)
    try:
        config.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DescriptionWriteError(f"--out: cannot create the folder of {config.out} ({err.strerror or err})") from None
    with writer_lock(config.out):
        todo = _todo(config, report)
        if config.backend == "templates":
            asyncio.run(_Runner(config, todo, report, lambda: 0).run(_templates_sample))
        elif todo:
            from .transport import check_reachable

            check_reachable(server_url(config), timeout=min(config.timeout, 10.0))
            asyncio.run(_run_openai(config, api_key, todo, report))
    return report
