"""The previous run's tables, as a rerun of harvest sees them: read a row group at a time, rows found by id.

A rerun keeps what it can of the previous transcripts table (a parts table: ``core.tables.PartsTable``): whole
units (a LibriSpeech chapter, an audio folder) whose listing digest is unchanged, as runs of row positions, and
single rows whose candidate and audio file are unchanged. Positions count rows across the parts in manifest
order. ``_reuse.json`` beside the tables (``HarvestPaths.reuse_state``) says which code and settings made the
rows (``context``), which version of the table it describes (its manifest's SHA-256) and where each unit's
rows are; any mismatch and nothing is taken over. Audio rejects that depend only
on a file's bytes (``BYTE_REJECTS``) are kept while the file is unchanged.

Memory stays bounded however many rows the previous table has: two row groups are cached (and a few single
columns: an unchanged unit needs only its ids and durations), and the index from utterance id to row holds a
64-bit hash per row, not the id.
"""

from __future__ import annotations

import bisect
import json
from collections import OrderedDict
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.log import console
from core.paths import HarvestPaths
from core.tables import PartsTable, manifest_hash, read_table
from schemas import REJECTS, TRANSCRIPTS, SchemaError

# Probe outcomes that depend on the file's bytes only: a rerun keeps such a reject while the file is unchanged.
BYTE_REJECTS = ("corrupt_audio", "empty_audio")

_id_hash = hash  # the previous table's id index keys; a test swaps in a weak one to force collisions


class PrevRow(NamedTuple):
    """The fields of a previous row that decide whether a candidate can keep it."""

    utt_id: str
    audio_path: str
    corpus: str
    split: str
    speaker: str | None
    text_source: str
    text_raw: str | None
    offset_s: float
    duration_s: float
    sample_rate_hz: int
    file_size: int | None
    file_mtime_ns: int | None
    file_sha256: str | None


_ROWS = object()  # key of a cached group's rows as PrevRow tuples, beside its columns by name


