"""Harvest: read ASR corpora in their own layouts into one transcripts table, and bad rows into rejects.

Readers (``stages.corpora``) yield candidate rows (or a reject); every candidate is then checked the
same way: the utterance id must be new, the transcript non-empty, the audio path must resolve inside
the declared corpus root, the file must exist and decode, its duration must be inside the bounds.
Each failure is a reject row with its reason; the run always completes and prints the counts by reason.

Scale: readers stream, candidates go through in chunks with at most a few chunks in flight, and the
transcripts are written a row group at a time. A rerun reads the previous table a row group at a time
too, and finds a row by an index of id hashes (12 bytes a row). What grows with the corpus is the set
of ids seen (duplicate detection) and that index. Probing and text normalization run in a process
pool over every core.

Incremental: every row records its audio file's size, mtime and SHA-256. A rerun lists the corpus
again but probes only files that are new or changed: same size and mtime is unchanged; same size
with another mtime is unchanged if the bytes hash the same. Readers that group candidates by
directory (LibriSpeech chapters, audio folders) also give a digest of the directory listing and its
transcripts: an unchanged directory's rows are copied from the previous table without looking at
one file. ``_reuse.json`` beside the tables records those digests and the code and settings the
rows were made with; any change there and nothing is reused. The lineage store records that a rerun
read the previous version of the table and wrote the new one.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import multiprocessing
import os
import stat
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from schemas import REJECTS, TRANSCRIPTS, SchemaError, check, open_table, read_table, to_table, write_table
from splsm.config import REPO_ROOT, CorpusConfig, ExperimentConfig
from splsm.log import console
from stages.corpora import CODE_FILES as READER_FILES
from stages.corpora import READERS, Candidate, Reject
from stages.corpora.probe import probe_items, sha256_of
from stages.corpora.records import Unit

CODE_FILES = [
    "stages/harvest.py",
    "stages/pseudolabel.py",
    *READER_FILES,
    "splsm/audio.py",
    "splsm/text.py",
    "schemas/__init__.py",
]

CHUNK = 1024  # candidates per unit of work: large enough to amortize a process round trip
INLINE_LIMIT = 2048  # probe this many files in-process before starting workers (a small rerun needs none)
ROW_GROUP = 16384
REUSE_FILE = "_reuse.json"

# Probe outcomes that depend on the file's bytes only: a rerun keeps such a reject while the file is unchanged.
BYTE_REJECTS = ("corrupt_audio", "empty_audio")


@dataclass
class HarvestSummary:
    transcripts: int
    rejects: int
    reject_counts: dict[str, int]
    hours: float
    listed: int = 0  # candidates and reader rejects seen
    probed: int = 0  # audio files opened and probed in this run
    reused: int = 0  # rows (and byte-level rejects) copied from the previous run unprobed
    transcribed: int = 0  # rows labelled by Whisper in this run
    seconds: float = 0.0


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:,.0f} utt/s")


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.fields[expected]}"),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _context(content_hash: bool, labeler) -> str:
    """What every row depends on besides its own files: the code that made it and row-shaping settings."""
    h = hashlib.sha256()
    for rel in sorted(CODE_FILES):
        h.update(rel.encode() + b"\0" + (REPO_ROOT / rel).read_bytes())
    h.update(f"{content_hash}\0{labeler.source if labeler else ''}".encode())
    return h.hexdigest()


_id_hash = hash  # the previous table's id index keys; a test swaps in a weak one to force collisions


class _PrevRow(NamedTuple):
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


_ROWS = object()  # key of a cached group's rows as _PrevRow tuples, beside its columns by name


class _Previous:
    """The previous run's tables, read a row group at a time: memory stays bounded however many rows it has.

    Rows are addressed by their position in the previous table. Unchanged units are runs of positions;
    other candidates are found by utterance id: the row after the last one found, else through an index
    of id hashes. Both mostly walk the table in order (readers list in the same order every run), so two
    cached row groups serve them.
    """

    CACHED_GROUPS = 2  # the group being checked and the one being copied out, when they differ

    def __init__(self, out_dir: Path, context: str):
        self.file: pq.ParquetFile | None = None
        self.num_rows = 0
        self.units: dict[str, tuple[str, int, int]] = {}
        self.byte_rejects: dict[str, tuple] = {}
        self._starts: list[int] = []  # first row of each row group
        self._groups: OrderedDict[int, tuple[pa.Table, dict[str, list]]] = OrderedDict()
        self._last = -1  # the group used last: most lookups fall in it
        self._ends: list[int] = []  # one past the last row of each row group
        self._next = 0  # the row after the last one found by id
        self._hashes: np.ndarray | None = None  # utterance id hashes, sorted
        self._rows: np.ndarray | None = None  # the row of each hash
        t_path, r_path = out_dir / "transcripts.parquet", out_dir / "rejects.parquet"
        try:
            state = json.loads((out_dir / REUSE_FILE).read_text())
        except (OSError, ValueError):
            return
        if state.get("context") != context or not t_path.exists():
            return  # other code or settings made these rows: make them again
        try:
            f = open_table(t_path, TRANSCRIPTS)
            rejects = read_table(r_path, REJECTS) if r_path.exists() else None
        except (SchemaError, OSError, pa.ArrowInvalid) as e:  # an older schema, or a damaged file
            console.print(f"[yellow]harvest[/]: previous tables not reusable ({e}); probing everything")
            return
        st = t_path.stat()
        if state.get("table") != [f.metadata.num_rows, st.st_size, st.st_mtime_ns]:
            return  # the table was replaced since: its rows are not where the units say
        self.file, self.num_rows = f, f.metadata.num_rows
        first = 0
        for g in range(f.metadata.num_row_groups):
            self._starts.append(first)
            first += f.metadata.row_group(g).num_rows
            self._ends.append(first)
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
        if self.file is not None:
            self.file.close()
        self._groups.clear()
        self._last = -1

    def _group(self, g: int) -> tuple[pa.Table, dict[str, list]]:
        if g == self._last:
            return self._groups[g]
        hit = self._groups.get(g)
        self._last = g
        if hit is not None:
            self._groups.move_to_end(g)
            return hit
        hit = self._groups[g] = (self.file.read_row_group(g), {})
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
        table, cols = self._group(g)
        col = cols.get(name)
        if col is None:  # Python values of a whole row group's column, made once per cached group
            col = cols[name] = table.column(name).to_pylist()
        return col

    def row(self, i: int) -> _PrevRow:
        """Row ``i``'s fields that decide whether a candidate can keep it."""
        g = self._last
        if not (g >= 0 and self._starts[g] <= i < self._ends[g]):
            g = bisect.bisect_right(self._starts, i) - 1
        table, cols = self._group(g)
        rows = cols.get(_ROWS)
        if rows is None:  # made once per cached group: a rerun of a manifest checks every row
            rows = cols[_ROWS] = list(
                map(_PrevRow._make, zip(*(self._column(g, f) for f in _PrevRow._fields), strict=True))
            )
        return rows[i - self._starts[g]]

    def find(self, utt_id: str) -> tuple[int, _PrevRow] | None:
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

    def index(self, utt_id: str) -> int | None:
        """The previous row of an utterance id, or None.

        The index holds each row's id hash, not the id: 12 bytes a row in two arrays, where a dict of ids
        took about 130 (a 3-million-row table's index takes 36 MB instead of about 370). Equal hashes are told
        apart by the id in the row itself.
        """
        if self.file is None:
            return None
        if self._hashes is None:  # built on first use: a rerun of unchanged directories never needs it
            hashes = np.empty(self.num_rows, dtype=np.int64)
            for g in range(self.file.metadata.num_row_groups):
                ids = self.file.read_row_group(g, columns=["utt_id"]).column(0).to_pylist()
                hashes[self._starts[g] : self._starts[g] + len(ids)] = np.fromiter(
                    map(_id_hash, ids), np.int64, len(ids)
                )
            order = np.argsort(hashes, kind="stable")
            self._hashes, self._rows = (
                hashes[order],
                order.astype(np.uint32 if len(order) < 2**32 else np.int64),
            )
        h = _id_hash(utt_id)
        k = int(np.searchsorted(self._hashes, h))
        while k < len(self._hashes) and self._hashes[k] == h:
            i = int(self._rows[k])
            if self.row(i).utt_id == utt_id:
                return i
            k += 1
        return None


