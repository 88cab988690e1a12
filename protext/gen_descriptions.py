"""``python -m protext.gen_descriptions`` (``protext-gen``): class descriptions from an LLM, cached as JSONL.

Parses flags, calls :func:`protext.descriptions.generate` (or, for ``import``, the CuPL import) and
prints. Rerunning the same command resumes: completed class x query units are skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

from .classlists import read_classes
from .descriptions import GenConfig, GenerationError, generate, queries
from .descriptions.redaction import install_redacting_log, make_redactor
from .errors import EXIT_USAGE, UserError, run_command

PROG = "python -m protext.gen_descriptions"


class _DeprecatedAlias(argparse.Action):
    """An old flag spelling: works as the new one, after a one-line warning."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: object) -> None:
        self.new = new
        kwargs["help"] = f"deprecated spelling of {new}"
        super().__init__(option_strings, dest, **kwargs)  # type: ignore[arg-type]

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        print(f"warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


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
    """The generation command's flags."""
    d = GenConfig(classes=[], out=Path())
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Generate short visual class descriptions with an LLM (CuPL-style) and cache them as JSONL. "
        "Rerunning the same command resumes: completed class x query units are skipped.",
        epilog=f"Import published descriptions instead: {PROG} import FILE.json --out llm_data/NAME.jsonl "
        "(see 'import --help').",
    )
    add = p.add_argument
    add("--classes", required=True, metavar="SPEC",
        help="a built-in list by dataset name (imagenet, dtd, eurosat, oxford_pets, ...; the eleven datasets of the "
        "published protocols), a .txt file (one name per line, CoOp 'n01440764 tench' ids dropped), a .json list, or a "
        "CoOp split_zhou_*.json file; names differing only in case, '_' or spacing are one class")
    add("--out", required=True, type=Path, metavar="FILE.jsonl",
        help="description cache to create or resume, e.g. llm_data/imagenet_gpt-4o-mini.jsonl")
    add("--backend", choices=("openai", "templates"), default=d.backend,
        help="'openai': any OpenAI-compatible chat server (OpenAI, vLLM, Ollama, llama.cpp); "
        "'templates': no LLM, descriptions from built-in attribute templates (offline) [%(default)s]")
    add("--model", help="chat model name as the server knows it (required with --backend openai)")
    add("--base-url", help="server URL, e.g. http://localhost:8000/v1 for vLLM, "
        "http://localhost:11434/v1 for Ollama [OpenAI, or $OPENAI_BASE_URL]")
    add("--api-key-env", default=d.api_key_env, metavar="VAR",
        help="environment variable holding the API key [%(default)s] (the key itself is never a flag, "
        "and never written to the cache or printed)")
    add("--queries", default="builtin", metavar="builtin|FILE",
        help="questions for the LLM with '{}' for the class name: the built-in CuPL-style set, or a file "
        "(.txt one per line, or .json list) [%(default)s]")
    add("--prompts", dest="queries", action=_DeprecatedAlias, new="--queries")
    add("--n-per-query", type=int, default=d.n_per_query, metavar="N",
        help="samples per class and query (sent as n; servers that refuse or ignore n get N single requests) "
        "[%(default)s]")
    add("--n-per-prompt", dest="n_per_query", type=int, action=_DeprecatedAlias, new="--n-per-query")
    add("--temperature", type=_temperature, default=d.temperature, metavar="T",
        help="sampling temperature, or 'default' to send none (reasoning models), as CuPL [%(default)s]")
    add("--max-tokens", type=int, default=d.max_tokens, metavar="N",
        help="answer length limit in tokens (sent as max_tokens, or max_completion_tokens if the model wants it) "
        "[%(default)s]")
    add("--seed", type=int, default=d.seed,
        help="sampling seed for servers that support it (sample i of a single-choice fallback uses seed+i) "
        "[none sent]")
    add("--concurrency", type=int, default=d.concurrency, metavar="N", help="requests in flight at most [%(default)s]")
    add("--timeout", type=float, default=d.timeout, metavar="SEC",
        help="per-request timeout; a server that accepts connections but lets a few requests in a row time out "
        "(after their retries) with no answer stops the run with an error naming the URL [%(default)s]")
    add("--max-retries", type=int, default=d.max_retries, metavar="N",
        help="client retries with backoff on 429, 5xx and timeouts (a server that cannot be "
        "connected to at all stops the run at once) [%(default)s]")
    add("--attempts", type=int, default=d.attempts, metavar="N",
        help="tries for answers that arrive unusable (bad JSON, no choices, only refusals) [%(default)s]")
    add("--system-prompt", default=d.system_prompt, metavar="TEXT",
        help="system message sent with every query ('' to send none) [ask for one short "
        "sentence of visible features that names the thing]")
    add("--no-progress", action="store_true", help="no progress bar (it is off anyway when stderr is not a terminal)")
    add("-v", "--verbose", action="store_true", help="log every retry and request")
    return p


