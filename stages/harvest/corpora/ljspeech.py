"""LJSpeech: ``metadata.csv`` (``id|raw transcript|normalized transcript``) + ``wavs/ID.wav``.

The normalized field spells numbers out ("fourteen fifty-five" for "1455"); it is what was read
aloud, so it is the default transcript. Fields are separated by ``|`` and never quoted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from core.config import CorpusConfig
from stages.harvest.corpora.records import Candidate, Reject, missing, text_lines

SPEAKER = "LJ"


def read(corpus: CorpusConfig) -> Iterator[Candidate | Reject]:
    root = Path(corpus.root)
    meta = Path(corpus.manifest) if corpus.manifest else root / "metadata.csv"
    if not meta.is_file():
        yield missing(corpus.name, meta, "LJSpeech metadata")
        return
    split = corpus.split or "train"
    for source, line in text_lines(meta, corpus.name):
        if isinstance(line, Reject):
            yield line
            continue
        fields = line.split("|")
        if len(fields) < 2 or not fields[0]:
            yield Reject(corpus.name, source, None, "line", "bad_row", "expected ID|TRANSCRIPT[|NORMALIZED]")
            continue
        utt_id = fields[0]
        if corpus.text_field == "normalized" and len(fields) >= 3:
            text = fields[2]
        else:
            text = fields[1]
        yield Candidate(
            utt_id, corpus.name, split, str(root / "wavs" / f"{utt_id}.wav"), text, SPEAKER, source
        )
