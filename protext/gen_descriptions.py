"""``python -m protext.gen_descriptions``: class descriptions from an LLM (or templates), cached as JSONL.

Stage one of the pipeline. For every class and every question template it asks an OpenAI-compatible
chat server for ``--n-per-prompt`` short visual descriptions (the CuPL recipe) and appends them to
``--out``. Work is done and recorded in *units* of one class x one prompt; a unit's lines are written
in one ``write`` + ``fsync``, so a rerun of the same command after a crash or SIGKILL skips completed
units and redoes only the rest. ``import`` converts an existing CuPL JSON file instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Iterator, Optional, Sequence

from .descriptions import (
    Description,
    DescriptionFileError,
    append_descriptions,
    import_cupl,
    load_cupl_json,
    match_classnames,
    read_records,
    repair_torn_tail,
)
from .prompt_sets import (
    ATTRIBUTE_TEMPLATES,
    CUPL_STYLE_PROMPTS,
    DEFAULT_SYSTEM_PROMPT,
    PromptFileError,
    format_prompt,
    load_prompt_templates,
)

log = logging.getLogger("protext.gen_descriptions")

TEMPLATES_MODEL = "templates"
BUILTIN_CLASS_LISTS = ("imagenet",)


class UsageError(ValueError):
    """Bad command-line input; the message names the argument or file at fault."""


# --------------------------------------------------------------------------------------------------
# configuration and plan


@dataclass
class GenConfig:
    """Everything one generation run needs; built from the command line or by a caller."""

    classes: list[str]
    out: Path
    backend: str = "openai"  # "openai" (any OpenAI-compatible server) or "templates" (offline)
    model: Optional[str] = None
    base_url: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    prompts: Sequence[str] = CUPL_STYLE_PROMPTS
    n_per_prompt: int = 10
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
        """Raise :class:`UsageError` for settings no run could use."""
        if self.backend not in ("openai", "templates"):
            raise UsageError(f"--backend: expected 'openai' or 'templates', got {self.backend!r}")
        if self.backend == "openai" and not self.model:
            raise UsageError("--model is required with --backend openai (e.g. --model gpt-4o-mini)")
        if not self.classes:
            raise UsageError("--classes: the class list is empty")
        for name, value, low in (
            ("--n-per-prompt", self.n_per_prompt, 1),
            ("--concurrency", self.concurrency, 1),
            ("--max-tokens", self.max_tokens, 1),
            ("--max-retries", self.max_retries, 0),
            ("--attempts", self.attempts, 1),
        ):
            if value < low:
                raise UsageError(f"{name} must be >= {low}, got {value}")
        if self.timeout <= 0:
            raise UsageError(f"--timeout must be > 0 seconds, got {self.timeout}")

    @property
    def model_name(self) -> str:
        return TEMPLATES_MODEL if self.backend == "templates" else str(self.model)


@dataclass(frozen=True)
class Unit:
    """One resumable piece of work: the samples of one prompt for one class."""

    classname: str
    prompt: str  # as recorded in the file: the question sent, or the template used


def plan_units(config: GenConfig) -> list[Unit]:
    """All units of the run, class-major so classes complete one after another."""
    units: list[Unit] = []
    for name in config.classes:
        if config.backend == "templates":
            units.extend(Unit(name, t) for t in ATTRIBUTE_TEMPLATES)
        else:
            units.extend(Unit(name, format_prompt(t, name)) for t in config.prompts)
    return list(dict.fromkeys(units))


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
# class lists


def _names_from_json(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"--classes: {path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        return data
    if isinstance(data, dict) and any(k in data for k in ("train", "val", "test")):
        return _names_from_coop_split(path, data)
    raise UsageError(
        f"--classes: {path}: expected a JSON list of class names or a CoOp split file "
        '({"train": [[path, label, classname], ...], ...})'
    )


def _names_from_coop_split(path: Path, data: dict) -> list[str]:
    by_label: dict[int, str] = {}
    for split in ("train", "val", "test"):
        for i, item in enumerate(data.get(split) or []):
            ok = isinstance(item, list) and len(item) == 3 and isinstance(item[1], int) and isinstance(item[2], str)
            if not ok:
                raise UsageError(f"--classes: {path}: {split}[{i}] is not [relpath, label, classname]: {item!r}")
            label, name = item[1], item[2]
            if by_label.setdefault(label, name) != name:
                raise UsageError(f"--classes: {path}: label {label} is both {by_label[label]!r} and {name!r}")
    if not by_label:
        raise UsageError(f"--classes: {path}: the split file lists no images")
    absent = sorted(set(range(max(by_label) + 1)) - set(by_label))
    if absent or min(by_label) < 0:
        raise UsageError(f"--classes: {path}: labels are not 0..{max(by_label)} (missing {absent[:10]})")
    return [by_label[i] for i in range(len(by_label))]


def load_classnames(spec: str) -> list[str]:
    """Class names from ``spec``: ``imagenet``, or a ``.txt`` (one per line) / ``.json`` file.

    JSON may be a list of names or a CoOp ``split_zhou_*.json`` file (names taken in label order).
    Repeated names are kept once (ImageNet has two), with a warning.
    """
    path = Path(spec)
    if spec.lower() in BUILTIN_CLASS_LISTS and not path.exists():
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # heavy import: only when asked

        names = list(IMAGENET_CLASSNAMES)
    elif path.is_file():
        if path.suffix.lower() == ".json":
            names = _names_from_json(path)
        elif path.suffix.lower() == ".txt":
            names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        else:
            raise UsageError(f"--classes: {path}: expected a .txt or .json file")
    else:
        raise UsageError(
            f"--classes: {spec!r} is neither a built-in list ({', '.join(BUILTIN_CLASS_LISTS)}) "
            "nor an existing .txt/.json file"
        )
    blank = [i for i, n in enumerate(names) if not n.strip()]
    if blank:
        raise UsageError(f"--classes: {spec}: empty class name at position {blank[0]}")
    names = [" ".join(n.split()) for n in names]
    unique = list(dict.fromkeys(names))
    if len(unique) < len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        warnings.warn(f"{spec}: class names listed more than once share one set of descriptions: {repeated}")
    return unique


# --------------------------------------------------------------------------------------------------
# the run


Sampler = Callable[[Unit], Awaitable[list[str]]]


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an advisory lock on the output so two runs never append the same units."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking, single-writer use is the user's responsibility
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"--out: {path} is being written by another gen_descriptions run") from None
        yield
    finally:
        os.close(fd)  # also releases the lock; a SIGKILL releases it too


def _cached_units(config: GenConfig) -> set[Unit]:
    """Units already in the output (after cutting off a crash-damaged tail)."""
    if not config.out.exists() or config.out.stat().st_size == 0:
        return set()
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # the repair warning must show on every resumed run
        repair_torn_tail(config.out)
    records = read_records(config.out)
    others = sorted({r.get("model", "") for r in records} - {config.model_name})
    if others:
        raise UsageError(
            f"--out: {config.out} already holds descriptions from model(s) {others}, not "
            f"{config.model_name!r}; write this model's descriptions to another file"
        )
    return {Unit(r["classname"], r.get("prompt", "")) for r in records}


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


async def run_units(config: GenConfig, sampler: Sampler, in_flight: Callable[[], int] = lambda: 0) -> RunReport:
    """Run every unit not already in ``config.out`` through ``sampler``, appending as units finish.

    A failing unit marks its class failed; the others go on. A :class:`~protext.llm_client.FatalAPIError`
    stops the run (units already written stay). Must run on the event loop that owns ``sampler``.
    """
    from .llm_client import FatalAPIError

    config.out.parent.mkdir(parents=True, exist_ok=True)
    report = RunReport(out=config.out, classes_total=len(dict.fromkeys(config.classes)))
    units = plan_units(config)
    report.units_total = len(units)
    with _exclusive(config.out):
        cached = _cached_units(config)
        todo = [u for u in units if u not in cached]
        report.units_cached = report.units_total - len(todo)
        remaining: dict[str, int] = {name: 0 for name in config.classes}
        for unit in todo:
            remaining[unit.classname] += 1
        report.classes_complete = sum(1 for n in remaining.values() if n == 0)

        progress = _Progress(config.progress, report.classes_total, report.classes_complete, in_flight)
        queue: asyncio.Queue[Unit] = asyncio.Queue()
        for unit in todo:
            queue.put_nowait(unit)

        def finish(unit: Unit, error: Optional[str]) -> None:
            if error is not None:
                if unit.classname not in report.failed:
                    report.failed[unit.classname] = error
                    progress.failed += 1
            remaining[unit.classname] -= 1
            if remaining[unit.classname] == 0 and unit.classname not in report.failed:
                report.classes_complete += 1
                progress.class_done()
            else:
                progress.refresh()

        async def worker() -> None:
            while report.fatal is None:
                try:
                    unit = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    texts = await sampler(unit)
                except FatalAPIError as err:
                    report.fatal = str(err)
                    return
                except Exception as err:  # noqa: BLE001 - any unit failure is reported, not raised
                    finish(unit, str(err) or type(err).__name__)
                    continue
                records = [Description(unit.classname, t, unit.prompt, config.model_name) for t in texts]
                # Synchronous on purpose: a unit's write is never interleaved with another's.
                append_descriptions(config.out, records)
                report.units_written += 1
                report.descriptions_written += len(records)
                finish(unit, None)

        try:
            await asyncio.gather(*(worker() for _ in range(min(config.concurrency, max(len(todo), 1)))))
        finally:
            progress.close()
    return report


def _templates_sampler() -> Sampler:
    async def sample(unit: Unit) -> list[str]:
        return [format_prompt(unit.prompt, unit.classname)]

    return sample


async def _run_openai(config: GenConfig, api_key: str) -> RunReport:
    import openai

    from .llm_client import DescriptionSampler, SamplingSettings, make_redactor

    client = openai.AsyncOpenAI(
        api_key=api_key, base_url=config.base_url, max_retries=config.max_retries, timeout=config.timeout
    )
    settings = SamplingSettings(
        model=str(config.model),
        temperature=config.temperature,
        max_tokens=config.max_tokens,
        seed=config.seed,
        system_prompt=config.system_prompt,
    )
    llm = DescriptionSampler(
        client, settings, concurrency=config.concurrency, attempts=config.attempts, redact=make_redactor(api_key)
    )

    async def sample(unit: Unit) -> list[str]:
        return await llm(unit.prompt, config.n_per_prompt)

    try:
        report = await run_units(config, sample, in_flight=lambda: llm.stats.in_flight)
    finally:
        await client.close()
    stats = llm.stats
    report.requests, report.retries, report.reasked = stats.requests, stats.retries, stats.reasked
    report.prompt_tokens, report.completion_tokens = stats.prompt_tokens, stats.completion_tokens
    report.tokens_reported, report.adaptations = stats.tokens_reported, list(stats.adaptations)
    return report


def resolve_api_key(config: GenConfig) -> str:
    """The API key from ``config.api_key_env``; a placeholder for local servers that need none."""
    key = os.environ.get(config.api_key_env, "").strip()
    if key:
        return key
    if config.base_url or os.environ.get("OPENAI_BASE_URL"):
        return "sk-no-key-given"  # vLLM / Ollama / llama.cpp accept any key; the client insists on one
    raise UsageError(
        f"${config.api_key_env} is not set: export your API key there, name another variable with "
        "--api-key-env, or pass --base-url for a local server that needs no key"
    )


def generate(config: GenConfig) -> RunReport:
    """Run one generation (blocking). Raises :class:`UsageError` / :class:`DescriptionFileError` early."""
    config.check()
    if config.backend == "templates":
        return asyncio.run(run_units(config, _templates_sampler()))
    return asyncio.run(_run_openai(config, resolve_api_key(config)))


# --------------------------------------------------------------------------------------------------
# command line


def _temperature(text: str) -> Optional[float]:
    if text.lower() in ("default", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'default', got {text!r}") from None
    if not 0 <= value <= 2:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    d = GenConfig(classes=[], out=Path())
    p = argparse.ArgumentParser(
        prog="python -m protext.gen_descriptions",
        description="Generate short visual class descriptions with an LLM (CuPL-style) and cache them as JSONL. "
        "Rerunning the same command resumes: completed class x prompt units are skipped.",
        epilog="Import published descriptions instead: python -m protext.gen_descriptions import FILE.json "
        "--out llm_data/NAME.jsonl (see 'import --help').",
    )
    p.add_argument("--classes", required=True, metavar="SPEC",
                   help="'imagenet' (open_clip's class names), or a .txt file (one name per line), or a .json file "
                   "(a list of names, or a CoOp split_zhou_*.json file: names in label order)")
    p.add_argument("--out", required=True, type=Path, metavar="FILE.jsonl",
                   help="description cache to create or resume, e.g. llm_data/imagenet_gpt-4o-mini.jsonl")
    p.add_argument("--backend", choices=("openai", "templates"), default=d.backend,
                   help="'openai': any OpenAI-compatible chat server (OpenAI, vLLM, Ollama, llama.cpp); "
                   "'templates': no LLM, descriptions from built-in attribute templates (offline); default %(default)s")
    p.add_argument("--model", help="chat model name as the server knows it (required with --backend openai)")
    p.add_argument("--base-url", help="server URL, e.g. http://localhost:8000/v1 for vLLM, "
                   "http://localhost:11434/v1 for Ollama (default: OpenAI, or $OPENAI_BASE_URL)")
    p.add_argument("--api-key-env", default=d.api_key_env, metavar="VAR",
                   help="environment variable holding the API key, default %(default)s (the key itself is never a flag, "
                   "and never written to the cache or printed)")
    p.add_argument("--prompts", default="builtin", metavar="builtin|FILE",
                   help="question templates with '{}' for the class name: the built-in CuPL-style set, or a file "
                   "(.txt one per line, or .json list); default %(default)s")
    p.add_argument("--n-per-prompt", type=int, default=d.n_per_prompt, metavar="N",
                   help="samples per class and prompt (sent as n; servers that refuse or ignore n get N single requests); default %(default)s")
    p.add_argument("--temperature", type=_temperature, default=d.temperature, metavar="T",
                   help="sampling temperature, or 'default' to send none (reasoning models); default %(default)s, as CuPL")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, metavar="N",
                   help="answer length limit in tokens (sent as max_tokens, or max_completion_tokens if the model wants it); "
                   "default %(default)s")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="sampling seed for servers that support it (sample i of a single-choice fallback uses seed+i); "
                   "default: none sent")
    p.add_argument("--concurrency", type=int, default=d.concurrency, metavar="N", help="requests in flight at most; default %(default)s")
    p.add_argument("--timeout", type=float, default=d.timeout, metavar="SEC", help="per-request timeout; default %(default)s")
    p.add_argument("--max-retries", type=int, default=d.max_retries, metavar="N",
                   help="client retries with backoff on 429, 5xx, timeouts and dropped connections; default %(default)s")
    p.add_argument("--attempts", type=int, default=d.attempts, metavar="N",
                   help="tries for answers that arrive unusable (bad JSON, no choices, only refusals); default %(default)s")
    p.add_argument("--system-prompt", default=d.system_prompt, metavar="TEXT",
                   help="system message sent with every question ('' to send none); default: ask for one short "
                   "sentence of visible features that names the thing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when stderr is not a terminal)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every retry and request")
    return p


def build_import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m protext.gen_descriptions import",
        description="Convert a CuPL/ProText description file ({classname: [descriptions]}) to the JSONL cache format.",
    )
    p.add_argument("json_file", type=Path, metavar="FILE.json", help="CuPL-format JSON, e.g. ../shared/cupl/texture_prompts_full.json")
    p.add_argument("--out", required=True, type=Path, metavar="FILE.jsonl", help="JSONL file to write, e.g. llm_data/dtd_cupl.jsonl")
    p.add_argument("--model", default="cupl", help="value of the 'model' field on every line")
    p.add_argument("--classes", metavar="SPEC",
                   help="a dataset's class list (as for generation): refuse to import unless every class has "
                   "descriptions (keys compared case-insensitively, '_' as space), listing the mismatches")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (refused otherwise)")
    return p


def config_from_args(args: argparse.Namespace) -> GenConfig:
    prompts: Sequence[str] = CUPL_STYLE_PROMPTS
    if args.prompts != "builtin":
        prompts = load_prompt_templates(args.prompts)
    return GenConfig(
        classes=load_classnames(args.classes),
        out=args.out,
        backend=args.backend,
        model=args.model,
        base_url=args.base_url,
        api_key_env=args.api_key_env,
        prompts=prompts,
        n_per_prompt=args.n_per_prompt,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
        concurrency=args.concurrency,
        timeout=args.timeout,
        max_retries=args.max_retries,
        attempts=args.attempts,
        system_prompt=args.system_prompt,
        progress=not args.no_progress,
    )


def _main_import(argv: list[str]) -> int:
    args = build_import_parser().parse_args(argv)
    if args.classes:
        wanted = load_classnames(args.classes)
        match = match_classnames(load_cupl_json(args.json_file), wanted)
        if match.missing:
            print(
                f"error: {args.json_file} has no descriptions for {len(match.missing)} of {len(wanted)} classes "
                f"of {args.classes}; nothing written.\n  missing: {match.missing[:20]}"
                + (" ..." if len(match.missing) > 20 else "")
                + f"\n  unmatched keys in the file: {match.unused[:20]}" + (" ..." if len(match.unused) > 20 else ""),
                file=sys.stderr,
            )
            return 1
    count = import_cupl(args.json_file, args.out, model=args.model, overwrite=args.overwrite)
    classes = len({r["classname"] for r in read_records(args.out)})
    print(f"imported {count} descriptions of {classes} classes from {args.json_file} into {args.out}")
    return 0


class _RedactingHandler(logging.StreamHandler):
    """stderr log handler that removes the API key from every message (openai's and httpx's too)."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__(sys.stderr)
        self.redact = redact
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        record = logging.makeLogRecord(record.__dict__)  # other handlers keep the original record
        record.msg, record.args = self.redact(record.getMessage()), None
        super().emit(record)


def _setup_logging(verbose: bool, redact: Callable[[str], str]) -> None:
    root = logging.getLogger()
    # Replace only our own handler, so repeated main() calls (tests, notebooks) do not stack them.
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _RedactingHandler)]
    root.addHandler(_RedactingHandler(redact))
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 some classes failed, 2 bad input or fatal API error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from .llm_client import make_redactor

    redact = make_redactor(os.environ.get("OPENAI_API_KEY"))
    try:
        if argv[:1] == ["import"]:
            return _main_import(argv[1:])
        args = build_parser().parse_args(argv)
        redact = make_redactor(os.environ.get("OPENAI_API_KEY"), os.environ.get(args.api_key_env))
        _setup_logging(args.verbose, redact)
        config = config_from_args(args)
        report = generate(config)
    except (UsageError, DescriptionFileError, PromptFileError, FileNotFoundError, FileExistsError, IsADirectoryError) as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed units are saved; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - an unexpected error still must not print the key
        print(redact(traceback.format_exc()), file=sys.stderr)
        return 2
    print(report.summary())
    if report.fatal:
        return 2
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
