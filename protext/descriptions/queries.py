"""What the description generator asks: CuPL-style *queries* for an LLM, and offline attribute templates.

Both are templates with one ``{}`` for the class name. :func:`format_query` fills it in the way a
person would write it (``an apple``, not ``a apple``; ``car side`` for the dataset name ``car_side``).
("Prompts" in protext are only what it learns; what is sent to an LLM is a query.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Union

from ..errors import UserError

__all__ = [
    "ATTRIBUTE_TEMPLATES",
    "CUPL_STYLE_QUERIES",
    "DEFAULT_SYSTEM_PROMPT",
    "QueryFileError",
    "display_name",
    "format_query",
    "load_queries",
]

CUPL_STYLE_QUERIES: tuple[str, ...] = (
    "What does a {} look like?",
    "How can you identify a {} in a photo?",
    "Describe what a {} looks like.",
    "Describe a photo of a {}.",
    "What visual features distinguish a {} from similar things?",
)
"""The built-in question set: several ways of asking for visual features, as in CuPL."""

DEFAULT_SYSTEM_PROMPT = (
    "You describe what things look like in photographs. Answer with one short sentence about "
    "visible features (shape, colour, texture, parts, typical surroundings) and name the thing "
    "in the sentence."
)

ATTRIBUTE_TEMPLATES: tuple[str, ...] = (
    "A photo of a {}, recognisable by its overall shape.",
    "A {} has a characteristic colour and texture.",
    "A close-up photo showing the distinctive parts of a {}.",
    "A {} seen in the surroundings where it is usually found.",
    "A photo of a {} at its typical size, compared with nearby objects.",
    "The outline and proportions of a {} are easy to recognise.",
    "A clear photo of a {}, showing the details that set it apart from similar things.",
)
"""Offline descriptions (``--backend templates``): generic visual attributes, no LLM needed."""


class QueryFileError(UserError, ValueError):
    """A query file that cannot be used; the message names the file (and line)."""


_AN_EXCEPTIONS = ("hour", "honest", "honor", "honour", "heir")
_A_EXCEPTIONS = ("uni", "use", "usu", "uti", "ute", "eu", "one", "once")


def display_name(classname: str) -> str:
    """The class name as it reads in a sentence: dataset underscores become spaces."""
    return " ".join(classname.replace("_", " ").split())


def _article_for(name: str) -> str:
    # A spelling heuristic, good enough for queries: an LLM barely cares about "a"/"an".
    lower = name.lower()
    if lower.startswith(_AN_EXCEPTIONS):
        return "an"
    if lower[:1] in ("a", "e", "i", "o", "u") and not lower.startswith(_A_EXCEPTIONS):
        return "an"
    return "a"


def format_query(template: str, classname: str) -> str:
    """Fill ``template``'s ``{}`` with ``classname``, fixing the article before it (``a`` -> ``an``)."""
    name = display_name(classname)
    head, sep, tail = template.partition("{}")
    if not sep:
        raise ValueError(f"template has no '{{}}' for the class name: {template!r}")
    match = re.search(r"(?:^|(?<=\s))([Aa]n?)\s+$", head)
    if match:
        article = _article_for(name)
        if match.group(1)[0] == "A":
            article = article.capitalize()
        head = head[: match.start(1)] + article + head[match.end(1) :]
    return f"{head}{name}{tail}"


def _check_template(path: Path, line: int, template: str) -> str:
    template = template.strip()
    count = template.count("{}")
    if count != 1:
        where = f"{path}:{line}" if line else str(path)
        raise QueryFileError(f"{where}: a template needs exactly one '{{}}' for the class name, found {count}: {template!r}")
    return template


def load_queries(path: Union[str, Path]) -> list[str]:
    """Read query templates from ``path``: ``.json`` (a list of strings) or text, one per line.

    Text files skip blank lines and lines starting with ``#``. Every template needs exactly one
    ``{}``; duplicates are dropped (they would only repeat the same requests).
    """
    path = Path(path)
    if not path.is_file():
        raise QueryFileError(f"--queries: {path}: query file not found")
    templates: list[str] = []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise QueryFileError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
            raise QueryFileError(f"{path}: expected a JSON list of query strings")
        templates = [_check_template(path, 0, t) for t in data]
    else:
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if text.strip() and not text.lstrip().startswith("#"):
                templates.append(_check_template(path, number, text))
    if not templates:
        raise QueryFileError(f"{path}: no queries found")
    return list(dict.fromkeys(templates))
