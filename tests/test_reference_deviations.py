"""Issue 31's audit of the reference's code against ``configs/paper.yaml``: each behaviour it found, under
``paper.yaml`` as the reference's code has it, and the project's default beside it.

- which clips share a training batch: random batches (its HF Trainer's shuffled sampler), not duration buckets;
- which clips share an evaluation batch: each test set in its file's order (src/evaluate_token_asr.py's
  DataLoader, no sampler), not longest first;
- ASR decoding: ``min_new_tokens=1`` and a plain ``max_new_tokens=128`` (src/train_stage0_evaluate_asr.py's
  GenerationConfig), not a bound from the clip's duration;
- the projection's init: PyTorch's ``nn.Linear`` default (``speech_llama_proj`` is never re-initialised), not
  N(0, 0.02) with a zero bias.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from helpers_lsm import TINY_QFORMER, build_models, librispeech_utts

from conftest import REPO
from core.config import BuildConfig, load_config
from core.paths import WorkPaths

PAPER = load_config(REPO / "configs" / "paper.yaml")
DEFAULT = load_config(REPO / "configs" / "tiny.yaml")


def test_paper_yaml_names_each_of_the_references_behaviours_and_the_reproduction_uses_them():
    t, e = PAPER.train, PAPER.evaluate
    assert t.loader.batching == "shuffled" and t.qformer.proj_init == "torch_default"
    assert (e.asr_length, e.max_new_tokens, e.asr_min_new_tokens, e.order) == ("cap", 128, 1, "dataset")
    # the project's defaults stay where docs/reference.md argues for them
    d = DEFAULT
    assert (d.train.loader.batching, d.train.qformer.proj_init) == ("duration", "normal")
    assert (d.evaluate.asr_length, d.evaluate.asr_min_new_tokens, d.evaluate.order) == (
        "duration",
        0,
        "duration",
    )
    # bench/reproduce.py --recipe reference overrides the reproduce configs with paper.yaml's values
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from reproduce import REFERENCE_RECIPE

    raw = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    for key in ("train.qformer.proj_init", "train.loader.batching", "evaluate.asr_length",
                "evaluate.asr_min_new_tokens", "evaluate.order", "train.freeze_llm", "train.lr",
                "train.qformer.stride_s"):  # fmt: skip
        node = raw
        for part in key.split("."):
            node = node[part]
        assert REFERENCE_RECIPE[key] == node, key


# ----- training batches -----


@pytest.fixture(scope="module")
def shards(harvested, tmp_path_factory):
    from test_loader import _rows

    from stages.build.shards import write_shards

    rows = _rows(WorkPaths(harvested).harvest.transcripts, 40)
    out = tmp_path_factory.mktemp("shards") / "shards"
    write_shards(rows, out, BuildConfig(rows_per_shard=15, row_group_rows=4))
    return out


def _batches_and_stream(shards, batching: str):
    from core.lsm.loader import ExampleLoader, _Stream

    loader = ExampleLoader(shards, "train", seed=3, batch_seconds=1e9, max_batch_size=4, shuffle_buffer=8,
                           bucket_batches=100, pad_to="longest", batching=batching)  # fmt: skip
    stream = _Stream(loader, 0, [0])
    # the shuffled stream as plans() draws it: the same generator, seeded the same way
    rows = [r["example_id"] for r in stream.rows(0, np.random.default_rng([3, 0, 0, 0]))]
    batches = [tuple(r["example_id"] for r in b) for b in stream.plans(0)]
    return batches, rows


def test_shuffled_batching_cuts_the_shuffled_stream_as_it_comes_and_duration_batching_does_not(shards):
    batches, rows = _batches_and_stream(shards, "shuffled")
    chunks = sorted(tuple(rows[i : i + 4]) for i in range(0, len(rows), 4))
    assert sorted(batches) == chunks  # random batches: any clips may meet
    batches, rows = _batches_and_stream(shards, "duration")
    assert sorted(batches) != chunks and sorted(x for b in batches for x in b) == sorted(rows)


def test_an_unknown_batching_is_refused(shards):
    from core.lsm.loader import ExampleLoader

    with pytest.raises(ValueError, match="batching must be one of duration, shuffled"):
        ExampleLoader(shards, "train", batching="sorted")


# ----- evaluation -----


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from core.lsm.model import LSMForConditionalGeneration

    return LSMForConditionalGeneration.from_parts(
        *build_models(tmp_path_factory.mktemp("m")), TINY_QFORMER
    ).eval()


def _items():
    from core import audio
    from stages.evaluate.decoding import Item

    out = []
    for i, (utt, path, _) in enumerate(librispeech_utts()[:6]):
        d = len(audio.load(str(path))) / 16000
        row = dict(split="test-clean" if i < 4 else "test-other", audio_path=str(path), offset_s=0.0, duration_s=d,
                   prefix="USER: Transcribe the speech SPEECH:", suffix=" ASSISTANT:", utt_id=utt)  # fmt: skip
        out.append(Item.of_row(f"k{i}", row, 3))
    return out


def _record(model, monkeypatch) -> list[tuple[tuple[float, ...], dict]]:
    """Every call of the model's generate, passed through: (the batch's durations, its options)."""
    seen, real = [], model.generate

    def spy(features, durations, *args, **kwargs):
        seen.append((tuple(round(float(d), 3) for d in durations), dict(kwargs)))
        return real(features, durations, *args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return seen


def test_dataset_order_batches_each_set_in_its_rows_order_and_duration_order_longest_first(
    model, monkeypatch
):
    from stages.evaluate.decoding import decode

    items = _items()
    dur = [round(it.duration_s, 3) for it in items]
    seen = _record(model, monkeypatch)
    decode(model, items, 2, order="dataset")
    assert [d for d, _ in seen] == [tuple(dur[0:2]), tuple(dur[2:4]), tuple(dur[4:6])]
    seen.clear()
    decode(model, items, 2)
    by_set = sorted(dur[:4], reverse=True), sorted(dur[4:], reverse=True)
    assert [d for d, _ in seen] == [tuple(by_set[0][:2]), tuple(by_set[0][2:]), tuple(by_set[1])]
    assert dur[:4] != by_set[0]  # the clips' own order is not already longest first, or this shows nothing


def test_min_new_tokens_reaches_generate(model, monkeypatch):
    """(generate holds eos back for that many tokens: tests/test_model_fast_paths.py)"""
    from stages.evaluate.decoding import decode

    items = _items()[:2]
    seen = _record(model, monkeypatch)
    d = decode(model, items, 2, min_new_tokens=1)
    assert seen and all(kw.get("min_new_tokens") == 1 for _, kw in seen) and d.texts.keys() == {"k0", "k1"}
    seen.clear()
    decode(model, items, 2)
    assert seen and all("min_new_tokens" not in kw for _, kw in seen)


def test_the_asr_length_is_the_plain_cap_under_paper_yaml_and_a_duration_bound_by_default():
    from stages.evaluate.decoding import asr_length

    assert [asr_length(d, PAPER.evaluate) for d in (1.0, 5.0, 20.0)] == [128, 128, 128]
    e = DEFAULT.evaluate
    assert [asr_length(d, e) for d in (1.0, 5.0, 20.0)] == [
        min(e.max_new_tokens, math.ceil(e.tokens_per_s * d) + e.length_slack) for d in (1.0, 5.0, 20.0)
    ]


# ----- the projection's init -----


def test_the_projection_starts_as_pytorch_leaves_a_linear_under_torch_default(tmp_path):
    from core.lsm.model import LSMForConditionalGeneration

    parts = build_models(tmp_path / "m")
    default = LSMForConditionalGeneration.from_parts(*parts, TINY_QFORMER).proj
    ref = LSMForConditionalGeneration.from_parts(
        *parts, TINY_QFORMER.model_copy(update={"proj_init": "torch_default"})
    )
    bound = 1 / math.sqrt(ref.proj.in_features)
    w, b = ref.proj.weight.detach(), ref.proj.bias.detach()
    # nn.Linear's default: weight and bias uniform within 1/sqrt(fan_in), so a uniform's std, bound/sqrt(3)
    assert float(w.abs().max()) <= bound and float(b.abs().max()) <= bound and float(b.abs().max()) > 0
    assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.1 * bound
    assert (
        float(default.bias.abs().max()) == 0
        and abs(float(default.weight.std()) - TINY_QFORMER.init_std) < 0.003
    )
    # and it survives a save and a load: the checkpoint's weights, not a new draw
    ref.save_pretrained(tmp_path / "ckpt")
    again = LSMForConditionalGeneration.from_pretrained(str(tmp_path / "ckpt"))
    assert again.config.proj_init == "torch_default"
    assert bool((again.proj.weight == ref.proj.weight).all()) and bool(
        (again.proj.bias == ref.proj.bias).all()
    )