class Previous:
    """The previous run's tables, read a row group at a time: memory stays bounded however many rows it has.

    Rows are addressed by their position in the previous table. Unchanged units are runs of positions;
    other candidates are found by utterance id: the row after the last one found, else through an index
    of id hashes. Both mostly walk the table in order (readers list in the same order every run), so two
    cached row groups serve them.
    """

    CACHED_GROUPS = 2  # the group being checked and the one being copied out, when they differ

    def __init__(self, paths: HarvestPaths, context: str):
        self.file: PartsTable | None = None
        self.manifest: str | None = None  # the SHA-256 of the previous table's manifest
        self.num_rows = 0
        self.units: dict[str, tuple[str, int, int]] = {}
        self.byte_rejects: dict[str, tuple] = {}
        self.part_starts: list[int] = []  # first row of each part
        self._pfs: dict[int, pq.ParquetFile] = {}
        self._loc: list[tuple[int, int]] = []  # (part, row group in it) of each row group, in table order
        self._starts: list[int] = []  # first row of each row group
        self._groups: OrderedDict[int, tuple[pa.Table, dict[str, list]]] = OrderedDict()
        self._cols: OrderedDict[tuple[int, str], list] = OrderedDict()  # single columns of uncached groups
        self._last = -1  # the group used last: most lookups fall in it
        self._ends: list[int] = []  # one past the last row of each row group
        self._next = 0  # the row after the last one found by id
        self._hashes: np.ndarray | None = None  # utterance id hashes, sorted
        self._rows: np.ndarray | None = None  # the row of each hash
        self._taken = np.zeros(0, dtype=bool)  # rows taken over with their unit (``take``)
        t_path, r_path = paths.transcripts, paths.rejects
        try:
            state = json.loads(paths.reuse_state.read_text())
        except (OSError, ValueError):
            return
        if state.get("context") != context or not t_path.is_dir():
            return  # other code or settings made these rows (or an older layout holds them): make them again
        try:
            table = PartsTable.open(t_path, TRANSCRIPTS)
            rejects = read_table(r_path, REJECTS) if r_path.exists() else None
            if state.get("table") != manifest_hash(t_path):
                return  # the table was replaced since: its rows are not where the units say
            first = 0
            for p, file in enumerate(table.files()):
                self.part_starts.append(first)
                pf = self._pfs[p] = pq.ParquetFile(file)
                if pf.metadata.num_rows != table.parts[p].rows:
                    raise SchemaError(
                        f"{file} has {pf.metadata.num_rows} rows, its manifest says {table.parts[p].rows}"
                    )
                for g in range(pf.metadata.num_row_groups):
                    self._loc.append((p, g))
                    self._starts.append(first)
                    first += pf.metadata.row_group(g).num_rows
                    self._ends.append(first)
        except (SchemaError, OSError, pa.ArrowInvalid) as e:  # an older schema, or a damaged file
            console.print(f"[yellow]harvest[/]: previous tables not reusable ({e}); probing everything")
            self.close()
            self._loc, self._starts, self._ends, self.part_starts = [], [], [], []
            return
        self.file, self.num_rows, self.manifest = table, first, state["table"]
        self._taken = np.zeros(first, dtype=bool)
        self.units = {k: tuple(v) for k, v in state.get("units", {}).items()}
        if rejects is not None:
            mask = pc.is_in(rejects["reason"], pa.array(BYTE_REJECTS))
            for r in rejects.filter(mask).to_pylist():
                if r["audio_path"] and r["file_size"] is not None:
                    self.byte_rejects[r["audio_path"]] = (
                        r["file_size"],
                        r["file_mtime_ns"],
                        r["file_sha256"],
                        r["reason"],
                        r["detail"],
                    )

    def __len__(self) -> int:
        return self.num_rows

    def close(self) -> None:
        for pf in self._pfs.values():
            pf.close()
        self._pfs.clear()
        self._groups.clear()
        self._cols.clear()
        self._last = -1

    def _read(self, g: int, columns: list[str] | None = None) -> pa.Table:
        p, rg = self._loc[g]
        return self._pfs[p].read_row_group(rg, columns=columns)

    def _group(self, g: int) -> tuple[pa.Table, dict[str, list]]:
        if g == self._last:
            return self._groups[g]
        hit = self._groups.get(g)
        self._last = g
        if hit is not None:
            self._groups.move_to_end(g)
            return hit
        hit = self._groups[g] = (self._read(g), {})
        if len(self._groups) > self.CACHED_GROUPS:
            self._groups.popitem(last=False)
        return hit

    def _spans(self, first: int, n: int) -> Iterator[tuple[int, int, int]]:
        """(row group, offset in it, count) covering rows ``first`` to ``first + n``."""
        while n > 0:
            g = bisect.bisect_right(self._starts, first) - 1
            k = min(n, self._ends[g] - first)
            yield g, first - self._starts[g], k
            first, n = first + k, n - k

    def rows(self, first: int, n: int) -> pa.Table:
        """Rows ``first`` to ``first + n`` as a table (slices of the cached row groups, not copies)."""
        parts = [self._group(g)[0].slice(lo, k) for g, lo, k in self._spans(first, n)]
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    def _column(self, g: int, name: str) -> list:
        """Python values of a whole row group's column, made once per cached group; a group not cached is not
        read whole for one column (an unchanged unit needs its ids and durations only)."""
        hit = self._groups.get(g)
        if hit is None:
            col = self._cols.get((g, name))
            if col is None:
                col = self._cols[(g, name)] = self._read(g, [name]).column(0).to_pylist()
                if len(self._cols) > 4 * self.CACHED_GROUPS:
                    self._cols.popitem(last=False)
            return col
        table, cols = hit
        col = cols.get(name)
        if col is None:
            col = cols[name] = table.column(name).to_pylist()
        return col

    def row(self, i: int) -> PrevRow:
        """Row ``i``'s fields that decide whether a candidate can keep it."""
        g = self._last
        if not (g >= 0 and self._starts[g] <= i < self._ends[g]):
            g = bisect.bisect_right(self._starts, i) - 1
        table, cols = self._group(g)
        rows = cols.get(_ROWS)
        if rows is None:  # made once per cached group: a rerun of a manifest checks every row
            rows = cols[_ROWS] = list(
                map(PrevRow._make, zip(*(self._column(g, f) for f in PrevRow._fields), strict=True))
            )
        return rows[i - self._starts[g]]

    def find(self, utt_id: str) -> tuple[int, PrevRow] | None:
        """The previous row of an utterance id (position and fields): the row after the last one found, if
        the id is there (a reader lists in the same order every run), else through the index."""
        i = self._next
        r = self.row(i) if i < self.num_rows else None
        if r is None or r.utt_id != utt_id:
            i = self.index(utt_id)
            if i is None:
                return None
            r = self.row(i)
        self._next = i + 1
        return i, r

    def values(self, name: str, first: int, n: int) -> list:
        """Python values of one column over rows ``first`` to ``first + n``."""
        return [v for g, lo, k in self._spans(first, n) for v in self._column(g, name)[lo : lo + k]]

    def take(self, first: int, n: int) -> None:
        """Rows ``first`` to ``first + n`` go over to the new table with their unit (``Admission.start_unit``)."""
        self._taken[first : first + n] = True

    def index(self, utt_id: str) -> int | None:
        """The previous row of an utterance id, or None.

        The index holds each row's id hash, not the id: 12 bytes a row in two arrays, where a dict of ids
        took about 130 (a 3-million-row table's index takes 36 MB instead of about 370). Equal hashes are told
        apart by the id in the row itself. Rows already taken over with their unit when it is built are left
        out: their ids are among those the run has seen, so a candidate with one is a duplicate before it is
        looked up (``Admission.admit``). A rerun whose new files come after its unchanged units (new
        speakers, new chapters) reads no ids for it.
        """
        if self.file is None:
            return None
        if self._hashes is None:  # built on first use: a rerun of unchanged directories never needs it
            hashes, rows = [], []
            for g in range(len(self._loc)):
                lo, hi = self._starts[g], self._ends[g]
                free = ~self._taken[lo:hi]
                if not free.any():
                    continue
                ids = self._read(g, ["utt_id"]).column(0).filter(pa.array(free)).to_pylist()
                hashes.append(np.fromiter(map(_id_hash, ids), np.int64, len(ids)))
                rows.append(np.flatnonzero(free) + lo)
            hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.int64)
            rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
            order = np.argsort(hashes, kind="stable")
            self._hashes, self._rows = (
                hashes[order],
                rows[order].astype(np.uint32 if self.num_rows < 2**32 else np.int64),
            )
        h = _id_hash(utt_id)
        k = int(np.searchsorted(self._hashes, h))
        while k < len(self._hashes) and self._hashes[k] == h:
            i = int(self._rows[k])
            if self.row(i).utt_id == utt_id:
                return i
            k += 1
        return None
