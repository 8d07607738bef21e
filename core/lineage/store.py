"""The lineage store: a DuckDB file that records every stage run and every dataset it read and wrote.

Tables
  runs      one row per stage run: stage, parameters, code version, status, times, Prefect flow-run id
  datasets  one row per dataset version: location, kind, content hash, schema, row count
  run_io    which run read (``input``) or wrote (``output``) which dataset version

A dataset version is identified by (location, content hash): rewriting a file with the same bytes
is the same version, and a changed file is a new one. Queries walk these edges: ``upstream`` from a
checkpoint back to the corpus and the LLM it came from, ``downstream`` from a dataset to everything
made from it.

DuckDB allows one process at a time to hold a file open for writing, and fails (rather than waits)
when another holds it. Stages therefore take an advisory lock on a sidecar file (``lineage.duckdb.lock``,
exclusive to write, shared to read) around each short transaction, so concurrent stage processes, also
in containers sharing the volume, queue instead of failing; a retry loop covers processes that do not
take the lock (a user's DuckDB shell).

``core.lineage.openlineage`` exports the store as OpenLineage run events for Marquez and similar tools;
``core.lineage.diff`` compares two versions of a dataset: their runs, inputs and, where kept, rows.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    stage VARCHAR NOT NULL,
    params JSON,
    code_version VARCHAR,
    status VARCHAR NOT NULL,          -- running / succeeded / failed
    started_at TIMESTAMPTZ NOT NULL,
    ended_at TIMESTAMPTZ,
    flow_run_id VARCHAR,
    error VARCHAR,
    host VARCHAR,
    image VARCHAR
);
-- added after the first release: stores made before it gain them on open
ALTER TABLE runs ADD COLUMN IF NOT EXISTS git_commit VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS image_digest VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS task_run_id VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS flow_name VARCHAR;
CREATE TABLE IF NOT EXISTS datasets (
    dataset_id VARCHAR PRIMARY KEY,
    location VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,            -- table / corpus / model / checkpoint / file
    content_hash VARCHAR NOT NULL,
    schema_name VARCHAR,
    schema_version INTEGER,
    row_count BIGINT,
    created_at TIMESTAMPTZ NOT NULL,
    UNIQUE (location, content_hash)
);
CREATE TABLE IF NOT EXISTS run_io (
    run_id VARCHAR NOT NULL,
    dataset_id VARCHAR NOT NULL,
    direction VARCHAR NOT NULL,       -- input / output
    role VARCHAR,                     -- what the stage calls it: corpus, llm, transcripts, ...
    PRIMARY KEY (run_id, dataset_id, direction)
);
"""


@dataclass(frozen=True)
class DatasetRef:
    """A dataset version as a stage reports it: where, what kind, which bytes."""

    location: str
    kind: str
    content_hash: str
    role: str = ""
    schema_name: str | None = None
    schema_version: int | None = None
    row_count: int | None = None


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class RunContext:
    """Where a stage run came from, beyond its parameters: what the runs table records about it."""

    code_version: str
    git_commit: str | None = None
    flow_run_id: str | None = None
    flow_name: str | None = None
    task_run_id: str | None = None
    image: str | None = None
    image_digest: str | None = None


