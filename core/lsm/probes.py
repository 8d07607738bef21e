"""What the speech carries: answer-token losses with other things in the speech slot.

A model that hears predicts its answer better from its own clip's speech than from another clip's. Teacher
forcing hides how much: once the first answer token is given, an LLM that has memorised a few sentences
knows the rest, so the first token and the later ones are counted apart. Per batch, the same rows scored with

- ``own``: the clip's own speech tokens;
- ``swapped``: the next row's speech (rows rolled by one, each clip with its own token count);
- ``zeroed``: zeros where the speech tokens are;
- ``oracle``: the transcript's own token embeddings (the LLM's input embeddings of its tokens): what a perfect
  connector could hand the LLM; a loss far above 0 here says the LLM, not the speech path, is the limit.

``SpeechProbe`` adds up sums and token counts (so batches and ranks add), and ``summary`` gives nats per
token: ``own_first``, ``own_later``, ``swapped_later``, ... and ``swap_gap_later`` (swapped minus own on the
later tokens: the words the speech carries beyond picking a sentence), ``swap_gap`` over all tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

VARIANTS = ("own", "swapped", "zeroed", "oracle")


@dataclass
class SpeechProbe:
    """Per variant: [first-token loss sum, first tokens, later-token loss sum, later tokens]."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, variant: str, first: torch.Tensor, later: torch.Tensor) -> None:
        t = torch.stack(
            [first.sum(), torch.tensor(float(first.numel())), later.sum(), torch.tensor(float(later.numel()))]
        ).double()
        self.sums[variant] = self.sums.get(variant, torch.zeros(4, dtype=torch.float64)) + t.cpu()

    def all_reduce(self, variants=VARIANTS) -> None:
        """Sum over the ranks of a process group (every rank must call it with the same ``variants``)."""
        import torch.distributed as dist

        stacked = torch.stack([self.sums.get(v, torch.zeros(4, dtype=torch.float64)) for v in variants])
        dist.all_reduce(stacked)
        self.sums = {v: stacked[i] for i, v in enumerate(variants) if stacked[i, 1] + stacked[i, 3] > 0}

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for v, (fs, fn, ls, ln) in ((v, t.tolist()) for v, t in self.sums.items()):
            if fn:
                out[f"{v}_first"] = fs / fn
            if ln:
                out[f"{v}_later"] = ls / ln
            if fn + ln:
                out[v] = (fs + ls) / (fn + ln)
        if "own" in out and "swapped" in out:
            out["swap_gap"] = out["swapped"] - out["own"]
            if "own_later" in out and "swapped_later" in out:
                out["swap_gap_later"] = out["swapped_later"] - out["own_later"]
        return out


def _token_losses(model, out, speech, batch, counts) -> tuple[torch.Tensor, torch.Tensor]:
    """(first-token losses [B], later-token losses [N - B]) of one teacher-forced pass."""
    answers = batch.answer_ids
    lengths = [len(a) for a in answers]
    target = torch.tensor([t for a in answers for t in a], device=out.logits.device)
    if out.logits.dim() == 2:  # logits at the answer positions only, rows in order
        logits = out.logits
    else:  # the LLM's own forward: every position; the answer's from the labels
        _, _, labels = model.assemble(
            speech, batch.durations_s, batch.prefix_ids, batch.suffix_ids, answers, "right", counts
        )
        predicts = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
        logits = out.logits[predicts != -100]
    losses = nn.functional.cross_entropy(logits.float(), target, reduction="none")
    starts = torch.tensor([0, *lengths[:-1]], device=losses.device).cumsum(0)  # each row's first answer token
    is_first = torch.zeros(len(losses), dtype=torch.bool, device=losses.device)
    is_first[starts] = True
    return losses[is_first], losses[~is_first]


@torch.no_grad()
def probe_batch(
    model,
    batch,
    probe: SpeechProbe,
    variants=("own", "swapped", "zeroed"),
    transcript_ids: list[list[int]] | None = None,
) -> None:
    """Add one batch's answer-token losses under each variant to ``probe``. ``swapped`` needs two rows or more
    (a batch of one adds nothing to it); ``oracle`` needs ``transcript_ids`` (each row's transcript tokens)."""
    kw = batch.kwargs()
    own = model.encode_speech(batch.input_features, batch.durations_s, batch.clip_digests)
    own_counts = model.speech_token_counts(batch.durations_s)
    if model.config.ctc_shrink:  # what the LLM reads: the tokens CTC keeps
        own, own_counts = model.llm_reads(own, own_counts)
    b = own.shape[0]
    for v in variants:
        counts = own_counts
        if v == "own":
            speech = own
        elif v == "swapped":
            if b < 2:
                continue
            perm = torch.roll(torch.arange(b), 1)
            speech = own[perm]
            counts = [own_counts[int(j)] for j in perm]
        elif v == "zeroed":
            speech = torch.zeros_like(own)
        elif v == "oracle":
            if transcript_ids is None:
                raise ValueError("the oracle probe needs each row's transcript token ids")
            embed = model.llm.get_input_embeddings()
            counts = [len(t) for t in transcript_ids]
            speech = own.new_zeros(b, max(counts), own.shape[-1])
            for i, t in enumerate(transcript_ids):
                speech[i, : len(t)] = embed(torch.tensor(t, device=own.device)).to(own.dtype)
        else:
            raise ValueError(f"unknown probe variant {v!r}; known: {', '.join(VARIANTS)}")
        out = model(**kw, speech=speech, speech_counts=counts)
        probe.add(v, *_token_losses(model, out, speech, batch, counts))
