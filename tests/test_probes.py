"""The speech probes (``core.lsm.probes``): each variant's losses against an independent computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_lsm import TINY_QFORMER, build_models, demo_rows

from core import audio
from core.lsm.batch import Collate
from core.lsm.model import LSMForConditionalGeneration
from core.lsm.probes import SpeechProbe, probe_batch

TOL = 1e-4


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("lsm-models"))


@pytest.fixture(scope="module")
def rows_clips():
    rows = [dict(r) for r in demo_rows() if r["split"] == "test-clean"]
    clips = [audio.load(r["audio_path"], r["offset_s"], r["duration_s"]) for r in rows]
    return rows, clips


def lsm(parts, **flags) -> LSMForConditionalGeneration:
    torch.manual_seed(0)
    return LSMForConditionalGeneration.from_parts(*parts, TINY_QFORMER, **flags).eval()


def text_only_losses(model, prefix, middle, suffix, answer) -> torch.Tensor:
    """The LLM alone over token ids: the loss of each answer token after prefix + middle + suffix."""
    ids = torch.tensor([prefix + middle + suffix + answer])
    logits = model.llm(input_ids=ids).logits[0, :-1]
    start = len(prefix) + len(middle) + len(suffix)
    return F.cross_entropy(logits[start - 1 :].float(), ids[0, start:], reduction="none")


@pytest.mark.parametrize("freeze_llm", [True, False], ids=["frozen-llm", "trained-llm"])
def test_own_speech_losses_are_the_training_loss_split_into_first_and_later_tokens(
    parts, rows_clips, freeze_llm
):
    model = lsm(parts, freeze_llm=freeze_llm)
    rows, clips = rows_clips
    batch = Collate.for_model(model)(rows, clips, with_answer=True)
    probe = SpeechProbe()
    probe_batch(model, batch, probe, variants=("own",))
    s = probe.summary()
    with torch.no_grad():
        loss = model(**batch.kwargs()).loss.item()
    n = sum(len(a) for a in batch.answer_ids)
    assert abs(s["own"] - loss) < TOL
    first = s["own_first"] * len(rows)
    assert abs(first + s["own_later"] * (n - len(rows)) - loss * n) < TOL * n


def test_the_oracle_is_the_llm_reading_the_transcripts_tokens(parts, rows_clips):
    model = lsm(parts, freeze_llm=True)
    rows, clips = rows_clips
    batch = Collate.for_model(model)(rows, clips, with_answer=True)
    tok = model.tokenizer
    transcripts = [tok(r["transcript"], add_special_tokens=False)["input_ids"] for r in rows]
    probe = SpeechProbe()
    probe_batch(model, batch, probe, variants=("oracle",), transcript_ids=transcripts)
    with torch.no_grad():
        want = [
            text_only_losses(model, p, t, s, a)
            for p, t, s, a in zip(
                batch.prefix_ids, transcripts, batch.suffix_ids, batch.answer_ids, strict=True
            )
        ]
    got = probe.summary()
    assert abs(got["oracle_first"] - torch.stack([w[0] for w in want]).mean().item()) < TOL
    assert abs(got["oracle_later"] - torch.cat([w[1:] for w in want]).mean().item()) < TOL


def test_swapped_speech_is_each_row_scored_with_the_next_rows_clip(parts, rows_clips):
    """Row i with row i-1's speech (rolled by one) gives the loss of a batch whose row i holds that clip."""
    model = lsm(parts, freeze_llm=True)
    rows, clips = rows_clips
    collate = Collate.for_model(model)
    batch = collate(rows, clips, with_answer=True)
    probe = SpeechProbe()
    probe_batch(model, batch, probe, variants=("own", "swapped", "zeroed"))
    s = probe.summary()
    rolled = collate(rows, clips[-1:] + clips[:-1], with_answer=True)  # each row's text, another row's clip
    with torch.no_grad():
        want = model(**rolled.kwargs()).loss.item()
    assert abs(s["swapped"] - want) < TOL
    assert s["swap_gap"] == pytest.approx(s["swapped"] - s["own"])
    assert s["zeroed"] != s["own"]
    # one row alone has no other clip to swap in: nothing is counted
    alone = SpeechProbe()
    probe_batch(model, collate(rows[:1], clips[:1], with_answer=True), alone, variants=("swapped",))
    assert "swapped" not in alone.summary()
