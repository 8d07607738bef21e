"""Harvest: read ASR corpora in their own layouts into one transcripts table, and bad rows into rejects.

Readers (``stages.harvest.corpora``) yield candidate rows (or a reject); admission
(``stages.harvest.admission``) checks every candidate the same way without opening audio: the utterance
id must be new, the transcript non-empty, the audio path must resolve inside the declared corpus root
and the file must exist. The probe (``stages.harvest.probe``) then opens the new or changed files: the
file must decode and its duration must be inside the bounds. Each failure is a reject row with its
reason; the run always completes and prints the counts by reason.

Scale: readers stream, candidates go through in chunks with at most a few chunks in flight, and the
transcripts are written a row group at a time. The table is a parts table (``core.tables.PartsTable``): a
rerun writes only its new rows, as new parts, keeps every previous part whose rows all stay as it is,
rewrites the few parts that lost rows (a file deleted or changed), merges runs of small parts that
reruns left, and commits the new version by replacing the manifest. Rows a rerun adds therefore come after
the rows it keeps: a rerun's table holds the same rows as a cold run's, not in the same order, and the
stages that read it put it in utterance-id order (``core.tables.read_transcripts``). A rerun reads the
previous table a row group at a time, and only what it must (``stages.harvest.previous``). What grows with the corpus is the set of ids seen (duplicate
detection) and the previous table's id index. Probing and text normalization run in a process pool over
every core.

Incremental: every row records its audio file's size, mtime and SHA-256. A rerun lists the corpus
again but probes only files that are new or changed: same size and mtime is unchanged; same size
with another mtime is unchanged if the bytes hash the same. Readers that group candidates by
directory (LibriSpeech chapters, audio folders) also give a digest of the directory listing and its
transcripts: an unchanged directory's rows are copied from the previous table without looking at
one file. The reuse state beside the tables records those digests and the code and settings the
rows were made with; any change there and nothing is reused.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

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

from core.atomic import atomic_file, write_text
from core.codehash import code_hash
from core.config import CorpusConfig
from core.log import console
from core.paths import HarvestPaths
from core.tables import Part, PartsTable, manifest_hash, part_name, read_table, run_token, write_table
from schemas import REJECTS, TRANSCRIPTS, SchemaError, check, to_table
from stages.harvest.admission import Admission, Chunk, NewRow, PrevRows, file_fields
from stages.harvest.corpora import READERS
from stages.harvest.corpora.records import Candidate, Reject, Unit
from stages.harvest.previous import Previous
from stages.harvest.probe import probe_items, text_forms

CHUNK = 1024  # candidates per unit of work: large enough to amortize a process round trip
INLINE_LIMIT = 2048  # probe this many files in-process before starting workers (a small rerun needs none)
WARM_ROWS = 50_000  # a rerun over a previous table this large starts its workers at once (``Prober.warm``)
ROW_GROUP = 16384
PART_ROWS = 8 * ROW_GROUP  # rows per part: what a rerun rewrites when one of a part's rows goes
SMALL_PART = PART_ROWS // 4  # a rerun's own part is usually smaller; runs of such parts are merged
MERGE_RUN = 8  # ... once this many small parts follow each other


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
    cut: int = 0  # new rows whose audio was cut to max_duration_s (harvest.long_audio: cut)
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


def row_context(content_hash: bool, labeler, cut_s: float | None = None) -> str:
    """What every row depends on besides its own files: the code that made it and row-shaping settings
    (``cut_s``: the length long audio is cut to, None when it is rejected instead)."""
    cut = "" if cut_s is None else f"\0cut:{cut_s}"
    return f"{code_hash('stages.harvest')}\0{content_hash}\0{labeler.source if labeler else ''}{cut}"


class Prober:
    """Opens the files admission could not settle: in this process for small work, else in a process pool;
    then turns each chunk's results into rows (or rejects) and the chunk's part of the table."""

    def __init__(self, admission: Admission, workers: int, labeler, content_hash: bool):
        self.admission = admission
        self.workers = workers
        self.labeler = labeler
        self.content_hash = content_hash
        self.pool: ProcessPoolExecutor | None = None
        self.probed = 0
        self.transcribed = 0

    @staticmethod
    def _items(chunk: Chunk) -> list[tuple[str, str | None]]:
        return [(p.path, p.candidate.text_raw) for p in chunk.probes]

    def submit(self, chunk: Chunk) -> None:
        items = self._items(chunk)
        if not items:
            chunk.results = []
            return
        self.probed += len({path for path, _ in items})
        # in this process: small work, one core, or after the pool broke (``_no_pool``)
        if self.workers <= 1 or (self.pool is None and self.probed <= INLINE_LIMIT):
            chunk.results = probe_items(items, self.content_hash)
            return
        try:
            if self.pool is None:
                self._start()
            chunk.future = self.pool.submit(probe_items, items, self.content_hash)
        except (OSError, BrokenProcessPool) as e:
            self._no_pool(e)
            chunk.results = probe_items(items, self.content_hash)

    def _start(self) -> None:
        # forkserver: workers start from a clean process, not a fork of one that may hold threads (Prefect,
        # torch) and their locks.
        ctx = multiprocessing.get_context("forkserver")
        self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx)

    def warm(self) -> None:
        """Start the workers now, while this process lists the corpus: a large rerun's new files then find
        them ready (started and the normalizer built) instead of waiting for them at the end of the walk."""
        if self.workers <= 1 or self.pool is not None:
            return
        try:
            self._start()
            for _ in range(self.workers):
                self.pool.submit(text_forms, "warm up")
        except (OSError, BrokenProcessPool) as e:
            self._no_pool(e)

    def _no_pool(self, e: BaseException) -> None:
        console.print(f"[yellow]harvest[/]: worker processes failed ({e!r}); probing in this process")
        self.workers = 1  # chunks already in the pool fail too and are probed here; no new ones go there

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def finish(self, chunk: Chunk) -> pa.Table | None:
        """Turn a chunk's probe results into rows and rejects; returns its rows in reader order."""
        results = chunk.results
        if results is None:
            try:
                results = chunk.future.result()
            except BrokenProcessPool as e:  # e.g. a script fed on stdin: workers cannot import __main__
                self._no_pool(e)
                results = probe_items(self._items(chunk), self.content_hash)
        waiting = [e for e in chunk.entries if type(e) is NewRow and chunk.new_rows[e.pos] is None]
        to_label: list[tuple[NewRow, Candidate, dict]] = []
        for entry, probe, (res, (text, text_norm)) in zip(waiting, chunk.probes, results, strict=True):
            c = probe.candidate
            file = file_fields(probe.path, probe.size, probe.mtime_ns, res.sha256)
            if res.reason is not None:
                self._drop(chunk, entry, c, "audio", res.reason, res.detail, file)
                continue
            row = self._row(c, res.sample_rate_hz, res.num_frames, text, text_norm, file)
            if isinstance(row, tuple):
                self._drop(chunk, entry, c, "audio", *row, file)
                continue
            chunk.new_rows[entry.pos] = row
            if c.text_raw is None:
                to_label.append((entry, c, file))
        if to_label:
            self._label(chunk, to_label)
        return self._table(chunk)

    @staticmethod
    def _drop(chunk: Chunk, entry: NewRow, c: Candidate, field: str, reason: str, detail: str, file: dict):
        chunk.rejects.append(
            (Reject(c.corpus, c.source, c.utt_id, field, reason, detail, **file), entry.unit)
        )
        chunk.dropped.add(entry.pos)

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
        if self.admission.cut_long and duration > self.admission.max_s:
            duration = self.admission.max_s  # its first max_duration_s seconds, the transcript whole
            self.admission.cut += 1
        bound = self.admission.bounds(duration)
        if bound:
            return bound
        return dict(
            utt_id=c.utt_id,
            corpus=c.corpus,
            split=c.split,
            offset_s=offset,
            duration_s=duration,
            sample_rate_hz=sr,
            text_raw=c.text_raw,
            text=text,
            text_norm=text_norm,
            speaker=c.speaker,
            text_source="corpus",
            **file,
        )

    def _label(self, chunk: Chunk, todo: list[tuple[NewRow, Candidate, dict]]) -> None:
        """Whisper transcripts for the rows without one; a row Whisper cannot label becomes a reject."""
        from core import audio
        from stages.harvest.pseudolabel import WINDOW_S

        clips, keep = [], []
        for entry, c, file in todo:
            row = chunk.new_rows[entry.pos]
            if row["duration_s"] > WINDOW_S:
                detail = f"{row['duration_s']:.2f}s is longer than Whisper's {WINDOW_S:.0f}s window"
                self._drop(chunk, entry, c, "audio", "too_long", detail, file)
                continue
            try:
                clips.append(audio.load(row["audio_path"], row["offset_s"], row["duration_s"]))
                keep.append((entry, c, file))
            except audio.AudioError as e:
                self._drop(chunk, entry, c, "audio", e.reason, e.detail, file)
        for (entry, c, file), said in zip(keep, self.labeler.transcribe(clips), strict=True):
            if not said.strip():
                self._drop(
                    chunk, entry, c, "text", "empty_transcript", f"{self.labeler.source} heard no words", file
                )
                continue
            text, text_norm = text_forms(said)
            chunk.new_rows[entry.pos].update(
                text_raw=said, text=text, text_norm=text_norm, text_source=self.labeler.source
            )
            self.transcribed += 1

    @staticmethod
    def _table(chunk: Chunk) -> pa.Table | None:
        """The chunk's new rows in reader order (previous rows it keeps stay in their parts)."""
        rows = [
            chunk.new_rows[e.pos] for e in chunk.entries if type(e) is NewRow and e.pos not in chunk.dropped
        ]
        return to_table(rows, TRANSCRIPTS) if rows else None


