"""A client that leaves before its answer is ready (a client timeout, a closed connection) frees the
server: a generation under way stops at its next token, one still queued never runs, the tokens made
are logged and counted, and the next request is served at once. Before, an abandoned long answer held
the one generation worker to its end, and every request queued behind it waited (found with
schemathesis at its default 10 s read timeout: requests timed out one after another)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from serve_support import FakeHub, audit_rows, auth, server_config, start_server

from qlorakit.models import GenerationResult

TICK = 0.02  # seconds per generated token: 400 tokens take 8 s


class TickingHub(FakeHub):
    """The hub interface with a slow, countable generation: one token per TICK, and a record of every
    call (how many tokens it made, whether it has ended and how)."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def _call(self, kind: str) -> dict[str, Any]:
        call = {"kind": kind, "made": 0, "ended": False, "finish": None}
        with self.lock:
            self.calls.append(call)
        return call

    def generate(self, model_id: str, prompt: str, *, max_new_tokens: int, cancel: threading.Event | None = None,
                 **kw: Any) -> GenerationResult:
        call = self._call("generate")
        finish = "length"
        for _ in range(max_new_tokens):
            time.sleep(TICK)
            call["made"] += 1
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
        call.update(ended=True, finish=finish)
        return GenerationResult(" tok" * call["made"], self.count_tokens(prompt), call["made"], finish)

    def stream(self, model_id: str, prompt: str, *, max_new_tokens: int, **kw: Any) -> Iterator[str]:
        call = self._call("stream")
        try:
            for _ in range(max_new_tokens):
                time.sleep(TICK)
                call["made"] += 1
                yield " tok"
            call["finish"] = "length"
        finally:
            call["ended"] = True
            call["finish"] = call["finish"] or "closed"

    def wait_ended(self, n: int, timeout: float) -> list[dict[str, Any]]:
        """The first ``n`` calls once they have all ended (or as they are at the timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                calls = list(self.calls[:n])
            if len(calls) == n and all(c["ended"] for c in calls):
                return calls
            time.sleep(0.02)
        return list(self.calls[:n])


@pytest.fixture
def ticking(runs, hub, tmp_path):
    cfg = server_config(runs, tmp_path / "gone.db", guards="off", max_tokens=400, default_max_tokens=400)
    th = TickingHub(hub.tokenizer)
    srv = start_server(cfg, th)
    yield srv, th
    srv.stop()


def _body(max_tokens: int, **kw: Any) -> dict[str, Any]:
    return {"model": "base", "prompt": "When do you open?", "max_tokens": max_tokens, "temperature": 0, **kw}


def test_a_generation_stops_when_its_client_times_out(ticking):
    srv, th = ticking
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.v1 + "/completions", json=_body(400), headers=auth("alice"),
                   timeout=httpx.Timeout(30.0, read=0.5))
    t_left = time.monotonic()
    [call] = th.wait_ended(1, timeout=10)
    assert call["ended"] and call["finish"] == "cancelled"
    assert call["made"] < 200  # stopped within a second or so of the client leaving, not after 400 tokens
    rows = audit_rows(srv.db, "SELECT status, completion_tokens, finish_reason, error_code FROM requests")
    assert rows == [(499, call["made"], "cancelled", "client_closed")]
    # the worker is free: the next request is answered now, not after the abandoned one's 8 s
    r = httpx.post(srv.v1 + "/completions", json=_body(3), headers=auth("bob"), timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert time.monotonic() - t_left < 6


def test_a_queued_request_whose_client_left_never_runs(ticking):
    srv, th = ticking
    first: dict[str, Any] = {}

    def patient() -> None:  # stays for its whole answer: 50 tokens, about 1 s
        first["r"] = httpx.post(srv.v1 + "/completions", json=_body(50), headers=auth("alice"), timeout=60)

    t = threading.Thread(target=patient)
    t.start()
    deadline = time.monotonic() + 10
    while not th.calls and time.monotonic() < deadline:  # the first is under way
        time.sleep(0.01)
    with pytest.raises(httpx.ReadTimeout):  # queued behind it, and gone before its turn
        httpx.post(srv.v1 + "/completions", json=_body(50), headers=auth("bob"), timeout=httpx.Timeout(30.0, read=0.3))
    t.join(60)
    assert first["r"].status_code == 200 and first["r"].json()["usage"]["completion_tokens"] == 50
    time.sleep(0.5)  # the worker would have taken the second job by now
    assert len(th.calls) == 1
    rows = audit_rows(srv.db, "SELECT key_id, status, completion_tokens FROM requests ORDER BY id", expect=2)
    assert sorted(rows) == [("alice", 200, 50), ("bob", 499, None)]


def test_a_stream_stops_generating_when_its_client_disconnects(ticking):
    srv, th = ticking
    with httpx.stream("POST", srv.v1 + "/completions", json=_body(400, stream=True), headers=auth("alice"),
                      timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]  # a few events, then the client goes
        assert all(x.startswith("data: ") or not x for x in got)
    [call] = th.wait_ended(1, timeout=10)
    assert call["ended"] and call["finish"] == "closed"  # the generator was closed, not drained
    assert call["made"] < 200
    r = httpx.post(srv.v1 + "/completions", json=_body(3), headers=auth("bob"), timeout=30)
    assert r.status_code == 200


def test_a_queued_stream_whose_client_left_never_runs(ticking):
    srv, th = ticking
    first: dict[str, Any] = {}

    def patient() -> None:
        first["r"] = httpx.post(srv.v1 + "/completions", json=_body(50), headers=auth("alice"), timeout=60)

    t = threading.Thread(target=patient)
    t.start()
    deadline = time.monotonic() + 10
    while not th.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    with httpx.stream("POST", srv.v1 + "/completions", json=_body(50, stream=True), headers=auth("bob"),
                      timeout=30) as r:
        assert r.status_code == 200  # the stream's headers go out at once; its generation waits its turn
    t.join(60)
    assert first["r"].status_code == 200
    time.sleep(0.5)
    assert len(th.calls) == 1
