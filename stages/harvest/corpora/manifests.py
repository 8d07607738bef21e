"""Manifest files: the reference's ``{audio, text}`` JSONL, and generic JSONL/CSV/TSV with named columns.

Relative audio paths are relative to the corpus root; absolute ones must still lie inside it (the
harvest checks every resolved path). A row without a transcript (no ``text`` key, or no text column
configured) is audio for Whisper to label.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

from core.config import CorpusConfig
from stages.harvest.corpora.records import Candidate, Reject, decode, join, label, missing, stem


def _parse_audio_field(value: str) -> tuple[str, tuple[int, int] | None]:
    """``path`` or the reference's ``path:start_frame:num_frames`` (frames at the file's own rate)."""
    parts = value.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return parts[0], (int(parts[1]), int(parts[2]))
    return value, None


def json_lines(
    corpus: CorpusConfig, path: Path, lines: Iterable[bytes]
) -> Iterator[tuple[int, str, dict | Reject]]:
    """``(LINE, FILE:LINE, JSON object)`` for each non-blank line of ``lines`` (a file opened in binary, plain or
    gzip), or a reject naming the line that is not one."""
    for lineno, raw in enumerate(lines, start=1):
        source = f"{path}:{lineno}"
        if not raw.strip():
            continue
        line = decode(raw, corpus.name, source)
        if isinstance(line, Reject):
            yield lineno, source, line
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, source, Reject(corpus.name, source, None, "line", "bad_json", str(e))
            continue
        if not isinstance(obj, dict):
            reject = Reject(corpus.name, source, None, "line", "bad_json", "the line is not a JSON object")
            yield lineno, source, reject
            continue
        yield lineno, source, obj


def _jsonl_rows(corpus: CorpusConfig, manifest: Path) -> Iterator[tuple[str, dict | Reject]]:
    with open(manifest, "rb") as f:
        for _, source, item in json_lines(corpus, manifest, f):
            yield source, item


def read_reference(corpus: CorpusConfig) -> Iterator[Candidate | Reject]:
    """The reference's manifest: one JSON object per line, ``{"audio": PATH, "text": TRANSCRIPT}``."""
    manifest = Path(corpus.manifest)
    if not manifest.is_file():
        yield missing(corpus.name, manifest, "manifest")
        return
    split = corpus.split or manifest.stem
    for source, obj in _jsonl_rows(corpus, manifest):
        if isinstance(obj, Reject):
            yield obj
            continue
        if not isinstance(obj.get("audio"), str) or not obj["audio"]:
            yield Reject(corpus.name, source, None, "audio", "missing_field", "no 'audio' string in the row")
            continue
        path, frames = _parse_audio_field(obj["audio"])
        utt_id = label(obj.get("id")) or stem(path) + (f"_{frames[0]}" if frames else "")
        text = obj.get("text")
        if text is not None and not isinstance(text, str):
            yield Reject(
                corpus.name, source, utt_id, "text", "bad_value", f"'text' is a {type(text).__name__}"
            )
            continue
        yield Candidate(
            utt_id,
            corpus.name,
            split,
            join(corpus.root, path),
            text,
            label(obj.get("speaker")),
            source,
            frames=frames,
        )


def _table_rows(corpus: CorpusConfig, manifest: Path, fmt: str) -> Iterator[tuple[str, dict | Reject]]:
    # Decode line by line so one bad byte is one reject, not a crash (a quoted cell cannot span lines).
    delimiter = "\t" if fmt == "tsv" else ","
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    header: list[str] | None = None
    with open(manifest, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            source = f"{manifest}:{lineno}"
            line = decode(raw, corpus.name, source)
            if isinstance(line, Reject):
                yield source, line
                continue
            if not line.strip():
                continue
            try:
                fields = next(csv.reader([line.rstrip("\r\n")], delimiter=delimiter, quoting=quoting))
            except csv.Error as e:
                yield source, Reject(corpus.name, source, None, "line", "bad_row", str(e))
                continue
            if header is None:
                header = fields
                continue
            if len(fields) != len(header):
                yield (
                    source,
                    Reject(
                        corpus.name,
                        source,
                        None,
                        "line",
                        "bad_row",
                        f"{len(fields)} fields, the header has {len(header)}",
                    ),
                )
                continue
            yield source, dict(zip(header, fields, strict=True))


class _BadSeconds(ValueError):
    def __init__(self, column: str, detail: str):
        super().__init__(detail)
        self.column, self.detail = column, detail


def _seconds(obj: dict, column: str | None) -> float | None:
    """A column's value as seconds: None if the column is not configured or the cell is empty; a value that
    is not a finite number >= 0 (text, NaN, Infinity, a negative number) raises ``_BadSeconds``."""
    if not column or obj.get(column) in (None, ""):
        return None
    v = obj[column]
    try:
        if isinstance(v, bool):
            raise TypeError("a boolean")
        seconds = float(v)
    except (TypeError, ValueError):
        raise _BadSeconds(column, f"{column!r} is {v!r}, not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise _BadSeconds(column, f"{column!r} is {v!r}, not a finite number of seconds >= 0")
    return seconds


def read_generic(corpus: CorpusConfig) -> Iterator[Candidate | Reject]:
    """A JSONL, CSV or TSV manifest whose columns ``corpus.columns`` names."""
    manifest = Path(corpus.manifest)
    if not manifest.is_file():
        yield missing(corpus.name, manifest, "manifest")
        return
    fmt = corpus.format or {".csv": "csv", ".tsv": "tsv"}.get(manifest.suffix.lower(), "jsonl")
    cols = corpus.columns
    split = corpus.split or manifest.stem
    rows = _jsonl_rows(corpus, manifest) if fmt == "jsonl" else _table_rows(corpus, manifest, fmt)
    for source, obj in rows:
        if isinstance(obj, Reject):
            yield obj
            continue
        audio = obj.get(cols.audio)
        if not isinstance(audio, str) or not audio:
            yield Reject(
                corpus.name, source, None, cols.audio, "missing_field", f"no {cols.audio!r} in the row"
            )
            continue
        try:
            offset = _seconds(obj, cols.offset)
            duration = _seconds(obj, cols.duration)
        except _BadSeconds as e:
            yield Reject(corpus.name, source, None, e.column, "bad_value", e.detail)
            continue
        offset = 0.0 if offset is None else offset
        if duration is not None and duration == 0:
            yield Reject(
                corpus.name, source, None, cols.duration, "bad_value", f"{cols.duration!r} is 0 seconds"
            )
            continue
        # A column not configured is None, which no row holds as a key (JSON keys and CSV headers are strings):
        # obj.get(None) is None, so id, text and speaker need no test of whether their column is set.
        utt_id = label(obj.get(cols.id))
        if utt_id in (None, ""):
            utt_id = stem(audio) + (f"_{round(offset * 1000)}" if cols.offset and offset else "")
        text = obj.get(cols.text)
        if text is not None and not isinstance(text, str):
            who = utt_id if isinstance(utt_id, str) else None
            yield Reject(corpus.name, source, who, cols.text, "bad_value", f"a {type(text).__name__}")
            continue
        speaker = label(obj.get(cols.speaker))
        yield Candidate(
            utt_id,
            corpus.name,
            split,
            join(corpus.root, audio),
            text,
            None if speaker == "" else speaker,
            source,
            offset_s=offset,
            duration_s=duration,
        )
