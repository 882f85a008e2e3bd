"""Done-when 2: missing or wrong keys get 401, floods get 429 with Retry-After, oversized requests
get 413 or 400, errors come in the OpenAI shape, and other keys are served meanwhile."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from serve_support import KEYS, auth, server_config, start_server

CHAT = {"model": "support", "messages": [{"role": "user", "content": "Where is my order?"}], "max_tokens": 4,
        "temperature": 0}


def _err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert "error" in body, body
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.url, timeout=120) as c:
        yield c


def test_missing_wrong_and_malformed_keys_get_401(http):
    e = _err(http.post("/v1/chat/completions", json=CHAT), 401)
    assert e["code"] == "invalid_api_key" and "Bearer" in e["message"]
    e = _err(http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-wrong"}), 401)
    assert e["message"] == "Incorrect API key provided."
    _err(http.get("/v1/models", headers={"Authorization": f"Basic {KEYS['alice']}"}), 401)
    r = http.get("/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    # an invalid body without a key is still a 401: keys are checked first
    _err(http.post("/v1/chat/completions", content=b"{not json"), 401)


def test_openai_client_sees_authentication_error(live):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.v1, api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_health_needs_no_key(http):
    r = http.get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["models"] == ["base", "support", "tone"]


def test_request_flood_gets_429_with_retry_after_while_other_keys_are_served(http):
    codes = [http.get("/v1/models", headers=auth("flood")).status_code for _ in range(5)]
    assert codes == [200] * 5
    r = http.get("/v1/models", headers=auth("flood"))
    e = _err(r, 429)
    assert e["type"] == "rate_limit_error" and e["code"] == "rate_limit_requests"
    retry = int(r.headers["retry-after"])
    assert 1 <= retry <= 60
    # the flooding key stays refused; another key is served, generation included
    assert http.post("/v1/chat/completions", json=CHAT, headers=auth("flood")).status_code == 429
    ok = http.post("/v1/chat/completions", json=CHAT, headers=auth("bob"))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


def test_token_limit_gets_429_and_a_request_above_it_400(http):
    # frugal may use 120 tokens a minute; this request reserves prompt (~35) + 24
    body = dict(CHAT, max_tokens=24)
    first = http.post("/v1/chat/completions", json=body, headers=auth("frugal"))
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["total_tokens"]
    results = []
    for _ in range(4):
        r = http.post("/v1/chat/completions", json=body, headers=auth("frugal"))
        results.append(r)
        if r.status_code == 429:
            break
    assert results[-1].status_code == 429, [r.status_code for r in results]
    e = _err(results[-1], 429)
    assert e["code"] == "rate_limit_tokens" and "120 tokens per minute" in e["message"]
    assert 1 <= int(results[-1].headers["retry-after"]) <= 60
    assert used < 120
    # more than the key may ever use in a minute: a clear 400, not a retry
    big = dict(CHAT, messages=[{"role": "user", "content": "bike " * 150}], max_tokens=24)
    e = _err(http.post("/v1/chat/completions", json=big, headers=auth("frugal")), 400)
    assert e["code"] == "tokens_exceed_limit" and e["param"] == "max_tokens"


def test_oversized_bodies_get_413_declared_or_chunked(http):
    huge = dict(CHAT, messages=[{"role": "user", "content": "x" * 30_000}])
    e = _err(http.post("/v1/chat/completions", json=huge, headers=auth("alice")), 413)
    assert "20000 bytes" in e["message"]
    payload = json.dumps(huge).encode()

    def chunks():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(payload), 4096):
            yield payload[i:i + 4096]

    _err(http.post("/v1/chat/completions", content=chunks(),
                   headers={**auth("alice"), "Content-Type": "application/json"}), 413)


def test_long_prompt_and_big_max_tokens_get_400(http):
    long = dict(CHAT, messages=[{"role": "user", "content": "wheel " * 400}])  # ~400 tokens > 300, < 20 kB
    e = _err(http.post("/v1/chat/completions", json=long, headers=auth("alice")), 400)
    assert e["code"] == "context_length_exceeded" and "300" in e["message"]
    e = _err(http.post("/v1/chat/completions", json=dict(CHAT, max_tokens=25), headers=auth("alice")), 400)
    assert e["param"] == "max_tokens" and "24" in e["message"]


@pytest.mark.parametrize("body, param", [
    ({"model": "support"}, "messages"),
    ({"model": "support", "messages": []}, "messages"),
    ({"model": "support", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": "support", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (dict(CHAT, stop=7), "stop"),
    (dict(CHAT, stream_options={"include_usage": True}), "stream_options"),
    (dict(CHAT, temperature=5), "temperature"),
    (dict(CHAT, top_p=0), "top_p"),
    (dict(CHAT, max_tokens=0), "max_tokens"),
    (dict(CHAT, stop=["a", "b", "c", "d", "e"]), "stop"),
])
def test_invalid_bodies_get_400_not_422(http, body, param):
    e = _err(http.post("/v1/chat/completions", json=body, headers=auth("alice")), 400)
    assert e["type"] == "invalid_request_error"
    assert e["param"] == param, e  # OpenAI's parameter path, without the validator's type names


def test_malformed_json_unknown_model_unsupported_params_and_routes(http):
    e = _err(http.post("/v1/chat/completions", content=b'{"model": ', headers={**auth("alice"),
                                                                              "Content-Type": "application/json"}), 400)
    assert "JSON" in e["message"] and e["param"] is None
    # a JSON body under another content type (`curl -d` sends a form type), or none: told which header
    for ctype in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {**auth("alice"), **({"Content-Type": ctype} if ctype else {})}
        e = _err(http.post("/v1/chat/completions", content=json.dumps(CHAT).encode(), headers=headers), 400)
        assert "expected 'application/json'" in e["message"] and (ctype or "no Content-Type") in e["message"], e
    r = http.post("/v1/chat/completions", content=json.dumps(CHAT).encode(),
                  headers={**auth("alice"), "Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text
    e = _err(http.post("/v1/chat/completions", json=dict(CHAT, model="gpt-4"), headers=auth("alice")), 404)
    assert e["code"] == "model_not_found" and "base, support, tone" in e["message"]
    e = _err(http.post("/v1/chat/completions", json=dict(CHAT, n=2), headers=auth("alice")), 400)
    assert e["param"] == "n"
    # an earlier assistant turn's tool calls would be dropped from what the model reads: refused
    calls = [{"id": "call_1", "type": "function", "function": {"name": "track", "arguments": "{}"}}]
    history = [{"role": "user", "content": "Where is order 42?"}, {"role": "assistant", "content": None, "tool_calls": calls},
               {"role": "tool", "tool_call_id": "call_1", "content": "Shipped on Monday."}]
    e = _err(http.post("/v1/chat/completions", json=dict(CHAT, messages=history), headers=auth("alice")), 400)
    assert e["param"] == "messages[1].tool_calls" and e["code"] == "unsupported_parameter"
    # content null without tool calls is an empty turn, as before
    history = [{"role": "assistant", "content": None}, {"role": "user", "content": "Where is order 42?"}]
    r = http.post("/v1/chat/completions", json=dict(CHAT, messages=history), headers=auth("alice"))
    assert r.status_code == 200, r.text
    e = _err(http.post("/v1/chat/completions", json=dict(CHAT, logprobs=True), headers=auth("alice")), 400)
    assert e["param"] == "logprobs" and e["code"] == "unsupported_parameter"
    e = _err(http.post("/v1/completions", json={"model": "tone", "prompt": "hi", "echo": True}, headers=auth("alice")),
             400)
    assert e["param"] == "echo"
    _err(http.post("/v1/completions", json={"model": "tone", "prompt": ""}, headers=auth("alice")), 400)
    _err(http.get("/v1/nothing-here", headers=auth("alice")), 404)
    _err(http.get("/v1/models/gpt-4", headers=auth("alice")), 404)


def test_queue_limits_answer_429_per_key_and_503_when_full(runs, hub, tmp_path):
    """One worker held busy; bob's second waiting request is refused (per-key bound), then a third
    key finds the server queue full; the waiting requests are answered once the worker is free."""
    srv = start_server(server_config(runs, tmp_path / "q.db", max_queue=2, max_queue_per_key=1), hub)
    sched = srv.app.state.qlorakit.scheduler
    release = threading.Event()
    sched.submit("hold", lambda: release.wait(60))
    results: dict[str, httpx.Response] = {}

    def ask(name: str, key: str) -> None:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            results[name] = c.post("/v1/chat/completions", json=CHAT, headers=auth(key))

    waiting: list[threading.Thread] = []

    def start_waiting(name: str, key: str) -> None:
        t = threading.Thread(target=ask, args=(name, key))
        t.start()
        waiting.append(t)
        deadline = time.monotonic() + 30
        while sched.waiting() < len(waiting) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sched.waiting() == len(waiting)

    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            start_waiting("bob1", "bob")
            r = c.post("/v1/chat/completions", json=CHAT, headers=auth("bob"))
            e = _err(r, 429)
            assert e["code"] == "too_many_queued" and int(r.headers["retry-after"]) >= 1
            start_waiting("alice1", "alice")
            r = c.post("/v1/chat/completions", json=CHAT, headers=auth("frugal"))
            e = _err(r, 503)
            assert e["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
            assert c.get("/health").json()["queue"] == 2
    finally:
        release.set()
        for t in waiting:
            t.join(120)
        srv.stop()
    assert results["bob1"].status_code == 200 and results["alice1"].status_code == 200
