"""Keeping the API key out of everything printed or logged (light: no client library imported)."""

from __future__ import annotations

import logging
import sys
from typing import Callable, Optional

__all__ = ["install_redacting_log", "make_redactor"]


def make_redactor(*secrets: Optional[str]) -> Callable[[str], str]:
    """A function replacing every given secret (and its ``Bearer`` form) in a text by ``***``."""
    hidden = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def redact(text: str) -> str:
        for secret in hidden:
            text = text.replace(secret, "***")
        return text

    return redact


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


def install_redacting_log(verbose: bool, redact: Callable[[str], str]) -> None:
    """Send log records to stderr through ``redact`` (INFO and up if ``verbose``, else WARNING)."""
    root = logging.getLogger()
    # Replace only our own handler, so repeated calls (tests, notebooks) do not stack them.
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _RedactingHandler)]
    root.addHandler(_RedactingHandler(redact))
    root.setLevel(logging.INFO if verbose else logging.WARNING)
