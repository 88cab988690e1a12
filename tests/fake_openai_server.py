"""A real HTTP server speaking the OpenAI chat-completions protocol, for driving the real ``openai`` client.

It binds 127.0.0.1 on a free port, answers deterministically and injects scripted faults::

    with FakeOpenAIServer(faults=["429", "hang"]) as server:
        client = openai.AsyncOpenAI(base_url=server.url, api_key="x")

Answers depend only on the user message and the sample index (``seed + choice index``; the seed
defaults to 0), so a run that asks for the same samples gets the same text whichever way it asks:
``n`` choices in one request, or single-choice requests with ``seed = base + i``. Some raw answers
carry boilerplate, duplicates or refusals; :func:`expected_descriptions` gives what survives cleaning.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Optional

from conftest import TEST_TIMEOUT

FAULTS = ("429", "500", "hang", "malformed", "empty", "ok")
"""Scripted faults: rate limit, server error, no answer at all (``hang``: the request is held until
the server stops, so the client's timeout always fires, however long it is), a 200 whose body is not
JSON, a 200 with an empty ``choices`` list, and an explicit healthy answer."""


def _trait(prompt: str, index: int) -> str:
    digest = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:10]
    return f"Visual trait {digest} number {index} is clearly visible."


def fake_answer(prompt: str, index: int) -> str:
    """The raw assistant message for sample ``index`` of ``prompt``."""
    kind = index % 5
    if kind == 1:
        return f"Sure! {_trait(prompt, index)} It also has a second sentence."
    if kind == 2:
        return _trait(prompt, index - 2)  # a duplicate of sample index-2 (same unit)
    if kind == 3:
        return f"  \n{_trait(prompt, index)}\n"
    if kind == 4:
        return "As an AI language model, I cannot see images."
    return _trait(prompt, index)


def expected_descriptions(prompt: str, n: int, seed: int = 0) -> list[str]:
    """The cleaned descriptions a unit of ``n`` samples of ``prompt`` must yield, in order."""
    out: list[str] = []
    for index in range(seed, seed + n):
        kind = index % 5
        if kind == 4:  # a refusal: cleaned away
            continue
        text = _trait(prompt, index - 2 if kind == 2 else index)  # kind 2 repeats sample index-2
        if text not in out:
            out.append(text)
    return out


class FakeOpenAIServer:
    """``ThreadingHTTPServer`` in a daemon thread; use as a context manager.

    Args:
        api_key: if set, requests must carry ``Authorization: Bearer <api_key>``; others get a 401
            whose message echoes the key they sent (as some servers do), to test redaction.
        delay: seconds to wait before each answer.
        ignore_n: answer one choice whatever ``n`` is (Ollama).
        refuse_n: 400 for ``n > 1`` (llama.cpp).
        reasoning: 400 for ``max_tokens`` and for a non-default ``temperature`` (OpenAI o-series).
        faults: consumed one per request, in arrival order, before healthy answers resume.
        fault_rule: ``f(user_message) -> fault or None``, consulted on every request after ``faults``.

    ``max_in_flight`` records how many requests were being answered at once at most; :meth:`hold_from`
    stops answering at an exact request, so a test can kill a client at a known point.
    """

    def __init__(
        self,
        *,
        api_key: Optional[str] = None,
        delay: float = 0.0,
        ignore_n: bool = False,
        refuse_n: bool = False,
        reasoning: bool = False,
        faults: Iterable[str] = (),
        fault_rule: Optional[Callable[[str], Optional[str]]] = None,
    ) -> None:
        self.api_key = api_key
        self.delay = delay
        self.ignore_n = ignore_n
        self.refuse_n = refuse_n
        self.reasoning = reasoning
        self.fault_rule = fault_rule
        self._faults: deque[str] = deque()
        self.add_faults(faults)
        self._lock = threading.Lock()
        self.log: list[dict[str, Any]] = []  # one entry per request: body, auth header, what was done
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        # Holding: requests from number ``_hold_from`` on (0-based, in arrival order) get no answer
        # until release(), so a test can stop a client at an exact point without any timing.
        self._hold_from: Optional[int] = None
        self._released = threading.Event()
        self._stopping = threading.Event()  # set by stop(): ends every ``hang``
        self._held = threading.Semaphore(0)
        self.in_flight = 0
        self.max_in_flight = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "FakeOpenAIServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.release()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The ``base_url`` to give the client."""
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def add_faults(self, faults: Iterable[str]) -> None:
        for fault in faults:
            if fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")
            self._faults.append(fault)

    def hold_from(self, index: int) -> None:
        """Answer no request from the ``index``-th on (0-based over all requests so far) until :meth:`release`."""
        with self._lock:
            self._hold_from = index
            self._released.clear()

    def release(self) -> None:
        """Stop holding; held requests end without an answer (their clients are usually gone by then)."""
        with self._lock:
            self._hold_from = None
        self._released.set()

    def wait_held(self, timeout: float = TEST_TIMEOUT) -> bool:
        """Block until one more request is being held; False if none arrives within ``timeout``."""
        return self._held.acquire(timeout=timeout)

    def counts(self) -> dict[str, int]:
        """How many requests got each outcome (``answer``, a fault name, or a 4xx kind)."""
        out: dict[str, int] = {}
        with self._lock:
            for entry in self.log:
                out[entry["outcome"]] = out.get(entry["outcome"], 0) + 1
        return out

    # -- protocol ----------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        auth = handler.headers.get("Authorization", "")
        if not handler.path.rstrip("/").endswith("/chat/completions"):
            self._send(handler, 404, {"error": {"message": f"no route {handler.path}", "type": "not_found"}})
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self._send(handler, 400, {"error": {"message": "request body is not JSON", "type": "invalid_request_error"}})
            return
        messages = body.get("messages") or [{}]
        prompt = str(messages[-1].get("content", ""))
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
            entry: dict[str, Any] = {"body": body, "auth": auth, "prompt": prompt}
            held = self._hold_from is not None and len(self.log) >= self._hold_from
            self.log.append(entry)
        if held:
            entry["outcome"] = "held"
            self._held.release()
            self._released.wait()
            return
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._answer(handler, entry, body, auth, prompt, fault)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _answer(self, handler: BaseHTTPRequestHandler, entry: dict[str, Any], body: dict[str, Any], auth: str,
                prompt: str, fault: Optional[str]) -> None:
        if fault is None and self.fault_rule is not None:
            fault = self.fault_rule(prompt)

        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            entry["outcome"] = "401"
            given = auth.removeprefix("Bearer ")
            self._send(handler, 401, {"error": {"message": f"Incorrect API key provided: {given}.", "type": "invalid_request_error", "code": "invalid_api_key"}})
            return
        bad_param = self._rejected_param(body)
        if bad_param is not None:
            entry["outcome"] = f"400:{bad_param[0]}"
            self._send(handler, 400, {"error": {"message": bad_param[1], "type": "invalid_request_error", "param": bad_param[0], "code": None}})
            return

        entry["outcome"] = fault or "answer"
        if self.delay:
            time.sleep(self.delay)
        if fault == "429":
            self._send(handler, 429, {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}}, {"retry-after-ms": "5"})
        elif fault == "500":
            self._send(handler, 500, {"error": {"message": "The server had an error", "type": "server_error"}}, {"retry-after-ms": "5"})
        elif fault == "hang":
            self._stopping.wait()  # never answer: the client times out, whatever its --timeout
        elif fault == "malformed":
            self._send_bytes(handler, 200, b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "mess')
        elif fault == "empty":
            self._send(handler, 200, self._completion(body, []))
        else:
            n = int(body.get("n") or 1)
            seed = int(body.get("seed") or 0)
            count = 1 if self.ignore_n else n
            self._send(handler, 200, self._completion(body, [fake_answer(prompt, seed + i) for i in range(count)]))

    def _rejected_param(self, body: dict[str, Any]) -> Optional[tuple[str, str]]:
        if self.refuse_n and int(body.get("n") or 1) > 1:
            return "n", "Only one completion choice is allowed"
        if self.reasoning:
            if "max_tokens" in body:
                return "max_tokens", ("Unsupported parameter: 'max_tokens' is not supported with this model. "
                                      "Use 'max_completion_tokens' instead.")
            if "temperature" in body and body["temperature"] != 1:
                return "temperature", (f"Unsupported value: 'temperature' does not support {body['temperature']} "
                                       "with this model. Only the default (1) value is supported.")
        return None

    @staticmethod
    def _completion(body: dict[str, Any], contents: list[str]) -> dict[str, Any]:
        choices = [
            {"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": "stop", "logprobs": None}
            for i, c in enumerate(contents)
        ]
        completion_tokens = sum(len(c.split()) for c in contents)
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "fake"),
            "choices": choices,
            "usage": {"prompt_tokens": 20, "completion_tokens": completion_tokens, "total_tokens": 20 + completion_tokens},
        }

    def _send(self, handler: BaseHTTPRequestHandler, status: int, payload: dict[str, Any], headers: Optional[dict[str, str]] = None) -> None:
        self._send_bytes(handler, status, json.dumps(payload).encode("utf-8"), headers)

    @staticmethod
    def _send_bytes(handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: Optional[dict[str, str]] = None) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) before we answered


if __name__ == "__main__":  # a manual server for trying the CLI by hand
    with FakeOpenAIServer(delay=0.05) as srv:
        print(f"fake OpenAI server at {srv.url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
