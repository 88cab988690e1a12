"""DescriptionSampler's one retry loop: the requests it reports are the requests the server got.

A real ``openai`` client talks to :class:`FakeOpenAIServer`, which logs every HTTP request it
receives, so each count here is checked against what actually crossed the wire.
"""

from __future__ import annotations

import asyncio
from typing import Iterable

import openai
import pytest

from conftest import TEST_TIMEOUT
from fake_openai_server import FakeOpenAIServer
from protext.descriptions.llm_client import BadResponseError, ClientStats, DescriptionSampler, SamplingSettings

PROMPT = "What does a dog look like?"


def _ask(
    server: FakeOpenAIServer, *, max_retries: int, attempts: int, n: int = 2, seed: int = 0
) -> tuple[list[str] | BaseException, ClientStats]:
    """One unit of ``n`` samples through a fresh sampler; its result (or error) and its counters."""

    async def run() -> tuple[list[str] | BaseException, ClientStats]:
        client = openai.AsyncOpenAI(api_key="x", base_url=server.url, max_retries=max_retries, timeout=TEST_TIMEOUT)
        sampler = DescriptionSampler(client, SamplingSettings(model="m", seed=seed), attempts=attempts)
        try:
            return await sampler(PROMPT, n), sampler.stats
        except (RuntimeError, BadResponseError) as err:
            return err, sampler.stats
        finally:
            await client.close()

    return asyncio.run(run())


def _server(faults: Iterable[str]) -> FakeOpenAIServer:
    return FakeOpenAIServer(faults=list(faults))


@pytest.mark.parametrize("failures", [0, 1, 2, 3, 5])
def test_transport_failures_are_retried_and_counted_exactly(failures: int) -> None:
    """N 500s (each with a 5 ms Retry-After): min(N, max_retries) retries, every send counted once."""
    max_retries = 3
    with _server(["500"] * failures) as server:
        result, stats = _ask(server, max_retries=max_retries, attempts=3)
        sent = len(server.log)
    assert sent == min(failures, max_retries) + 1  # never more than the configured tries
    assert stats.requests == sent and stats.retries == sent - 1 and stats.reasked == 0
    if failures > max_retries:
        assert isinstance(result, RuntimeError) and "InternalServerError" in str(result)
    else:
        assert isinstance(result, list) and result


@pytest.mark.parametrize("failures", [0, 1, 2, 4])
def test_unusable_answers_are_reasked_within_the_attempts(failures: int) -> None:
    """N unparsable bodies: min(N + 1, attempts) asks in all, each counted once; none is a retry."""
    attempts = 3
    with _server(["malformed"] * failures) as server:
        result, stats = _ask(server, max_retries=5, attempts=attempts)
        sent = len(server.log)
    assert sent == min(failures + 1, attempts)
    assert stats.requests == sent and stats.reasked == sent - 1 and stats.retries == 0
    if failures >= attempts:
        assert isinstance(result, BadResponseError) and f"after {attempts} attempts" in str(result)
    else:
        assert isinstance(result, list) and result


def test_unusable_bodies_and_empty_cleanings_share_one_budget() -> None:
    """Bodies that do not parse, then answers that clean to nothing, draw on one budget of asks.

    With two nested loops (re-asks inside a request, rounds around it) every round would spend its
    own ``attempts`` asks: ``attempts²`` requests. Sample 4 of the fake server is a refusal, which
    cleaning removes, so a healthy answer here is still an unusable unit.
    """
    attempts = 3
    with _server(["malformed", "malformed", "ok"] * attempts) as server:
        result, stats = _ask(server, max_retries=0, attempts=attempts, n=1, seed=4)
        sent = len(server.log)
    assert isinstance(result, BadResponseError) and "no usable description" in str(result)
    assert sent == attempts == stats.requests and stats.reasked == attempts - 1


def test_a_mixed_run_reports_what_was_sent() -> None:
    """Transport failures and unusable answers interleaved: requests = first send + retries + re-asks."""
    faults = ["429", "malformed", "500", "empty", "500"]
    with _server(faults) as server:
        result, stats = _ask(server, max_retries=3, attempts=3)
        sent = len(server.log)
    assert isinstance(result, list) and result
    assert sent == len(faults) + 1 == stats.requests
    assert stats.retries == 3 and stats.reasked == 2 and stats.in_flight == 0