class Spans:
    """Where each unit's rows are, as the run finds them: runs of previous rows (``kept``, by position in the
    previous table) and of new rows (by position among this run's new rows). Once the new table's layout is
    known (``finish``), a unit whose rows are one run of it can be taken over whole by the next run."""

    def __init__(self, prev_rows: int):
        self.kept = np.zeros(prev_rows, dtype=bool)  # previous rows this run keeps
        self.by_unit: dict[int, list[list]] = {}  # unit -> [[is_new, first, count], ...]
        self.before = np.zeros(0, dtype=np.int64)
        self.base = 0

    def add(self, unit: int, is_new: bool, first: int, n: int) -> None:
        if not is_new:
            self.kept[first : first + n] = True
        if unit < 0:
            return
        runs = self.by_unit.setdefault(unit, [])
        if runs and runs[-1][0] == is_new and runs[-1][1] + runs[-1][2] == first:
            runs[-1][2] += n
        else:
            runs.append([is_new, first, n])

    def finish(self) -> None:
        """Kept previous rows keep their order, and the new rows follow them (``finish_table``)."""
        self.before = np.cumsum(self.kept) - self.kept  # kept rows before each previous row
        self.base = int(self.kept.sum())

    def resolve(self, unit: int) -> tuple[int, int] | None:
        """(first row, rows) of a unit in the new table, if its rows are one run there."""
        first = end = None
        for is_new, f, n in self.by_unit.get(unit, []):
            start = self.base + f if is_new else int(self.before[f])
            if end is not None and start != end:
                return None
            first = start if first is None else first
            end = start + n
        return None if first is None else (first, end - first)


