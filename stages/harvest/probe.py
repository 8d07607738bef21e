"""The per-file work of a harvest, run in worker processes: probe the audio header, hash the bytes,
and form the transcript's readable and normalized text.

Kept apart from the driver so a worker imports only soundfile, numpy and the normalizer, not pyarrow,
DuckDB or torch (the ``stages`` and ``stages.harvest`` packages import nothing themselves).
"""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

from core import audio
from core.text import transcript_forms


class FileProbe(NamedTuple):
    """What opening one audio file told: its rate and length, or why it is unusable (``reason``)."""

    sample_rate_hz: int = 0
    num_frames: int = 0
    sha256: str | None = None
    reason: str | None = None  # None: the file is usable
    detail: str = ""


WHOLE_FILE = 4 << 20  # smaller files are read in one go: the hash and the FLAC header come from one read


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def probe_file(path: str, content_hash: bool) -> FileProbe:
    head = None
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size <= WHOLE_FILE:
                head = f.read()
                sha = hashlib.sha256(head).hexdigest() if content_hash else None
            else:
                head = f.read(64 << 10)
                f.seek(0)
                sha = hashlib.file_digest(f, "sha256").hexdigest() if content_hash else None
    except OSError as e:
        return FileProbe(reason="missing_audio", detail=f"{path}: {e}")
    try:
        info = audio.probe(path, head)
    except audio.AudioError as e:
        return FileProbe(sha256=sha, reason=e.reason, detail=e.detail)
    return FileProbe(info.sample_rate_hz, info.num_frames, sha)


def text_forms(text_raw: str | None) -> tuple[str | None, str | None]:
    if text_raw is None:
        return None, None
    return transcript_forms(text_raw)


def probe_items(
    items: list[tuple[str, str | None]], content_hash: bool
) -> list[tuple[FileProbe, tuple[str | None, str | None]]]:
    """For each (resolved audio path, raw transcript): the file's probe result and the text forms.

    Segments of one long file (GigaSpeech) come in a row: the file is probed and hashed once.
    """
    out = []
    last_path, last = None, None
    for path, text_raw in items:
        if path != last_path:
            last_path, last = path, probe_file(path, content_hash)
        out.append((last, text_forms(text_raw)))
    return out