class LineageStore:
    def __init__(self, path: str | os.PathLike, lock_timeout_s: float = 300.0):
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._schema_ready = False

    @contextmanager
    def _file_lock(self, exclusive: bool):
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            if exclusive:
                raise
            yield  # a store on a read-only mount: nobody writes it, so reading needs no lock
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextmanager
    def _connect(self, read_only: bool = False):
        """Open the file under the sidecar lock, retrying while a process without it holds DuckDB's lock."""
        read_only = read_only and self.path.exists()
        with self._file_lock(exclusive=not read_only):
            deadline = time.monotonic() + self.lock_timeout_s
            delay = 0.02
            while True:
                try:
                    con = duckdb.connect(str(self.path), read_only=read_only)
                    break
                except duckdb.IOException as e:
                    if "lock" not in str(e).lower() or time.monotonic() > deadline:
                        raise
                    time.sleep(delay * (1 + random.random()))
                    delay = min(delay * 2, 0.5)
            try:
                if not read_only and not self._schema_ready:
                    con.execute(SCHEMA_SQL)
                    self._schema_ready = True
                yield con
            finally:
                con.close()

    # ----- writing -----

    def start_run(self, stage: str, params: dict, ctx: RunContext) -> str:
        """Record a run as ``running``, with where it came from (code, Prefect runs, image)."""
        run_id = uuid.uuid4().hex
        with self._connect() as con:
            con.execute(
                "INSERT INTO runs (run_id, stage, params, code_version, status, started_at, flow_run_id, host,"
                " image, git_commit, image_digest, task_run_id, flow_name)"
                " VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    run_id,
                    stage,
                    json.dumps(params, sort_keys=True, default=str),
                    ctx.code_version,
                    _now(),
                    ctx.flow_run_id,
                    os.uname().nodename,
                    ctx.image,
                    ctx.git_commit,
                    ctx.image_digest,
                    ctx.task_run_id,
                    ctx.flow_name,
                ],
            )
        return run_id

    def finish_run(
        self,
        run_id: str,
        inputs: list[DatasetRef],
        outputs: list[DatasetRef],
        status: str = "succeeded",
        error: str | None = None,
    ) -> None:
        with self._connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                for direction, refs in (("input", inputs), ("output", outputs)):
                    for ref in refs:
                        dataset_id = self._upsert_dataset(con, ref)
                        con.execute(
                            "INSERT INTO run_io VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                            [run_id, dataset_id, direction, ref.role],
                        )
                con.execute(
                    "UPDATE runs SET status = ?, ended_at = ?, error = ? WHERE run_id = ?",
                    [status, _now(), error, run_id],
                )
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise

    @staticmethod
    def _upsert_dataset(con, ref: DatasetRef) -> str:
        row = con.execute(
            "SELECT dataset_id FROM datasets WHERE location = ? AND content_hash = ?",
            [ref.location, ref.content_hash],
        ).fetchone()
        if row:
            return row[0]
        dataset_id = uuid.uuid4().hex
        con.execute(
            "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                dataset_id,
                ref.location,
                ref.kind,
                ref.content_hash,
                ref.schema_name,
                ref.schema_version,
                ref.row_count,
                _now(),
            ],
        )
        return dataset_id

    # ----- reading -----

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        if not self.path.exists():
            with self._connect():  # a store nobody wrote yet: create its tables, then read them
                pass
        with self._connect(read_only=True) as con:
            return con.execute(sql, params or []).fetchall()

    def dicts(self, sql: str, params: list | None = None) -> list[dict]:
        if not self.path.exists():
            with self._connect():
                pass
        with self._connect(read_only=True) as con:
            cur = con.execute(sql, params or [])
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def latest_dataset(self, location: str) -> tuple | None:
        """The most recently written version of the dataset at ``location``."""
        rows = self.query(
            """SELECT d.dataset_id, d.location, d.kind, d.content_hash, d.row_count
               FROM datasets d LEFT JOIN run_io io ON io.dataset_id = d.dataset_id AND io.direction = 'output'
               LEFT JOIN runs r ON r.run_id = io.run_id
               WHERE d.location = ?
               ORDER BY coalesce(r.ended_at, d.created_at) DESC LIMIT 1""",
            [location],
        )
        return rows[0] if rows else None

    def _run_datasets(self, run_id: str, direction: str) -> list[tuple[str, dict]]:
        """The datasets a run read (``input``) or wrote (``output``): (dataset_id, edge fields)."""
        rows = self.query(
            """SELECT d.dataset_id, d.location, d.kind, d.content_hash, d.row_count, io.role
               FROM run_io io JOIN datasets d USING (dataset_id)
               WHERE io.run_id = ? AND io.direction = ? ORDER BY d.location""",
            [run_id, direction],
        )
        return [
            (did, dict(location=loc, kind=kind, content_hash=chash, row_count=n, role=role))
            for did, loc, kind, chash, n, role in rows
        ]

    def upstream(self, location: str) -> list[dict]:
        """Walk from a dataset to the runs that wrote it and their inputs, recursively.

        Returns one entry per edge, depth first: {depth, dataset, kind, hash, run_id, stage, started_at}.
        """
        start = self.latest_dataset(location)
        if start is None:
            raise KeyError(f"no dataset recorded at {location}")
        out: list[dict] = []
        seen: set[str] = set()

        def walk(dataset_id: str, depth: int) -> None:
            writers = self.query(
                """SELECT r.run_id, r.stage, r.started_at, r.code_version FROM run_io io JOIN runs r USING (run_id)
                   WHERE io.dataset_id = ? AND io.direction = 'output' AND r.status = 'succeeded'
                   ORDER BY r.ended_at DESC LIMIT 1""",
                [dataset_id],
            )
            if not writers or writers[0][0] in seen:
                return
            run_id, stage, started_at, code_version = writers[0]
            seen.add(run_id)
            for did, edge in self._run_datasets(run_id, "input"):
                out.append(
                    dict(
                        edge,
                        depth=depth,
                        via_stage=stage,
                        via_run=run_id,
                        started_at=started_at,
                        code_version=code_version,
                    )
                )
                walk(did, depth + 1)

        walk(start[0], 1)
        return out

    def downstream(self, location: str) -> list[dict]:
        """Walk from a dataset to the runs that read any version of it and what they wrote, recursively."""
        roots = self.query("SELECT dataset_id FROM datasets WHERE location = ?", [location])
        if not roots:
            raise KeyError(f"no dataset recorded at {location}")
        out: list[dict] = []
        seen: set[str] = set()

        def walk(dataset_id: str, depth: int) -> None:
            readers = self.query(
                """SELECT DISTINCT r.run_id, r.stage, r.started_at FROM run_io io JOIN runs r USING (run_id)
                   WHERE io.dataset_id = ? AND io.direction = 'input' AND r.status = 'succeeded'
                   ORDER BY r.started_at""",
                [dataset_id],
            )
            for run_id, stage, started_at in readers:
                if run_id in seen:
                    continue
                seen.add(run_id)
                for did, edge in self._run_datasets(run_id, "output"):
                    out.append(
                        dict(edge, depth=depth, via_stage=stage, via_run=run_id, started_at=started_at)
                    )
                    walk(did, depth + 1)

        for (did,) in roots:
            walk(did, 1)
        return out
