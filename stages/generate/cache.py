"""The request cache: every answer on disk the moment it arrives, keyed by what determines it.

The key is a hash of (model id, model revision, prompt, sampling parameters) and nothing else, so a
rerun, a resumed crash, another backend or a new catalog version that leaves a prompt unchanged all
find the answer instead of paying for it again.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str  # "stop" or "length", as the OpenAI protocol says
    prompt_tokens: int
    completion_tokens: int


def request_key(model: str, revision: str, prompt: str, sampling: dict) -> str:
    blob = json.dumps(
        {
            "model": model,
            "revision": revision,
            "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
            "sampling": sampling,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class AnswerCache:
    """SQLite in WAL mode: each answer is its own committed transaction, so a SIGKILL loses at most the
    answers still in flight, never a committed one, and never leaves a half-written row."""

    def __init__(self, path: Path, read_also: list[Path] = ()):
        """Writes go to ``path`` only; lookups also consult ``read_also`` (other workers' caches), so
        workers on different hosts never share a writable SQLite file yet still reuse each other's answers."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.con = sqlite3.connect(path, timeout=60, check_same_thread=False)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute(
            "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, model TEXT, prompt TEXT, sampling TEXT,"
            " answer TEXT, finish_reason TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)"
        )
        self.others = [p for p in read_also if Path(p).resolve() != path.resolve() and Path(p).exists()]

    def get_many(self, keys: list[str]) -> dict[str, Answer]:
        found = self._lookup(self.con, keys)
        for other in self.others:
            rest = [k for k in keys if k not in found]
            if not rest:
                break
            con = sqlite3.connect(f"file:{other}?mode=ro", uri=True, timeout=60)
            try:
                found.update(self._lookup(con, rest))
            finally:
                con.close()
        return found

    @staticmethod
    def _lookup(con: sqlite3.Connection, keys: list[str]) -> dict[str, Answer]:
        found = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = (
                "SELECT key, answer, finish_reason, prompt_tokens, completion_tokens FROM answers "
                f"WHERE key IN ({','.join('?' * len(chunk))})"
            )
            for k, *rest in con.execute(q, chunk):
                found[k] = Answer(*rest)
        return found

    def count(self) -> int:
        return self.con.execute("SELECT count(*) FROM answers").fetchone()[0]

    def put(self, key: str, model: str, prompt: str, sampling: dict, a: Answer) -> None:
        with self.con:
            self.con.execute(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    key,
                    model,
                    prompt,
                    json.dumps(sampling, sort_keys=True),
                    a.text,
                    a.finish_reason,
                    a.prompt_tokens,
                    a.completion_tokens,
                    time.time(),
                ],
            )

    def close(self) -> None:
        self.con.close()
