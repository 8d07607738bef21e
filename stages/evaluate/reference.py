"""The Whisper the LSM's encoder came from, transcribing the same eval clips on its own: the reference row
beside the speech-text model's WER.

The Whisper directory's full encoder-decoder decodes each clip greedily (through its own feature extractor,
its generation config, English), under the same length bound as the LSM's answers. A Whisper directory that
cannot transcribe (a tiny random one built for tests has no generation config for it) gives no row, and the
report says why.
"""

from __future__ import annotations

import time
from pathlib import Path

from core import audio
from stages.evaluate.decoding import Decoded, Item, loaded_batches


class NoReference(Exception):
    """This Whisper directory cannot give a reference transcript; the message says why."""


def load(whisper_dir: Path, device: str):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    whisper_dir = Path(whisper_dir)
    if not (whisper_dir / "generation_config.json").is_file():
        raise NoReference(f"{whisper_dir} has no generation config for transcription")
    model = (
        WhisperForConditionalGeneration.from_pretrained(whisper_dir, use_safetensors=True).to(device).eval()
    )
    gc = model.generation_config
    if getattr(gc, "no_timestamps_token_id", None) is None or gc.decoder_start_token_id is None:
        raise NoReference(
            f"{whisper_dir}'s generation config lacks Whisper's special tokens (a random test model?)"
        )
    return model, WhisperProcessor.from_pretrained(whisper_dir)


def decode(whisper_dir: Path, items: list[Item], batch_size: int, device: str = "cpu") -> Decoded:
    """Each item's clip transcribed by the Whisper alone; unreadable audio lands in ``failed``."""
    import torch

    model, proc = load(whisper_dir, device)
    kw = {}
    if getattr(model.generation_config, "is_multilingual", False):
        kw.update(language="en", task="transcribe")  # an English-only Whisper takes neither
    res = Decoded()
    order = sorted(items, key=lambda it: (it.group, -it.duration_s, it.key))
    for _, groups in loaded_batches(order, batch_size, res.failed):
        for group, rows in groups.items():
            t0 = time.perf_counter()
            feats = proc(
                [c for _, c in rows], sampling_rate=audio.TARGET_SR, return_tensors="pt"
            ).input_features
            with torch.inference_mode():
                ids = model.generate(
                    feats.to(device), max_new_tokens=max(it.max_new_tokens for it, _ in rows), **kw
                )
            texts = proc.batch_decode(ids, skip_special_tokens=True)
            res.decode_s[group] += time.perf_counter() - t0
            for (it, c), text in zip(rows, texts, strict=True):
                res.texts[it.key] = text.strip()
                res.audio_s[group] += len(c) / audio.TARGET_SR
    return res
