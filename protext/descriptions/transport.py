"""The HTTP side of talking to a chat server: can it be reached, which failures are worth sending again, how long to wait.

Rules only, no state: :class:`~protext.descriptions.llm_client.DescriptionSampler` runs the one
retry loop and counts what it sends; this module tells it whether a failed request may succeed if
sent again (the ``openai`` client's own rule: 408, 409, 429, 5xx, timeouts, dropped connections, or
the server's ``x-should-retry``) and how long to wait first (``Retry-After`` honoured up to a minute,
else exponential backoff with jitter). :func:`check_reachable` finds a closed port or unknown host
before a run starts, in one connection attempt.
"""

from __future__ import annotations

import math
import os
import random
import socket
from typing import Optional
from urllib.parse import urlsplit

import openai

from ..errors import UserError

__all__ = [
    "INITIAL_RETRY_DELAY",
    "MAX_RETRY_AFTER",
    "MAX_RETRY_DELAY",
    "ServerUnreachable",
    "backoff_seconds",
    "check_reachable",
    "is_transport_failure",
]


class ServerUnreachable(UserError):
    """The server's host cannot be resolved or its port refuses connections."""


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
# retry policy

#: backoff between transport retries, as the openai client does it: 0.5 s doubling to 8 s, 0-25 % jitter
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
#: a server's Retry-After is honoured up to this many seconds (longer ones get the plain backoff)
MAX_RETRY_AFTER = 60.0
#: statuses a request is sent again for (the openai client's own rule; 5xx too)
_RETRY_STATUSES = (408, 409, 429)


def _retry_after(err: openai.APIStatusError) -> Optional[float]:
    """Seconds the server asked us to wait (``retry-after-ms`` or ``retry-after``), if usable."""
    headers = err.response.headers
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            seconds = float(headers.get(name, "")) * scale
        except ValueError:  # absent, or an HTTP date: fall back to the plain backoff
            continue
        if math.isfinite(seconds) and 0 < seconds <= MAX_RETRY_AFTER:
            return seconds
    return None


def is_transport_failure(err: openai.APIError) -> bool:
    """Whether sending the same request again may succeed (the openai client's rule)."""
    if isinstance(err, (openai.APITimeoutError, openai.APIConnectionError)):
        return True
    if not isinstance(err, openai.APIStatusError):
        return False
    verdict = err.response.headers.get("x-should-retry")
    if verdict in ("true", "false"):  # the server says: obey
        return verdict == "true"
    return err.status_code in _RETRY_STATUSES or err.status_code >= 500


def backoff_seconds(retry: int, err: openai.APIError) -> float:
    """Wait before transport retry number ``retry`` (0-based): the server's Retry-After, else exponential."""
    if isinstance(err, openai.APIStatusError):
        asked = _retry_after(err)
        if asked is not None:
            return asked
    return min(INITIAL_RETRY_DELAY * 2.0 ** min(retry, 30), MAX_RETRY_DELAY) * (1 - 0.25 * random.random())
