"""Whisper's log-mel features in torch, batched, matching ``WhisperFeatureExtractor``.

The numbers are those of Hugging Face's ``WhisperFeatureExtractor`` (the reference's collator): a
400-point periodic Hann STFT with hop 160 on 16 kHz audio (centred, reflect-padded), the last frame
dropped, power through the same Slaney mel filter bank (``transformers.audio_utils.mel_filter_bank``),
``log10`` clamped at 1e-10, floored at each clip's maximum minus 8, then ``(x + 4) / 4``.

Why not just call the extractor: its numpy path frames and FFTs in Python (tens of ms per clip) and
always transforms the full 30 s window even when the clip is 4 s of speech and 26 s of zeros. Here the
STFT runs only over the batch's longest clip (plus the 200 samples a frame reaches beyond it); every
frame past that sees only zero samples, so its mel power is exactly 0 and its log is the clamp value
``log10(1e-10)``, which we fill in instead of computing. The result equals the extractor's on the same
padding within float32 rounding (``tests/test_features.py`` asserts the tolerance).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160
CHUNK_S = 30
LOG_FLOOR = -10.0  # log10 of the 1e-10 clamp: the value of a frame that saw only zeros


@lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> torch.Tensor:
    """(n_mels, 201) Slaney mel filters, the very ones ``WhisperFeatureExtractor(feature_size=n_mels)`` builds."""
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(np.ascontiguousarray(fb.T, dtype=np.float32))


@lru_cache(maxsize=2)
def _window(device: str) -> torch.Tensor:
    return torch.hann_window(N_FFT, device=device)


def num_frames(num_samples: int) -> int:
    """Frames of a clip of ``num_samples`` once padding is cut (HF: samples // hop, the last frame dropped)."""
    return num_samples // HOP


def log_mel(
    clips: list[np.ndarray | torch.Tensor],
    n_mels: int = 80,
    pad_to: str = "30s",
    device: str | torch.device = "cpu",
    chunk_s: float = CHUNK_S,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of 16 kHz mono clips: ``(input_features (B, n_mels, T) float32, lengths (B,))``.

    ``pad_to="30s"``: every clip is cut or zero-padded to 30 s, ``T = 3000``, exactly as
    ``WhisperFeatureExtractor(...)(clips, padding="max_length")`` (what HF's ``WhisperEncoder`` and the
    reference need). ``pad_to="longest"``: clips are zero-padded to the batch's longest clip (still cut at
    30 s), ``T = longest // 160``, as the extractor with ``padding="longest"``. ``lengths`` is each clip's
    own number of frames (``samples // 160``), for masks. ``chunk_s``: the encoder's input length, 30 s for
    every released Whisper (a tiny Whisper may take less: its feature extractor's ``chunk_length``); "30s"
    padding and the cut are to ``chunk_s``.
    """
    if pad_to not in ("30s", "longest"):
        raise ValueError(f"pad_to must be '30s' or 'longest', not {pad_to!r}")
    if not clips:
        raise ValueError("log_mel: no clips")
    device = torch.device(device)
    chunk_samples = round(chunk_s * SAMPLE_RATE)
    wav = [torch.as_tensor(c, dtype=torch.float32).reshape(-1)[:chunk_samples] for c in clips]
    lens = [int(w.numel()) for w in wav]
    padded_len = chunk_samples if pad_to == "30s" else max(lens)
    total_frames = padded_len // HOP
    # Frame t sees samples [160 t - 200, 160 t + 200): past the longest clip every frame sees only zeros.
    # A buffer of at least 201 zeros after the longest clip makes the STFT's end reflection mirror zeros,
    # so each frame it yields is the frame of the fully padded signal.
    longest = max(lens)
    span = padded_len if longest + 2 * (N_FFT // 2 + 1) >= padded_len else longest + N_FFT // 2 + 1
    x = torch.zeros(len(wav), span, dtype=torch.float32)
    for i, w in enumerate(wav):
        x[i, : lens[i]] = w
    x = x.to(device)
    stft = torch.stft(x, N_FFT, HOP, window=_window(str(device)), return_complex=True)
    n_live = min(total_frames, stft.shape[-1])  # with the full window, HF's dropped last frame goes here
    z = stft[..., :n_live]
    power = torch.addcmul(z.real.square(), z.imag, z.imag)  # |z|^2 without abs's square root
    live = torch.clamp(mel_filters(n_mels).to(device) @ power, min=1e-10).log10_()
    # Frames past n_live are exactly LOG_FLOOR, which no live frame is below: the peak is the live peak,
    # and the padded frames all take one value per clip, written once instead of computed.
    floor = live.amax(dim=(1, 2), keepdim=True) - 8.0
    out = torch.empty((len(wav), n_mels, total_frames), dtype=torch.float32, device=device)
    out[..., :n_live] = torch.maximum(live, floor).add_(4.0).div_(4.0)
    if n_live < total_frames:
        out[..., n_live:] = (floor.clamp(min=LOG_FLOOR) + 4.0) / 4.0
    return out, torch.tensor([num_frames(n) for n in lens], dtype=torch.long)
