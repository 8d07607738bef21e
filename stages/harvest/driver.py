"""Harvest: read ASR corpora in their own layouts into one transcripts table, and bad rows into rejects.

Readers (``stages.harvest.corpora``) yield candidate rows (or a reject); admission
(``stages.harvest.admission``) checks every candidate the same way without opening audio: the utterance
id must be new, the transcript non-empty, the audio path must resolve inside the declared corpus root
and the file must exist. The probe (``stages.harvest.probe``) then opens the new or changed files: the
file must decode and its duration must be inside the bounds. Each failure is a reject row with its
reason; the run always completes and prints the counts by reason.

Scale: readers stream, candidates go through in chunks with at most a few chunks in flight, and the
transcripts are written a row group at a time. A rerun reads the previous table a row group at a time
too (``stages.harvest.previous``). What grows with the corpus is the set of ids seen (duplicate
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
from core.tables import write_table
from schemas import REJECTS, TRANSCRIPTS, check, to_table
from stages.harvest.admission import Admission, Chunk, NewRow, PrevRows, file_fields
from stages.harvest.corpora import READERS
from stages.harvest.corpora.records import Candidate, Reject, Unit
from stages.harvest.previous import Previous
from stages.harvest.probe import probe_items, text_forms

CHUNK = 1024  # candidates per unit of work: large enough to amortize a process round trip
INLINE_LIMIT = 2048  # probe this many files in-process before starting workers (a small rerun needs none)
ROW_GROUP = 16384


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
                # forkserver: workers start from a clean process, not a fork of one that may hold threads
                # (Prefect, torch) and their locks.
                ctx = multiprocessing.get_context("forkserver")
                self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx)
            chunk.future = self.pool.submit(probe_items, items, self.content_hash)
        except (OSError, BrokenProcessPool) as e:
            self._no_pool(e)
            chunk.results = probe_items(items, self.content_hash)

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

    def _table(self, chunk: Chunk) -> pa.Table | None:
        """The chunk's rows in reader order: runs of previous rows sliced (no copy), new rows built."""
        segments: list[PrevRows | list[dict]] = []  # adjacent runs of previous rows merged
        for e in chunk.entries:
            if type(e) is PrevRows:
                last = segments[-1] if segments else None
                if type(last) is PrevRows and last.first + last.count == e.first:
                    last.count += e.count
                else:
                    segments.append(PrevRows(e.first, e.count, -1))
            elif e.pos not in chunk.dropped:
                if not segments or type(segments[-1]) is not list:
                    segments.append([])
                segments[-1].append(chunk.new_rows[e.pos])
        if not segments:
            return None
        schema = TRANSCRIPTS.with_metadata()
        prev = self.admission.prev
        parts = [
            prev.rows(seg.first, seg.count).cast(schema)
            if type(seg) is PrevRows
            else to_table(seg, TRANSCRIPTS)
            for seg in segments
        ]
        return pa.concat_tables(parts)


def account(admission: Admission, chunk: Chunk, first_row: int, rejects: list[Reject]) -> None:
    """Per-unit row and reject counts, and where each unit's rows start in the output."""
    units = admission.units
    row = first_row
    for e in chunk.entries:
        n = e.count if type(e) is PrevRows else (0 if e.pos in chunk.dropped else 1)
        if e.unit >= 0 and n:
            u = units[e.unit]
            if u.first_row is None:
                u.first_row = row
            u.rows += n
        row += n
    for r, unit in chunk.rejects:
        rejects.append(r)
        if unit >= 0:
            units[unit].rejects += 1


def reuse_state(admission: Admission, context: str, table: Path, n_rows: int) -> dict:
    """What the next run may take over: units without rejects, and the table they index."""
    units = {
        u.key: (u.digest, u.first_row, u.rows)
        for u in admission.units
        if u.rows and not u.rejects and u.first_row is not None
    }
    st = table.stat()
    return {"context": context, "table": [n_rows, st.st_size, st.st_mtime_ns], "units": units}


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
    s = HarvestSummary(0, 0, {}, 0.0)
    rejects: list[Reject] = []
    pending: deque[Chunk] = deque()
    buffered: list[pa.Table] = []
    n_rows = 0
    # Clear the previous reuse state first: if this run dies half way, the next one must not trust it.
    paths.dir.mkdir(parents=True, exist_ok=True)
    paths.reuse_state.unlink(missing_ok=True)
    try:
        with (
            atomic_file(paths.transcripts) as tmp,
            _progress() as bar,
            pq.ParquetWriter(tmp, TRANSCRIPTS.with_metadata(), compression="zstd") as writer,
        ):

            def flush(force: bool = False) -> None:
                nonlocal buffered
                if buffered and (force or sum(t.num_rows for t in buffered) >= ROW_GROUP):
                    t = pa.concat_tables(buffered)
                    check(t, TRANSCRIPTS, str(paths.transcripts))
                    writer.write_table(t, row_group_size=ROW_GROUP)
                    buffered = []

            def emit(chunk: Chunk) -> None:
                nonlocal n_rows
                table = prober.finish(chunk)
                account(admission, chunk, n_rows, rejects)
                if table is not None:
                    n_rows += table.num_rows
                    s.hours += pc.sum(table["duration_s"]).as_py() / 3600
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
    finally:
        prober.close()
        prev.close()
    write_table(to_table([r.row() for r in rejects], REJECTS), paths.rejects, REJECTS)
    write_text(paths.reuse_state, json.dumps(reuse_state(admission, context, paths.transcripts, n_rows)))
    s.transcripts = n_rows
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