def account(admission: Admission, chunk: Chunk, first_new: int, spans: Spans, rejects: list[Reject]) -> None:
    """Per-unit row and reject counts, and where each unit's rows are (``Spans``)."""
    units = admission.units
    new = first_new
    for e in chunk.entries:
        if type(e) is PrevRows:
            spans.add(e.unit, False, e.first, e.count)
            n = e.count
        elif e.pos in chunk.dropped:
            continue
        else:
            spans.add(e.unit, True, new, 1)
            new, n = new + 1, 1
        if e.unit >= 0:
            units[e.unit].rows += n
    for r, unit in chunk.rejects:
        rejects.append(r)
        if unit >= 0:
            units[unit].rejects += 1


class PartWriter:
    """This run's new parts in the table's directory: ``PART_ROWS`` rows each, each written aside and renamed
    into place whole (fsynced), under names no other run uses; none is part of the table before the commit."""

    def __init__(self, directory: Path, token: str):
        self.dir, self.token = directory, token
        self.parts: list[Part] = []
        self.rows = 0
        self._n = 0
        self._open: list | None = None  # [atomic_file context, writer, name, rows, seconds]

    def write(self, t: pa.Table) -> None:
        while t.num_rows:
            if self._open is None:
                name = part_name(self.token, self._n)
                self._n += 1
                cm = atomic_file(self.dir / name)
                w = pq.ParquetWriter(cm.__enter__(), TRANSCRIPTS.with_metadata(), compression="zstd")
                self._open = [cm, w, name, 0, 0.0]
            head = t.slice(0, PART_ROWS - self._open[3])
            self._open[1].write_table(head, row_group_size=ROW_GROUP)
            self._open[3] += head.num_rows
            self._open[4] += pc.sum(head["duration_s"]).as_py() or 0.0
            self.rows += head.num_rows
            t = t.slice(head.num_rows)
            if self._open[3] >= PART_ROWS:
                self.cut()

    def cut(self) -> list[Part]:
        """End the part being written (the next row starts another); returns the parts written so far."""
        if self._open is not None:
            cm, w, name, _, secs = self._open
            self._open = None
            w.close()
            cm.__exit__(None, None, None)
            self.parts.append(PartsTable.describe(self.dir / name, secs))
        return self.parts

    def take(self) -> list[Part]:
        """The parts written since the last ``take``, the one being written ended."""
        parts, self.parts = self.cut(), []
        return parts

    def abort(self) -> None:
        """Remove what this run wrote: the part being written and every part it finished (none committed)."""
        if self._open is not None:
            cm, w, *_ = self._open
            self._open = None
            try:
                w.close()  # on a full disk its last flush fails too
            except OSError:
                pass
            try:
                cm.__exit__(RuntimeError, RuntimeError("harvest failed"), None)  # removes the temporary
            except RuntimeError:
                pass
        for f in self.dir.glob(f"part-{self.token}-*.parquet"):  # part_name's files of this run
            f.unlink(missing_ok=True)
        self.parts = []


