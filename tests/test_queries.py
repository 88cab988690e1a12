"""Queries: what the generator asks an LLM, read from the built-in set or a file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protext.descriptions.queries import CUPL_STYLE_QUERIES, QueryFileError, display_name, format_query, load_queries
from protext.errors import UserError


def test_builtin_queries_each_hold_one_slot() -> None:
    assert len(CUPL_STYLE_QUERIES) == 5 and all(q.count("{}") == 1 for q in CUPL_STYLE_QUERIES)


def test_text_file_skips_comments_and_blank_lines_and_drops_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "q.txt"
    path.write_text("# my queries\n\nWhat does a {} look like?\n  Describe an {}.  \nWhat does a {} look like?\n")
    assert load_queries(path) == ["What does a {} look like?", "Describe an {}."]
    assert format_query("Describe an {}.", "tabby_cat") == "Describe a tabby cat."
    assert format_query("An {} at night.", "hour glass") == "An hour glass at night."
    assert display_name("  car__side ") == "car side"


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("q.txt", "Describe {}.\nNo slot here.\n", r"q\.txt:2: a template needs exactly one '\{\}'"),
        ("q.txt", "Both {} and {}.\n", r"q\.txt:1: a template needs exactly one '\{\}' for the class name, found 2"),
        ("q.txt", "# only a comment\n", r"q\.txt: no queries found"),
        ("q.json", '["Describe {}."', r"q\.json:1: malformed JSON"),
        ("q.json", json.dumps({"q": "Describe {}."}), r"q\.json: expected a JSON list of query strings"),
    ],
)
def test_bad_query_files_name_the_file_and_line(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(QueryFileError, match=message) as info:
        load_queries(path)
    assert isinstance(info.value, UserError)


def test_missing_query_file_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(QueryFileError, match=r"--queries: .*nope\.txt: query file not found"):
        load_queries(tmp_path / "nope.txt")
