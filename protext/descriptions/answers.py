"""From a chat model's raw answers to class descriptions: one sentence each, no filler, refusals or duplicates.

Pure text, no client: :class:`~protext.descriptions.llm_client.DescriptionSampler` cleans every
unit's answers here, and asks again when nothing usable is left.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

__all__ = ["clean_descriptions", "split_sentences"]

_THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|$)", re.IGNORECASE | re.DOTALL)
_LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022]+|\d{1,3}[.)]|\(\d{1,3}\))\s+")
_MARKDOWN = re.compile(r"\*\*|__|`|^#+\s*")
_QUOTES = "\"'\u201c\u201d\u2018\u2019"
_REFUSAL = re.compile(
    r"\bas an? (?:ai|artificial intelligence|(?:large )?language model)\b"
    r"|\bi(?:'m| am) (?:sorry|unable|not able)\b"
    r"|\bi (?:cannot|can't|can not|don't have|do not have)\b"
    r"|\bsorry, but\b"
    r"|\bunable to (?:see|view|access|provide)\b",
    re.IGNORECASE,
)
_FILLER_SENTENCE = re.compile(
    r"^(?:sure|certainly|of course|absolutely|okay|ok|great|good question|great question|hello|hi"
    r"|here (?:is|are|'s)\b.*|let me\b.*)[\s!.,:]*$",
    re.IGNORECASE,
)
_LEADING_FILLER = re.compile(r"^(?:sure|certainly|of course|absolutely|okay|ok)\s*[,!:.-]\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?][\"')\]\u201d\u2019]*\s+")
_ABBREVIATIONS = frozenset(
    "e.g i.e etc vs approx dr mr mrs ms st no fig cf ca inc ltd jr sr mt ft".split()
)
_MIN_WORDS = 3


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences, without breaking after common abbreviations or initials."""
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        if end < len(text) and not (text[end].isupper() or text[end].isdigit() or text[end] in _QUOTES + "("):
            continue
        words = text[start : match.start() + 1].split()
        last_word = words[-1].rstrip(".").lower() if words else ""
        if last_word in _ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha()):
            continue
        sentences.append(text[start : match.end()].strip())
        start = end
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _one_description(chunk: str) -> Optional[str]:
    """The first real sentence of one answer (or list item), or None if it is filler or a refusal."""
    chunk = _MARKDOWN.sub("", " ".join(chunk.split())).strip().strip(_QUOTES).strip()
    if not chunk or _REFUSAL.search(chunk):
        return None
    for sentence in split_sentences(chunk):
        if _FILLER_SENTENCE.match(sentence):
            continue
        sentence = _LEADING_FILLER.sub("", sentence).strip().strip(_QUOTES).strip()
        if sentence.endswith(":") or len(sentence.split()) < _MIN_WORDS:
            return None
        sentence = sentence[0].upper() + sentence[1:]
        if sentence[-1] not in ".!?":
            sentence += "."
        return sentence
    return None


def clean_descriptions(answers: Iterable[Optional[str]]) -> list[str]:
    """Turn raw chat answers into descriptions: one sentence each, no filler, refusals or duplicates.

    An answer that is a bulleted or numbered list gives one description per item; any other answer
    gives its first sentence after dropping openers like "Sure!". Reasoning traces (``<think>``) are
    removed. Duplicates are compared case- and whitespace-insensitively; the first spelling is kept.
    """
    out: list[str] = []
    seen: set[str] = set()
    for answer in answers:
        if not answer:
            continue
        text = _THINK_BLOCK.sub("", answer)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if sum(bool(_LIST_ITEM.match(ln)) for ln in lines) >= 2:
            chunks = [_LIST_ITEM.sub("", ln) for ln in lines if _LIST_ITEM.match(ln)]
        else:
            chunks = [" ".join(lines)]
        for chunk in chunks:
            desc = _one_description(chunk)
            key = " ".join(desc.casefold().split()) if desc else ""
            if desc and key not in seen:
                seen.add(key)
                out.append(desc)
    return out
