"""Manifest files: the reference's ``{audio, text}`` JSONL, and generic JSONL/CSV/TSV with named columns.

Relative audio paths are relative to the corpus root; absolute ones must still lie inside it (the
harvest checks every resolved path). A row without a transcript (no ``text`` key, or no text column
configured) is audio for Whisper to label.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from core.config import CorpusConfig
from stages.harvest.corpora.records import Candidate, Reject, decode, join, missing, stem


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
        utt_id = obj.get("id") or stem(path) + (f"_{frames[0]}" if frames else "")
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
            obj.get("speaker"),
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
            offset = (
                float(obj[cols.offset]) if cols.offset and obj.get(cols.offset) not in (None, "") else 0.0
            )
            duration = (
                float(obj[cols.duration])
                if cols.duration and obj.get(cols.duration) not in (None, "")
                else None
            )
        except (TypeError, ValueError) as e:
            yield Reject(corpus.name, source, None, cols.offset or cols.duration, "bad_value", str(e))
            continue
        utt_id = obj.get(cols.id) if cols.id else None
        if not utt_id:
            utt_id = stem(audio) + (f"_{round(offset * 1000)}" if cols.offset and offset else "")
        text = obj.get(cols.text) if cols.text else None
        if text is not None and not isinstance(text, str):
            yield Reject(corpus.name, source, str(utt_id), cols.text, "bad_value", f"a {type(text).__name__}")
            continue
        speaker = obj.get(cols.speaker) if cols.speaker else None
        yield Candidate(
            str(utt_id),
            corpus.name,
            split,
            join(corpus.root, audio),
            text,
            str(speaker) if speaker not in (None, "") else None,
            source,
            offset_s=offset,
            duration_s=duration,
        )
