"""The shared audio loader: every stage that touches audio goes through here.

Reads whatever libsndfile reads (wav, flac, ogg/opus, mp3 with libsndfile >= 1.1), a segment of a
long file by seeking rather than decoding from the start, downmixes to mono and resamples to
16 kHz with soxr. Probing reads the header only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

TARGET_SR = 16_000


class AudioError(Exception):
    """The file is missing, unreadable or empty; ``reason`` is the reject reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class AudioInfo:
    sample_rate_hz: int
    num_frames: int
    num_channels: int

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.sample_rate_hz


def probe(path: str | Path) -> AudioInfo:
    path = Path(path)
    if not path.is_file():
        raise AudioError("missing_audio", f"{path} does not exist")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError("corrupt_audio", f"{path}: {e}") from e
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError("empty_audio", f"{path} has no samples")
    return AudioInfo(int(info.samplerate), int(info.frames), int(info.channels))


def load(
    path: str | Path, offset_s: float = 0.0, duration_s: float | None = None, sr: int = TARGET_SR
) -> np.ndarray:
    """Mono float32 samples at ``sr``, from ``offset_s`` for ``duration_s`` seconds (to the end if None)."""
    path = Path(path)
    if not path.is_file():
        raise AudioError("missing_audio", f"{path} does not exist")
    try:
        with sf.SoundFile(str(path)) as f:
            native = f.samplerate
            start = int(round(offset_s * native))
            if start:
                f.seek(start)
            frames = -1 if duration_s is None else int(round(duration_s * native))
            x = f.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError("corrupt_audio", f"{path}: {e}") from e
    if x.shape[0] == 0:
        raise AudioError("empty_audio", f"{path} has no samples at {offset_s}s")
    x = x.mean(axis=1)
    if native != sr:
        x = soxr.resample(x, native, sr, quality="HQ")
    return np.ascontiguousarray(x, dtype=np.float32)
