"""Every README snippet runs as written: Python blocks execute, every command line parses."""

from __future__ import annotations

import importlib
import re
import shlex
import warnings

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def _commands() -> list[list[str]]:
    """Every ``python -m protext.X ...`` line of the bash blocks, continuations joined, comments cut."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split(" #")[0].split("&&"):
                part = part.strip()
                if part.startswith("python -m protext.") and "..." not in part:
                    commands.append(shlex.split(part)[2:])
    return commands


def test_python_snippets_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert blocks, "the README has a Python API snippet"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "example_prompts.safetensors").is_file()


def _parser_for(argv: list[str]):
    # a package's command lives in its __main__ module
    name = argv[0] + (".__main__" if argv[0] == "protext.datasets" else "")
    module = importlib.import_module(name)
    rest = argv[1:]
    if argv[0] == "protext.gen_descriptions" and rest[:1] == ["import"]:
        return module.build_import_parser(), rest[1:]
    return module.build_parser(), rest


@pytest.mark.parametrize("argv", _commands(), ids=lambda a: " ".join(a)[:60])
def test_every_command_line_parses(argv):
    parser, rest = _parser_for(argv)
    parser.parse_args(rest)  # an unknown flag or a bad choice exits 2 here


def test_the_commands_cover_every_stage():
    modules = {argv[0] for argv in _commands()}
    assert {
        "protext.gen_descriptions", "protext.train", "protext.eval", "protext.export",
        "protext.datasets", "protext.reproduce", "protext.quickstart",
    } <= modules
