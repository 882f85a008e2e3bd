"""``qlorakit data export-feedback``: rated or corrected answers of the server -> a training file.

    qlorakit data export-feedback --db runs/support-v1/serve.db -o feedback.jsonl
                                  [--min-rating 0.5] [--adapter NAME ...] [--include-flagged]
                                  [--no-completions] [--licence SPDX]

Reads the SQLite database that ``qlorakit serve`` writes (tables ``completions`` and ``feedback``,
see :mod:`qlorakit.serve.store`) and writes one training record per completion whose latest
feedback either carries a correction (the corrected answer is what is learned) or rates the answer
at least ``--min-rating`` on the -1..1 scale (thumbs up = 1; 4 stars = 0.5, 5 stars = 1):

- chat completions become chat records ``{"messages": [..., {"role": "assistant", "content": ANSWER}]}``;
- text completions become completion records ``{"text": PROMPT + ANSWER}`` (``--no-completions``
  leaves them out).

Left out, and counted in the provenance: answers withheld by the output guard (unless corrected),
requests a guard flagged (unless ``--include-flagged``: flagged input may be an injection attempt
that should not be learned), conversations with tool turns (the training formats have no tool
role), and adapters not named by ``--adapter``.

Next to ``OUT`` go ``OUT.provenance.json`` (the database's path and the sha256 of the snapshot that
was read, the rows, the time, the adapters, the selection and the licence "user feedback (owner's
data)") and ``OUT.licence`` (the SPDX id the data ledger of ``qlorakit train`` reads; ``other``
unless ``--licence`` says otherwise, since the terms are the owner's). All three are written
atomically; the provenance file last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._files import as_created
from .readers import DataError

__all__ = ["export_feedback", "FeedbackExport", "register", "LICENCE_NOTE", "SCHEMA_VERSIONS"]

LICENCE_NOTE = "user feedback (owner's data)"
SCHEMA_VERSIONS = ("1",)  # serve database schema versions this reader understands
_CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class FeedbackExport:
    out: str
    provenance: str
    records: int
    chat_records: int
    completion_records: int
    corrected: int
    considered: int  # completions with feedback
    skipped: dict[str, int] = field(default_factory=dict)
    adapters: dict[str, int] = field(default_factory=dict)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        as_created(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _snapshot(db: Path, into: Path) -> None:
    """A consistent copy of a live database (the server may be writing), via SQLite's backup API."""
    try:
        src = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as e:
        raise DataError(f"{db}: cannot open the serve database ({e})") from e
    try:
        dst = sqlite3.connect(str(into))
        try:
            src.backup(dst)
        finally:
            dst.close()
    except sqlite3.DatabaseError as e:
        raise DataError(f"{db}: not a readable SQLite database ({e})") from e
    finally:
        src.close()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_QUERY = """
SELECT c.id, c.model, c.endpoint, c.prompt, c.answer, c.finish_reason, f.id, f.score, f.correction, f.created,
       (SELECT r.guard_verdicts FROM requests r WHERE r.completion_id = c.id AND r.endpoint LIKE
        'POST /v1/%completions' LIMIT 1) AS verdicts
FROM completions c
JOIN feedback f ON f.completion_id = c.id
WHERE f.created = (SELECT MAX(f2.created) FROM feedback f2 WHERE f2.completion_id = c.id)
ORDER BY c.created, c.id
"""


def _input_flagged(cid: str, verdicts_json: str | None) -> bool:
    """Whether an input guard flagged the request that produced this completion."""
    if not verdicts_json:
        return False
    try:
        verdicts = json.loads(verdicts_json)
    except json.JSONDecodeError as e:
        raise DataError(f"completion {cid}: stored guard verdicts are not JSON ({e.msg})") from e
    return any(v.get("flagged") and str(v.get("check", "")).startswith("input_") for v in verdicts)


def _record(cid: str, endpoint: str, prompt_json: str, answer: str) -> tuple[dict[str, Any] | None, str]:
    """(training record, '') or (None, reason it was left out)."""
    try:
        prompt = json.loads(prompt_json)
    except json.JSONDecodeError as e:
        raise DataError(f"completion {cid}: stored prompt is not JSON ({e.msg})") from e
    if endpoint == "chat":
        if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
            raise DataError(f"completion {cid}: stored chat prompt is not a list of messages")
        if any(m.get("role") not in _CHAT_ROLES for m in prompt):
            return None, "tool_turns"
        msgs = [{"role": m["role"], "content": str(m.get("content") or "")} for m in prompt
                if str(m.get("content") or "").strip() or m["role"] == "user"]
        return {"messages": [*msgs, {"role": "assistant", "content": answer}]}, ""
    if not isinstance(prompt, str):
        raise DataError(f"completion {cid}: stored completion prompt is not a string")
    return {"text": prompt + answer}, ""


