"""A work directory's transcripts and examples as lhotse CutSets (``splsm export lhotse``).

Writes ``OUT/splsm_cuts_transcripts.jsonl.gz`` (one cut per row of the ``harvest/transcripts`` table) and
``OUT/splsm_cuts_examples.jsonl.gz`` (one cut per row of ``build/examples.parquet``), named as lhotse's recipes
name theirs (``PREFIX_cuts_PART``), so ``lhotse.load_manifest``, ``CutSet.from_file`` and NeMo's lhotse
dataloading read them as they are. Each cut is the row's segment of its audio file (``start`` = ``offset_s``)
with one supervision over the whole cut; what lhotse has no field for rides in the supervision's ``custom``:

- transcripts: ``text`` is the corpus's own transcript (``text_raw``, as lhotse's recipes keep it); custom holds
  ``corpus``, ``split``, ``text`` (the readable form the LLM was given), ``text_norm``, ``text_source``;
- examples: ``text`` is the example's transcript; custom holds ``example_id``, ``utt_id``, ``split``, ``task``,
  ``instruction``, ``answer``, and the prompt's ``prefix`` and ``suffix``.

A lhotse Recording states its file's rate and length, which the tables hold only for the segment: each audio
file's header is read once (``core.audio.probe``, the harvest's own probe). A file that is gone, or now shorter
than a row's segment, is an error naming the table, row and utterance: the cut would not load. The recording
id is the file's stem (made unique with a hash of the path when two files share a stem). The harvest downmixes
multi-channel files to mono; such a file becomes a MultiCut over all its channels, so lhotse loads the same
audio, one row per channel, for the user to mix the same way.

Tables are read a row group at a time and cuts written as they come: memory holds one row group and the
recordings seen. Each output file appears whole or not at all (``core.atomic``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from core import audio
from core.atomic import atomic_file
from core.paths import WorkPaths
from core.tables import row_groups
from schemas import EXAMPLES, TRANSCRIPTS, SchemaError, TableSchema

TOLERANCE_S = 1e-3  # the harvest's slack between a segment's end and its file's length
PREFIX = "splsm"


class ExportError(Exception):
    """The work directory cannot be exported: no outputs, a table of another shape, audio gone or changed."""


@dataclass
class LhotseExport:
    """What ``export_lhotse`` wrote: the cuts file of each table and its cut count, and what was not there."""

    files: dict[str, Path] = field(default_factory=dict)
    cuts: dict[str, int] = field(default_factory=dict)
    recordings: int = 0
    absent: dict[str, Path] = field(default_factory=dict)  # tables the work directory lacks


def cuts_file(out: str | os.PathLike, part: str) -> Path:
    """``OUT/splsm_cuts_PART.jsonl.gz``: where the cuts of ``part`` (transcripts or examples) go."""
    return Path(out) / f"{PREFIX}_cuts_{part}.jsonl.gz"


def export_lhotse(workdir: str | os.PathLike, out: str | os.PathLike) -> LhotseExport:
    """Write the work directory's transcripts and examples (those it has) as CutSets under ``out``."""
    try:
        import lhotse  # noqa: F401
    except ImportError as e:
        raise ExportError("splsm export lhotse writes through the lhotse package: pip install lhotse") from e
    paths = WorkPaths(workdir)
    tables = {
        "transcripts": (paths.harvest.transcripts, TRANSCRIPTS, _transcript_cut),
        "examples": (paths.build.examples, EXAMPLES, _example_cut),
    }
    result = LhotseExport(absent={k: p for k, (p, _, _) in tables.items() if not p.exists()})
    if len(result.absent) == len(tables):
        raise ExportError(
            f"{paths.root} has neither harvest transcripts ({paths.harvest.transcripts}) nor build examples "
            f"({paths.build.examples}): run `splsm harvest` (and `splsm build`) with --workdir {paths.root} first"
        )
    recordings = _Recordings()
    for part, (path, schema, make) in tables.items():
        if part in result.absent:
            continue
        target = cuts_file(out, part)
        n = 0
        with atomic_file(target) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
            for cut in _cuts(path, schema, make, recordings):
                f.write(json.dumps(cut.to_dict(), ensure_ascii=False) + "\n")
                n += 1
        result.files[part], result.cuts[part] = target, n
    result.recordings = len(recordings.by_path)
    return result


