"""What changed between two versions of a dataset or checkpoint: the runs, and where the data is there, the rows.

A version of a path is what the lineage store records: one ``datasets`` row per (location, content hash),
ordered by when a run last wrote it (or, for a path only ever read, such as a corpus, when it was first
recorded). The run that wrote each version says its parameters, code version, image and the versions of its
inputs; ``diff_versions`` compares the two runs field by field.

The rows of two table versions can be compared only where both versions' bytes still exist. splsm keeps one
copy of each output, overwritten by the next run (a harvest rerun replaces the transcripts table's
manifest), so the store holds hashes of old versions, not their data: the latest version is the file at its
location (checked by hashing it), and an older one only where the caller kept a copy and names it
(``from_data`` / ``to_data``), whose hash must then match the version's. Without both, the result says why the
rows cannot be compared (``rows_unavailable``) and holds the metadata alone.

Rows are compared in DuckDB over the Parquet files (a file, or every ``*.parquet`` under a directory of
parts), matched by the table's key (``TABLE_KEYS`` by its schema name, or one the caller gives): added,
removed and changed rows are counted, changes counted per column, and a few keys of each kind sampled.
A table without a key is compared as a multiset of whole rows: added and removed, and no "changed".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb

from core.digest import fingerprint_dir, sha256_file
from core.lineage.store import LineageStore
from core.tables import MANIFEST, manifest_files, table_identity

# The columns that identify a row of each table (by its schema name), for matching rows across versions.
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "transcripts": ("utt_id",),
    "responses": ("utt_id", "task"),
    "examples": ("example_id",),
    "shards": ("file",),
    "generate_stats": ("task", "filter"),
    "predictions": ("example_id", "system"),
    "metrics": ("eval_set", "task", "system"),
    "probe": ("utt_id", "eval_set", "category"),
    "probe_metrics": ("eval_set", "category"),
    "qa": ("qa_id",),
    "qa_metrics": ("eval_set", "source"),
}

# The run fields compared besides parameters and inputs: what code, where, under which flow.
RUN_FIELDS = ("stage", "code_version", "git_commit", "image", "image_digest", "flow_name")


class DiffError(ValueError):
    """The diff cannot be made as asked: no versions at the path, a version that does not exist, data that is
    not the version it is given as. The message says which and what to do."""


@dataclass(frozen=True)
class InputVersion:
    role: str
    location: str
    kind: str
    content_hash: str
    row_count: int | None


@dataclass(frozen=True)
class WriterRun:
    """The run that wrote a version (the latest successful one, where several wrote the same bytes)."""

    run_id: str
    stage: str
    started_at: datetime
    ended_at: datetime | None
    params: dict
    fields: dict[str, str | None]  # RUN_FIELDS
    inputs: tuple[InputVersion, ...]


@dataclass(frozen=True)
class Version:
    number: int  # 1 = the oldest recorded
    dataset_id: str
    content_hash: str
    kind: str
    row_count: int | None
    schema_name: str | None
    schema_version: int | None
    recorded_at: datetime  # when a run last wrote it, else when it was first recorded
    writer: WriterRun | None  # None: read by runs, never written by a recorded one (a corpus, a model)


@dataclass(frozen=True)
class Change:
    """One field that differs between the two versions' runs: a parameter (dotted path) or a run field."""

    name: str
    before: object
    after: object


@dataclass(frozen=True)
class InputChange:
    """An input (by role and location) whose version differs, or that only one of the two runs read."""

    role: str
    location: str
    before: str | None  # content hash; None: the earlier run did not read it
    after: str | None
    before_rows: int | None
    after_rows: int | None

    @property
    def status(self) -> str:
        return "added" if self.before is None else "removed" if self.after is None else "changed"


@dataclass(frozen=True)
class RowDiff:
    before_source: str  # the files read for each version
    after_source: str
    key: tuple[str, ...] | None  # None: compared as whole rows
    before_rows: int
    after_rows: int
    added: int
    removed: int
    changed: int | None  # None without a key
    unchanged: int | None
    changed_columns: dict[str, int]  # column -> rows where it differs
    columns_added: tuple[str, ...]
    columns_removed: tuple[str, ...]
    samples: dict[str, list[dict]]  # added / removed / changed -> a few keys (whole rows without a key)