def finish_table(prev: Previous, spans: Spans, new: list[Part], out: PartWriter) -> list[Part]:
    """The new version's parts, in order: each previous part whose rows all stay, as it is; one that lost rows,
    rewritten with the rest; then this run's new parts. Then every run of ``MERGE_RUN`` or more small parts
    that follow each other is merged (in order, so row positions stay as ``Spans`` counts them)."""
    parts: list[Part] = []
    if prev.file is not None:
        for p, (part, file) in enumerate(zip(prev.file.parts, prev.file.files(), strict=True)):
            lo = prev.part_starts[p]
            keep = spans.kept[lo : lo + part.rows]
            n = int(keep.sum())
            if n == part.rows:
                parts.append(part)
            elif n:
                t = read_table(file, TRANSCRIPTS).filter(pa.array(keep))
                out.write(t.cast(TRANSCRIPTS.with_metadata()))
                parts.extend(out.take())
    parts.extend(new)
    merged: list[Part] = []
    run: list[Part] = []

    def close_run() -> None:
        if len(run) >= MERGE_RUN:
            for r in run:
                out.write(read_table(out.dir / r.file, TRANSCRIPTS).cast(TRANSCRIPTS.with_metadata()))
            merged.extend(out.take())
        else:
            merged.extend(run)
        run.clear()

    for part in parts:
        if part.rows < SMALL_PART:
            run.append(part)
        else:
            close_run()
            merged.append(part)
    close_run()
    return merged


def reuse_state(admission: Admission, context: str, table: Path, spans: Spans) -> dict:
    """What the next run may take over: units without rejects whose rows are one run of the table, and the
    version of the table (its manifest) that positions refer to."""
    units = {}
    for i, u in enumerate(admission.units):
        if u.rows and not u.rejects and (where := spans.resolve(i)) is not None:
            units[u.key] = (u.digest, *where)
    return {"context": context, "table": manifest_hash(table), "units": units}


