"""GigaSpeech: ``GigaSpeech.json`` metadata over long opus files, one candidate per segment.

Each audio entry names its file (``path``, relative to the corpus root) and its segments with
``begin_time`` / ``end_time`` in seconds and ``text_tn``: upper-case words with punctuation as tags
(``<COMMA>``, ``<PERIOD>``, ...), which the text forms map back to punctuation. Subsets nest
(XS in S in M in L in XL) and every segment lists each subset it belongs to (``"{XS}"``), so one
subset is a filter. Segments labelled only with garbage tags (``<SIL>``, ``<MUSIC>``, ``<NOISE>``,
``<OTHER>``) are not speech: their authors say to drop them, so they become rejects.

The metadata of the whole corpus is one JSON file of gigabytes: it is streamed one audio entry at a
time (ijson), never parsed whole. A file that breaks off or goes bad part way keeps the segments
before the fault and ends in one ``bad_json`` reject that says where.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import ijson

from core.config import CorpusConfig
from core.text import garbage_tags
from stages.harvest.corpora.records import BOM, Candidate, Reject, label, missing


def read(corpus: CorpusConfig) -> Iterator[Candidate | Reject]:
    root = Path(corpus.root)
    meta = Path(corpus.manifest) if corpus.manifest else root / "GigaSpeech.json"
    if not meta.is_file():
        yield missing(corpus.name, meta, "GigaSpeech metadata")
        return
    tag = "{" + corpus.subset + "}"
    split = corpus.split or corpus.subset.lower()
    a_idx = -1
    with open(meta, "rb") as f:
        if f.read(3) != BOM:  # a byte-order mark before the JSON is no part of it
            f.seek(0)
        try:
            for a_idx, audio in enumerate(ijson.items(f, "audios.item", use_float=True)):
                yield from _audio(corpus, root, f"{meta}:audios[{a_idx}]", audio, tag, split)
        except (ijson.JSONError, UnicodeDecodeError) as e:
            at = f"after audios[{a_idx}]" if a_idx >= 0 else "before the first audio entry"
            yield Reject(corpus.name, str(meta), None, "manifest", "bad_json", f"{at}, byte {f.tell()}: {e}")
            return
    if a_idx < 0:
        yield Reject(corpus.name, str(meta), None, "audios", "missing_field", "no entries under 'audios'")


def _audio(corpus: CorpusConfig, root: Path, where: str, audio, tag: str, split: str):
    """The candidates (and rejects) of one audio entry: its segments in the requested subset."""
    if not isinstance(audio, dict) or not isinstance(audio.get("path"), str):
        yield Reject(corpus.name, where, None, "path", "missing_field", "audio entry without a 'path'")
        return
    if tag not in audio.get("subsets", [tag]):
        return
    path = str(root / audio["path"])
    audio_speaker = audio.get("speaker")
    for s_idx, seg in enumerate(audio.get("segments", [])):
        source = f"{where}.segments[{s_idx}]"
        if not isinstance(seg, dict):
            yield Reject(corpus.name, source, None, "segment", "bad_row", "a segment that is not an object")
            continue
        if tag not in seg.get("subsets", [tag]):
            continue
        sid = seg.get("sid")
        try:
            begin, end = float(seg["begin_time"]), float(seg["end_time"])
            text = seg["text_tn"]
        except (KeyError, TypeError, ValueError) as e:
            who = sid if isinstance(sid, str) else None
            yield Reject(corpus.name, source, who, "segment", "bad_row", f"bad or missing field: {e}")
            continue
        if not isinstance(sid, str) or not sid:
            yield Reject(corpus.name, source, None, "sid", "missing_field", "segment without a 'sid'")
            continue
        if end <= begin:
            yield Reject(
                corpus.name,
                source,
                sid,
                "audio",
                "empty_audio",
                f"segment ends ({end}) before it begins ({begin})",
            )
            continue
        garbage = garbage_tags(text) if isinstance(text, str) else []
        if garbage:
            yield Reject(
                corpus.name,
                source,
                sid,
                "text",
                "garbage_utterance",
                f"{' '.join(garbage)} marks a segment without speech: {text!r}",
            )
            continue
        speaker = label(seg.get("speaker") or audio_speaker)
        yield Candidate(
            sid,
            corpus.name,
            split,
            path,
            text if isinstance(text, str) else "",
            None if speaker in (None, "", "N/A") else speaker,
            source,
            offset_s=begin,
            duration_s=end - begin,
        )
