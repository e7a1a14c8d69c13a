"""Chat answers (a judge's, above all) kept on disk, keyed by the request's content, so a crashed or repeated
run pays only once.

SQLite (standard library, one file, atomic commits) is enough: the judge runs in one process, and a row is
committed as soon as its answer arrives, so a crash loses at most the calls in flight.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path


def request_key(request: dict) -> str:
    """The same request (model, messages, sampling, attempt number) always gets the same key."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ResponseCache:
    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def get(self, request: dict) -> dict | None:
        row = self._db.execute("SELECT value FROM responses WHERE key = ?", (request_key(request),)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, request: dict, response: dict) -> None:
        self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (request_key(request), json.dumps(response)))

    def close(self) -> None:
        self._db.close()
