"""Parquet tables on disk, checked against their schema (``schemas``) on every write and every read.

A table is one Parquet file, or a directory of parts with a manifest (``PartsTable``): the manifest,
``DIR/_manifest.json``, is the table's one entry point. It lists the parts in order with each one's rows,
bytes and SHA-256, and a writer commits a new version of the table by replacing the manifest (atomically,
fsynced) after the parts it names are on disk. A part is never rewritten in place: a new version names new
files, so a reader holding the old manifest keeps reading whole, consistent parts. Files in the directory that
the manifest does not name (the parts of a killed writer, or of a version since replaced) are not part of the
table; ``PartsTable.sweep`` removes them. pyarrow, pandas and DuckDB can read the directory directly too
(``_``- and ``.``-prefixed names are not data to them), as long as no writer is half way.

``write_table`` checks a table and writes it whole or not at all (``core.atomic``); ``read_table`` and
``open_table`` check a file against the schema the reader expects before anyone uses a row; ``row_groups``
walks either layout a row group at a time; ``table_identity`` is the content hash lineage records.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.atomic import atomic_file, write_text
from core.digest import sha256_file
from schemas import META_KEY, SchemaError, TableSchema, check

MANIFEST = "_manifest.json"
MANIFEST_VERSION = 1


def write_table(
    table: pa.Table, path: str | os.PathLike, expected: TableSchema, row_group_size: int = 2048
) -> Path:
    """Check ``table`` and write it as Parquet, whole or not at all (write aside, then rename)."""
    path = Path(path)
    check(table, expected, str(path))
    table = table.select(expected.schema.names).cast(expected.with_metadata())
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
    return path


def _open_file(path: Path, expected: TableSchema, where: str | None = None) -> pq.ParquetFile:
    where = where or str(path)
    try:
        f = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise SchemaError(f"table {expected.tag} in {where}: not a readable Parquet file ({e})") from e
    found = f.schema_arrow
    if (found.metadata or {}).get(META_KEY) is None:
        f.close()
        raise SchemaError(
            f"table {expected.tag} in {where}: schema version expected {expected.tag}, found none"
        )
    check(found, expected, where)
    return f


def open_table(path: str | os.PathLike, expected: TableSchema) -> pq.ParquetFile:
    """Open a one-file Parquet table whose schema (columns, types, version) is the one the caller expects,
    without reading its rows: for a reader that goes a row group at a time. Non-null columns are checked per
    row group by whoever reads them (``check`` on the table read). A parts table: ``PartsTable.open``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"table {expected.tag}: {path} does not exist")
    if path.is_dir():
        raise SchemaError(f"table {expected.tag}: {path} is a parts table; open it with PartsTable")
    return _open_file(path, expected)


def read_table(path: str | os.PathLike, expected: TableSchema) -> pa.Table:
    """Read a Parquet table (a file, or a parts table through its manifest) and check it against the schema
    the caller expects."""
    path = Path(path)
    if path.is_dir():
        return PartsTable.open(path, expected).read()
    with open_table(path, expected) as f:
        table = f.read()  # not pq.read_table: that imports pyarrow.dataset, a third of a second
    check(table, expected, str(path))
    return table


def row_groups(path: str | os.PathLike, expected: TableSchema) -> Iterator[tuple[str, pa.Table]]:
    """(where, row group) over a table of either layout, in order, each group checked (its nulls)."""
    path = Path(path)
    files = PartsTable.open(path, expected).files() if path.is_dir() else [path]
    for file in files:
        with _open_file(file, expected) as f:
            for g in range(f.num_row_groups):
                group = f.read_row_group(g)
                check(group, expected, f"{file} row group {g}")
                yield f"{file} row group {g}", group


def table_identity(path: str | os.PathLike) -> tuple[str, str | None, int | None]:
    """(content hash, schema tag, rows) of a table as lineage records it: a file's SHA-256, or for a parts
    table its manifest's (which holds every part's SHA-256: the same parts give the same hash, and nothing
    needs reading but the manifest)."""
    path = Path(path)
    if path.is_dir():
        m = path / MANIFEST
        if not m.is_file():
            raise FileNotFoundError(
                f"{path} is a directory without {MANIFEST}: no committed version of a table"
            )
        data = json.loads(m.read_text())
        return "sha256:" + sha256_file(m), data.get("schema"), data.get("rows")
    meta = pq.read_metadata(path)
    tag = (meta.schema.to_arrow_schema().metadata or {}).get(META_KEY, b"").decode() or None
    return "sha256:" + sha256_file(path), tag, meta.num_rows


@dataclass(frozen=True)
class Part:
    """One part of a parts table: its file name in the table's directory, and what the manifest records."""

    file: str
    rows: int
    bytes: int
    sha256: str
    duration_s: float | None = None  # the sum of a ``duration_s`` column, where the table has one