@dataclass
class _Chunk:
    # ("prev", row, unit) | ("new", position in new_rows, unit) | ("slice", first row, unit, count)
    order: list[tuple] = field(default_factory=list)
    new_rows: list[dict | None] = field(default_factory=list)
    probes: list[tuple[Candidate, str, int, int]] = field(
        default_factory=list
    )  # candidate, path, size, mtime
    rejects: list[tuple[Reject, int]] = field(default_factory=list)  # with the unit it came from
    items: list[tuple[str, str | None]] = field(default_factory=list)
    dropped: set[int] = field(default_factory=set)  # new rows that became rejects
    future: Future | None = None
    results: list | None = None
    listed: int = 0


class _Harvester:
    def __init__(self, out_dir: Path, max_s: float, min_s: float, workers: int, labeler, content_hash: bool):
        self.max_s, self.min_s = max_s, min_s
        self.workers = workers
        self.labeler = labeler
        self.content_hash = content_hash
        self.context = _context(content_hash, labeler)
        self.prev = _Previous(out_dir, self.context)
        self.seen: dict[str, str | int] = {}  # utterance id -> where it came from (see ``_packed``)
        self._files: dict[str, int] = {}  # the files that sources name, numbered for ``_packed``
        self.rejects: list[Reject] = []
        self.pool: ProcessPoolExecutor | None = None
        self.summary = HarvestSummary(0, 0, {}, 0.0)
        # per unit: key, digest, first row, rows, rejects (a unit with no rejects can be taken over next time)
        self.units: list[list] = []
        self._dir_cache: dict[str, str] = {}
        self._settings: dict[int, str] = {}  # each corpus's settings as JSON, part of every unit's digest
        self._hash_cache: tuple[str, str] | None = None

    # ----- units: whole directories taken over from the previous run -----

    def start_unit(self, unit: Unit, corpus: CorpusConfig, chunk: _Chunk) -> bool:
        """Copy an unchanged unit's rows from the previous table; False if its candidates must be read."""
        # The corpus settings (split, text field, ...) shape the rows as much as the files do, and the
        # rows hold resolved paths: the unit's key is its directory's real path, so a directory now reached
        # through another link is another unit.
        key = f"{corpus.name}:{unit.key}"
        settings = self._settings.get(id(corpus))
        if settings is None:
            settings = self._settings[id(corpus)] = corpus.model_dump_json()
        sig = f"{settings}\0{unit.key}\0{unit.digest}"
        digest = hashlib.blake2b(sig.encode(), digest_size=16).hexdigest()
        self.units.append([key, digest, None, 0, 0])
        old = self.prev.units.get(key)
        if old is None or old[0] != digest or self.prev.file is None:
            return False
        _, first, n = old
        ids = self.prev.values("utt_id", first, n)
        if not self.seen.keys().isdisjoint(ids):  # a duplicate id: let the per-row path say which
            return False
        durations = self.prev.values("duration_s", first, n)
        if self._bounds(min(durations)) or self._bounds(max(durations)):
            return False
        self.seen.update(dict.fromkeys(ids, f"{unit.key} (unchanged since the previous run)"))
        chunk.order.append(("slice", first, len(self.units) - 1, n))
        self.summary.reused += n
        return True

    # ----- admission: everything decided without opening the audio -----

    def _packed(self, source: str) -> str | int:
        """``FILE:LINE`` as one int (file number << 40 | line), any other source as it is.

        ``seen`` holds a source for every id, only to say where a duplicate's first came from. As text a
        source took about 80 bytes a row, as an int 32: 3 million rows of a manifest hold 150 MB less.
        """
        file, sep, line = source.rpartition(":")
        if not (
            sep and line.isascii() and line.isdigit() and len(line) < 12 and (line[0] != "0" or line == "0")
        ):
            return source
        number = self._files.get(file)
        if number is None:
            number = self._files[file] = len(self._files)
        return number << 40 | int(line)

    def _where(self, packed: str | int) -> str:
        if isinstance(packed, str):
            return packed
        files = list(self._files)  # only for a duplicate: rare
        return f"{files[packed >> 40]}:{packed & (1 << 40) - 1}"

    def _resolve(self, path: str, root: str) -> tuple[str, os.stat_result | None, str | None]:
        """The real path, its stat (None if missing) and a reject reason, with one realpath per directory."""
        d, slash, name = path.rpartition("/")
        if slash and not d:
            d = "/"
        rd = self._dir_cache.get(d)
        if rd is None:
            if len(self._dir_cache) > 65536:
                self._dir_cache.clear()
            rd = self._dir_cache[d] = os.path.realpath(d)
        real = f"{rd}/{name}"
        try:
            st = os.lstat(real)
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(real)
                st = os.stat(real)
        except OSError:
            st = None
            real = os.path.realpath(real)
        if not (real.startswith(root + os.sep) or real == root):
            return real, st, "outside_root"
        if st is None or not stat.S_ISREG(st.st_mode):
            return real, None, "missing_audio"
        return real, st, None

    def _same_bytes(self, path: str, size: int, mtime: int, p_size, p_mtime, p_sha) -> bool:
        if size != p_size:
            return False
        if mtime == p_mtime:
            return True
        if not (self.content_hash and p_sha):
            return False
        if self._hash_cache is None or self._hash_cache[0] != path:
            self._hash_cache = (path, sha256_of(path))
        return self._hash_cache[1] == p_sha

    def _reusable(self, c: Candidate, real: str, st: os.stat_result) -> tuple[int, _PrevRow] | None:
        """The previous row of this candidate (its position and fields) if it can be kept as is."""
        found = self.prev.find(c.utt_id)
        if found is None:
            return None
        i, r = found
        if (r.audio_path, r.corpus, r.split, r.speaker) != (real, c.corpus, c.split, c.speaker):
            return None
        if c.text_raw is None:
            if self.labeler is None or r.text_source != self.labeler.source:
                return None
        elif r.text_source != "corpus" or r.text_raw != c.text_raw:
            return None
        if c.frames is not None:
            sr = r.sample_rate_hz
            if (r.offset_s, r.duration_s) != (c.frames[0] / sr, c.frames[1] / sr):
                return None
        elif r.offset_s != c.offset_s or (c.duration_s is not None and r.duration_s != c.duration_s):
            return None
        if not self._same_bytes(
            real, st.st_size, st.st_mtime_ns, r.file_size, r.file_mtime_ns, r.file_sha256
        ):
            return None
        return i, r

    def admit(self, c: Candidate, root: str, chunk: _Chunk, unit: int) -> None:
        def reject(field: str, reason: str, detail: str, **file) -> None:
            chunk.rejects.append((Reject(c.corpus, c.source, c.utt_id, field, reason, detail, **file), unit))

        if c.utt_id in self.seen:
            first = self._where(self.seen[c.utt_id])
            return reject("utt_id", "duplicate_utt_id", f"{c.utt_id} already came from {first}")
        self.seen[c.utt_id] = self._packed(c.source)
        if c.text_raw is not None and not c.text_raw.strip():
            return reject("text", "empty_transcript", "the transcript is empty")
        if c.text_raw is None and self.labeler is None:
            return reject(
                "text",
                "no_transcript",
                "the corpus has no transcript for this audio and harvest.whisper_checkpoint is not set",
            )
        real, st, why = self._resolve(c.audio_path, root)
        if why == "outside_root":
            return reject("audio", why, f"{c.audio_path} resolves to {real}, outside the corpus root {root}")
        if why == "missing_audio":
            return reject("audio", why, f"{real} does not exist", audio_path=real)
        found = self._reusable(c, real, st)
        if found is not None:
            i, r = found
            self.summary.reused += 1
            bound = self._bounds(r.duration_s)  # the bounds may have changed since
            if bound:
                return reject("audio", *bound, **self._file(real, st, r.file_sha256))
            if st.st_mtime_ns != r.file_mtime_ns:  # touched, same bytes: record the new mtime
                row = self.prev.rows(i, 1).to_pylist()[0]
                row["file_mtime_ns"] = st.st_mtime_ns
                chunk.order.append(("new", len(chunk.new_rows), unit))
                chunk.new_rows.append(row)
            else:
                chunk.order.append(("prev", i, unit))
            return
        old = self.prev.byte_rejects.get(real)
        if old is not None and self._same_bytes(real, st.st_size, st.st_mtime_ns, *old[:3]):
            self.summary.reused += 1
            return reject("audio", old[3], old[4], **self._file(real, st, old[2]))
        chunk.order.append(("new", len(chunk.new_rows), unit))
        chunk.new_rows.append(None)  # filled when the probe comes back
        chunk.probes.append((c, real, st.st_size, st.st_mtime_ns))

    @staticmethod
    def _file(real: str, st_or_size, sha: str | None, mtime: int | None = None) -> dict:
        if isinstance(st_or_size, os.stat_result):
            size, mtime = st_or_size.st_size, st_or_size.st_mtime_ns
        else:
            size = st_or_size
        return dict(audio_path=real, file_size=size, file_mtime_ns=mtime, file_sha256=sha)

    # ----- probing: in-process for small work, else in a process pool -----

    def submit(self, chunk: _Chunk) -> None:
        chunk.items = [(real, c.text_raw) for c, real, _, _ in chunk.probes]
        if not chunk.items:
            chunk.results = []
            return
        self.summary.probed += len({real for real, _ in chunk.items})
        # in this process: small work, one core, or after the pool broke (``_no_pool``)
        if self.workers <= 1 or (self.pool is None and self.summary.probed <= INLINE_LIMIT):
            chunk.results = probe_items(chunk.items, self.content_hash)
            return
        try:
            if self.pool is None:
                # forkserver: workers start from a clean process, not a fork of one that may hold threads
                # (Prefect, torch) and their locks.
                ctx = multiprocessing.get_context("forkserver")
                self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx)
            chunk.future = self.pool.submit(probe_items, chunk.items, self.content_hash)
        except (OSError, BrokenProcessPool) as e:
            self._no_pool(e)
            chunk.results = probe_items(chunk.items, self.content_hash)

    def _no_pool(self, e: BaseException) -> None:
        console.print(f"[yellow]harvest[/]: worker processes failed ({e!r}); probing in this process")
        self.workers = 1  # chunks already in the pool fail too and are probed here; no new ones go there

    def finish(self, chunk: _Chunk) -> pa.Table | None:
        """Turn a chunk's probe results into rows and rejects; returns its rows in reader order."""
        results = chunk.results
        if results is None:
            try:
                results = chunk.future.result()
            except BrokenProcessPool as e:  # e.g. a script fed on stdin: workers cannot import __main__
                self._no_pool(e)
                results = probe_items(chunk.items, self.content_hash)
        slots = [(e[1], e[2]) for e in chunk.order if e[0] == "new" and chunk.new_rows[e[1]] is None]
        to_label: list[tuple[int, int, Candidate, dict]] = []
        dropped: set[int] = set()
        for (pos, unit), (c, real, size, mtime), (res, (text, text_norm)) in zip(
            slots, chunk.probes, results, strict=True
        ):
            status, a, b, sha = res
            file = self._file(real, size, sha, mtime)
            if status == "err":
                chunk.rejects.append((Reject(c.corpus, c.source, c.utt_id, "audio", a, b, **file), unit))
                dropped.add(pos)
                continue
            row_or_reason = self._row(c, a, b, text, text_norm, file)
            if isinstance(row_or_reason, tuple):
                chunk.rejects.append(
                    (Reject(c.corpus, c.source, c.utt_id, "audio", *row_or_reason, **file), unit)
                )
                dropped.add(pos)
                continue
            chunk.new_rows[pos] = row_or_reason
            if c.text_raw is None:
                to_label.append((pos, unit, c, file))
        if to_label:
            dropped |= self._label(chunk, to_label)
        chunk.dropped = dropped
        return self._table(chunk, dropped)

    def _row(self, c: Candidate, sr: int, frames: int, text, text_norm, file: dict) -> dict | tuple[str, str]:
        file_s = frames / sr
        if c.frames is not None:  # frame counts are only seconds once the file's rate is known
            offset, duration = c.frames[0] / sr, c.frames[1] / sr
        else:
            offset = c.offset_s
            duration = file_s - offset if c.duration_s is None else c.duration_s
        if offset + duration > file_s + 1e-3:
            return "segment_out_of_range", f"segment ends at {offset + duration:.3f}s, file is {file_s:.3f}s"
        if duration <= 0:
            return "empty_audio", f"{file['audio_path']} has no samples at {offset:.3f}s"
        bound = self._bounds(duration)
        if bound:
            return bound
        return dict(
            utt_id=c.utt_id,
            corpus=c.corpus,
            split=c.split,
            audio_path=file["audio_path"],
            offset_s=offset,
            duration_s=duration,
            sample_rate_hz=sr,
            text_raw=c.text_raw,
            text=text,
            text_norm=text_norm,
            speaker=c.speaker,
            text_source="corpus",
            **{k: file[k] for k in ("file_size", "file_mtime_ns", "file_sha256")},
        )

    def _bounds(self, duration: float) -> tuple[str, str] | None:
        if duration > self.max_s:
            return "too_long", f"{duration:.2f}s is longer than the {self.max_s}s bound"
        if duration < self.min_s:
            return "too_short", f"{duration:.2f}s is shorter than the {self.min_s}s bound"
        return None

    def _label(self, chunk: _Chunk, todo: list[tuple[int, int, Candidate, dict]]) -> set[int]:
        """Whisper transcripts for the rows without one; returns the positions that became rejects."""
        from splsm import audio
        from stages.corpora.probe import text_forms
        from stages.pseudolabel import WINDOW_S

        dropped: set[int] = set()
        clips, keep = [], []

        def reject(pos, unit, c, field, reason, detail, file) -> None:
            chunk.rejects.append((Reject(c.corpus, c.source, c.utt_id, field, reason, detail, **file), unit))
            dropped.add(pos)

        for pos, unit, c, file in todo:
            row = chunk.new_rows[pos]
            if row["duration_s"] > WINDOW_S:
                detail = f"{row['duration_s']:.2f}s is longer than Whisper's {WINDOW_S:.0f}s window"
                reject(pos, unit, c, "audio", "too_long", detail, file)
                continue
            try:
                clips.append(audio.load(row["audio_path"], row["offset_s"], row["duration_s"]))
                keep.append((pos, unit, c, file))
            except audio.AudioError as e:
                reject(pos, unit, c, "audio", e.reason, e.detail, file)
        for (pos, unit, c, file), said in zip(keep, self.labeler.transcribe(clips), strict=True):
            if not said.strip():
                reject(
                    pos, unit, c, "text", "empty_transcript", f"{self.labeler.source} heard no words", file
                )
                continue
            text, text_norm = text_forms(said)
            chunk.new_rows[pos].update(
                text_raw=said, text=text, text_norm=text_norm, text_source=self.labeler.source
            )
            self.summary.transcribed += 1
        return dropped

    def _table(self, chunk: _Chunk, dropped: set[int]) -> pa.Table | None:
        """The chunk's rows in reader order: runs of previous rows sliced (no copy), new rows built."""
        segments: list[list] = []  # ["prev", first, count] (adjacent runs merged) | ["new", rows]
        for e in chunk.order:
            if e[0] in ("slice", "prev"):
                first, n = e[1], (e[3] if e[0] == "slice" else 1)
                last = segments[-1] if segments else None
                if last and last[0] == "prev" and last[1] + last[2] == first:
                    last[2] += n
                else:
                    segments.append(["prev", first, n])
            elif e[1] not in dropped:
                if not segments or segments[-1][0] != "new":
                    segments.append(["new", []])
                segments[-1][1].append(chunk.new_rows[e[1]])
        if not segments:
            return None
        schema = TRANSCRIPTS.with_metadata()
        parts = [
            self.prev.rows(seg[1], seg[2]).cast(schema) if seg[0] == "prev" else to_table(seg[1], TRANSCRIPTS)
            for seg in segments
        ]
        return pa.concat_tables(parts)

    def account(self, chunk: _Chunk, first_row: int) -> None:
        """Per-unit row and reject counts, and where each unit's rows start in the output."""
        row = first_row
        for e in chunk.order:
            n = e[3] if e[0] == "slice" else (0 if e[0] == "new" and e[1] in chunk.dropped else 1)
            u = e[2]
            if u >= 0 and n:
                if self.units[u][2] is None:
                    self.units[u][2] = row
                self.units[u][3] += n
            row += n
        for r, u in chunk.rejects:
            self.rejects.append(r)
            if u >= 0:
                self.units[u][4] += 1

    def reuse_state(self, table: Path, n_rows: int) -> dict:
        units = {
            k: (d, first, n) for k, d, first, n, rej in self.units if n and not rej and first is not None
        }
        st = table.stat()
        return {"context": self.context, "table": [n_rows, st.st_size, st.st_mtime_ns], "units": units}


