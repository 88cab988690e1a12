"""Asking an OpenAI-compatible chat server for class descriptions, whatever the server's quirks.

Transport failures (429, 5xx, timeouts, dropped connections) are retried with backoff by the
``openai`` client itself (``max_retries``, ``timeout``). This module adds what the client cannot know:

* answers that arrive but are unusable (body not JSON, empty ``choices``, nothing left after
  cleaning) are asked again, up to ``attempts`` times;
* servers that refuse ``n > 1`` (llama.cpp) or ignore it (Ollama) are switched to single-choice
  requests, with ``seed + i`` per sample when a seed is set so the samples still differ;
* reasoning models that reject ``max_tokens`` or a non-default ``temperature`` get
  ``max_completion_tokens`` and no temperature;
* authentication / permission / unknown-model errors, and a server that cannot be connected to at
  all (refused, unknown host) once the client's retries are spent, are :class:`FatalAPIError` naming
  the URL: every other request would fail the same way. Rate limits, 5xx and timeouts stay per-request
  failures with their retries. :func:`check_reachable` finds a closed port or unknown host before
  the run starts, in one connection attempt;
* a server that accepts connections but never answers (stuck, or far too slow for ``--timeout``)
  is a :class:`ServerStalled` after a few requests in a row time out with no answer in between,
  so the run stops in a time set by ``timeout`` and ``max_retries``, not by the number of classes.
  Every timeout or connection message names the URL.

Every message that leaves this module goes through a redactor, so the API key is never printed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence
from urllib.parse import urlsplit

import openai

from ..errors import UserError
from .redaction import make_redactor

log = logging.getLogger(__name__)

__all__ = [
    "BadResponseError",
    "ClientStats",
    "DescriptionSampler",
    "FatalAPIError",
    "SamplingSettings",
    "ServerStalled",
    "ServerUnreachable",
    "check_reachable",
    "clean_descriptions",
    "make_redactor",
    "split_sentences",
]


class BadResponseError(RuntimeError):
    """The server answered, but with nothing usable (after ``attempts`` tries)."""


class FatalAPIError(RuntimeError):
    """An error that every request would hit (bad key, no permission, unknown model or URL)."""


class ServerStalled(FatalAPIError):
    """Requests keep timing out with no answer in between: the server is stuck (or far too slow)."""


#: timed-out requests in a row (each after all of the client's retries) that stop a run in which the
#: server never answered at all; small, because one wave of concurrent requests should be enough to
#: tell a stuck server from a working one
STALL_BEFORE_ANY_ANSWER = 3
#: the same once the server has answered: at least two whole waves of concurrent requests, so a busy
#: server that times out a few requests of one wave is not taken for a dead one
STALL_AFTER_ANSWERS = 8


class ServerUnreachable(UserError):
    """The server's host cannot be resolved or its port refuses connections."""


class _NChoicesRefused(Exception):
    """Internal: the server rejected ``n > 1``."""


@dataclass
class SamplingSettings:
    """What each chat request asks for."""

    model: str
    temperature: Optional[float] = 0.99  # None: leave the server's default
    max_tokens: int = 60
    seed: Optional[int] = None  # sample i of a single-choice fallback uses seed + i
    system_prompt: str = ""  # empty: no system message


@dataclass
class ClientStats:
    """Counters for the progress bar and the end-of-run summary."""

    requests: int = 0
    in_flight: int = 0
    retries: int = 0  # transport retries done by the openai client
    reasked: int = 0  # unusable answers asked again by us
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_reported: bool = False
    adaptations: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# reachability

_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


def check_reachable(base_url: str, timeout: float) -> None:
    """Open (and close) one TCP connection to ``base_url``'s host and port, or raise :class:`ServerUnreachable`.

    A closed port or an unknown host would otherwise be retried with backoff for every request.
    Skipped when a proxy is configured in the environment (the proxy, not the server, is what the
    client connects to); the sampler then reports connection failures itself.
    """
    if any(os.environ.get(v) or os.environ.get(v.upper()) for v in _PROXY_VARIABLES):
        return
    parts = urlsplit(base_url)
    if not parts.hostname:
        raise ServerUnreachable(f"--base-url {base_url!r} is not a URL (expected e.g. http://localhost:8000/v1)")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err) or type(err).__name__
        raise ServerUnreachable(
            f"--base-url {base_url}: cannot connect to {parts.hostname}:{port} ({reason}); "
            "is the server running, and is the URL right?"
        ) from None


# --------------------------------------------------------------------------------------------------
# response cleaning

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


# --------------------------------------------------------------------------------------------------
# requests


def _error_text(err: BaseException) -> str:
    message = getattr(err, "message", None) or str(err)
    return f"{type(err).__name__}: {message}"


