"""The training step computes only what can learn: frozen encoder frames from a cache, the Q-Former over the
windows that hold audio, the frozen LLM's prompt prefix once without gradient, logits at answer positions only.
Each fast path must give the loss and the gradients of the plain one (the whole sequence, every window, the
encoder run on every clip, logits everywhere)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers_lsm import TINY_QFORMER, build_models, demo_rows

from core import audio
from core.lsm.batch import Collate
from core.lsm.encoder_cache import EncoderCache, encoder_identity, for_model
from core.lsm.model import LSMForConditionalGeneration

TOL = 1e-5


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("lsm-models"))


@pytest.fixture(scope="module")
def rows_clips():
    # test-clean (6.6 s, 16.7 s, 4.8 s) and two dev-clean clips: different lengths and different prompts
    rows = [r for r in demo_rows() if r["split"] == "test-clean"] + [
        r for r in demo_rows() if r["split"] != "test-clean"
    ][:2]
    rows = [dict(r) for r in rows]
    rows[3]["prefix"] = rows[3]["prefix"] + " Say it again, briefly"  # a third, longer prefix
    clips = [audio.load(r["audio_path"], r["offset_s"], r["duration_s"]) for r in rows]
    return rows, clips


def lsm(parts, **flags) -> LSMForConditionalGeneration:
    torch.manual_seed(0)
    qformer = TINY_QFORMER.model_copy(update=flags.pop("qformer", {}))
    return LSMForConditionalGeneration.from_parts(*parts, qformer, **flags).eval()


def plain_loss(model, batch) -> torch.Tensor:
    """Today's path: every window through the Q-Former, the whole sequence through the LLM, logits everywhere."""
    frames = model.encode_frames(batch.input_features)
    _, kernel, stride, w = model.batch_windows(batch.durations_s)
    if model.config.window_mode == "fixed":
        w = model.num_windows
    t = (w - 1) * stride + kernel
    x = model.ln_speech(frames[:, :t])
    b, _, d = x.shape
    windows = x.unfold(1, kernel, stride)[:, :w].permute(0, 1, 3, 2).reshape(b * w, kernel, d)
    out = model.qformer(
        query_embeds=model.query_tokens.expand(b * w, -1, -1), encoder_hidden_states=windows
    ).last_hidden_state
    speech = model.proj(out).reshape(b, w * model.config.num_queries, -1)
    embeds, mask, labels = model.assemble(
        speech, batch.durations_s, batch.prefix_ids, batch.suffix_ids, batch.answer_ids, "right"
    )
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    keep = labels[:, 1:] != -100
    return F.cross_entropy(logits[:, :-1][keep].float(), labels[:, 1:][keep])


def grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for n in a:
        assert torch.allclose(a[n], b[n], atol=TOL, rtol=1e-4), (n, (a[n] - b[n]).abs().max())