def _estimate(corpora: list[CorpusConfig], prev: int) -> int | None:
    """Rows to expect, for the ETA: the previous run's count, or a manifest's line count."""
    if prev:
        return prev
    total = 0
    for c in corpora:
        path = c.manifest or (c.root / "metadata.csv" if c.kind == "ljspeech" else None)
        if path is None or not Path(path).is_file():
            return None
        with open(path, "rb") as f:
            total += sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    return total or None


def harvest(
    corpora: list[CorpusConfig],
    out_dir: Path,
    max_duration_s: float = 30.0,
    min_duration_s: float = 0.0,
    workers: int | None = None,
    whisper_checkpoint: str | Path | None = None,
    whisper_language: str | None = "en",
    whisper_batch_size: int = 8,
    content_hash: bool = True,
    whisper_max_tokens: int | None = None,
) -> HarvestSummary:
    """Read every corpus, probe new or changed audio, write ``transcripts.parquet`` and ``rejects.parquet``."""
    t0 = time.monotonic()
    out_dir = Path(out_dir)
    labeler = None
    if whisper_checkpoint is not None:
        from stages.pseudolabel import WhisperLabeler

        labeler = WhisperLabeler(whisper_checkpoint, whisper_language, whisper_batch_size, whisper_max_tokens)
    workers = workers or len(os.sched_getaffinity(0))
    h = _Harvester(out_dir, max_duration_s, min_duration_s, workers, labeler, content_hash)
    s = h.summary
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "transcripts.parquet"
    tmp = out_dir / f".transcripts.parquet.{os.getpid()}.tmp"
    writer = pq.ParquetWriter(tmp, TRANSCRIPTS.with_metadata(), compression="zstd")
    pending: deque[_Chunk] = deque()
    buffered: list[pa.Table] = []
    n_rows = 0

    def flush(force: bool = False) -> None:
        nonlocal buffered
        if buffered and (force or sum(t.num_rows for t in buffered) >= ROW_GROUP):
            t = pa.concat_tables(buffered)
            check(t, TRANSCRIPTS, str(final))
            writer.write_table(t, row_group_size=ROW_GROUP)
            buffered = []

    def emit(chunk: _Chunk) -> None:
        nonlocal n_rows
        table = h.finish(chunk)
        h.account(chunk, n_rows)
        if table is not None:
            n_rows += table.num_rows
            s.hours += pc.sum(table["duration_s"]).as_py() / 3600
            buffered.append(table)
            flush()
        bar.advance(task, chunk.listed)

    # Clear the previous reuse state first: if this run dies half way, the next one must not trust it.
    (out_dir / REUSE_FILE).unlink(missing_ok=True)
    try:
        with _progress() as bar:
            expected = _estimate(corpora, len(h.prev) + len(h.prev.byte_rejects))
            task = bar.add_task("harvest", total=expected, expected=f"{expected:,}" if expected else "?")
            chunk = _Chunk()

            def admit_all(items, corpus: CorpusConfig, root: str, unit: int) -> None:
                nonlocal chunk
                for item in items:
                    if isinstance(item, Unit):
                        if h.start_unit(item, corpus, chunk):
                            chunk.listed += chunk.order[-1][3]
                        else:
                            admit_all(item.items, corpus, root, len(h.units) - 1)
                    elif isinstance(item, Reject):
                        chunk.rejects.append((item, unit))
                        chunk.listed += 1
                    else:
                        h.admit(item, root, chunk, unit)
                        chunk.listed += 1
                    if chunk.listed >= CHUNK:
                        h.submit(chunk)
                        pending.append(chunk)
                        chunk = _Chunk()
                        while pending and (
                            len(pending) > 2 * h.workers
                            or pending[0].future is None
                            or pending[0].future.done()
                        ):
                            emit(pending.popleft())

            for corpus in corpora:
                admit_all(READERS[corpus.kind](corpus), corpus, os.path.realpath(corpus.root), -1)
            h.submit(chunk)
            pending.append(chunk)
            while pending:
                emit(pending.popleft())
            s.listed = int(bar.tasks[0].completed)
            bar.update(task, total=s.listed)
        flush(force=True)
        writer.close()
        os.replace(tmp, final)
    finally:
        if h.pool is not None:
            h.pool.shutdown(cancel_futures=True)
        h.prev.close()
        writer.close()
        tmp.unlink(missing_ok=True)
    write_table(to_table([r.row() for r in h.rejects], REJECTS), out_dir / "rejects.parquet", REJECTS)
    state_tmp = out_dir / f".{REUSE_FILE}.{os.getpid()}.tmp"
    state_tmp.write_text(json.dumps(h.reuse_state(final, n_rows)))
    os.replace(state_tmp, out_dir / REUSE_FILE)
    s.transcripts = n_rows
    s.rejects = len(h.rejects)
    s.reject_counts = dict(Counter(r.reason for r in h.rejects).most_common())
    s.seconds = time.monotonic() - t0
    return s


