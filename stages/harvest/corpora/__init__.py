"""Corpus readers, one module per on-disk layout, each turning a corpus into candidates and rejects.

A reader only parses the corpus's own metadata; it does not open audio. The harvest stage then
checks every candidate the same way (path confined to the root, audio probed, bounds, text).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from core.config import CorpusConfig
from stages.harvest.corpora import (
    audio_folder,
    commonvoice,
    gigaspeech,
    lhotse_manifests,
    librispeech,
    ljspeech,
    manifests,
)
from stages.harvest.corpora.records import Candidate, Reject, Unit

Reader = Callable[[CorpusConfig], Iterator[Candidate | Reject | Unit]]

READERS: dict[str, Reader] = {
    "librispeech": librispeech.read,
    "commonvoice": commonvoice.read,
    "gigaspeech": gigaspeech.read,
    "jsonl": manifests.read_reference,
    "manifest": manifests.read_generic,
    "ljspeech": ljspeech.read,
    "audio_folder": audio_folder.read,
    "lhotse": lhotse_manifests.read,
}
