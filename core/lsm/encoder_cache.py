"""Frozen encoder outputs computed once: a clip's Whisper frames, stored in the work directory and read back.

A frozen encoder gives the same frames for the same clip every time it sees it: at every epoch, in both arms of
a reproduction (same clips, same encoder), and in evaluation, where the probe and QA ask several questions about
each clip. On CPU the encoder is about a third of a training step, so the frames are worth keeping.

Layout and keys::

    WORKDIR/cache/encoder/ENCODER/KK/KEY.safetensors

- ``ENCODER`` is the encoder's identity: the SHA-256 of its config and of every weight (names, dtypes, shapes and
  bytes), so another encoder (another checkpoint, a fine-tuned one) never reads these frames;
- ``KEY`` hashes that identity with the clip (the SHA-256 of the 16 kHz samples the features were made from: the
  audio content and its segment both), the feature settings (mel bins, the encoder's input length, padding) and
  the dtype the encoder computes in (bfloat16 under autocast on a GPU, float32 on a CPU);
- an entry holds the first N frames of the clip's encoder output in the encoder's own dtype (N: the frames the
  Q-Former's windows reach, about the clip's own frames; ``LSMForConditionalGeneration.frames_needed``), and in its
  metadata the key, N and the SHA-256 of the tensor's bytes. A request for more frames than an entry holds misses,
  and the longer result replaces the entry.

Reading checks the metadata and the checksum: an entry that is damaged (cut short, bit-flipped, someone else's
bytes) is never used; it is recomputed and rewritten, with a warning. Entries are written aside and renamed, so
concurrent writers (the ranks of a training, two runs on one work directory) leave one whole entry. A cache that
cannot be written (a full disk, a read-only mount) only costs speed: the frames are used, a warning says why
they were not stored, and later entries are not attempted in that process.

The cache is only for an encoder whose weights do not change: ``LSMForConditionalGeneration.use_encoder_cache``
refuses it while the encoder trains. Size: 50 frames a second x d_model x bytes per value (Whisper tiny.en in
float32: 77 kB per second of audio, 280 MB per hour; large-v2 in bfloat16: 128 kB per second).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

FORMAT = 1  # bump when the layout of an entry changes: old entries then miss


def encoder_identity(encoder: torch.nn.Module) -> str:
    """SHA-256 of an encoder's config and weights: the same for the same weights, wherever they were loaded."""
    h = hashlib.sha256(f"splsm-encoder-cache/{FORMAT}\n".encode())
    cfg = getattr(encoder, "config", None)
    if cfg is not None:
        h.update(cfg.to_json_string(use_diff=False).encode())
    for name, t in sorted(encoder.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def clip_digest(samples: np.ndarray | torch.Tensor) -> str:
    """SHA-256 of a clip's 16 kHz float32 samples, exactly as the features were made from them."""
    a = np.ascontiguousarray(np.asarray(samples, dtype=np.float32).reshape(-1))
    return hashlib.sha256(a.tobytes()).hexdigest()


def _tensor_sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def for_model(
    model, root: str | os.PathLike, pad_to: str = "30s", dtype: torch.dtype | None = None
) -> EncoderCache:
    """The cache of ``model``'s encoder under ``root`` (``WorkPaths.encoder_cache``), for the features its own
    feature extractor makes (``core.lsm.batch.Collate.for_model``; the training loader pads to ``pad_to``) and the
    dtype the encoder computes in (``dtype``: bfloat16 under autocast; default its weights')."""
    fe = model.feature_extractor
    settings = {
        "n_mels": int(fe.feature_size),
        "chunk_s": float(fe.chunk_length),
        "pad_to": pad_to,
        "dtype": str(dtype or model.encoder.dtype),
    }
    return EncoderCache(Path(root), encoder_identity(model.encoder), settings)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    written: int = 0
    damaged: int = 0
    write_errors: int = 0


@dataclass
class EncoderCache:
    """The frames of one encoder under ``root`` (``WORKDIR/cache/encoder``); see the module docstring."""

    root: Path
    identity: str
    features: dict  # the feature settings that change the encoder's input: n_mels, chunk_s, pad_to
    stats: CacheStats = field(default_factory=CacheStats)
    writable: bool = True

    def __post_init__(self):
        self.root = Path(self.root)
        self.dir = self.root / self.identity[:32]
        self._settings = json.dumps(self.features, sort_keys=True)

    def key(self, digest: str) -> str:
        return hashlib.sha256(f"{FORMAT}\n{self.identity}\n{digest}\n{self._settings}".encode()).hexdigest()

    def path(self, digest: str) -> Path:
        k = self.key(digest)
        return self.dir / k[:2] / f"{k}.safetensors"

    def get(self, digest: str, frames: int) -> torch.Tensor | None:
        """The clip's first ``frames`` frames, or None (absent, too short, or damaged: recomputed by the caller)."""
        from safetensors import SafetensorError, safe_open

        path = self.path(digest)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                t = f.get_tensor("frames")
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            return self._damaged(path, f"unreadable ({e})")
        if meta.get("key") != self.key(digest) or meta.get("sha256") != _tensor_sha(t):
            return self._damaged(path, "its checksum or key does not match")
        if t.dim() != 2 or t.shape[0] < frames:
            self.stats.misses += 1  # stored for a shorter need: recomputed, and the longer entry replaces it
            return None
        self.stats.hits += 1
        return t[:frames]

    def _damaged(self, path: Path, why: str) -> None:
        self.stats.damaged += 1
        self.stats.misses += 1
        warnings.warn(f"encoder cache: {path} is {why}; recomputing it", RuntimeWarning, stacklevel=3)
        path.unlink(missing_ok=True)
        return None

    def put(self, digest: str, frames: torch.Tensor) -> None:
        """Store a clip's frames ([N, d_model], the encoder's dtype); a failure to write only warns."""
        if not self.writable:
            return
        from safetensors.torch import save_file

        t = frames.detach().cpu().contiguous()
        path = self.path(digest)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            meta = {"key": self.key(digest), "frames": str(t.shape[0]), "sha256": _tensor_sha(t)}
            save_file({"frames": t}, str(tmp), metadata=meta)
            os.replace(tmp, path)  # no fsync: a cut-short entry fails its checksum and is recomputed
            self.stats.written += 1
        except OSError as e:
            self.stats.write_errors += 1
            self.writable = False
            warnings.warn(
                f"encoder cache: cannot write {path} ({e.strerror or e}); frames are computed as needed from now on",
                RuntimeWarning,
                stacklevel=2,
            )
        finally:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass

    def summary(self) -> str:
        s = self.stats
        return (
            f"encoder cache {self.dir}: {s.hits} hits, {s.misses} misses, {s.written} written"
            + (f", {s.damaged} damaged entries recomputed" if s.damaged else "")
            + (f", {s.write_errors} write failures" if s.write_errors else "")
        )
