"""The pytest markers registered in pyproject.toml are the ones the tests use: none unused, none unregistered."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

TESTS = Path(__file__).resolve().parent
BUILTIN = {"parametrize", "filterwarnings", "skip", "skipif", "xfail", "usefixtures"}


def test_every_registered_marker_is_used_and_every_used_marker_is_registered() -> None:
    config = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    registered = {line.split(":")[0].strip() for line in config["markers"]}
    used = {
        name
        for path in TESTS.rglob("*.py")
        for name in re.findall(r"pytest\.mark\.([A-Za-z_]\w*)", path.read_text(encoding="utf-8"))
    } - BUILTIN
    assert registered == used, f"registered but unused: {registered - used}; used but unregistered: {used - registered}"
    assert "--strict-markers" in config["addopts"]
