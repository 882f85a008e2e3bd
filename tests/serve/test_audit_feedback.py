"""The audit log, POST /v1/feedback, and done-when 5: feedback posted through the API comes back out of
``qlorakit data export-feedback`` as training records, and a fine-tune on them runs."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest
from serve_support import KEYS, audit_rows, auth

from qlorakit.cli import main as cli_main

openai = pytest.importorskip("openai")

SYSTEM = {"role": "system", "content": "You answer for Fernhill Cycles."}
QUESTIONS = ["What are your opening hours?", "Do you sell helmets?", "Can I return a bike after a week?",
             "Do you repair e-bikes?", "Is there a warranty on frames?"]


@pytest.fixture(scope="module")
def alice(live):
    return openai.OpenAI(base_url=live.v1, api_key=KEYS["alice"], max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.url, timeout=120) as c:
        yield c


def test_audit_row_per_request_with_key_hash_tokens_latency_and_verdicts(live, alice, http):
    out = alice.chat.completions.create(model="tone", messages=[SYSTEM, {"role": "user", "content": QUESTIONS[0]}],
                                        max_tokens=5, temperature=0)
    r = http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
                  headers=auth("bob"))
    assert r.status_code == 404
    rows = audit_rows(live.db, "SELECT key_id, key_sha256, model, status, prompt_tokens, completion_tokens, "
                               "latency_ms, guard_verdicts, guard_action, completion_id, endpoint FROM requests "
                               "WHERE completion_id=?", (out.id,))
    assert len(rows) == 1
    key_id, sha, model, status, pt, ct, latency, verdicts, action, cid, endpoint = rows[0]
    assert (key_id, sha, model, status) == ("alice", hashlib.sha256(KEYS["alice"].encode()).hexdigest(), "tone", 200)
    assert (pt, ct) == (out.usage.prompt_tokens, out.usage.completion_tokens)
    assert latency > 0 and endpoint == "POST /v1/chat/completions"
    checks = {(v["check"], v["guard"]) for v in json.loads(verdicts)}
    assert {("input_injection", "injection.prompt"), ("input_harmful", "moderation.request"),
            ("output_harmful", "moderation.content")} <= checks
    miss = audit_rows(live.db, "SELECT key_id, status, error_code FROM requests WHERE request_id=?",
                 (r.headers["x-request-id"],))
    assert miss == [("bob", 404, "model_not_found")]
    # keys themselves are never written, only their sha256
    raw = b"".join(p.read_bytes() for p in live.db.parent.glob(live.db.name + "*"))
    assert all(k.encode() not in raw for k in KEYS.values())


def test_feedback_validation_and_ownership(alice, http):
    out = alice.chat.completions.create(model="support", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                        max_tokens=3, temperature=0)
    ok = http.post("/v1/feedback", json={"completion_id": out.id, "rating": 4, "scale": "stars"}, headers=auth("alice"))
    assert ok.status_code == 200 and ok.json()["score"] == 0.5 and ok.json()["completion_id"] == out.id
    cases = [
        ({"completion_id": out.id, "rating": 3}, "alice", 400, "rating"),  # 3 on the thumbs scale
        ({"completion_id": out.id, "rating": 6, "scale": "stars"}, "alice", 400, "rating"),
        ({"completion_id": out.id, "rating": 1, "extra": 1}, "alice", 400, "extra"),
        ({"completion_id": "chatcmpl-unknown", "rating": 1}, "alice", 404, "completion_id"),
        ({"completion_id": out.id, "rating": 1}, "bob", 404, "completion_id"),  # not bob's answer
    ]
    for body, key, status, param in cases:
        r = http.post("/v1/feedback", json=body, headers=auth(key))
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param


def test_feedback_exports_to_training_records_and_a_fine_tune_runs(live, alice, http, tiny_model_dir, tmp_path):
    asked = []
    for q in QUESTIONS[1:]:
        msgs = [SYSTEM, {"role": "user", "content": q}]
        out = alice.chat.completions.create(model="support", messages=msgs, max_tokens=4, temperature=0)
        asked.append((msgs, out))
    streamed = alice.chat.completions.create(model="tone", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                             max_tokens=4, temperature=0, stream=True)
    chunks = list(streamed)
    stream_id, stream_text = chunks[0].id, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    text = alice.completions.create(model="support", prompt="Fernhill Cycles is", max_tokens=4, temperature=0)
    fb = [
        (asked[0][1].id, {"rating": 1}),  # thumbs up: the answer as given
        (asked[1][1].id, {"rating": -1, "correction": "Yes, we repair e-bikes in our workshop."}),
        (asked[2][1].id, {"rating": -1}),  # thumbs down, no correction: left out
        (asked[3][1].id, {"rating": 2, "scale": "stars"}),  # 2 stars: left out
        (asked[3][1].id, {"rating": 5, "scale": "stars", "comment": "on second thought"}),  # latest wins
        (stream_id, {"rating": 1}),
        (text.id, {"rating": 1}),
    ]
    for cid, body in fb:
        r = http.post("/v1/feedback", json={"completion_id": cid, **body}, headers=auth("alice"))
        assert r.status_code == 200, r.text
    out = tmp_path / "feedback.jsonl"
    # --include-flagged: the live server only flags, and where the guards draw their lines is not
    # what this test is about (test_export_feedback.py covers what is left out)
    assert cli_main(["data", "export-feedback", "--db", str(live.db), "-o", str(out), "--adapter", "support",
                     "--adapter", "tone", "--include-flagged"]) == 0
    recs = {r["meta"]["completion_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    want = {asked[0][1].id, asked[1][1].id, asked[3][1].id, stream_id, text.id}
    assert want <= set(recs) and asked[2][1].id not in recs
    assert recs[asked[0][1].id]["messages"] == [*asked[0][0], {"role": "assistant",
                                                               "content": asked[0][1].choices[0].message.content}]
    assert recs[asked[1][1].id]["messages"][-1]["content"] == "Yes, we repair e-bikes in our workshop."
    assert recs[asked[1][1].id]["meta"]["corrected"] is True
    assert recs[asked[3][1].id]["meta"]["score"] == 1.0
    assert recs[stream_id]["messages"][-1]["content"] == stream_text
    assert recs[text.id]["text"] == "Fernhill Cycles is" + text.choices[0].text
    prov = json.loads((tmp_path / "feedback.jsonl.provenance.json").read_text())
    assert prov["licence"] == "user feedback (owner's data)"
    assert prov["output"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert prov["rows"]["records"] == len(recs) and prov["rows"]["skipped"]["below_min_rating"] >= 1
    assert set(prov["adapters"]) <= {"support", "tone"} and len(prov["source"]["db_snapshot_sha256"]) == 64
    assert (tmp_path / "feedback.jsonl.licence").read_text().splitlines()[0] == "other"

    # qlorakit train accepts the file and records where it came from
    runs = tmp_path / "runs"
    assert cli_main(["train", "name=from-feedback", f"output_dir={runs}", f"model.base={tiny_model_dir}",
                     f"data.train={out}", "train.max_steps=2", "train.micro_batch_size=2", "eval.samples=0", "eval.suites=[]",
                     "train.progress=false", "train.checkpoint_every=0"]) == 0
    run = runs / "from-feedback"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    manifest = json.loads((run / "data_manifest.json").read_text())
    text_manifest = json.dumps(manifest)
    assert hashlib.sha256(out.read_bytes()).hexdigest() in text_manifest
    assert "user feedback (owner's data)" in text_manifest
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(s.get("step") == 2 for s in steps)
