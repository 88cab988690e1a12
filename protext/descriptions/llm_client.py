"""Asking an OpenAI-compatible chat server for class descriptions, whatever the server's quirks.

:class:`DescriptionSampler` holds the one loop that sends every request of a unit and counts each
one it sends (:class:`ClientStats`), so the reported counts are the requests the server got, not an
estimate:

* transport failures (429, 408, 409, 5xx, timeouts, dropped connections) are sent again with the
  ``openai`` client's backoff (``Retry-After`` honoured up to a minute), up to the client's
  ``max_retries`` times per request; the client itself is used with its own retries off, so no
  retry happens that this loop does not see (which failures and how long to wait:
  :mod:`.transport`);
* answers that arrive but are unusable (body not JSON, empty ``choices``, nothing left after
  cleaning by :mod:`.answers`) are asked again, ``attempts`` asks per unit in all (one budget shared
  by every request of the unit, never ``attempts`` asks for each of ``attempts`` rounds);
* servers that refuse ``n > 1`` (llama.cpp) or ignore it (Ollama) are switched to single-choice
  requests, with ``seed + i`` per sample when a seed is set so the samples still differ;
* reasoning models that reject ``max_tokens`` or a non-default ``temperature`` get
  ``max_completion_tokens`` and no temperature;
* authentication / permission / unknown-model errors, and a server that cannot be connected to at
  all (refused, unknown host) once the client's retries are spent, are :class:`FatalAPIError` naming
  the URL: every other request would fail the same way. Rate limits, 5xx and timeouts stay per-request
  failures with their retries. :func:`~.transport.check_reachable` finds a closed port or unknown
  host before the run starts, in one connection attempt;
* a server that accepts connections but never answers (stuck, or far too slow for ``--timeout``)
  is a :class:`ServerStalled` after a few requests in a row time out with no answer in between,
  so the run stops in a time set by ``timeout`` and ``max_retries``, not by the number of classes.
  Every timeout or connection message names the URL.

Every message that leaves this module goes through a redactor, so the API key is never printed.
The sampler is kept as one class, close to 400 lines: its retry loop, the quirks it learns and its
stall count share one state per run, which a split would have to pass between modules.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import openai

from .answers import clean_descriptions, split_sentences  # noqa: F401  (split_sentences: tests read it here)
from .transport import backoff_seconds, is_transport_failure

log = logging.getLogger(__name__)

__all__ = [
    "BadResponseError",
    "ClientStats",
    "DescriptionSampler",
    "FatalAPIError",
    "SamplingSettings",
    "ServerStalled",
    "clean_descriptions",
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


class _Asks:
    """The unusable-answer budget of one unit: ``attempts`` asks in all, shared by its requests."""

    def __init__(self, attempts: int) -> None:
        self.left = attempts - 1  # re-asks after the first ask

    def take(self) -> bool:
        """Spend one re-ask; False when none is left."""
        if self.left <= 0:
            return False
        self.left -= 1
        return True


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

    requests: int = 0  # HTTP requests sent, every retry and re-ask included
    in_flight: int = 0
    retries: int = 0  # of those, re-sent after a transport failure (429/5xx/timeout/connection)
    reasked: int = 0  # of those, asked again after an unusable answer
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_reported: bool = False
    adaptations: list[str] = field(default_factory=list)


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
        self.max_retries = client.max_retries
        # Our loop does every retry, so that it can count them: the copy sends each request once.
        self._send_once = client.with_options(max_retries=0).chat.completions.with_raw_response.create
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
        tries = self.max_retries + 1
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

    def _given_up(self, err: openai.APIError) -> RuntimeError:
        """The error to raise for a request whose transport failure is not (or no longer) retried."""
        if isinstance(err, openai.APITimeoutError):  # before APIConnectionError: it is one
            return self._timed_out(err)
        if isinstance(err, openai.APIConnectionError):
            # Not a slow answer but no connection at all, after every retry: every other request
            # would fail the same way, so stop the run and name the URL.
            return FatalAPIError(self.redact(
                f"cannot connect to {self.client.base_url} ({_error_text(err)}); "
                "is the server running, and is --base-url right?"
            ))
        return RuntimeError(self.redact(f"{_error_text(err)} (from {self.client.base_url})"))

    async def _request(self, prompt: str, n: int, seed: Optional[int], asks: _Asks) -> list[str]:
        """Ask until one chat request yields text; return the choices' texts (at least one).

        The module's one retry loop: each pass sends exactly one HTTP request and counts it in
        ``stats.requests``. A pass is repeated for a parameter quirk just learned (each is learned
        once), for a transport failure (``max_retries`` times per request, counted in
        ``stats.retries``) and for an unusable answer (while the unit's ``asks`` last, counted in
        ``stats.reasked``). Nothing else sends: the client's own retries are off.
        """
        transport_retries = 0
        quirks = 0
        while True:
            args = self._request_args(prompt, n, seed)
            async with self._slots:
                self.stats.in_flight += 1
                self.stats.requests += 1
                try:
                    raw = await self._send_once(**args)
                except openai.BadRequestError as err:
                    self._answered()
                    if not self._learn_from_400(err, args):
                        raise RuntimeError(self.redact(_error_text(err))) from None
                    quirks += 1
                    if quirks > 3:  # three quirks are known; a fourth rejection is not one of them
                        raise RuntimeError(f"server keeps rejecting the request parameters: {sorted(args)}") from None
                    continue
                except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as err:
                    raise FatalAPIError(self.redact(_error_text(err))) from None
                except openai.APIError as err:
                    if isinstance(err, openai.APIStatusError):
                        self._answered()
                    if not is_transport_failure(err) or transport_retries >= self.max_retries:
                        raise self._given_up(err) from None
                    # The wait holds the slot, as the client's own backoff did: a rate-limited
                    # server wants fewer requests in flight, not the same number sooner.
                    await asyncio.sleep(backoff_seconds(transport_retries, err))
                    transport_retries += 1
                    self.stats.retries += 1
                    continue
                finally:
                    self.stats.in_flight -= 1
            self._answered()
            texts, bad = self._texts(raw)
            if texts:
                return texts
            if not asks.take():
                raise BadResponseError(f"{bad} after {self.attempts} attempts")
            self.stats.reasked += 1

    def _texts(self, raw: Any) -> tuple[list[str], str]:
        """The answer's choice texts in index order, or none and why the answer is unusable."""
        try:
            completion = raw.parse()
        except (ValueError, openai.APIResponseValidationError) as err:  # JSONDecodeError is a ValueError
            return [], f"unparsable response body ({type(err).__name__})"
        if completion.usage is not None:
            self.stats.tokens_reported = True
            self.stats.prompt_tokens += completion.usage.prompt_tokens or 0
            self.stats.completion_tokens += completion.usage.completion_tokens or 0
        choices = sorted(completion.choices or [], key=lambda c: c.index)
        texts = [c.message.content for c in choices if c.message and c.message.content]
        if texts:
            return texts, ""
        reasons = {str(c.finish_reason) for c in choices}
        bad = "empty choices list" if not choices else f"no text in the answer (finish_reason {', '.join(sorted(reasons))})"
        if "length" in reasons:
            bad += "; raise --max-tokens (reasoning models spend tokens before answering)"
        return [], bad

    # -- samples of one prompt -------------------------------------------------------------------------

    async def _singles(self, prompt: str, indices: Sequence[int], asks: _Asks) -> list[str]:
        base = self.settings.seed
        results = await asyncio.gather(
            *(self._request(prompt, 1, None if base is None else base + i, asks) for i in indices),
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

    async def _sample(self, prompt: str, n: int, asks: _Asks) -> list[str]:
        if n == 1 or self.single_choice:
            return await self._singles(prompt, range(n), asks)
        try:
            texts = await self._request(prompt, n, self.settings.seed, asks)
        except _NChoicesRefused:
            self.single_choice = True
            self._adapt(f"server refuses n={n}: sending {n} single-choice requests per prompt instead")
            return await self._singles(prompt, range(n), asks)
        if len(texts) < n:
            # Ollama answers one choice whatever n is: keep it, ask for the rest one by one.
            self.single_choice = True
            self._adapt(f"server ignored n={n} (returned {len(texts)}): sending single-choice requests instead")
            texts = texts + await self._singles(prompt, range(len(texts), n), asks)
        return texts

    async def __call__(self, prompt: str, n: int) -> list[str]:
        """``n`` samples for ``prompt``, cleaned (so possibly fewer, never none).

        Raises:
            FatalAPIError: no request can succeed (authentication, permission, model, URL, no
                connection to the server at all, or :class:`ServerStalled`: requests keep timing out).
            BadResponseError: answers kept arriving unusable.
            RuntimeError: a transport error that its retries (``max_retries``) did not overcome.
        """
        asks = _Asks(self.attempts)  # one budget for the unit: its requests' re-asks and ours
        while True:
            descriptions = clean_descriptions(await self._sample(prompt, n, asks))
            if descriptions:
                return descriptions
            if not asks.take():
                break
            self.stats.reasked += 1
        raise BadResponseError(
            f"no usable description in {self.attempts} attempts (answers were empty, refusals or filler)"
        )
