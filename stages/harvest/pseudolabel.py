"""Whisper pseudo-labels: transcribe audio that has no transcript.

Two kinds of Whisper are read (``labeler``): a Hugging Face Whisper directory (the pipeline's own, e.g. the
converted Whisper tiny.en, through transformers), or a local file in openai-whisper's own format
(``{"dims": ..., "model_state_dict": ...}``), which we load ourselves with ``torch.load(weights_only=True)``
rather than through ``whisper.load_model``, which downloads when given a model name and decides on
``weights_only`` by comparing version strings. Greedy decoding, no timestamps, at most 30 s a clip. Every
label records its provenance as ``whisper:<sha256 of the weights file>``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.digest import sha256_file
from core.extras import check

# Whisper's encoder sees 30 s; longer audio would be cut silently, so it is refused instead.
WINDOW_S = 30.0


def labeler(
    path: str | Path, language: str | None = "en", batch_size: int = 8, max_tokens: int | None = None
):
    """The labeller for ``path``: a Hugging Face Whisper directory, or an openai-whisper checkpoint file."""
    path = Path(path)
    if path.is_dir():
        return HFWhisperLabeler(path, language, batch_size, max_tokens)
    return WhisperLabeler(path, language, batch_size, max_tokens)


class HFWhisperLabeler:
    """A Hugging Face Whisper directory (``WhisperForConditionalGeneration``, its feature extractor and
    tokenizer), decoding greedily in batches."""

    def __init__(
        self, directory: Path, language: str | None = "en", batch_size: int = 8, max_tokens: int | None = None
    ):
        self.directory = Path(directory)
        weights = self.directory / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"harvest Whisper: {self.directory} has no model.safetensors")
        self.source = f"whisper:{sha256_file(weights)}"
        self.language, self.batch_size, self.max_tokens = language, batch_size, max_tokens
        self._model = None

    def _load(self):
        if self._model is None:
            from transformers import WhisperForConditionalGeneration, WhisperProcessor

            self._model = WhisperForConditionalGeneration.from_pretrained(
                self.directory, use_safetensors=True
            ).eval()
            self._processor = WhisperProcessor.from_pretrained(self.directory)
        return self._model, self._processor

    def transcribe(self, clips: list[np.ndarray]) -> list[str]:
        """Text for each 16 kHz mono clip (at most 30 s each), greedy, without timestamps."""
        import torch

        model, proc = self._load()
        kw = {"max_new_tokens": self.max_tokens or 224}
        if getattr(model.generation_config, "is_multilingual", False):
            kw.update(language=self.language, task="transcribe")  # an English-only Whisper takes neither
        texts: list[str] = []
        with torch.inference_mode():
            for i in range(0, len(clips), self.batch_size):
                batch = [np.asarray(c, dtype=np.float32) for c in clips[i : i + self.batch_size]]
                feats = proc(batch, sampling_rate=16_000, return_tensors="pt").input_features
                ids = model.generate(feats, **kw)
                texts.extend(t.strip() for t in proc.batch_decode(ids, skip_special_tokens=True))
        return texts


class WhisperLabeler:
    def __init__(
        self,
        checkpoint: str | Path,
        language: str | None = "en",
        batch_size: int = 8,
        max_tokens: int | None = None,
    ):
        self.checkpoint = Path(checkpoint)
        if not self.checkpoint.is_file():
            raise FileNotFoundError(f"harvest.whisper_checkpoint: {self.checkpoint} does not exist")
        check(
            ("whisper",),
            "pseudolabel",
            f"harvest.whisper_checkpoint {self.checkpoint} (an openai-whisper file)",
        )
        self.sha256 = sha256_file(self.checkpoint)
        self.source = f"whisper:{self.sha256}"
        self.language = language
        self.batch_size = batch_size
        self.max_tokens = max_tokens  # None: Whisper's own limit (half its text context, 224 tokens)
        self._model = None

    def _load(self):
        if self._model is None:
            import torch
            import whisper

            ckpt = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
            try:
                dims = whisper.model.ModelDimensions(**ckpt["dims"])
                model = whisper.model.Whisper(dims)
                model.load_state_dict(ckpt["model_state_dict"])
            except (KeyError, TypeError, RuntimeError) as e:
                raise ValueError(
                    f"{self.checkpoint}: not an openai-whisper checkpoint with 'dims' and 'model_state_dict' ({e})"
                ) from e
            self._model = model.eval()
        return self._model

    def transcribe(self, clips: list[np.ndarray]) -> list[str]:
        """Text for each 16 kHz mono clip (at most 30 s each), greedy, without timestamps."""
        import torch
        import whisper

        model = self._load()
        options = whisper.DecodingOptions(
            language=self.language,
            task="transcribe",
            fp16=False,
            without_timestamps=True,
            sample_len=self.max_tokens,
        )
        texts: list[str] = []
        with torch.inference_mode():
            for i in range(0, len(clips), self.batch_size):
                mels = torch.stack(
                    [
                        whisper.log_mel_spectrogram(
                            whisper.pad_or_trim(torch.from_numpy(np.asarray(c, dtype=np.float32))),
                            n_mels=model.dims.n_mels,
                        )
                        for c in clips[i : i + self.batch_size]
                    ]
                )
                texts.extend(r.text.strip() for r in whisper.decode(model, mels, options))
        return texts