@pytest.mark.parametrize(
    "flags",
    [
        dict(freeze_llm=True),  # prefix states reused, answer logits only
        dict(freeze_llm=False, lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
        dict(freeze_llm=False),  # the whole LLM trains: answer logits only
        dict(freeze_llm=True, qformer={"window_mode": "per_batch"}),
    ],
    ids=["frozen", "lora", "full", "frozen-per-batch"],
)
def test_fast_forward_gives_the_plain_paths_loss_and_gradients(parts, rows_clips, flags):
    model = lsm(parts, **flags)
    if flags.get("lora"):  # peft starts B at zero: move it so the adapters' gradients mean something
        with torch.no_grad():
            for n, p in model.llm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    rows, clips = rows_clips
    batch = Collate.for_model(model)(rows, clips, with_answer=True)
    assert len({tuple(p) for p in batch.prefix_ids}) >= 2
    frozen = flags.get("freeze_llm", False)
    assert model._prefix_reusable() == frozen
    want_loss = plain_loss(model, batch)
    want = grads(model, want_loss)
    for _attempt in range(2):  # the second time the prefix states come from the kept ones
        out = model(**batch.kwargs())
        assert abs(out.loss.item() - want_loss.item()) < TOL
        assert out.logits.shape[0] == sum(len(a) for a in batch.answer_ids)
        assert_same(grads(model, out.loss), want)
    if frozen:
        assert len(model._prefix_store) == len({tuple(p) for p in batch.prefix_ids})
    # and "all" logits give the LLM's own output, its loss the same
    full = model(**batch.kwargs(), logits="all")
    assert (
        full.logits.shape[:2] == (len(rows), full.logits.shape[1])
        and abs(full.loss.item() - want_loss.item()) < TOL
    )


def test_fixed_windows_compute_only_the_windows_that_hold_audio(parts, rows_clips):
    model = lsm(parts, freeze_llm=True)
    rows, clips = rows_clips
    batch = Collate.for_model(model)(rows, clips, with_answer=False)
    counts = model.window_counts(batch.durations_s)
    assert max(counts) < model.num_windows  # every clip is shorter than 30 s
    seen = []
    hook = model.qformer.register_forward_hook(
        lambda m, a, kw, out: seen.append(kw["query_embeds"].shape[0]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            fast = model.encode_speech(batch.input_features, batch.durations_s)
            frames = model.encode_frames(batch.input_features)
            every = model.connect(frames, [model.chunk_s] * len(rows))  # all 88 windows of every clip
    finally:
        hook.remove()
    assert seen == [sum(counts), len(rows) * model.num_windows]
    for i, c in enumerate(counts):
        assert torch.allclose(fast[i, :c], every[i, :c], atol=1e-6)
        assert not fast[i, c:].any()  # past its own windows a clip's row is padding nothing reads


def test_per_batch_windows_still_attend_every_window_of_the_batch(parts, rows_clips):
    model = lsm(parts, freeze_llm=True, qformer={"window_mode": "per_batch"})
    rows, clips = rows_clips
    batch = Collate.for_model(model)(rows, clips, with_answer=False)
    _, _, _, w = model.batch_windows(batch.durations_s)
    assert model.window_counts(batch.durations_s) == [w] * len(rows)
    with torch.no_grad():
        speech = model.encode_speech(batch.input_features, batch.durations_s)
    assert speech.shape[1] == w and speech.abs().sum(-1).gt(0).all()


# ------------------------------------------------------------------------------------------ the encoder cache


def attach(model, root, **features) -> EncoderCache:
    settings = {**for_model(model, root).features, **features}
    cache = EncoderCache(root, encoder_identity(model.encoder), settings)
    model.use_encoder_cache(cache)
    return cache


def test_encoder_cache_gives_the_same_loss_and_gradients_and_is_read_the_second_time(
    parts, rows_clips, tmp_path
):
    model = lsm(parts, freeze_llm=True)
    rows, clips = rows_clips
    batch = Collate.for_model(model)(rows, clips, with_answer=True)
    model.use_encoder_cache(None)
    want_loss = model(**batch.kwargs()).loss
    want = grads(model, want_loss)
    cache = attach(model, tmp_path / "enc")
    for n_written, n_hits in ((len(rows), 0), (len(rows), len(rows))):
        out = model(**batch.kwargs())
        assert abs(out.loss.item() - want_loss.item()) < TOL
        assert_same(grads(model, out.loss), want)
        assert (cache.stats.written, cache.stats.hits) == (n_written, n_hits)
    # only the clip's own frames are stored (up to the end of its last window), in the encoder's dtype
    entry = cache.get(batch.clip_digests[2], 1)
    stored = [f for f in (tmp_path / "enc").rglob("*.safetensors")]
    assert len(stored) == len(set(batch.clip_digests)) == len(rows) - 1  # two rows share one clip
    from safetensors import safe_open

    need = model.frames_needed(batch.durations_s)
    for d, n in zip(batch.clip_digests, need, strict=True):
        with safe_open(str(cache.path(d)), framework="pt") as f:
            t = f.get_tensor("frames")
        assert t.shape == (n, model.config.encoder_config.d_model) and t.dtype == model.encoder.dtype
        assert n < model.total_frames
    assert entry is not None


def test_a_changed_encoder_clip_or_feature_setting_misses_the_cache(parts, rows_clips, tmp_path):
    model = lsm(parts, freeze_llm=True)
    rows, clips = rows_clips
    collate = Collate.for_model(model)
    batch = collate(rows[:2], clips[:2], with_answer=True)
    cache = attach(model, tmp_path)
    with torch.no_grad():
        model(**batch.kwargs())
    assert cache.stats.written == 2
    # the same encoder, loaded anew: the same identity, every clip a hit
    again = attach(lsm(parts, freeze_llm=True), tmp_path)
    assert again.identity == cache.identity
    assert all(again.get(d, 1) is not None for d in batch.clip_digests)
    # another encoder (one weight changed)
    other = lsm(parts, freeze_llm=True)
    with torch.no_grad():
        next(other.encoder.parameters()).add_(1e-3)
    changed = attach(other, tmp_path)
    assert changed.identity != cache.identity
    assert all(changed.get(d, 1) is None for d in batch.clip_digests)
    # another clip: the same file but another segment, or one sample changed
    cut = collate(rows[:1], [clips[0][:-160]], with_answer=True)
    louder = clips[0].copy()
    louder[100] += 1e-3
    assert cut.clip_digests[0] != batch.clip_digests[0]
    assert collate(rows[:1], [louder], with_answer=True).clip_digests[0] != batch.clip_digests[0]
    assert cache.get(cut.clip_digests[0], 1) is None
    # another feature setting (mel bins, input length, padding)
    for setting in ({"n_mels": 128}, {"chunk_s": 20}, {"pad_to": "longest"}):
        other_features = attach(lsm(parts, freeze_llm=True), tmp_path, **setting)
        assert all(other_features.get(d, 1) is None for d in batch.clip_digests), setting
    # a request for more frames than an entry holds (a longer clip beside it under per-batch windows) misses
    need = model.frames_needed(batch.durations_s)[0]
    assert cache.get(batch.clip_digests[0], need) is not None
    assert cache.get(batch.clip_digests[0], need + 1) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "swap"])
def test_a_damaged_cache_entry_is_recomputed_never_read(parts, rows_clips, tmp_path, damage):
    model = lsm(parts, freeze_llm=True)
    rows, clips = rows_clips
    batch = Collate.for_model(model)(rows[:2], clips[:2], with_answer=True)
    with torch.no_grad():
        want = model(**batch.kwargs()).loss
    cache = attach(model, tmp_path)
    with torch.no_grad():
        model(**batch.kwargs())
    a, b = (cache.path(d) for d in batch.clip_digests)
    raw = a.read_bytes()
    if damage == "truncate":
        a.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":  # one bit of the tensor's last byte: the file still parses
        a.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    elif damage == "garbage":
        a.write_bytes(b"\0" * 64)
    else:  # another clip's entry under this clip's name
        a.write_bytes(b.read_bytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = model(**batch.kwargs()).loss
    assert abs(got.item() - want.item()) < TOL
    assert cache.stats.damaged == 1 and any("recomputing" in str(w.message) for w in caught)
    assert cache.get(batch.clip_digests[0], 1) is not None  # rewritten whole


def test_the_encoder_cache_is_refused_while_the_encoder_trains(parts, tmp_path):
    model = lsm(parts, freeze_encoder=False, freeze_llm=True)
    with pytest.raises(ValueError, match="encoder trains"):
        attach(model, tmp_path)


def test_a_cache_that_cannot_be_written_costs_speed_only(parts, rows_clips, tmp_path):
    model = lsm(parts, freeze_llm=True)
    rows, clips = rows_clips
    batch = Collate.for_model(model)(rows[:2], clips[:2], with_answer=True)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache's folder should be")
    cache = attach(model, blocker)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = model(**batch.kwargs()).loss
    model.use_encoder_cache(None)
    with torch.no_grad():
        want = model(**batch.kwargs()).loss
    assert abs(got.item() - want.item()) < TOL
    assert cache.stats.write_errors == 1 and not cache.writable
    assert any("cannot write" in str(w.message) for w in caught)


def test_prefix_states_are_dropped_when_the_weights_may_have_changed(parts, rows_clips):
    model = lsm(parts, freeze_llm=True)
    rows, clips = rows_clips
    batch = Collate.for_model(model)(rows[:2], clips[:2], with_answer=True)
    with torch.no_grad():
        model(**batch.kwargs())
    assert model._prefix_store
    other = copy.deepcopy(model)
    other.train()
    assert not getattr(other, "_prefix_store", None)


# ------------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("window_mode", ["fixed", "per_batch"])
def test_greedy_decoding_gives_the_llms_own_generate_tokens(parts, rows_clips, window_mode):
    model = lsm(parts, freeze_llm=True, qformer={"window_mode": window_mode})
    rows, clips = rows_clips
    batch = Collate.for_model(model)(rows, clips, with_answer=False)
    args = (batch.input_features, batch.durations_s, batch.prefix_ids, batch.suffix_ids, 12)
    assert model._greedy_ok()
    fast = model.generate(*args)
    model.fast_decode = False  # the LLM's own generate over left-padded rows
    try:
        plain = model.generate(*args)
        forced_plain = model.generate(*args, min_new_tokens=12)
    finally:
        model.fast_decode = True
    assert fast == plain
    assert any(len(r) for r in fast)
    # with a minimum, eos is held back exactly as generate's own min_new_tokens does
    assert model.generate(*args, min_new_tokens=12) == forced_plain
    assert all(len(r) == 12 for r in forced_plain)
    # a row decodes the same alone as in its batch (rows leave the batch as they finish)
    for i in range(len(rows)):
        one = Collate.for_model(model)([rows[i]], [clips[i]], with_answer=False)
        alone = model.generate(one.input_features, one.durations_s, one.prefix_ids, one.suffix_ids, 12)
        if window_mode == "fixed":  # per-batch windows depend on the batch by design
            assert alone[0] == fast[i]


# the LLM's own generate refuses max_new_tokens 0
@pytest.mark.parametrize(
    "fast_decode, max_new_tokens", [(True, 0), (True, 1), (True, 12), (False, 1), (False, 12)]
)
def test_on_token_streams_each_rows_tokens_then_one_end_as_decoded(
    parts, rows_clips, fast_decode, max_new_tokens
):
    model = lsm(parts, freeze_llm=True)
    rows, clips = rows_clips
    batch = Collate.for_model(model)(rows, clips, with_answer=False)
    args = (batch.input_features, batch.durations_s, batch.prefix_ids, batch.suffix_ids, max_new_tokens)
    events: list[tuple[int, int | None]] = []
    model.fast_decode = fast_decode
    try:
        got = model.generate(*args, on_token=lambda r, t: events.append((r, t)))
    finally:
        model.fast_decode = True
    assert got == model.generate(*args)  # the hook changes nothing
    for i, row in enumerate(got):
        mine = [t for r, t in events if r == i]
        assert mine == row + [None]  # its tokens in order, then exactly one end
    if fast_decode and max_new_tokens == 12:  # greedy streams step by step: rows interleave
        assert [r for r, _ in events[: len(rows)]] == list(range(len(rows)))


def test_a_generation_option_or_logits_processor_goes_through_the_llms_generate(parts, rows_clips):
    model = lsm(parts, freeze_llm=True)
    assert model._greedy_ok()
    model.llm.generation_config.repetition_penalty = 1.3
    try:
        assert not model._greedy_ok()
    finally:
        model.llm.generation_config.repetition_penalty = 1.0
    rows, clips = rows_clips
    batch = Collate.for_model(model)(rows[:2], clips[:2], with_answer=False)
    args = (batch.input_features, batch.durations_s, batch.prefix_ids, batch.suffix_ids, 6)
    beams = model.generate(*args, num_beams=2)
    assert len(beams) == 2