class PartsTable:
    """A table stored as Parquet parts in a directory, with ``_manifest.json`` as its one entry point."""

    def __init__(self, path: Path, expected: TableSchema, parts: list[Part]):
        self.path, self.expected, self.parts = Path(path), expected, parts

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @classmethod
    def open(cls, path: str | os.PathLike, expected: TableSchema) -> PartsTable:
        """The table as its manifest describes it, checked: the schema version, and every part present with
        the size the manifest records (a part's schema is checked when it is read)."""
        path = Path(path)
        m = path / MANIFEST
        if not m.exists():
            if not path.exists():
                raise FileNotFoundError(f"table {expected.tag}: {path} does not exist")
            raise SchemaError(f"table {expected.tag} in {path}: no {MANIFEST}, so no committed version")
        try:
            data = json.loads(m.read_text())
            tag, entries = data["schema"], data["parts"]
            parts = [Part(**e) for e in entries]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SchemaError(f"table {expected.tag}: {m} is not a readable manifest ({e!r})") from e
        if tag != expected.tag:
            raise SchemaError(
                f"table {expected.tag} in {path}: schema version expected {expected.tag}, found {tag}"
            )
        for p in parts:
            f = path / p.file
            try:
                size = f.stat().st_size
            except OSError:
                raise SchemaError(f"table {expected.tag}: {m} names {p.file}, which is missing") from None
            if size != p.bytes:
                raise SchemaError(f"table {expected.tag}: {f} has {size} bytes, the manifest says {p.bytes}")
        return cls(path, expected, parts)

    def files(self) -> list[Path]:
        return [self.path / p.file for p in self.parts]

    def read(self, columns: list[str] | None = None) -> pa.Table:
        tables = []
        for file in self.files():
            with _open_file(file, self.expected) as f:
                t = f.read(columns=columns)
            if columns is None:
                check(t, self.expected, str(file))
            tables.append(t)
        if not tables:
            schema = self.expected.with_metadata()
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        return pa.concat_tables(tables)

    @staticmethod
    def describe(file: Path, duration_s: float | None = None) -> Part:
        """The manifest entry of a part file written in the table's directory (``duration_s``: the sum of
        its ``duration_s`` column, where the table has one and the writer counted it)."""
        return Part(
            file.name, pq.read_metadata(file).num_rows, file.stat().st_size, sha256_file(file), duration_s
        )

    @staticmethod
    def commit(path: str | os.PathLike, expected: TableSchema, parts: list[Part]) -> Path:
        """Make ``parts`` (already on disk, fsynced, in ``path``) the table's version: the manifest is written
        aside, fsynced and renamed into place, so a reader sees the old version or the new one whole."""
        path = Path(path)
        data = {
            "version": MANIFEST_VERSION,
            "schema": expected.tag,
            "rows": sum(p.rows for p in parts),
            "parts": [asdict(p) for p in parts],
        }
        return write_text(path / MANIFEST, json.dumps(data, indent=1) + "\n")

    @staticmethod
    def sweep(path: str | os.PathLike, keep: set[str]) -> list[Path]:
        """Remove the ``*.parquet`` files in ``path`` that the committed manifest does not name (``keep``) and
        that no live run may still commit: a part whose name says its writer (``run_token``) is alive on this
        host, or was written on another host less than a day ago, is left alone (the stage lock already keeps
        two runs of a stage apart; this keeps a writer that got past it, or a tool of its own, whole)."""
        gone = []
        for f in Path(path).glob("*.parquet"):
            if f.name in keep or _writer_live(f):
                continue
            f.unlink(missing_ok=True)
            gone.append(f)
        return gone


def _writer_live(part: Path) -> bool:
    """Whether the run that wrote a part (named by ``part_name``) may still be at work."""
    from core.atomic import FOREIGN_STALE_S, HOST_ID, _alive

    fields = part.name.split("-")  # part-TIME-PID-hHOST-RANDOM-N.parquet; older names lack PID and HOST
    if len(fields) != 6 or not fields[2].isdigit() or not fields[3].startswith("h"):
        return False
    pid, host = int(fields[2]), fields[3][1:]
    if host != HOST_ID:
        try:
            return time.time() - part.stat().st_mtime < FOREIGN_STALE_S
        except OSError:
            return False
    return pid != os.getpid() and _alive(pid)


def part_name(token: str, n: int) -> str:
    """A new part's file name: unique to the writing run (``token``), numbered in write order."""
    return f"part-{token}-{n:05d}.parquet"


def run_token() -> str:
    """A token that names one run's new parts: time-ordered, unique across processes and hosts, and naming
    its writer (pid and host, as ``core.atomic``'s temporaries do) so that a sweep can tell a live run's."""
    import uuid

    from core.atomic import HOST_ID

    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-h{HOST_ID}-{uuid.uuid4().hex[:8]}"


def manifest_hash(path: str | os.PathLike) -> str | None:
    """SHA-256 of a parts table's manifest (what names one version of it), or None when there is none."""
    try:
        return hashlib.sha256((Path(path) / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return None


def manifest_files(path: str | os.PathLike) -> list[Path]:
    """The part files a parts table's manifest names, in order, whatever its schema (for tools that compare
    any table, such as ``core.lineage.diff``)."""
    path = Path(path)
    return [path / e["file"] for e in json.loads((path / MANIFEST).read_text())["parts"]]


def read_transcripts(path: str | os.PathLike) -> pa.Table:
    """The harvest's transcripts table in utterance-id order: the order the stages that read it work in, so
    that the same rows give the same requests, examples and splits whether one cold harvest wrote the table
    or a chain of incremental reruns did (a rerun's new rows come after those it kept)."""
    from schemas import TRANSCRIPTS

    table = read_table(path, TRANSCRIPTS)
    return table.sort_by("utt_id") if table.num_rows > 1 else table