@dataclass(frozen=True)
class DatasetDiff:
    location: str
    versions: tuple[Version, ...]  # every recorded version, oldest first
    before: Version
    after: Version
    run_changes: list[Change]
    param_changes: list[Change]
    input_changes: list[InputChange]
    rows: RowDiff | None
    rows_unavailable: str | None  # why the rows were not compared, when they were not
    notes: list[str] = field(default_factory=list)


# ----- versions and their runs -----


def versions(store: LineageStore, location: str) -> list[Version]:
    """Every recorded version of ``location``, oldest first, each with the run that wrote it."""
    rows = store.dicts(
        """SELECT d.dataset_id, d.content_hash, d.kind, d.row_count, d.schema_name, d.schema_version,
                  d.created_at,
                  max(r.ended_at) FILTER (WHERE r.status = 'succeeded') AS written_at
           FROM datasets d
           LEFT JOIN run_io io ON io.dataset_id = d.dataset_id AND io.direction = 'output'
           LEFT JOIN runs r ON r.run_id = io.run_id
           WHERE d.location = ?
           GROUP BY ALL
           ORDER BY coalesce(written_at, any_value(d.created_at)), any_value(d.created_at), d.dataset_id""",
        [location],
    )
    out = []
    for i, r in enumerate(rows, 1):
        out.append(
            Version(
                number=i,
                dataset_id=r["dataset_id"],
                content_hash=r["content_hash"],
                kind=r["kind"],
                row_count=r["row_count"],
                schema_name=r["schema_name"],
                schema_version=r["schema_version"],
                recorded_at=r["written_at"] or r["created_at"],
                writer=_writer(store, r["dataset_id"]),
            )
        )
    return out


def _writer(store: LineageStore, dataset_id: str) -> WriterRun | None:
    runs = store.dicts(
        f"""SELECT r.run_id, r.stage, r.started_at, r.ended_at, r.params, {", ".join("r." + f for f in RUN_FIELDS[1:])}
            FROM run_io io JOIN runs r USING (run_id)
            WHERE io.dataset_id = ? AND io.direction = 'output' AND r.status = 'succeeded'
            ORDER BY r.ended_at DESC LIMIT 1""",
        [dataset_id],
    )
    if not runs:
        return None
    r = runs[0]
    inputs = store.query(
        """SELECT io.role, d.location, d.kind, d.content_hash, d.row_count
           FROM run_io io JOIN datasets d USING (dataset_id)
           WHERE io.run_id = ? AND io.direction = 'input' ORDER BY io.role, d.location""",
        [r["run_id"]],
    )
    return WriterRun(
        run_id=r["run_id"],
        stage=r["stage"],
        started_at=r["started_at"],
        ended_at=r["ended_at"],
        params=json.loads(r["params"]) if r["params"] else {},
        fields={f: r[f] for f in RUN_FIELDS},
        inputs=tuple(InputVersion(role or "", loc, kind, h, n) for role, loc, kind, h, n in inputs),
    )


def _short(h: str) -> str:
    return h.split(":", 1)[-1][:12]


def _pick(vs: list[Version], selector: str, which: str, location: str) -> Version:
    """A version by number (1 = oldest), content-hash prefix or prefix of the id of the run that wrote it."""
    listing = ", ".join(f"{v.number}={_short(v.content_hash)}" for v in vs)
    s = selector.strip()
    if s.isdigit():
        n = int(s)
        if 1 <= n <= len(vs):
            return vs[n - 1]
        raise DiffError(f"--{which} {selector}: {location} has versions 1 to {len(vs)} ({listing})")
    bare = s.split(":", 1)[-1].lower()
    hits = [
        v
        for v in vs
        if (len(bare) >= 4 and v.content_hash.split(":", 1)[-1].startswith(bare))
        or (v.writer is not None and len(bare) >= 4 and v.writer.run_id.startswith(bare))
    ]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise DiffError(
            f"--{which} {selector}: no version of {location} has that number, content hash or writing run "
            f"(at least 4 characters of a hash or run id); its versions: {listing}"
        )
    raise DiffError(
        f"--{which} {selector}: matches versions {', '.join(str(v.number) for v in hits)} of {location}; "
        "give more characters"
    )