def _rows(path: Path, schema: TableSchema) -> Iterator[tuple[int, dict]]:
    """(row number from 0, row) of a table (a file or a parts table) checked against its schema, a row group
    at a time."""
    i = 0
    groups = row_groups(path, schema)
    while True:
        try:
            _, group = next(groups)
        except StopIteration:
            return
        except SchemaError as e:
            raise ExportError(f"{path} is not a {schema.tag} table: {e}") from e
        for row in group.to_pylist():
            yield i, row
            i += 1


class _Recordings:
    """One lhotse Recording per audio file, its header read once; ids unique across the export."""

    def __init__(self):
        self.by_path: dict[str, object] = {}
        self.ids: set[str] = set()

    def get(self, path: str, where: str):
        from lhotse import AudioSource, Recording

        rec = self.by_path.get(path)
        if rec is not None:
            return rec
        try:
            info = audio.probe(path)
        except audio.AudioError as e:
            raise ExportError(f"{where}: its audio cannot be read ({e.reason}): {e.detail}") from e
        rid = Path(path).stem
        if rid in self.ids:
            rid = f"{rid}-{hashlib.blake2b(path.encode(), digest_size=4).hexdigest()}"
        self.ids.add(rid)
        channels = list(range(info.num_channels))
        rec = self.by_path[path] = Recording(
            id=rid,
            sources=[AudioSource(type="file", channels=channels, source=path)],
            sampling_rate=info.sample_rate_hz,
            num_samples=info.num_frames,
            duration=info.num_frames / info.sample_rate_hz,
            channel_ids=channels,
        )
        return rec


def _cuts(path: Path, schema: TableSchema, make: Callable, recordings: _Recordings) -> Iterator:
    for i, row in _rows(path, schema):
        key = row.get("example_id") or row["utt_id"]
        where = f"{path} row {i} ({key}, audio {row['audio_path']})"
        rec = recordings.get(row["audio_path"], where)
        start, duration = row["offset_s"], row["duration_s"]
        if start + duration > rec.duration + TOLERANCE_S:
            raise ExportError(
                f"{where}: its segment ends at {start + duration:.3f}s, the file now lasts {rec.duration:.3f}s "
                "(changed since the harvest?)"
            )
        yield make(row, rec)


def _cut(cut_id: str, row: dict, rec, text: str, custom: dict):
    """The row's segment of ``rec`` with one supervision over all of it (a MultiCut for a multi-channel file)."""
    from lhotse import MonoCut, MultiCut, SupervisionSegment

    channel = rec.channel_ids[0] if len(rec.channel_ids) == 1 else list(rec.channel_ids)
    sup = SupervisionSegment(
        id=cut_id,
        recording_id=rec.id,
        start=0.0,
        duration=row["duration_s"],
        channel=channel,
        text=text,
        speaker=row["speaker"],
        custom=custom,
    )
    cls = MonoCut if isinstance(channel, int) else MultiCut
    return cls(
        id=cut_id,
        start=row["offset_s"],
        duration=row["duration_s"],
        channel=channel,
        supervisions=[sup],
        recording=rec,
    )


def _transcript_cut(row: dict, rec):
    custom = {k: row[k] for k in ("corpus", "split", "text", "text_norm", "text_source")}
    return _cut(row["utt_id"], row, rec, row["text_raw"], custom)


def _example_cut(row: dict, rec):
    keys = ("example_id", "utt_id", "split", "task", "instruction", "answer", "prefix", "suffix")
    return _cut(row["example_id"], row, rec, row["transcript"], {k: row[k] for k in keys})
