"""Parquet tables on disk, checked against their schema (``schemas``) on every write and every read.

``write_table`` checks a table and writes it whole or not at all (``core.atomic``); ``read_table`` and
``open_table`` check a file against the schema the reader expects before anyone uses a row.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.atomic import atomic_file
from schemas import META_KEY, SchemaError, TableSchema, check


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


def open_table(path: str | os.PathLike, expected: TableSchema) -> pq.ParquetFile:
    """Open a Parquet table whose schema (columns, types, version) is the one the caller expects, without
    reading its rows: for a reader that goes a row group at a time. Non-null columns are checked per row
    group by whoever reads them (``check`` on the table read)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"table {expected.tag}: {path} does not exist")
    f = pq.ParquetFile(path)
    found = f.schema_arrow
    if (found.metadata or {}).get(META_KEY) is None:
        raise SchemaError(
            f"table {expected.tag} in {path}: schema version expected {expected.tag}, found none"
        )
    check(found, expected, str(path))
    return f


def read_table(path: str | os.PathLike, expected: TableSchema) -> pa.Table:
    """Read a Parquet table and check it against the schema the caller expects."""
    path = Path(path)
    open_table(path, expected).close()
    table = pq.read_table(path)
    check(table, expected, str(path))
    return table