def build_import_parser() -> argparse.ArgumentParser:
    """The ``import`` subcommand's flags."""
    p = argparse.ArgumentParser(
        prog=f"{PROG} import",
        description="Convert CuPL descriptions ({classname: [descriptions]}) to the JSONL cache format. Every "
        "description is kept, repeats included (they are training samples).",
    )
    p.add_argument("source", type=Path, metavar="FILE.json|FOLDER",
                   help="a CuPL-format JSON file (e.g. CuPL's texture_prompts_full.json), or CuPL's own "
                   "release folder with --dataset")
    p.add_argument("--out", required=True, type=Path, metavar="FILE.jsonl", help="JSONL file to write, e.g. llm_data/dtd_cupl.jsonl")
    p.add_argument("--dataset", metavar="NAME",
                   help="read SOURCE as CuPL's release for this dataset (e.g. stanford_cars, sun397, dtd): its file "
                   "name in a folder, and its original keys renamed to the class names by protext's key map")
    p.add_argument("--model", default="cupl", help="value of the 'model' field on every line [%(default)s]")
    p.add_argument("--classes", metavar="SPEC",
                   help="a dataset's class list (as for generation): refuse to import unless every class has "
                   "descriptions (keys compared case-insensitively, '_' as space), listing the mismatches")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (refused otherwise, and always while another run writes it)")
    return p


def _classes(spec: str) -> list[str]:
    try:
        return read_classes(spec)
    except UserError as err:
        raise GenerationError(f"--classes: {err}") from None


def config_from_args(args: argparse.Namespace) -> GenConfig:
    """A :class:`GenConfig` from parsed flags (reads the class list and the query file)."""
    chosen = queries.CUPL_STYLE_QUERIES if args.queries == "builtin" else queries.load_queries(args.queries)
    return GenConfig(
        classes=_classes(args.classes), out=args.out, backend=args.backend, model=args.model,
        base_url=args.base_url, api_key_env=args.api_key_env, queries=chosen, n_per_query=args.n_per_query,
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed, concurrency=args.concurrency,
        timeout=args.timeout, max_retries=args.max_retries, attempts=args.attempts,
        system_prompt=args.system_prompt, progress=not args.no_progress,
    )


def _main_import(argv: list[str]) -> int:
    from .descriptions import import_descriptions
    from .descriptions.cupl import check_import_output, read_source

    args = build_import_parser().parse_args(argv)
    check_import_output(args.out, args.source)
    wanted = _classes(args.classes) if args.classes else None
    data = read_source(args.source, dataset=args.dataset, classes=wanted, classes_name=args.classes or "")
    summary = import_descriptions(data, args.out, model=args.model, overwrite=args.overwrite)
    print(summary.line(args.source))
    return 0


def _main_generate(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    redact = make_redactor(os.environ.get("OPENAI_API_KEY"), os.environ.get(args.api_key_env))
    install_redacting_log(args.verbose, redact)
    try:
        report = generate(config_from_args(args))
    except (UserError, KeyboardInterrupt):
        raise
    except Exception:  # noqa: BLE001 - a bug keeps its traceback, but never prints the key
        print(redact(traceback.format_exc()), file=sys.stderr)
        return EXIT_USAGE
    print(report.summary())
    if report.fatal:
        # The summary (stdout) says what was kept; the reason the run stopped is also the one
        # error line on stderr, where scripts and people look for it.
        print(f"error: {report.fatal}", file=sys.stderr)
        return EXIT_USAGE
    return 1 if report.failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 some classes failed, 2 bad input or a fatal API error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["import"]:
        return run_command(lambda: _main_import(argv[1:]))
    return run_command(lambda: _main_generate(argv), resume_hint="completed units are saved; rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
