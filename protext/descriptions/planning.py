"""Planning a description generation: its settings, checked before anything runs, and the units it will do.

:class:`GenConfig` is everything one run needs (from the command line or a caller);
:meth:`GenConfig.check` refuses settings no run could use, naming the flag. :func:`plan_units`
turns the classes and queries into *units* of one class x one query, the pieces a run does and
records one at a time (:mod:`.generation` runs them). Class names that differ only in case, ``_``
or spacing are one class (:func:`unique_classes`), as in training and in
:func:`~protext.descriptions.cache_reader.read_descriptions`: the first spelling is kept, with a
warning.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import urlsplit

from ..errors import UserError
from .cache_format import normalize_classname, unit_key
from .queries import ATTRIBUTE_TEMPLATES, CUPL_STYLE_QUERIES, DEFAULT_SYSTEM_PROMPT, format_query

__all__ = [
    "DEFAULT_OPENAI_URL",
    "GenConfig",
    "GenerationError",
    "MAX_TIMEOUT",
    "TEMPLATES_MODEL",
    "Unit",
    "plan_units",
    "resolve_api_key",
    "server_url",
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

    Units are told apart by :func:`~protext.descriptions.cache_format.unit_key`, the key readers use to
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


# --------------------------------------------------------------------------------------------------
# where requests go


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