def export_feedback(db: str | Path, out: str | Path, *, min_rating: float = 0.5, adapters: list[str] | None = None,
                    include_flagged: bool = False, include_completions: bool = True,
                    licence: str = "other") -> FeedbackExport:
    """Write the training file, its ``.licence`` and its ``.provenance.json``; return a summary."""
    dbp, outp = Path(db), Path(out)
    if not dbp.is_file():
        raise DataError(f"{dbp}: no such database; expected the SQLite file of 'qlorakit serve' (its --db)")
    if not -1.0 <= min_rating <= 1.0:
        raise DataError(f"--min-rating {min_rating}: expected a value in -1..1 (thumbs up = 1, 4 stars = 0.5)")
    with tempfile.TemporaryDirectory(prefix="qlorakit-feedback-") as tmp:
        snap = Path(tmp) / "snapshot.db"
        _snapshot(dbp, snap)
        snap_sha = _sha256(snap)
        con = sqlite3.connect(str(snap))
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            missing = {"meta", "completions", "feedback", "requests"} - tables
            if missing:
                raise DataError(f"{dbp}: not a 'qlorakit serve' database (tables {sorted(missing)} missing)")
            ver = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if ver is None or ver[0] not in SCHEMA_VERSIONS:
                raise DataError(f"{dbp}: serve database schema version {ver[0] if ver else None!r}; this version "
                                f"reads {list(SCHEMA_VERSIONS)}")
            rows = con.execute(_QUERY).fetchall()
        except sqlite3.DatabaseError as e:
            raise DataError(f"{dbp}: cannot read the feedback ({e})") from e
        finally:
            con.close()
    records: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    used_adapters: Counter[str] = Counter()
    ids: list[str] = []
    corrected = n_chat = 0
    for cid, model, endpoint, prompt, answer, finish, fid, score, correction, _, verdicts in rows:
        if adapters and model not in adapters:
            skipped["other_adapter"] += 1
            continue
        if correction is None and score < min_rating:
            skipped["below_min_rating"] += 1
            continue
        if correction is None and finish == "content_filter":
            skipped["withheld_by_output_guard"] += 1
            continue
        if not include_flagged and _input_flagged(cid, verdicts):
            skipped["guard_flagged"] += 1
            continue
        if endpoint != "chat" and not include_completions:
            skipped["text_completion"] += 1
            continue
        rec, why = _record(cid, endpoint, prompt, correction if correction is not None else answer)
        if rec is None:
            skipped[why] += 1
            continue
        rec["meta"] = {"completion_id": cid, "feedback_id": fid, "adapter": model, "score": score,
                       "corrected": correction is not None}
        records.append(rec)
        ids.append(cid)
        used_adapters[model] += 1
        corrected += correction is not None
        n_chat += "messages" in rec
    if not records:
        raise DataError(f"{dbp}: no feedback qualifies ({len(rows)} rated completions; left out: "
                        f"{dict(skipped) or 'none'}); nothing written")
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    prov_path = outp.with_name(outp.name + ".provenance.json")
    summary = FeedbackExport(str(outp), str(prov_path), len(records), n_chat, len(records) - n_chat, corrected,
                             len(rows), dict(skipped), dict(used_adapters))
    provenance = {
        "kind": "qlorakit feedback export",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"db": str(dbp.resolve()), "db_snapshot_sha256": snap_sha, "schema_version": ver[0]},
        "licence": LICENCE_NOTE,
        "licence_spdx": licence,
        "selection": {"min_rating": min_rating, "adapters": adapters or "all", "include_flagged": include_flagged,
                      "include_completions": include_completions, "latest_feedback_per_completion": True},
        "rows": {"rated_completions": len(rows), "records": len(records), "chat": n_chat,
                 "text": len(records) - n_chat, "corrected": corrected, "skipped": dict(skipped)},
        "adapters": dict(used_adapters),
        "completion_ids": ids,
        "output": {"path": outp.name, "sha256": hashlib.sha256(data).hexdigest()},
    }
    _write_atomic(outp, data)
    _write_atomic(outp.with_name(outp.name + ".licence"),
                  f"{licence}\n{LICENCE_NOTE}, exported from {dbp.resolve()}\n".encode("utf-8"))
    _write_atomic(prov_path, (json.dumps(provenance, indent=2) + "\n").encode("utf-8"))
    return summary


def _run(a: argparse.Namespace) -> int:
    s = export_feedback(a.db, a.out, min_rating=a.min_rating, adapters=a.adapter or None,
                        include_flagged=a.include_flagged, include_completions=not a.no_completions,
                        licence=a.licence)
    if a.json:
        print(json.dumps(asdict(s), indent=2))
    else:
        left = ", ".join(f"{k} {v}" for k, v in sorted(s.skipped.items())) or "none"
        print(f"wrote {s.out}: {s.records} records ({s.chat_records} chat, {s.completion_records} text; "
              f"{s.corrected} corrected) from {s.considered} rated completions; left out: {left}\n"
              f"provenance: {s.provenance}")
    return 0


def register(subparsers: Any) -> None:
    """The ``export-feedback`` subcommand of ``qlorakit data`` (see :data:`qlorakit.data.cli.PLUGINS`)."""
    p = subparsers.add_parser("export-feedback", help="rated or corrected server answers -> a training file",
                              description="Turn the feedback stored by 'qlorakit serve' into a JSONL training "
                                          "file that 'qlorakit train' accepts, with a provenance sidecar.")
    p.add_argument("--db", required=True, metavar="FILE", help="the server's SQLite database (its --db)")
    p.add_argument("-o", "--out", required=True, metavar="OUT.jsonl", help="training file to write")
    p.add_argument("--min-rating", type=float, default=0.5,
                   help="lowest rating kept, on -1..1 (thumbs up = 1, 4 stars = 0.5, 5 stars = 1); "
                        "corrected answers are always kept")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME",
                   help="only answers of this model id (repeatable); default: all")
    p.add_argument("--include-flagged", action="store_true", help="keep requests that a guard flagged")
    p.add_argument("--no-completions", action="store_true", help="leave out /v1/completions answers")
    p.add_argument("--licence", "--license", dest="licence", default="other", metavar="SPDX",
                   help="licence id written to OUT.licence for the training ledger "
                        "(default 'other': the owner's terms)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_run)
