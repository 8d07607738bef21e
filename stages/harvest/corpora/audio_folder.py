"""A folder of audio files without transcripts: every file is an utterance for Whisper to label."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from core.config import CorpusConfig
from stages.harvest.corpora.listing import digest, walk
from stages.harvest.corpora.records import Candidate, Reject, Unit, missing, stem


def read(corpus: CorpusConfig) -> Iterator[Candidate | Reject | Unit]:
    root = Path(corpus.root)
    if not root.is_dir():
        yield missing(corpus.name, root, "corpus root")
        return
    exts = tuple(e.lower() for e in corpus.extensions)
    split = corpus.split or "train"
    for dirpath, files in walk(str(root)):
        audio = [f for f in files if f[0].lower().endswith(exts)]
        if audio:
            items = (
                Candidate(stem(n), corpus.name, split, f"{dirpath}/{n}", None, None, f"{dirpath}/{n}")
                for n, _, _ in audio
            )
            yield Unit(dirpath, digest(audio), items)
