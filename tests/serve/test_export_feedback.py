"""``qlorakit data export-feedback`` on a database written through the store: what is kept, what is
left out and why, the provenance, and clear errors."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from qlorakit.data import DataError
from qlorakit.data.feedback import export_feedback
from qlorakit.serve import AuditRecord, AuditStore

Q = [{"role": "user", "content": "Do you sell helmets?"}]


def _completion(store: AuditStore, cid: str, *, model: str = "support", endpoint: str = "chat", prompt=None,
                answer: str = "Yes.", finish: str = "stop", verdicts=None) -> None:
    store.save_completion(cid, key_id="alice", model=model, endpoint=endpoint, prompt=Q if prompt is None else prompt,
                          answer=answer, finish_reason=finish, params={})
    rec = AuditRecord(f"req-{cid}", "POST /v1/chat/completions" if endpoint == "chat" else "POST /v1/completions",
                      key_id="alice", model=model, completion_id=cid, guard_verdicts=verdicts or [])
    store.log_request(rec)


def _feedback(store: AuditStore, cid: str, score: float, correction: str | None = None) -> None:
    store.save_feedback(f"fb-{cid}-{time.monotonic_ns()}", completion_id=cid, key_id="alice", rating=score,
                        scale="thumbs", score=score, correction=correction, comment=None)


@pytest.fixture()
def db(tmp_path):
    store = AuditStore(tmp_path / "serve.db")
    flagged = [{"check": "input_injection", "flagged": True, "action": "flag"}]
    out_flag = [{"check": "output_harmful", "flagged": True, "action": "block"}]
    _completion(store, "good")
    _feedback(store, "good", 1)
    _completion(store, "fixed", answer="No.")
    _feedback(store, "fixed", -1, "Yes, from 30 euros.")
    _completion(store, "bad")
    _feedback(store, "bad", -1)
    _completion(store, "changed-mind")
    _feedback(store, "changed-mind", 1)
    _feedback(store, "changed-mind", -1)  # the latest feedback counts
    _completion(store, "flagged", verdicts=flagged)
    _feedback(store, "flagged", 1)
    _completion(store, "withheld", answer="[withheld]", finish="content_filter", verdicts=out_flag)
    _feedback(store, "withheld", 1)
    _completion(store, "withheld-fixed", answer="[withheld]", finish="content_filter", verdicts=out_flag)
    _feedback(store, "withheld-fixed", 0, "We cannot help with that.")
    _completion(store, "tool", prompt=[*Q, {"role": "tool", "content": "stock: 3"}])
    _feedback(store, "tool", 1)
    _completion(store, "other-model", model="tone")
    _feedback(store, "other-model", 1)
    _completion(store, "text", endpoint="completions", prompt="Helmets cost", answer=" 30 euros.")
    _feedback(store, "text", 1)
    _completion(store, "no-feedback")
    store.close()
    return tmp_path / "serve.db"


def test_selection_records_and_provenance(db, tmp_path):
    out = tmp_path / "fb.jsonl"
    s = export_feedback(db, out, adapters=["support"])
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    by_id = {r["meta"]["completion_id"]: r for r in recs}
    assert sorted(by_id) == ["fixed", "good", "text", "withheld-fixed"]
    assert by_id["good"]["messages"] == [*Q, {"role": "assistant", "content": "Yes."}]
    assert by_id["fixed"]["messages"][-1]["content"] == "Yes, from 30 euros."
    assert by_id["withheld-fixed"]["messages"][-1]["content"] == "We cannot help with that."
    assert by_id["text"] == {"text": "Helmets cost 30 euros.", "meta": by_id["text"]["meta"]}
    assert s.skipped == {"below_min_rating": 2, "guard_flagged": 1, "withheld_by_output_guard": 1, "tool_turns": 1,
                         "other_adapter": 1}
    assert (s.records, s.chat_records, s.completion_records, s.corrected, s.considered) == (4, 3, 1, 2, 10)
    prov = json.loads((tmp_path / "fb.jsonl.provenance.json").read_text())
    assert prov["completion_ids"] == [r["meta"]["completion_id"] for r in recs]
    assert prov["licence"] == "user feedback (owner's data)" and prov["selection"]["adapters"] == ["support"]
    # the snapshot digest is of the rows that were read: another row changes it
    again = export_feedback(db, tmp_path / "fb2.jsonl", adapters=["support"])
    prov2 = json.loads((tmp_path / "fb2.jsonl.provenance.json").read_text())
    assert prov2["source"]["db_snapshot_sha256"] == prov["source"]["db_snapshot_sha256"] and again.records == 4
    store = AuditStore(db)
    _feedback(store, "bad", 1)
    store.close()
    export_feedback(db, tmp_path / "fb3.jsonl", adapters=["support"])
    prov3 = json.loads((tmp_path / "fb3.jsonl.provenance.json").read_text())
    assert prov3["source"]["db_snapshot_sha256"] != prov["source"]["db_snapshot_sha256"]
    assert prov3["rows"]["records"] == 5


def test_options_include_flagged_min_rating_no_completions(db, tmp_path):
    s = export_feedback(db, tmp_path / "a.jsonl", include_flagged=True, include_completions=False, min_rating=-1)
    ids = [json.loads(x)["meta"]["completion_id"] for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert "flagged" in ids and "bad" in ids and "changed-mind" in ids and "other-model" in ids
    assert "text" not in ids and "withheld" not in ids and s.skipped["text_completion"] == 1


def test_errors_are_clear(db, tmp_path):
    with pytest.raises(DataError, match="no such database"):
        export_feedback(tmp_path / "none.db", tmp_path / "x.jsonl")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(DataError, match="not a readable SQLite database"):
        export_feedback(junk, tmp_path / "x.jsonl")
    with pytest.raises(DataError, match="nothing written"):
        export_feedback(db, tmp_path / "x.jsonl", adapters=["nobody"])
    assert not (tmp_path / "x.jsonl").exists()
    with pytest.raises(DataError, match="-1..1"):
        export_feedback(db, tmp_path / "x.jsonl", min_rating=4)
    con = sqlite3.connect(str(db))
    con.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(DataError, match="schema version '99'"):
        export_feedback(db, tmp_path / "x.jsonl")


def test_cli_prints_summary_and_exit_codes(db, tmp_path, capsys):
    from qlorakit.cli import main

    assert main(["data", "export-feedback", "--db", str(db), "-o", str(tmp_path / "c.jsonl")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["data", "export-feedback", "--db", str(tmp_path / "none.db"), "-o", str(tmp_path / "d.jsonl")]) == 2
