"""Durable record of served responses and the feedback users give on them (SQLite, WAL mode).

Schema (created on first use)::

    responses(id TEXT PRIMARY KEY,        -- the id returned to the client (cmpl-..., chatcmpl-...)
              created REAL,               -- unix time
              route TEXT, model TEXT,
              prompt TEXT, completion TEXT, finish_reason TEXT,
              prompt_tokens INTEGER, completion_tokens INTEGER, latency_s REAL)
    feedback(id INTEGER PRIMARY KEY AUTOINCREMENT,
             response_id TEXT NOT NULL REFERENCES responses(id),
             created REAL, rating INTEGER NOT NULL, comment TEXT)

Every call opens its own connection, so several replicas on one machine can share the file."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, created REAL, route TEXT, model TEXT, prompt TEXT, completion TEXT,
    finish_reason TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, latency_s REAL);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, response_id TEXT NOT NULL REFERENCES responses(id),
    created REAL, rating INTEGER NOT NULL, comment TEXT);
CREATE INDEX IF NOT EXISTS feedback_response ON feedback(response_id);
"""


class FeedbackStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: committed rows survive a process crash
        return db

    def record_response(self, *, id: str, route: str, model: str, prompt: str, completion: str,
                        finish_reason: str | None, prompt_tokens: int, completion_tokens: int, latency_s: float) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (id, time.time(), route, model, prompt, completion, finish_reason, prompt_tokens,
                        completion_tokens, latency_s))

    def add_feedback(self, response_id: str, rating: int, comment: str | None) -> int | None:
        """The feedback row id, or None when no response has that id."""
        with self._connect() as db:
            if db.execute("SELECT 1 FROM responses WHERE id = ?", (response_id,)).fetchone() is None:
                return None
            cur = db.execute("INSERT INTO feedback (response_id, created, rating, comment) VALUES (?, ?, ?, ?)",
                             (response_id, time.time(), rating, comment))
            return int(cur.lastrowid)

    def get(self, response_id: str) -> dict | None:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM responses WHERE id = ?", (response_id,)).fetchone()
            if row is None:
                return None
            fb = db.execute("SELECT id, created, rating, comment FROM feedback WHERE response_id = ? ORDER BY id",
                            (response_id,)).fetchall()
            return {**dict(row), "feedback": [dict(f) for f in fb]}