class DescriptionSampler:
    """Samples cleaned descriptions for a prompt from one chat model, adapting to the server.

    Args:
        client: an ``openai.AsyncOpenAI`` built with the run's ``max_retries`` and ``timeout``.
        settings: model and sampling parameters.
        concurrency: at most this many HTTP requests in flight (backoff sleeps hold their slot,
            which is what a rate-limited server wants).
        attempts: tries for an answer that arrives unusable.
        redact: applied to every error message raised or logged.
        stall_after: timed-out requests in a row, with no answer since the start, that raise
            :class:`ServerStalled`; once the server has answered, ``max(STALL_AFTER_ANSWERS,
            2 * concurrency)`` in a row do.
    """

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        settings: SamplingSettings,
        *,
        concurrency: int = 8,
        attempts: int = 3,
        redact: Callable[[str], str] = lambda s: s,
        stall_after: int = STALL_BEFORE_ANY_ANSWER,
    ) -> None:
        if concurrency < 1 or attempts < 1 or stall_after < 1:
            raise ValueError("concurrency, attempts and stall_after must be >= 1")
        self.client = client
        self.settings = settings
        self.attempts = attempts
        self.redact = redact
        self.stats = ClientStats()
        self._slots = asyncio.Semaphore(concurrency)
        # Server quirks, learned once and shared by all requests of the run.
        self.single_choice = False
        self.token_param = "max_tokens"
        self.send_temperature = settings.temperature is not None
        self.send_seed = settings.seed is not None
        # Stall detection: answers seen (any HTTP response counts, errors included) and requests
        # that timed out in a row since the last answer.
        self.stall_after = stall_after
        self.stall_after_answers = max(STALL_AFTER_ANSWERS, 2 * concurrency)
        self.answered = 0
        self.timeouts_in_a_row = 0

    def _adapt(self, message: str) -> None:
        message = self.redact(message)
        if message not in self.stats.adaptations:
            self.stats.adaptations.append(message)
            log.warning("%s", message)

    # -- stall detection ------------------------------------------------------------------------------

    def _answered(self) -> None:
        """The server sent an HTTP response (good or bad): it is alive, so the timeout streak ends."""
        self.answered += 1
        self.timeouts_in_a_row = 0

    def _timed_out(self, err: openai.APITimeoutError) -> RuntimeError:
        """Count a request that timed out after every retry; the error to raise for it.

        Returns :class:`ServerStalled` once enough requests in a row timed out (a stuck server would
        otherwise cost ``tries x timeout`` per unit, for every unit of the run), else a per-unit
        RuntimeError. Both name the URL.
        """
        self.timeouts_in_a_row += 1
        tries = self.client.max_retries + 1
        timeout = self.client.timeout
        limit = self.stall_after if self.answered == 0 else self.stall_after_answers
        if self.timeouts_in_a_row >= limit:
            if self.answered == 0:
                what = f"accepted connections but answered none of the first {self.timeouts_in_a_row} requests"
            else:
                what = f"stopped answering: {self.timeouts_in_a_row} requests in a row got no answer"
            return ServerStalled(self.redact(
                f"{self.client.base_url} {what} within --timeout {timeout}s ({tries} tries each); check that "
                "the server is healthy and serving this --model, or raise --timeout if it is only slow "
                "(units already written are kept; rerun the same command to resume)"
            ))
        return RuntimeError(self.redact(
            f"no answer from {self.client.base_url} within --timeout {timeout}s ({tries} tries; {_error_text(err)})"
        ))

    # -- one HTTP request ----------------------------------------------------------------------------

    def _request_args(self, prompt: str, n: int, seed: Optional[int]) -> dict[str, Any]:
        messages = []
        if self.settings.system_prompt:
            messages.append({"role": "system", "content": self.settings.system_prompt})
        messages.append({"role": "user", "content": prompt})
        args: dict[str, Any] = {"model": self.settings.model, "messages": messages}
        args[self.token_param] = self.settings.max_tokens
        if n > 1:
            args["n"] = n
        if self.send_temperature:
            args["temperature"] = self.settings.temperature
        if self.send_seed and seed is not None:
            args["seed"] = seed
        return args

    def _learn_from_400(self, err: openai.BadRequestError, sent: dict[str, Any]) -> bool:
        """Adjust to a rejected parameter; True if the request is worth sending again."""
        param = (err.param or "").lower()
        text = (getattr(err, "message", "") or str(err)).lower()

        def about(name: str) -> bool:
            return param == name or f"'{name}'" in text or f'"{name}"' in text or f"`{name}`" in text

        if "max_tokens" in sent and (about("max_tokens") or "max_completion_tokens" in text):
            self.token_param = "max_completion_tokens"
            self._adapt("server rejects max_tokens: sending max_completion_tokens instead")
            return True
        if "temperature" in sent and (about("temperature") or "temperature" in text):
            self.send_temperature = False
            self._adapt("server rejects this temperature: using the model's default temperature")
            return True
        if "seed" in sent and about("seed"):
            self.send_seed = False
            self._adapt("server rejects seed: sending no seed")
            return True
        if sent.get("n", 1) > 1 and (about("n") or re.search(r"\bn\b|\bchoices?\b", text)):
            raise _NChoicesRefused()
        return False

    async def _request(self, prompt: str, n: int, seed: Optional[int]) -> list[str]:
        """Send one chat request; return the choices' texts (at least one)."""
        create = self.client.chat.completions.with_raw_response.create
        bad: Optional[str] = None
        for attempt in range(self.attempts):
            if attempt:
                self.stats.reasked += 1
            for _ in range(4):  # each known parameter quirk can be learned once
                args = self._request_args(prompt, n, seed)
                async with self._slots:
                    self.stats.in_flight += 1
                    self.stats.requests += 1
                    try:
                        raw = await create(**args)
                    except openai.BadRequestError as err:
                        self._answered()
                        if self._learn_from_400(err, args):
                            continue
                        raise RuntimeError(self.redact(_error_text(err))) from None
                    except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as err:
                        raise FatalAPIError(self.redact(_error_text(err))) from None
                    except openai.APITimeoutError as err:
                        self.stats.retries += self.client.max_retries  # all spent before giving up
                        raise self._timed_out(err) from None
                    except openai.APIConnectionError as err:
                        # Not a slow answer but no connection at all, after every retry: every other
                        # request would fail the same way, so stop the run and name the URL.
                        raise FatalAPIError(self.redact(
                            f"cannot connect to {self.client.base_url} ({_error_text(err)}); "
                            "is the server running, and is --base-url right?"
                        )) from None
                    except (openai.InternalServerError, openai.RateLimitError) as err:
                        self._answered()
                        self.stats.retries += self.client.max_retries  # all spent before giving up
                        raise RuntimeError(self.redact(f"{_error_text(err)} (from {self.client.base_url})")) from None
                    except openai.APIError as err:
                        if isinstance(err, openai.APIStatusError):
                            self._answered()
                        raise RuntimeError(self.redact(f"{_error_text(err)} (from {self.client.base_url})")) from None
                    finally:
                        self.stats.in_flight -= 1
                break
            else:
                raise RuntimeError(f"server keeps rejecting the request parameters: {sorted(args)}")
            self._answered()
            self.stats.retries += raw.retries_taken
            try:
                completion = raw.parse()
            except (ValueError, openai.APIResponseValidationError) as err:  # JSONDecodeError is a ValueError
                bad = f"unparsable response body ({type(err).__name__})"
                continue
            if completion.usage is not None:
                self.stats.tokens_reported = True
                self.stats.prompt_tokens += completion.usage.prompt_tokens or 0
                self.stats.completion_tokens += completion.usage.completion_tokens or 0
            choices = sorted(completion.choices or [], key=lambda c: c.index)
            texts = [c.message.content for c in choices if c.message and c.message.content]
            if not texts:
                reasons = {str(c.finish_reason) for c in choices}
                bad = "empty choices list" if not choices else f"no text in the answer (finish_reason {', '.join(sorted(reasons))})"
                if "length" in reasons:
                    bad += "; raise --max-tokens (reasoning models spend tokens before answering)"
                continue
            return texts
        raise BadResponseError(f"{bad} after {self.attempts} attempts")

    # -- samples of one prompt -------------------------------------------------------------------------

    async def _singles(self, prompt: str, indices: Sequence[int]) -> list[str]:
        base = self.settings.seed
        results = await asyncio.gather(
            *(self._request(prompt, 1, None if base is None else base + i) for i in indices),
            return_exceptions=True,
        )
        # An error that stops the run outranks a per-unit failure of a sibling request.
        fatal = [r for r in results if isinstance(r, FatalAPIError)]
        if fatal:
            raise fatal[0]
        texts: list[str] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            texts.extend(result[:1])
        return texts

    async def _sample(self, prompt: str, n: int) -> list[str]:
        if n == 1 or self.single_choice:
            return await self._singles(prompt, range(n))
        try:
            texts = await self._request(prompt, n, self.settings.seed)
        except _NChoicesRefused:
            self.single_choice = True
            self._adapt(f"server refuses n={n}: sending {n} single-choice requests per prompt instead")
            return await self._singles(prompt, range(n))
        if len(texts) < n:
            # Ollama answers one choice whatever n is: keep it, ask for the rest one by one.
            self.single_choice = True
            self._adapt(f"server ignored n={n} (returned {len(texts)}): sending single-choice requests instead")
            texts = texts + await self._singles(prompt, range(len(texts), n))
        return texts

    async def __call__(self, prompt: str, n: int) -> list[str]:
        """``n`` samples for ``prompt``, cleaned (so possibly fewer, never none).

        Raises:
            FatalAPIError: no request can succeed (authentication, permission, model, URL, no
                connection to the server at all, or :class:`ServerStalled`: requests keep timing out).
            BadResponseError: answers kept arriving unusable.
            RuntimeError: a transport error the client's own retries did not overcome.
        """
        for attempt in range(self.attempts):
            if attempt:
                self.stats.reasked += 1
            descriptions = clean_descriptions(await self._sample(prompt, n))
            if descriptions:
                return descriptions
        raise BadResponseError(
            f"no usable description in {self.attempts} attempts (answers were empty, refusals or filler)"
        )
