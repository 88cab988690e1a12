"""A server that accepts connections and never answers stops a generation early (issue 15, item 1).

The stalled server here is a bare socket server: it accepts every connection, reads nothing back
and never writes a byte, exactly what a stuck inference server looks like to the client. The
assertions are about behaviour (the run stops with exit 2, one error line naming the URL, earlier
units kept, most units never tried), not about retry counts or wall time.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path

import pytest

from protext.descriptions.queries import CUPL_STYLE_QUERIES
from protext.gen_descriptions import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402


class StalledServer:
    """Accepts TCP connections on 127.0.0.1 and never answers; counts the connections it got."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.held: list[socket.socket] = []  # kept open so the client sees silence, not a reset
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:  # the listening socket was closed: stop
                return
            self.held.append(conn)

    def __enter__(self) -> "StalledServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        try:  # wakes the accept() blocked in the thread (close alone does not, on Linux)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for conn in self.held:
            conn.close()
        self.thread.join()


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


#: a per-request timeout no healthy local answer comes near, even on a loaded machine
HEALTHY_TIMEOUT = "30"
#: against the stalled server any timeout ends the same way; a short one keeps the test short
STALLED_TIMEOUT = "0.3"


def _argv(url: str, classes: Path, out: Path, timeout: str, *extra: str) -> list[str]:
    # concurrency 2 < the stall threshold: the breaker must work across waves of units, not only
    # within the first one; one retry keeps each wave short
    return ["--classes", str(classes), "--out", str(out), "--base-url", url, "--model", "fake-model",
            "--n-per-query", "2", "--seed", "0", "--concurrency", "2", "--timeout", timeout, "--max-retries", "1",
            "--no-progress", *extra]


def test_stalled_server_stops_the_run_naming_the_url_and_keeps_written_units(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "d.jsonl"
    first = tmp_path / "first.txt"
    first.write_text("beagle\n")
    with FakeOpenAIServer() as healthy:  # an earlier run completed one class
        assert main(_argv(healthy.url, first, out, HEALTHY_TIMEOUT)) == 0
    capsys.readouterr()
    before = out.read_bytes()
    assert before

    # Many classes: a run that waited out every unit's timeouts would try all of them.
    many = tmp_path / "many.txt"
    many.write_text("beagle\n" + "".join(f"class {i}\n" for i in range(40)))
    with StalledServer() as stalled:
        code = main(_argv(stalled.url, many, out, STALLED_TIMEOUT))
        connections = len(stalled.held)
    captured = capsys.readouterr()
    assert code == 2
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: "), captured.err
    assert stalled.url in err_lines[0] and "--timeout" in err_lines[0]
    assert "STOPPED:" in captured.out
    assert out.read_bytes() == before  # the earlier class's units are all still there, nothing added
    # Far fewer connections than the 40 new classes' units, each tried twice, would have opened.
    units = 40 * len(CUPL_STYLE_QUERIES)
    assert 0 < connections < units


def test_timeout_messages_name_the_url(tmp_path: Path) -> None:
    """A single timed-out unit (below the stall threshold) fails with a message naming the URL."""
    import asyncio

    import openai

    from protext.descriptions.llm_client import DescriptionSampler, SamplingSettings

    with StalledServer() as stalled:
        async def one() -> str:
            client = openai.AsyncOpenAI(api_key="x", base_url=stalled.url, max_retries=0, timeout=0.2)
            sampler = DescriptionSampler(client, SamplingSettings(model="m"), stall_after=5)
            try:
                await sampler("What does a dog look like?", 1)
            except RuntimeError as err:
                return str(err)
            finally:
                await client.close()
            return ""

        message = asyncio.run(one())
    assert stalled.url in message and "--timeout" in message


def test_server_that_answers_then_keeps_answering_is_not_taken_for_stalled(tmp_path: Path) -> None:
    """Timeouts that the client's retries recover from are not stalls: only requests that stay
    unanswered after every retry count, so a server with a few slow moments finishes the run."""
    classes = tmp_path / "c.txt"
    classes.write_text("beagle\ntabby cat\n")
    out = tmp_path / "d.jsonl"
    # each hang is held until the server stops, so it costs the client one whole timeout: keep it
    # short, and give every request more retries than there are hangs
    with FakeOpenAIServer(faults=["hang", "hang", "hang"]) as server:
        assert main(_argv(server.url, classes, out, "3", "--max-retries", "5")) == 0
    names = {json.loads(line)["classname"] for line in out.read_text().splitlines()}
    assert names == {"beagle", "tabby cat"}
