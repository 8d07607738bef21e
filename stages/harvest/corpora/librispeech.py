"""LibriSpeech: ``SUBSET/SPEAKER/CHAPTER/*.flac`` next to ``SPEAKER-CHAPTER.trans.txt``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from core.config import CorpusConfig
from stages.harvest.corpora.listing import digest, walk
from stages.harvest.corpora.records import Candidate, Reject, Unit, decode, missing


def read(corpus: CorpusConfig) -> Iterator[Candidate | Reject | Unit]:
    root = Path(corpus.root)
    if not root.is_dir():
        yield missing(corpus.name, root, "corpus root")
        return
    # One chapter directory at a time: a 3-million-file corpus is never listed into memory whole. The
    # chapter's digest covers its listing, the transcript files' size and mtime with the rest (the rule the
    # harvest applies to audio files too), so an unchanged chapter is taken over without reading a byte of
    # it: the transcripts are read only when its candidates are.
    for dirpath, files in walk(str(root)):
        if any(n.endswith((".flac", ".trans.txt")) for n, _, _ in files):  # in a chapter, the first one
            yield Unit(dirpath, digest(files), _chapter(corpus, dirpath, files))


def _chapter(corpus: CorpusConfig, dirpath: str, files: list[tuple[str, int, int]]):
    chapter = Path(dirpath)
    speaker = chapter.parent.name
    split = corpus.split or chapter.parent.parent.name
    listed: set[str] = set()
    for name, _, _ in files:
        if not name.endswith(".trans.txt"):
            continue
        path = f"{dirpath}/{name}"
        try:
            data = Path(path).read_bytes()
        except OSError as e:  # a dangling link, a file without read permission: its lines are unknown
            detail = f"cannot read {path}: {e.strerror or e}"
            yield Reject(corpus.name, path, None, "text", "unreadable_transcript", detail)
            continue
        for lineno, raw in enumerate(data.splitlines(), start=1):
            source = f"{path}:{lineno}"
            line = decode(raw, corpus.name, source)
            if isinstance(line, Reject):
                yield line
                continue
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            listed.add(utt_id)
            yield Candidate(utt_id, corpus.name, split, f"{dirpath}/{utt_id}.flac", text, speaker, source)
    for name, _, _ in files:
        stem = name[:-5]
        if name.endswith(".flac") and stem not in listed:  # audio without a line: Whisper may label it
            path = f"{dirpath}/{name}"
            yield Candidate(stem, corpus.name, split, path, None, speaker, path)
