"""Harvest: read ASR corpora in their own layouts into one transcripts table, and bad rows into rejects.

Readers yield candidate rows (or a reject); every candidate is then checked the same way: the audio
path must resolve inside the declared corpus root, the file must exist and decode, its duration must
be inside the bounds, the transcript must be non-empty UTF-8, the utterance id must be new. Each
failure is a reject row with its reason; the run always completes and prints the counts by reason.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from schemas import REJECTS, TRANSCRIPTS, to_table, write_table
from splsm import audio
from splsm.config import CorpusConfig, ExperimentConfig
from splsm.log import console, progress
from splsm.stage import Artifact, StageResult, run_stage
from splsm.text import normalize, readable

CODE_FILES = ["stages/harvest.py", "splsm/audio.py", "splsm/text.py", "schemas/__init__.py"]


@dataclass(frozen=True)
class Candidate:
    """A row as a corpus reader found it, before its audio is probed."""

    utt_id: str
    corpus: str
    split: str
    audio_path: Path
    text_raw: str
    speaker: str | None
    source: str  # file:line, for error messages and rejects
    offset_s: float = 0.0
    duration_s: float | None = None  # None: to the end of the file
    frames: tuple[int, int] | None = None  # (start, count) in the file's own samples, as the reference writes


@dataclass(frozen=True)
class Reject:
    corpus: str
    source: str
    utt_id: str | None
    field: str
    reason: str
    detail: str

    def row(self) -> dict:
        return self.__dict__.copy()


def _decode(raw: bytes, corpus: str, source: str, utt_id: str | None) -> str | Reject:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Reject(corpus, source, utt_id, "text", "non_utf8_transcript", str(e))


def read_librispeech(corpus: CorpusConfig) -> Iterator[Candidate | Reject]:
    """LibriSpeech: ``SUBSET/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt`` next to ``*.flac``."""
    root = corpus.root
    if not root.is_dir():
        yield Reject(
            corpus.name, str(root), None, "root", "missing_corpus_root", f"{root} is not a directory"
        )
        return
    for trans in sorted(root.rglob("*.trans.txt")):
        chapter_dir = trans.parent
        speaker = chapter_dir.parent.name
        split = corpus.split or chapter_dir.parent.parent.name
        listed: set[str] = set()
        for lineno, raw in enumerate(trans.read_bytes().splitlines(), start=1):
            source = f"{trans}:{lineno}"
            line = _decode(raw, corpus.name, source, None)
            if isinstance(line, Reject):
                yield line
                continue
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            listed.add(utt_id)
            yield Candidate(utt_id, corpus.name, split, chapter_dir / f"{utt_id}.flac", text, speaker, source)
        for flac in sorted(chapter_dir.glob("*.flac")):
            if flac.stem not in listed:
                yield Reject(
                    corpus.name,
                    str(flac),
                    flac.stem,
                    "text",
                    "no_transcript",
                    f"{flac.name} has no line in {trans.name}",
                )


def _parse_audio_field(value: str) -> tuple[str, tuple[int, int] | None]:
    """``path`` or the reference's ``path:start_frame:num_frames`` (frames at the file's own rate)."""
    parts = value.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return parts[0], (int(parts[1]), int(parts[2]))
    return value, None


def read_jsonl(corpus: CorpusConfig) -> Iterator[Candidate | Reject]:
    """The reference's manifest: one JSON object per line, ``{"audio": PATH, "text": TRANSCRIPT}``.

    Relative audio paths are relative to the corpus root.
    """
    manifest = corpus.manifest
    if not manifest.is_file():
        yield Reject(
            corpus.name, str(manifest), None, "manifest", "missing_manifest", f"{manifest} does not exist"
        )
        return
    split = corpus.split or manifest.stem
    for lineno, raw in enumerate(manifest.read_bytes().splitlines(), start=1):
        source = f"{manifest}:{lineno}"
        if not raw.strip():
            continue
        line = _decode(raw, corpus.name, source, None)
        if isinstance(line, Reject):
            yield line
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield Reject(corpus.name, source, None, "line", "bad_json", str(e))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("audio"), str) or not obj["audio"]:
            yield Reject(corpus.name, source, None, "audio", "missing_field", "no 'audio' string in the row")
            continue
        path, frames = _parse_audio_field(obj["audio"])
        text = obj.get("text")
        utt_id = obj.get("id") or Path(path).stem + (f"_{frames[0]}" if frames else "")
        if not isinstance(text, str):
            yield Reject(
                corpus.name, source, utt_id, "text", "empty_transcript", "no 'text' string in the row"
            )
            continue
        audio_path = Path(path) if Path(path).is_absolute() else corpus.root / path
        yield Candidate(
            utt_id, corpus.name, split, audio_path, text, obj.get("speaker"), source, frames=frames
        )


READERS = {"librispeech": read_librispeech, "jsonl": read_jsonl}


def _check(c: Candidate, root: Path, max_s: float, min_s: float) -> dict | Reject:
    """Probe one candidate's audio and text; a reject carries the reason."""

    def reject(field: str, reason: str, detail: str) -> Reject:
        return Reject(c.corpus, c.source, c.utt_id, field, reason, detail)

    resolved = c.audio_path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        return reject("audio", "outside_root", f"{c.audio_path} resolves outside the corpus root {root}")
    text = c.text_raw.strip()
    if not text:
        return reject("text", "empty_transcript", "the transcript is empty")
    try:
        info = audio.probe(resolved)
    except audio.AudioError as e:
        return reject("audio", e.reason, e.detail)
    offset, duration = c.offset_s, c.duration_s
    if c.frames is not None:  # frame counts are only seconds once the file's rate is known
        offset, duration = c.frames[0] / info.sample_rate_hz, c.frames[1] / info.sample_rate_hz
    if duration is None:
        duration = info.duration_s - offset
    if offset + duration > info.duration_s + 1e-3:
        return reject(
            "audio",
            "segment_out_of_range",
            f"segment ends at {offset + duration:.3f}s, file is {info.duration_s:.3f}s",
        )
    if duration <= 0:
        return reject("audio", "empty_audio", f"{resolved} has no samples")
    if duration > max_s:
        return reject("audio", "too_long", f"{duration:.2f}s is longer than the {max_s}s bound")
    if duration < min_s:
        return reject("audio", "too_short", f"{duration:.2f}s is shorter than the {min_s}s bound")
    return dict(
        utt_id=c.utt_id,
        corpus=c.corpus,
        split=c.split,
        audio_path=str(resolved),
        offset_s=offset,
        duration_s=duration,
        sample_rate_hz=info.sample_rate_hz,
        text_raw=c.text_raw,
        text=readable(text),
        text_norm=normalize(text),
        speaker=c.speaker,
        text_source="corpus",
    )


