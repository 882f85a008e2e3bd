"""The audit log and the feedback store: one SQLite file (WAL mode), three tables.

``requests``     one row per answered request, errors included: time, key id and key sha256 (never
                 the key), endpoint, model, HTTP status, error code, token counts, queue wait and
                 latency, stream or not, finish reason, guard verdicts (JSON) and the action taken.
``completions``  what feedback refers to: id, key id, model, endpoint, the prompt (chat messages or
                 the completion prompt, JSON), the answer, finish reason and sampling parameters.
``feedback``     ratings and corrections of a completion: rating as given, its scale, the rating
                 mapped to -1..1 (``score``), correction, comment.

``qlorakit data export-feedback`` (:mod:`qlorakit.data.feedback`) reads this schema; its version is
in the ``meta`` table.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["AuditStore", "AuditRecord", "SCHEMA_VERSION"]

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    created REAL NOT NULL,
    key_id TEXT,
    key_sha256 TEXT,
    endpoint TEXT NOT NULL,
    model TEXT,
    status INTEGER NOT NULL,
    error_code TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    queue_ms REAL,
    latency_ms REAL NOT NULL,
    stream INTEGER NOT NULL DEFAULT 0,
    finish_reason TEXT,
    guard_verdicts TEXT NOT NULL DEFAULT '[]',
    guard_action TEXT NOT NULL DEFAULT '',
    completion_id TEXT
);
CREATE INDEX IF NOT EXISTS requests_key ON requests (key_id, created);
CREATE TABLE IF NOT EXISTS completions (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    key_id TEXT,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    prompt TEXT NOT NULL,
    answer TEXT NOT NULL,
    finish_reason TEXT,
    params TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS feedback (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    completion_id TEXT NOT NULL REFERENCES completions (id),
    key_id TEXT,
    rating REAL NOT NULL,
    scale TEXT NOT NULL,
    score REAL NOT NULL,
    correction TEXT,
    comment TEXT
);
CREATE INDEX IF NOT EXISTS feedback_completion ON feedback (completion_id, created);
"""


@dataclass
class AuditRecord:
    """What one request leaves in the audit log; filled in as the request goes."""

    request_id: str
    endpoint: str
    created: float = field(default_factory=time.time)
    key_id: str | None = None
    key_sha256: str | None = None
    model: str | None = None
    status: int = 200
    error_code: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    queue_ms: float | None = None
    latency_ms: float = 0.0
    stream: bool = False
    finish_reason: str | None = None
    guard_verdicts: list[dict[str, Any]] = field(default_factory=list)
    guard_action: str = ""
    completion_id: str | None = None


class AuditStore:
    """Thread-safe writes and the few reads the server needs (one connection behind a lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            from .errors import ServeError

            raise ServeError(f"{self.path}: audit database schema version {row[0]}, this version writes "
                             f"{SCHEMA_VERSION}; use another --db")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def log_request(self, rec: AuditRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO requests (request_id, created, key_id, key_sha256, endpoint, model, status, error_code, "
                "prompt_tokens, completion_tokens, queue_ms, latency_ms, stream, finish_reason, guard_verdicts, "
                "guard_action, completion_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (rec.request_id, rec.created, rec.key_id, rec.key_sha256, rec.endpoint, rec.model, rec.status,
                 rec.error_code, rec.prompt_tokens, rec.completion_tokens, rec.queue_ms, rec.latency_ms,
                 int(rec.stream), rec.finish_reason, json.dumps(rec.guard_verdicts), rec.guard_action,
                 rec.completion_id))

    def save_completion(self, cid: str, *, key_id: str | None, model: str, endpoint: str, prompt: Any, answer: str,
                        finish_reason: str | None, params: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO completions (id, created, key_id, model, endpoint, prompt, answer, finish_reason, params) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (cid, time.time(), key_id, model, endpoint, json.dumps(prompt, ensure_ascii=False), answer,
                 finish_reason, json.dumps(params)))

    def completion_owner(self, cid: str) -> tuple[bool, str | None]:
        """(exists, key id) of a stored completion."""
        with self._lock:
            row = self._db.execute("SELECT key_id FROM completions WHERE id=?", (cid,)).fetchone()
        return (row is not None, row[0] if row else None)

    def save_feedback(self, fid: str, *, completion_id: str, key_id: str | None, rating: float, scale: str,
                      score: float, correction: str | None, comment: str | None) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO feedback (id, created, completion_id, key_id, rating, scale, score, correction, comment) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (fid, time.time(), completion_id, key_id, rating, scale, score, correction, comment))

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read-only queries (tests, health)."""
        with self._lock:
            return self._db.execute(sql, args).fetchall()