def _flatten(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out or {prefix: []}
    return {prefix: value}


def _param_changes(before: dict, after: dict) -> list[Change]:
    a, b = _flatten(before), _flatten(after)
    missing = object()
    return [
        Change(k, a.get(k), b.get(k))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, missing) != b.get(k, missing)
    ]


def _input_changes(before: WriterRun, after: WriterRun) -> list[InputChange]:
    a = {(i.role, i.location): i for i in before.inputs}
    b = {(i.role, i.location): i for i in after.inputs}
    out = []
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key), b.get(key)
        if x is not None and y is not None and x.content_hash == y.content_hash:
            continue
        out.append(
            InputChange(
                key[0],
                key[1],
                x.content_hash if x else None,
                y.content_hash if y else None,
                x.row_count if x else None,
                y.row_count if y else None,
            )
        )
    return out


# ----- the data of a version -----


def content_identity(path: Path) -> str:
    """A path's content identity as the stages record it (``core.stage.Artifact.ref``): a file's SHA-256, a
    parts table's manifest's, another directory's listing fingerprint."""
    if (path / MANIFEST).is_file():
        return table_identity(path)[0]
    return fingerprint_dir(path) if path.is_dir() else "sha256:" + sha256_file(path)


def _data_of(v: Version, location: str, given: Path | None, which: str) -> tuple[Path | None, str | None]:
    """Where version ``v``'s bytes are (``given``, checked, else the location if it still holds them), or
    why they are not available."""
    if given is not None:
        given = Path(given)
        if not given.exists():
            raise DiffError(f"--{which}-data {given} does not exist")
        found = content_identity(given)
        if found != v.content_hash:
            raise DiffError(
                f"--{which}-data {given} is not version {v.number} of {location}: its content is {found}, "
                f"version {v.number} is {v.content_hash}"
            )
        return given, None
    loc = Path(location)
    if not loc.exists():
        return None, f"{location} no longer exists"
    found = content_identity(loc)
    if found == v.content_hash:
        return loc, None
    return None, (
        f"version {v.number} ({_short(v.content_hash)}) is no longer on disk: {location} now holds "
        f"{_short(found)}, and splsm keeps only the latest data of each output (the store records old "
        f"versions' hashes, not their rows); give a kept copy of it with --{which}-data"
    )


