"""The description-generation engine: ask an LLM (or templates) for class descriptions, resumably.

For every class and every query it asks an OpenAI-compatible chat server for ``n_per_query`` short
visual descriptions (the CuPL recipe) and appends them to ``config.out``. Work is done and recorded
in *units* of one class x one query; a unit's lines are written in one ``write`` + ``fsync``, so a
rerun of the same call after a crash or SIGKILL skips completed units and redoes only the rest.
Class names that differ only in case, ``_`` or spacing are one class (as in training and in
:func:`~protext.descriptions.cache.read_descriptions`): the first spelling is kept, with a warning.

Python use::

    from protext.descriptions import GenConfig, generate
    report = generate(GenConfig(classes=["beagle", "tabby cat"], out=Path("llm_data/pets.jsonl"),
                                backend="templates"))
    print(report.summary())
"""

from __future__ import annotations

import asyncio
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Optional, Sequence
from urllib.parse import urlsplit

from ..errors import UserError
from .cache import (
    Description,
    DescriptionWriteError,
    append_descriptions,
    normalize_classname,
    read_records,
    repair_torn_tail,
    unit_key,
    writer_lock,
)
from .queries import ATTRIBUTE_TEMPLATES, CUPL_STYLE_QUERIES, DEFAULT_SYSTEM_PROMPT, format_query

__all__ = [
    "GenConfig",
    "GenerationError",
    "RunReport",
    "Unit",
    "generate",
    "plan_units",
    "resolve_api_key",
    "unique_classes",
]

TEMPLATES_MODEL = "templates"
DEFAULT_OPENAI_URL = "https://api.openai.com/v1"


class GenerationError(UserError, ValueError):
    """Settings or files a generation cannot use; the message names the flag or file at fault."""


def unique_classes(names: Sequence[str]) -> list[str]:
    """``names`` with spacing collapsed and classes that normalise alike kept once (first spelling), with a warning."""
    kept: dict[str, str] = {}
    merged: list[str] = []
    for raw in names:
        name = " ".join(raw.split())
        norm = normalize_classname(name)
        if norm not in kept:
            kept[norm] = name
        else:  # a later listing of a class already kept
            merged.append(name if kept[norm] == name else f"{name} (as {kept[norm]})")
    if merged:
        warnings.warn(
            f"class names listed more than once (case, '_' and spacing ignored) share one set of descriptions: {sorted(set(merged))}",
            stacklevel=2,
        )
    return list(kept.values())


#: per-request timeout ceiling; the integer settings' bounds are in :meth:`GenConfig.check`, whose
#: upper ends catch typos that would open a million connections or retry for days (OpenAI caps n at 128)
MAX_TIMEOUT = 86400.0  # a day: a longer per-request timeout is a typo, and would hide a stuck server


@dataclass
class GenConfig:
    """Everything one generation run needs; built from the command line or by a caller."""

    classes: list[str]
    out: Path
    backend: str = "openai"  # "openai" (any OpenAI-compatible server) or "templates" (offline)
    model: Optional[str] = None
    base_url: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    queries: Sequence[str] = CUPL_STYLE_QUERIES
    n_per_query: int = 10
    temperature: Optional[float] = 0.99
    max_tokens: int = 60
    seed: Optional[int] = None
    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 5
    attempts: int = 3
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    progress: bool = True

    def check(self) -> None:
        """Raise :class:`GenerationError` for settings no run could use."""
        if self.backend not in ("openai", "templates"):
            raise GenerationError(f"--backend: expected 'openai' or 'templates', got {self.backend!r}")
        if self.backend == "openai" and not self.model:
            raise GenerationError("--model is required with --backend openai (e.g. --model gpt-4o-mini)")
        if not self.classes:
            raise GenerationError("--classes: the class list is empty")
        for name, value, low, high in (
            ("--n-per-query", self.n_per_query, 1, 128),
            ("--concurrency", self.concurrency, 1, 1024),
            ("--max-tokens", self.max_tokens, 1, 1_000_000),
            ("--max-retries", self.max_retries, 0, 100),
            ("--attempts", self.attempts, 1, 100),
        ):
            if value < low:
                raise GenerationError(f"{name} must be >= {low}, got {value}")
            if value > high:
                raise GenerationError(f"{name} must be <= {high}, got {value}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise GenerationError(f"--seed must fit in 64 bits (servers take an int64), got {self.seed}")
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and 0 < self.timeout <= MAX_TIMEOUT):
            raise GenerationError(f"--timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT:g}, got {self.timeout}")
        if self.temperature is not None and not (math.isfinite(self.temperature) and 0 <= self.temperature <= 2):
            raise GenerationError(f"--temperature must be between 0 and 2 (or 'default'), got {self.temperature}")
        if self.backend == "openai":
            if not self.api_key_env.strip():
                raise GenerationError("--api-key-env must name an environment variable, got ''")
            if self.base_url is not None:
                parts = urlsplit(self.base_url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise GenerationError(
                        f"--base-url {self.base_url!r} is not an http(s) URL (expected e.g. http://localhost:8000/v1)"
                    )
        if self.out.is_dir():
            raise GenerationError(f"--out: {self.out} is a directory; name a .jsonl file")

    @property
    def model_name(self) -> str:
        return TEMPLATES_MODEL if self.backend == "templates" else str(self.model)


@dataclass(frozen=True)
class Unit:
    """One resumable piece of work: the samples of one query for one class."""

    classname: str
    query: str  # as recorded in the file: the question sent, or the template used


def plan_units(config: GenConfig) -> list[Unit]:
    """All units of the run, class-major so classes complete one after another.

    Units are told apart by :func:`~protext.descriptions.cache.unit_key`, the key readers use to
    recognise a rewritten unit, so the plan never holds two units a reader would merge.
    """
    units: dict[tuple[str, str, str], Unit] = {}
    for name in config.classes:
        if config.backend == "templates":
            queries = ATTRIBUTE_TEMPLATES
        else:
            queries = tuple(format_query(t, name) for t in config.queries)
        for query in queries:
            units.setdefault(unit_key(name, query, config.model_name), Unit(name, query))
    return list(units.values())


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

    from .llm_client import DescriptionSampler, SamplingSettings, make_redactor

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


def resolve_api_key(config: GenConfig) -> str:
    """The API key from ``config.api_key_env``; a placeholder for local servers that need none."""
    key = os.environ.get(config.api_key_env, "").strip()
    if key:
        return key
    if config.base_url or os.environ.get("OPENAI_BASE_URL"):
        return "sk-no-key-given"  # vLLM / Ollama / llama.cpp accept any key; the client insists on one
    raise GenerationError(
        f"${config.api_key_env} is not set: export your API key there, name another variable with "
        "--api-key-env, or pass --base-url for a local server that needs no key"
    )


def server_url(config: GenConfig) -> str:
    """The URL requests go to: ``--base-url``, else ``$OPENAI_BASE_URL``, else OpenAI's."""
    return config.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_URL


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
            from .llm_client import check_reachable

            check_reachable(server_url(config), timeout=min(config.timeout, 10.0))
            asyncio.run(_run_openai(config, api_key, todo, report))
    return report
