"""Batched decoding with the KV cache: greedy or beam search through the LLM's own ``generate``.

Items are batched in order of duration so that a batch pads little, decoded with left padding (every
row's next token sits in the last column), and returned by key, so the caller's order never depends
on the batching. Each item carries its own token bound; a batch decodes to the largest bound of its
rows and cuts every row to its own, which for greedy decoding is what decoding the row alone gives.
Decoding time (features, encoder, generate) is measured per group, for RTFx.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache

from core import audio
from core.log import console, progress


@dataclass(frozen=True)
class Item:
    key: str
    group: str  # timings are summed per group (an eval set)
    audio_path: str
    offset_s: float
    duration_s: float
    prefix: str
    suffix: str
    max_new_tokens: int
    utt_id: str = ""

    @classmethod
    def of_row(
        cls, key: str, example: dict, max_new_tokens: int, group: str | None = None, prompt=None
    ) -> Item:
        """An item for an examples-table row: its own prompt around the speech, or ``prompt`` (a
        ``core.prompts.SpeechPrompt``) in its place."""
        if prompt is not None:
            example = {**example, "prefix": prompt.prefix, "suffix": prompt.suffix}
        return cls(
            key,
            example["split"] if group is None else group,
            example["audio_path"],
            example["offset_s"],
            example["duration_s"],
            example["prefix"],
            example["suffix"],
            max_new_tokens,
            example["utt_id"],
        )

    @classmethod
    def asking(
        cls, key: str, example: dict, instruction: str, fmt: str, max_new_tokens: int, tokenizer=None
    ) -> Item:
        """An item that asks ``instruction`` about the speech of an examples-table row (``tokenizer``: the
        model's, which ``chat_template`` prompts need)."""
        from core.prompts import speech_prompt

        p = speech_prompt(instruction, fmt, tokenizer)
        return cls(
            key,
            example["split"],
            example["audio_path"],
            example["offset_s"],
            example["duration_s"],
            p.prefix,
            p.suffix,
            max_new_tokens,
            example["utt_id"],
        )


@dataclass
class Decoded:
    texts: dict[str, str] = field(default_factory=dict)
    failed: dict[str, audio.AudioError] = field(default_factory=dict)  # key -> why its audio did not load
    audio_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    decode_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def asr_length(duration_s: float, cfg) -> int:
    """The most tokens an ASR answer may have under ``cfg`` (``core.config.EvaluateConfig``): the cap for every
    clip (``asr_length: cap``, the reference's), or a bound from the clip's duration under the cap."""
    if cfg.asr_length == "cap":
        return cfg.max_new_tokens
    return length_bound(duration_s, cfg.tokens_per_s, cfg.length_slack, cfg.max_new_tokens)


def length_bound(duration_s: float, tokens_per_s: float, slack: int, cap: int) -> int:
    """Tokens an ASR answer may take for a clip: proportional to its duration, never over the cap."""
    return max(1, min(cap, math.ceil(tokens_per_s * duration_s) + slack))


@lru_cache(maxsize=64)
def _clip(path: str, offset_s: float, duration_s: float):
    # The probe and QA ask several questions about each clip: read it once.
    return audio.load(path, offset_s, duration_s)


def loaded_batches(order: list[Item], batch_size: int, failed: dict, load=audio.load):
    """``order`` in batches of ``batch_size``, each batch's clips loaded and split by group: yields (items in the
    batch, {group: [(item, clip)]}). An item whose audio cannot be loaded lands in ``failed``. Timings stay per
    group: with ``order`` sorted by group first, a batch seldom holds two."""
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        groups: dict[str, list] = {}
        for it in chunk:
            try:
                clip = load(it.audio_path, it.offset_s, it.duration_s)
            except audio.AudioError as e:
                failed[it.key] = e
                continue
            groups.setdefault(it.group, []).append((it, clip))
        yield len(chunk), groups


def decode(
    model,
    items: list[Item],
    batch_size: int,
    num_beams: int = 1,
    label: str = "decode",
    min_new_tokens: int = 0,
    order: str = "duration",
) -> Decoded:
    """Decode every item; an item whose audio cannot be loaded lands in ``failed``, never silently dropped.

    Batches are made by ``core.lsm.batch.Collate``, the function the training loader uses. ``order``: which
    items share a batch (``core.config.EvaluateConfig.order``): each group's longest first (``duration``), or
    each group's items as given (``dataset``). ``min_new_tokens``: no answer ends before that many tokens."""
    import torch

    from core.lsm.batch import Collate

    collate = Collate.for_model(model)

    device = next(model.parameters()).device
    res = Decoded()
    if order not in ("duration", "dataset"):
        raise ValueError(f"decode: order {order!r} is neither duration nor dataset")
    if order == "dataset":  # a stable sort keeps each group's items in the order given
        first = {g: i for i, g in enumerate(dict.fromkeys(it.group for it in items))}
        order_ = sorted(items, key=lambda it: first[it.group])
    else:
        order_ = sorted(items, key=lambda it: (it.group, -it.duration_s, it.utt_id, it.key))
    _clip.cache_clear()
    with progress() as bar:
        task = bar.add_task(label, total=len(order_), status="")
        for n, batch_groups in loaded_batches(order_, batch_size, res.failed, _clip):
            for group, rows in batch_groups.items():
                t0 = time.perf_counter()
                batch = collate(
                    [dict(prefix=it.prefix, suffix=it.suffix) for it, _ in rows],
                    [c for _, c in rows],
                    with_answer=False,
                ).to(device)
                bound = max(it.max_new_tokens for it, _ in rows)
                ids = model.generate(
                    batch.input_features,
                    batch.durations_s,
                    batch.prefix_ids,
                    batch.suffix_ids,
                    bound,
                    num_beams,
                    clip_digests=batch.clip_digests,
                    **({"min_new_tokens": min_new_tokens} if min_new_tokens else {}),
                )
                if device.type == "cuda":
                    torch.cuda.synchronize()
                res.decode_s[group] += time.perf_counter() - t0
                for (it, c), row in zip(rows, ids, strict=True):
                    res.texts[it.key] = model.tokenizer.decode(
                        row[: it.max_new_tokens], skip_special_tokens=True
                    ).strip()
                    res.audio_s[group] += len(c) / audio.TARGET_SR
            bar.update(task, advance=n, status=f"{len(res.failed)} rejected" if res.failed else "")
    for key, e in res.failed.items():
        console.print(f"[yellow]{label}: warning: {key}: {e}[/]")
    return res