def _parquet_files(path: Path) -> list[str]:
    if path.is_file():
        return [str(path)]
    if (path / MANIFEST).is_file():  # a parts table: the parts its manifest names, not leftovers beside them
        return [str(p) for p in manifest_files(path)]
    return sorted(
        str(p)
        for p in path.rglob("*.parquet")
        if not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def _sql_list(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def row_diff(before: Path, after: Path, key: tuple[str, ...] | None, sample: int = 5) -> RowDiff:
    """Rows added, removed and changed from the Parquet data at ``before`` to that at ``after`` (files, or
    directories of parts), matched on ``key`` (or as whole rows when None)."""
    fa, fb = _parquet_files(before), _parquet_files(after)
    for path, files in ((before, fa), (after, fb)):
        if not files:
            raise DiffError(f"{path} holds no Parquet file: its rows cannot be compared")
    con = duckdb.connect()
    try:
        try:
            con.execute(
                f"CREATE TEMP VIEW a AS SELECT * FROM read_parquet({_sql_list(fa)}, union_by_name = true)"
            )
            con.execute(
                f"CREATE TEMP VIEW b AS SELECT * FROM read_parquet({_sql_list(fb)}, union_by_name = true)"
            )
            cols_a = {r[0]: r[1] for r in con.execute("DESCRIBE a").fetchall()}
            cols_b = {r[0]: r[1] for r in con.execute("DESCRIBE b").fetchall()}
        except duckdb.Error as e:
            raise DiffError(f"cannot read the Parquet data of {before} or {after}: {e}") from e
        if key:
            for path, cols in ((before, cols_a), (after, cols_b)):
                if missing := [k for k in key if k not in cols]:
                    raise DiffError(
                        f"{path} has no key column {', '.join(missing)}; its columns: {', '.join(cols)}"
                    )
            for name, path in (("a", before), ("b", after)):
                k = ", ".join(_q(c) for c in key)
                dup = con.execute(
                    f"SELECT {k}, count(*) AS n FROM {name} GROUP BY ALL HAVING count(*) > 1 ORDER BY n DESC LIMIT 1"
                ).fetchone()
                if dup:
                    raise DiffError(
                        f"{path}: key ({', '.join(key)}) is not unique: {dict(zip(key, dup[:-1], strict=True))} "
                        f"is on {dup[-1]} rows; give the columns that identify a row with --key"
                    )
        common = [c for c in cols_a if c in cols_b and (not key or c not in key)]
        n_a = con.execute("SELECT count(*) FROM a").fetchone()[0]
        n_b = con.execute("SELECT count(*) FROM b").fetchone()[0]

        def val(c: str, side: str = "") -> str:
            """A column as compared: as it is, or as text where the two versions store it in other types."""
            ref = f"{side}.{_q(c)}" if side else _q(c)
            return ref if cols_a[c] == cols_b[c] else f"CAST({ref} AS VARCHAR)"

        samples: dict[str, list[dict]] = {}
        if key:
            on = " AND ".join(f"a.{_q(k)} IS NOT DISTINCT FROM b.{_q(k)}" for k in key)
            kcols = ", ".join(_q(k) for k in key)
            order = ", ".join(_q(k) for k in key)

            def keys(sql: str) -> list[dict]:
                return [
                    dict(zip(key, r, strict=True))
                    for r in con.execute(sql + f" ORDER BY {order} LIMIT {int(sample)}").fetchall()
                ]

            added = con.execute(f"SELECT count(*) FROM b ANTI JOIN a ON {on}").fetchone()[0]
            removed = con.execute(f"SELECT count(*) FROM a ANTI JOIN b ON {on}").fetchone()[0]
            samples["added"] = keys(f"SELECT {kcols} FROM b ANTI JOIN a ON {on}")
            samples["removed"] = keys(f"SELECT {kcols} FROM a ANTI JOIN b ON {on}")
            differs = [f"{val(c, 'a')} IS DISTINCT FROM {val(c, 'b')}" for c in common]
            any_diff = " OR ".join(differs) or "false"
            per_col = ", ".join(f"sum(({d})::INT)" for d in differs)
            row = con.execute(
                f"SELECT count(*), count(*) FILTER (WHERE {any_diff}){', ' + per_col if per_col else ''} "
                f"FROM a JOIN b ON {on}"
            ).fetchone()
            matched, changed = row[0], row[1]
            changed_columns = {c: int(n or 0) for c, n in zip(common, row[2:], strict=True) if n}
            sel = ", ".join(f"a.{_q(k)}" for k in key)
            samples["changed"] = [
                dict(zip(key, r, strict=True))
                for r in con.execute(
                    f"SELECT {sel} FROM a JOIN b ON {on} WHERE {any_diff} ORDER BY {sel} LIMIT {int(sample)}"
                ).fetchall()
            ]
            unchanged = matched - changed
        else:
            cols = ", ".join(f"{val(c)} AS {_q(c)}" for c in common)
            only_b = f"(SELECT {cols} FROM b EXCEPT ALL SELECT {cols} FROM a)"
            only_a = f"(SELECT {cols} FROM a EXCEPT ALL SELECT {cols} FROM b)"
            added = con.execute(f"SELECT count(*) FROM {only_b}").fetchone()[0]
            removed = con.execute(f"SELECT count(*) FROM {only_a}").fetchone()[0]
            for name, q in (("added", only_b), ("removed", only_a)):
                cur = con.execute(f"SELECT * FROM {q} LIMIT {int(sample)}")
                names = [d[0] for d in cur.description]
                samples[name] = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
            changed, unchanged, changed_columns = None, None, {}
    finally:
        con.close()
    return RowDiff(
        before_source=str(before),
        after_source=str(after),
        key=key,
        before_rows=n_a,
        after_rows=n_b,
        added=added,
        removed=removed,
        changed=changed,
        unchanged=unchanged,
        changed_columns=changed_columns,
        columns_added=tuple(c for c in cols_b if c not in cols_a),
        columns_removed=tuple(c for c in cols_a if c not in cols_b),
        samples=samples,
    )


# ----- the diff -----


def diff_versions(
    store: LineageStore,
    path: str | os.PathLike,
    before: str | None = None,
    after: str | None = None,
    before_data: str | os.PathLike | None = None,
    after_data: str | os.PathLike | None = None,
    key: tuple[str, ...] | None = None,
    sample: int = 5,
) -> DatasetDiff:
    """What changed at ``path`` from version ``before`` to version ``after`` (default: the one before the
    latest, and the latest). Versions are given as ``_pick`` reads them: a number, or a prefix of a content
    hash or of the writing run's id. ``before_data`` / ``after_data``: kept copies of those versions' data."""
    location = str(Path(path).resolve())
    vs = versions(store, location)
    if not vs:
        raise DiffError(
            f"no versions recorded at {location}: no stage run read or wrote it (see splsm lineage runs)"
        )
    b = _pick(vs, after, "to", location) if after is not None else vs[-1]
    if before is not None:
        a = _pick(vs, before, "from", location)
    elif b.number > 1:
        a = vs[b.number - 2]
    else:
        raise DiffError(
            f"{location} has only {len(vs)} version(s) up to version {b.number}: nothing before it to compare "
            "with (give --from)"
        )
    notes: list[str] = []
    if a.number == b.number:
        notes.append("both sides are the same version")
    run_changes: list[Change] = []
    param_changes: list[Change] = []
    input_changes: list[InputChange] = []
    if a.writer and b.writer:
        if a.writer.run_id != b.writer.run_id:
            run_changes.append(Change("run_id", a.writer.run_id, b.writer.run_id))
        run_changes += [
            Change(f, a.writer.fields[f], b.writer.fields[f])
            for f in RUN_FIELDS
            if a.writer.fields[f] != b.writer.fields[f]
        ]
        param_changes = _param_changes(a.writer.params, b.writer.params)
        input_changes = _input_changes(a.writer, b.writer)
    else:
        for v in (a, b):
            if v.writer is None:
                notes.append(
                    f"version {v.number} was not written by a recorded run (only read, as an input): no run, "
                    "parameters or inputs to compare"
                )

    rows: RowDiff | None = None
    reason: str | None = None
    tableish = {a.kind, b.kind} <= {"table", "shards"}
    if not tableish and before_data is None and after_data is None:
        reason = f"a {b.kind} is not a table: only tables' rows are compared"
    else:
        da, why_a = _data_of(a, location, Path(before_data) if before_data else None, "from")
        db, why_b = _data_of(b, location, Path(after_data) if after_data else None, "to")
        if da is None or db is None:
            reason = "; ".join(w for w in (why_a, why_b) if w)
        else:
            k = key if key else TABLE_KEYS.get(b.schema_name or a.schema_name or "")
            rows = row_diff(da, db, k, sample)
            if k is None:
                notes.append(
                    "no key known for this table (give --key): rows compared whole, so a changed row "
                    "counts as one removed and one added"
                )
    return DatasetDiff(
        location=location,
        versions=tuple(vs),
        before=a,
        after=b,
        run_changes=run_changes,
        param_changes=param_changes,
        input_changes=input_changes,
        rows=rows,
        rows_unavailable=reason,
        notes=notes,
    )