@dataclass
class HarvestSummary:
    transcripts: int
    rejects: int
    reject_counts: dict[str, int]
    hours: float


def harvest(
    corpora: list[CorpusConfig],
    out_dir: Path,
    max_duration_s: float = 30.0,
    min_duration_s: float = 0.0,
    workers: int = 8,
) -> HarvestSummary:
    """Read every corpus, probe every file, write ``transcripts.parquet`` and ``rejects.parquet``."""
    rows: list[dict] = []
    rejects: list[Reject] = []
    seen: dict[str, str] = {}
    with progress() as bar, ThreadPoolExecutor(workers) as pool:
        for corpus in corpora:
            found = list(READERS[corpus.kind](corpus))
            task = bar.add_task(f"harvest {corpus.name}", total=len(found), status="")
            cands = [c for c in found if isinstance(c, Candidate)]
            rejects.extend(r for r in found if isinstance(r, Reject))
            bar.advance(task, len(found) - len(cands))
            check = partial(_check, root=corpus.root, max_s=max_duration_s, min_s=min_duration_s)
            for c, result in zip(cands, pool.map(check, cands), strict=True):
                bar.advance(task)
                if isinstance(result, Reject):
                    rejects.append(result)
                elif c.utt_id in seen:
                    rejects.append(
                        Reject(
                            c.corpus,
                            c.source,
                            c.utt_id,
                            "utt_id",
                            "duplicate_utt_id",
                            f"{c.utt_id} already came from {seen[c.utt_id]}",
                        )
                    )
                else:
                    seen[c.utt_id] = c.source
                    rows.append(result)
    write_table(to_table(rows, TRANSCRIPTS), out_dir / "transcripts.parquet", TRANSCRIPTS)
    write_table(to_table([r.row() for r in rejects], REJECTS), out_dir / "rejects.parquet", REJECTS)
    counts = dict(Counter(r.reason for r in rejects).most_common())
    return HarvestSummary(len(rows), len(rejects), counts, sum(r["duration_s"] for r in rows) / 3600)


def print_summary(s: HarvestSummary) -> None:
    from rich.table import Table

    console.print(
        f"harvest: {s.transcripts} transcripts ({s.hours * 60:.1f} min of audio), {s.rejects} rejects"
    )
    if s.reject_counts:
        t = Table("reject reason", "rows", title="rejects by reason")
        for reason, n in s.reject_counts.items():
            t.add_row(reason, str(n))
        console.print(t)


def run(cfg: ExperimentConfig, workdir: Path, force: bool = False) -> StageResult:
    out = Path(workdir) / "harvest"
    inputs = [Artifact(f"corpus:{c.name}", c.root, "corpus") for c in cfg.corpora]
    inputs += [Artifact(f"manifest:{c.name}", c.manifest, "file") for c in cfg.corpora if c.manifest]

    def body() -> dict:
        s = harvest(cfg.corpora, out, cfg.harvest.max_duration_s, cfg.harvest.min_duration_s)
        print_summary(s)
        return s.__dict__

    params = {"corpora": [c.model_dump(mode="json") for c in cfg.corpora], **cfg.harvest.model_dump()}
    return run_stage(
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
