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
    # One chapter directory at a time: a 3-million-file corpus is never listed into memory whole.
    for dirpath, files in walk(str(root)):
        flacs = [n[:-5] for n, _, _ in files if n.endswith(".flac")]
        trans = [n for n, _, _ in files if n.endswith(".trans.txt")]
        if not flacs and not trans:
            continue
        texts = [(dirpath + "/" + n, (Path(dirpath) / n).read_bytes()) for n in trans]
        yield Unit(dirpath, digest(files, *(t for _, t in texts)), _chapter(corpus, dirpath, flacs, texts))


def _chapter(corpus: CorpusConfig, dirpath: str, flacs: list[str], texts: list[tuple[str, bytes]]):
    chapter = Path(dirpath)
    speaker = chapter.parent.name
    split = corpus.split or chapter.parent.parent.name
    listed: set[str] = set()
    for path, data in texts:
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
    for stem in flacs:
        if stem not in listed:  # audio without a line: Whisper may label it, else a no_transcript reject
            path = f"{dirpath}/{stem}.flac"
            yield Candidate(stem, corpus.name, split, path, None, speaker, path)
