"""Rows of the examples table and their clips -> one ``SpeechBatch``: the single collate function that the
training loader and evaluation's decoding both call, so a model sees the same inputs in both.

Features are Whisper's log-mels (``core.lsm.features``, equal to ``WhisperFeatureExtractor``'s), cut or
padded to the encoder's input length; the prompt pieces are tokenized here, the prefix with the
tokenizer's special tokens (BOS), the suffix and the answer without, the answer followed by eos.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.lsm.encoder_cache import clip_digest
from core.lsm.features import CHUNK_S, SAMPLE_RATE, log_mel


@dataclass
class SpeechBatch:
    """One batch as the model takes it; ``answer_ids`` (answer + eos) only for training."""

    input_features: torch.Tensor  # [B, n_mels, frames] log-mels padded to the encoder's input (30 s)
    durations_s: torch.Tensor  # [B] seconds of real audio in each row (cut at the encoder's input length)
    prefix_ids: list[list[int]] | None  # starts with the tokenizer's BOS; None without a tokenizer
    suffix_ids: list[list[int]] | None
    answer_ids: list[list[int]] | None = None
    feature_lengths: torch.Tensor | None = None  # [B] frames of each clip before padding
    clip_digests: list[str] | None = None  # SHA-256 of each clip's samples: the encoder cache's key
    # each row's transcript as tokens (no BOS, no eos), with answers: the target of a CTC warm start of the
    # connector (train.ctc_warmup_steps), whatever the row's task asks
    transcript_ids: list[list[int]] | None = None

    def to(self, device) -> SpeechBatch:
        return SpeechBatch(
            self.input_features.to(device),
            self.durations_s.to(device),
            self.prefix_ids,
            self.suffix_ids,
            self.answer_ids,
            self.feature_lengths,
            self.clip_digests,
            self.transcript_ids,
        )

    def pin_memory(self) -> SpeechBatch:
        """Page-locked feature tensors (the DataLoader calls this with ``pin_memory=True``)."""
        self.input_features = self.input_features.pin_memory()
        self.durations_s = self.durations_s.pin_memory()
        return self

    def kwargs(self) -> dict:
        """The model's forward arguments."""
        return dict(
            input_features=self.input_features,
            durations_s=self.durations_s,
            prefix_ids=self.prefix_ids,
            suffix_ids=self.suffix_ids,
            answer_ids=self.answer_ids,
            clip_digests=self.clip_digests,
        )

    def __len__(self) -> int:
        return len(self.input_features)


@dataclass(frozen=True)
class Collate:
    """``collate(rows, clips, with_answer)``: the batch of example rows (dicts with ``prefix``, ``suffix``
    and, for training, ``answer``) and their 16 kHz clips."""

    tokenizer: object | None
    n_mels: int = 80
    chunk_s: float = CHUNK_S  # the encoder's input length: 30 s, or a tiny Whisper's shorter chunk
    pad_to: str = "30s"

    @classmethod
    def for_model(cls, model) -> Collate:
        """As a loaded model's own tokenizer and feature extractor want it."""
        fe = model.feature_extractor
        return cls(model.tokenizer, fe.feature_size, fe.chunk_length)

    def __call__(self, rows: list[dict], clips: list[np.ndarray], with_answer: bool) -> SpeechBatch:
        feats, lengths = log_mel(clips, self.n_mels, self.pad_to, chunk_s=self.chunk_s)
        durations = torch.tensor(
            [min(len(c) / SAMPLE_RATE, self.chunk_s) for c in clips], dtype=torch.float32
        )
        prefix = suffix = answer = transcript = None
        tok = self.tokenizer
        if tok is not None:
            prefix = [tok(r["prefix"], add_special_tokens=True)["input_ids"] for r in rows]
            suffix = [tok(r["suffix"], add_special_tokens=False)["input_ids"] for r in rows]
            if with_answer:
                answer = [
                    tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in rows
                ]
                transcript = [
                    tok(r.get("transcript") or r["answer"], add_special_tokens=False)["input_ids"]
                    for r in rows
                ]
        # What the encoder is given (the samples, cut at its input length): an encoder cache's key
        digests = [clip_digest(c[: round(self.chunk_s * SAMPLE_RATE)]) for c in clips]
        return SpeechBatch(feats, durations, prefix, suffix, answer, lengths, digests, transcript)
