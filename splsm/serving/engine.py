"""A loaded checkpoint that answers (clip, instruction) queries, one batch at a time, streamed or not.

Everything is the pipeline's own: ``stages.evaluate``'s checkpoint check and loading, the checkpoint's
``recipe.json`` for the prompt layout and the default (ASR) instruction, ``core.audio`` for clips,
``core.lsm.batch.Collate`` for the batch, and the model's batched greedy ``generate`` with its ``on_token`` hook
for streaming. A query is checked whole before it is decoded (``Engine.query``), so decoding meets no bad input.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import audio
from core.recipe import Recipe


class QueryError(ValueError):
    """A query the model cannot take (a clip too long, a prompt over the model's context): said in one line."""


@dataclass(frozen=True)
class Query:
    """One clip and what to ask about it, checked by ``Engine.query``."""

    clip: np.ndarray  # 16 kHz mono
    instruction: str
    prefix: str
    suffix: str
    max_new_tokens: int
    prompt_tokens: int  # prefix + speech tokens + suffix


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str  # "stop" (the model ended it) or "length" (max_new_tokens reached)
    completion_tokens: int
    prompt_tokens: int


class TextStream:
    """One row's tokens as text, piece by piece: the pieces join to ``text()``, ``tokenizer.decode(ids).strip()``,
    the answer as evaluate reads it. A piece is held back while it ends in whitespace or in a partial character
    (and for good, should a tokenizer ever rewrite text it has already decoded)."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.sent = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.text()
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece

    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True).strip()

    def close(self) -> str:
        """What is left to send once the row is done (a held-back piece)."""
        text = self.text()
        piece = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += piece
        return piece


class Engine:
    """A checkpoint loaded for asking: ``query`` checks a clip and an instruction, ``answer`` decodes a batch.

    ``recipe``: how to lay out prompts; by default the checkpoint's ``recipe.json``, else the project's defaults
    (``recipe_note`` then says so). ``answer`` may be called from one thread at a time (a lock holds it)."""

    def __init__(
        self,
        checkpoint: str | Path,
        device: str | None = None,
        recipe: Recipe | None = None,
        max_new_tokens: int = 1024,
        load: bool = True,
    ):
        """Check the checkpoint and read its recipe and window; with ``load``, load the weights (else ``load()``
        does, so that a caller can check its inputs first)."""
        from core.config import ENCODER_FRAMES_PER_S
        from core.lsm.model import LSMConfig
        from stages.evaluate.evaluator import check_lsm_checkpoint

        self.checkpoint = check_lsm_checkpoint(Path(checkpoint))
        self.recipe_note = ""
        if recipe is None:
            recipe = Recipe.read(self.checkpoint)
        if recipe is None:
            recipe = Recipe.default()
            self.recipe_note = (
                f"{self.checkpoint} has no recipe.json (it was not written by the train stage): asking in "
                f"the {recipe.prompt_format} layout with the {recipe.catalog} wordings; --config names the "
                "config it was trained with"
            )
        self.recipe = recipe
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.default_instruction = recipe.instruction("asr") if "asr" in recipe.instructions else None
        config = LSMConfig.from_pretrained(str(self.checkpoint))
        # Whisper's window (30 s; the model's chunk_s): the longest clip the encoder hears whole
        self.max_audio_s = config.encoder_config.max_source_positions / ENCODER_FRAMES_PER_S
        # The reference's per-batch windows depend on the batch's longest clip: batching would change answers.
        self.batchable = config.window_mode == "fixed"
        self.context = getattr(config.llm_config, "max_position_embeddings", None) or 2048
        self.model = None
        self._lock = threading.Lock()
        self._prompts: dict[str, tuple[str, str, int]] = {}
        if load:
            self.load()

    def load(self) -> Engine:
        """Load the weights (as evaluate does) onto ``device`` (default: cuda where there is one)."""
        import torch

        from core.lsm.batch import Collate
        from stages.evaluate.evaluator import _load_model

        if self.model is None:
            self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.model = _load_model(self.checkpoint, self.device)
            self.collate = Collate.for_model(self.model)
            self.tokenizer = self.model.tokenizer
        return self

    # ----- checking a query -----

    def clip_from_file(self, path: str | Path, max_s: float | None = None) -> np.ndarray:
        """A clip from a file (any format and rate ``core.audio`` reads); ``AudioError`` naming it otherwise."""
        return audio.load(path, max_s=self._max_s(max_s))

    def clip_from_bytes(self, data: bytes, label: str, max_s: float | None = None) -> np.ndarray:
        """A clip from an uploaded file's bytes; ``AudioError`` naming ``label`` otherwise."""
        return audio.decode(data, label, max_s=self._max_s(max_s))

    def _max_s(self, max_s: float | None) -> float:
        return self.max_audio_s if max_s is None else min(max_s, self.max_audio_s)

    def instruction_for(self, instruction: str | None = None, task: str | None = None) -> str:
        """The instruction to ask: the one given, the first wording of the recipe's ``task`` category, or the
        recipe's ASR wording."""
        if instruction is not None and instruction.strip():
            return instruction.strip()
        if task is not None:
            return self.recipe.instruction(task)  # RecipeError naming the categories
        if self.default_instruction is None:
            raise QueryError(
                f"the recipe's catalog {self.recipe.catalog} has no asr category: give an instruction"
            )
        return self.default_instruction

    def query(self, clip: np.ndarray, instruction: str, max_new_tokens: int | None = None) -> Query:
        """A checked query; ``max_new_tokens`` is capped at the engine's cap and at what the context leaves."""
        if len(clip) == 0:
            raise QueryError("the clip has no samples")
        if len(clip) > round(self.max_audio_s * audio.TARGET_SR):
            raise QueryError(
                f"the clip is {len(clip) / audio.TARGET_SR:.1f} s long; the model hears at most "
                f"{self.max_audio_s:g} s (Whisper's window)"
            )
        prefix, suffix, text_tokens = self._prompt(instruction)
        speech = self.model.speech_token_counts([len(clip) / audio.TARGET_SR])[0]
        prompt_tokens = text_tokens + speech
        room = self.context - prompt_tokens
        if room < 1:
            raise QueryError(
                f"the prompt takes {prompt_tokens} tokens with the speech; the model's context holds {self.context}"
            )
        n = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        return Query(
            clip, instruction, prefix, suffix, max(1, min(n, self.max_new_tokens, room)), prompt_tokens
        )

    def _prompt(self, instruction: str) -> tuple[str, str, int]:
        hit = self._prompts.get(instruction)
        if hit is None:
            p = self.recipe.prompt(instruction, self.tokenizer)
            n = len(self.tokenizer(p.prefix)["input_ids"]) + len(
                self.tokenizer(p.suffix, add_special_tokens=False)["input_ids"]
            )
            hit = (p.prefix, p.suffix, n)
            if len(self._prompts) < 1024:
                self._prompts[instruction] = hit
        return hit

    # ----- decoding -----

    def answer(
        self,
        queries: list[Query],
        on_text: Callable[[int, str], None] | None = None,
        on_done: Callable[[int, Answer], None] | None = None,
    ) -> list[Answer]:
        """Decode ``queries`` as one batch (greedy): each row to its own ``max_new_tokens``, as decoding it alone
        gives (with fixed windows). ``on_text(i, piece)`` streams row i's text, ``on_done(i, answer)`` says it
        is done, as soon as it is, while the other rows may still decode."""
        streams = [TextStream(self.tokenizer) for _ in queries]
        answers: list[Answer | None] = [None] * len(queries)

        def finish(i: int) -> None:
            if answers[i] is not None:
                return
            s, q = streams[i], queries[i]
            tail = s.close()
            if tail and on_text is not None:
                on_text(i, tail)
            reason = "length" if len(s.ids) >= q.max_new_tokens else "stop"
            answers[i] = Answer(s.text(), reason, len(s.ids), q.prompt_tokens)
            if on_done is not None:
                on_done(i, answers[i])

        def on_token(i: int, token: int | None) -> None:
            if answers[i] is not None:  # past its own max_new_tokens: a longer row of the batch decodes on
                return
            if token is None:
                finish(i)
                return
            piece = streams[i].push(token)
            if piece and on_text is not None:
                on_text(i, piece)
            if len(streams[i].ids) >= queries[i].max_new_tokens:
                finish(i)

        batch = self.collate(
            [{"prefix": q.prefix, "suffix": q.suffix} for q in queries], [q.clip for q in queries], False
        ).to(self.device)
        with self._lock:
            self.model.generate(
                batch.input_features,
                batch.durations_s,
                batch.prefix_ids,
                batch.suffix_ids,
                max(q.max_new_tokens for q in queries),
                on_token=on_token,
            )
        for i in range(len(queries)):
            finish(i)
        return answers
