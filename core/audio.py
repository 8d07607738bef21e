"""The shared audio loader: every stage that touches audio goes through here.

Reads whatever libsndfile reads (wav, flac, ogg/opus, mp3 with libsndfile >= 1.1), from a file or from bytes
in memory (an upload), a segment of a long file by seeking rather than decoding from the start, downmixes to
mono and resamples to 16 kHz with soxr. Probing reads the header only.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

TARGET_SR = 16_000

# What decoding a file can raise besides libsndfile's own error: a file cut short or changed under us
# (RuntimeError, EOFError, OSError), a header with impossible numbers (ValueError, OverflowError), soxr on a
# degenerate input (ValueError), a header announcing more samples than memory holds (MemoryError).
DECODE_ERRORS = (sf.LibsndfileError, RuntimeError, EOFError, OSError, ValueError, OverflowError, MemoryError)


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


def flac_info(head: bytes) -> AudioInfo | None:
    """Rate, length and channels from FLAC's STREAMINFO block, if ``head`` (the file's first bytes) settles it.

    Opening a file through libsndfile costs ~200 us, more than the rest of a harvest's per-file work
    but the text normalizer; FLAC puts everything a probe needs in its first 42 bytes. Returns None
    whenever the bytes at hand do not settle it (another format, a truncated head, an unknown length),
    and libsndfile decides. The metadata chain must also end in a frame header, which libsndfile's
    own header-only open does not check.
    """
    if len(head) < 42 or head[:4] != b"fLaC" or head[4] & 0x7F != 0 or int.from_bytes(head[5:8], "big") != 34:
        return None
    si = int.from_bytes(head[8:42], "big")  # 272 bits: block sizes 16+16, frame sizes 24+24, then these

    def bits(offset: int, width: int) -> int:
        return (si >> (272 - offset - width)) & ((1 << width) - 1)

    rate, channels, frames = bits(80, 20), bits(100, 3) + 1, bits(108, 36)
    if rate == 0 or frames == 0:
        return None
    i = 4
    while True:  # walk the metadata blocks to the first audio frame
        if i + 4 > len(head):
            return None
        last = head[i] & 0x80
        i += 4 + int.from_bytes(head[i + 1 : i + 4], "big")
        if last:
            break
    if i + 2 > len(head) or head[i] != 0xFF or head[i + 1] & 0xFE != 0xF8:
        return None
    return AudioInfo(rate, frames, channels)


def probe(path: str | Path, head: bytes | None = None) -> AudioInfo:
    """Sample rate, length and channels from the file's header (no samples are decoded).

    ``head``: the file's first bytes, when the caller has read them anyway (to hash the file).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        size = None
    if size is None or not path.is_file():
        raise AudioError("missing_audio", f"{path} does not exist")
    if size == 0:
        raise AudioError("empty_audio", f"{path} is a zero-length file")
    if head is not None:
        fast = flac_info(head)
        if fast is not None:
            return fast
    try:
        info = sf.info(str(path))
    except DECODE_ERRORS as e:
        raise AudioError("corrupt_audio", f"{path}: {e}") from e
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError("empty_audio", f"{path} has no samples")
    return AudioInfo(int(info.samplerate), int(info.frames), int(info.channels))


def load(
    path: str | Path,
    offset_s: float = 0.0,
    duration_s: float | None = None,
    sr: int = TARGET_SR,
    max_s: float | None = None,
) -> np.ndarray:
    """Mono float32 samples at ``sr``, from ``offset_s`` for ``duration_s`` seconds (to the end if None).

    Every way this can fail (no file, a segment no file has, bytes libsndfile or soxr cannot decode) is an
    ``AudioError`` with a reject reason, so a caller that counts skips never meets another exception.
    ``max_s``: what is read may not be longer (``too_long``, found from the header before any sample is decoded).
    """
    path = Path(path)
    for name, v in (("offset", offset_s), ("duration", duration_s)):
        if v is None and name == "duration":
            continue
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise AudioError("bad_segment", f"{path}: {name} {v!r} s is not a finite number of seconds >= 0")
    if not path.is_file():
        raise AudioError("missing_audio", f"{path} does not exist")
    return _read(str(path), str(path), offset_s, duration_s, sr, max_s)


def decode(data: bytes, label: str, sr: int = TARGET_SR, max_s: float | None = None) -> np.ndarray:
    """``load`` for a whole file held in memory (an upload): ``label`` names it in every ``AudioError``."""
    if not data:
        raise AudioError("empty_audio", f"{label} is empty (0 bytes)")
    return _read(io.BytesIO(data), label, 0.0, None, sr, max_s)


def _read(source, label: str, offset_s: float, duration_s: float | None, sr: int, max_s: float | None):
    try:
        with sf.SoundFile(source) as f:
            native = f.samplerate
            start = int(round(offset_s * native))
            if start:
                f.seek(start)
            frames = -1 if duration_s is None else int(round(duration_s * native))
            if max_s is not None:
                n = f.frames - start if frames < 0 else min(frames, f.frames - start)
                if n > round(max_s * native):
                    raise AudioError(
                        "too_long", f"{label} is {n / native:.1f} s long, over the {max_s:g} s limit"
                    )
            x = f.read(frames, dtype="float32", always_2d=True)
        if x.shape[0] == 0:
            raise AudioError("empty_audio", f"{label} has no samples at {offset_s}s")
        x = x.mean(axis=1)
        if native != sr:
            x = soxr.resample(x, native, sr, quality="HQ")
    except AudioError:
        raise
    except DECODE_ERRORS as e:
        # libsndfile names an in-memory file by its repr (<_io.BytesIO object at 0x...>): name it by its label
        detail = str(e) if isinstance(source, str) else str(e).replace(repr(source), label)
        raise AudioError("corrupt_audio", f"{label}: {type(e).__name__}: {detail}") from e
    return np.ascontiguousarray(x, dtype=np.float32)