def print_summary(s: HarvestSummary) -> None:
    from rich.table import Table

    console.print(
        f"harvest: {s.transcripts} transcripts ({s.hours * 60:.1f} min of audio), {s.rejects} rejects; "
        f"{s.listed} listed, {s.probed} files probed, {s.reused} reused from the previous run, "
        f"{s.transcribed} transcribed by Whisper, {s.seconds:.1f}s"
    )
    if s.reject_counts:
        t = Table("reject reason", "rows", title="rejects by reason")
        for reason, n in s.reject_counts.items():
            t.add_row(reason, str(n))
        console.print(t)


def _checkpoint(cfg: ExperimentConfig) -> Path | None:
    ckpt = cfg.harvest.whisper_checkpoint
    if ckpt is None or ckpt.is_absolute() or cfg.source is None:
        return ckpt
    return (cfg.source.parent / ckpt).resolve()  # relative to the config file, like every config path


def run(cfg: ExperimentConfig, workdir: Path, force: bool = False):
    from splsm.lineage import LineageStore, lineage_path
    from splsm.stage import Artifact, run_stage

    out = Path(workdir) / "harvest"
    ckpt = _checkpoint(cfg)
    inputs = [Artifact(f"corpus:{c.name}", c.root, "corpus") for c in cfg.corpora]
    inputs += [Artifact(f"manifest:{c.name}", c.manifest, "file") for c in cfg.corpora if c.manifest]
    if ckpt is not None:
        inputs.append(Artifact("whisper_checkpoint", ckpt, "model"))
    previous = out / "transcripts.parquet"
    prev_ref = Artifact("previous_transcripts", previous, "table").ref() if previous.exists() else None

    def body() -> dict:
        h = cfg.harvest
        s = harvest(
            cfg.corpora,
            out,
            max_duration_s=h.max_duration_s,
            min_duration_s=h.min_duration_s,
            workers=h.workers,
            whisper_checkpoint=ckpt,
            whisper_language=h.whisper_language,
            whisper_batch_size=h.whisper_batch_size,
            content_hash=h.content_hash,
            whisper_max_tokens=h.whisper_max_tokens,
        )
        print_summary(s)
        return s.__dict__

    params = {
        "corpora": [c.model_dump(mode="json") for c in cfg.corpora],
        **cfg.harvest.model_dump(mode="json"),
    }
    result = run_stage(
        "harvest",
        workdir,
        params,
        inputs,
        [
            Artifact("transcripts", out / "transcripts.parquet", "table"),
            Artifact("rejects", out / "rejects.parquet", "table"),
        ],
        body,
        CODE_FILES,
        force,
    )
    if not result.reused and prev_ref is not None:
        # The previous table is an input of this run (its unchanged rows were copied), but not part of
        # the reuse key: otherwise every rerun would see a "new" input and never be reused.
        LineageStore(lineage_path(workdir)).finish_run(result.run_id, [prev_ref], [])
    return result