def _committed(tdir: Path) -> set[str]:
    """The part files the table's manifest names (none when there is no readable manifest)."""
    try:
        return {p.file for p in PartsTable.open(tdir, TRANSCRIPTS).parts}
    except (OSError, SchemaError):
        return set()


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
    out: HarvestPaths | str | os.PathLike,
    max_duration_s: float = 30.0,
    min_duration_s: float = 0.0,
    workers: int | None = None,
    whisper_checkpoint: str | Path | None = None,
    whisper_language: str | None = "en",
    whisper_batch_size: int = 8,
    content_hash: bool = True,
    whisper_max_tokens: int | None = None,
    long_audio: str = "reject",
) -> HarvestSummary:
    """Read every corpus, probe new or changed audio, write the transcripts and rejects tables.

    ``out``: the harvest paths (``WorkPaths.harvest``), or a folder to use as the harvest folder.
    """
    t0 = time.monotonic()
    paths = out if isinstance(out, HarvestPaths) else HarvestPaths(Path(out))
    labeler = None
    if whisper_checkpoint is not None:
        from stages.harvest.pseudolabel import labeler as make_labeler

        labeler = make_labeler(whisper_checkpoint, whisper_language, whisper_batch_size, whisper_max_tokens)
    cut = long_audio == "cut"
    context = row_context(content_hash, labeler, max_duration_s if cut else None)
    prev = Previous(paths, context)
    admission = Admission(
        prev, max_duration_s, min_duration_s, labeler.source if labeler else None, content_hash, cut
    )
    prober = Prober(admission, workers or len(os.sched_getaffinity(0)), labeler, content_hash)
    if len(prev) >= WARM_ROWS:
        prober.warm()
    s = HarvestSummary(0, 0, {}, 0.0)
    rejects: list[Reject] = []
    pending: deque[Chunk] = deque()
    buffered: list[pa.Table] = []
    # The previous reuse state stays: it names the version of the table it describes (its manifest's hash),
    # which stays the table's version until this run commits; a run that dies first costs the next nothing.
    paths.dir.mkdir(parents=True, exist_ok=True)
    tdir = paths.transcripts
    tdir.mkdir(exist_ok=True)
    # parts a killed run wrote but never committed are no part of the table
    PartsTable.sweep(tdir, {p.file for p in prev.file.parts} if prev.file is not None else _committed(tdir))
    spans = Spans(len(prev))
    out = PartWriter(tdir, run_token())
    try:
        with _progress() as bar:

            def flush(force: bool = False) -> None:
                nonlocal buffered
                if buffered and (force or sum(t.num_rows for t in buffered) >= ROW_GROUP):
                    t = pa.concat_tables(buffered)
                    check(t, TRANSCRIPTS, str(paths.transcripts))
                    out.write(t)
                    buffered = []

            new_rows = 0

            def emit(chunk: Chunk) -> None:
                nonlocal new_rows
                table = prober.finish(chunk)
                account(admission, chunk, new_rows, spans, rejects)
                if table is not None:
                    new_rows += table.num_rows
                    buffered.append(table)
                    flush()
                bar.advance(task, chunk.listed)

            expected = _estimate(corpora, len(prev) + len(prev.byte_rejects))
            task = bar.add_task("harvest", total=expected, expected=f"{expected:,}" if expected else "?")
            chunk = Chunk()

            def admit_all(items, corpus: CorpusConfig, root: str, unit: int) -> None:
                nonlocal chunk
                for item in items:
                    if isinstance(item, Unit):
                        if not admission.start_unit(item, corpus, chunk):
                            admit_all(item.items, corpus, root, len(admission.units) - 1)
                    elif isinstance(item, Reject):
                        admission.reject(item, chunk, unit)
                    else:
                        admission.admit(item, root, chunk, unit)
                    if chunk.listed >= CHUNK:
                        prober.submit(chunk)
                        pending.append(chunk)
                        chunk = Chunk()
                        while pending and (
                            len(pending) > 2 * prober.workers
                            or pending[0].future is None
                            or pending[0].future.done()
                        ):
                            emit(pending.popleft())

            for corpus in corpora:
                admit_all(READERS[corpus.kind](corpus), corpus, os.path.realpath(corpus.root), -1)
            prober.submit(chunk)
            pending.append(chunk)
            while pending:
                emit(pending.popleft())
            s.listed = int(bar.tasks[0].completed)
            bar.update(task, total=s.listed)
            flush(force=True)
        spans.finish()
        parts = finish_table(prev, spans, out.take(), out)
        # The rejects first, then the manifest: the commit of the new version. Only then the reuse state that
        # points at it, and the old version's parts go.
        write_table(to_table([r.row() for r in rejects], REJECTS), paths.rejects, REJECTS)
        PartsTable.commit(tdir, TRANSCRIPTS, parts)
    except BaseException:
        out.abort()
        raise
    finally:
        prober.close()
        prev.close()
    write_text(paths.reuse_state, json.dumps(reuse_state(admission, context, tdir, spans)))
    PartsTable.sweep(tdir, {p.file for p in parts})
    paths.legacy_transcripts.unlink(missing_ok=True)
    s.transcripts = sum(p.rows for p in parts)
    s.hours = sum(p.duration_s or 0.0 for p in parts) / 3600
    s.rejects = len(rejects)
    s.reject_counts = dict(Counter(r.reason for r in rejects).most_common())
    s.probed, s.reused, s.transcribed = prober.probed, admission.reused, prober.transcribed
    s.cut = admission.cut
    s.seconds = time.monotonic() - t0
    return s


def print_summary(s: HarvestSummary) -> None:
    from rich.table import Table

    console.print(
        f"harvest: {s.transcripts} transcripts ({s.hours * 60:.1f} min of audio), {s.rejects} rejects; "
        f"{s.listed} listed, {s.probed} files probed, {s.reused} reused from the previous run, "
        f"{s.transcribed} transcribed by Whisper, {s.seconds:.1f}s"
        + (f"; {s.cut} new clips cut to the duration bound (harvest.long_audio: cut)" if s.cut else "")
    )
    if s.reject_counts:
        t = Table("reject reason", "rows", title="rejects by reason")
        for reason, n in s.reject_counts.items():
            t.add_row(reason, str(n))
        console.print(t)
