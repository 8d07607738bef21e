"""The LSM: assembly from pretrained parts, save/load, the sequence layout, labels and padding."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers_lsm import TINY_QFORMER, build_models, demo_rows

from core import audio
from core.lsm.batch import Collate
from core.lsm.model import LSMForConditionalGeneration, check_checkpoint


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("lsm-models"))


@pytest.fixture(scope="module")
def model(parts):
    torch.manual_seed(0)
    return LSMForConditionalGeneration.from_parts(*parts, TINY_QFORMER).eval()


@pytest.fixture(scope="module")
def eval_rows():
    # The three test-clean clips (6.6 s, 16.7 s, 4.8 s): different lengths, so batches need padding.
    rows = [r for r in demo_rows() if r["split"] == "test-clean"]
    clips = [audio.load(r["audio_path"], r["offset_s"], r["duration_s"]) for r in rows]
    return rows, clips


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("lsm-ckpt") / "checkpoint"
    model.save_pretrained(out)
    return out


def test_from_parts_keeps_pretrained_weights_and_freezes_encoder(model, parts):
    from transformers import AutoModelForCausalLM, WhisperModel

    whisper_dir, llm_dir = parts
    enc = WhisperModel.from_pretrained(whisper_dir).encoder.state_dict()
    llm = AutoModelForCausalLM.from_pretrained(llm_dir).state_dict()
    assert enc.keys() == model.encoder.state_dict().keys()
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in enc.items())
    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in llm.items())
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.llm.parameters())
    assert model.query_tokens.requires_grad and model.query_tokens.abs().sum() > 0  # initialized, not zeros
    # The reference's windows: 17 of Whisper's 1500 frames, 88 windows per 30 s, cross-attention everywhere.
    assert (model.kernel, model.stride, model.num_windows) == (17, 17, 88)
    assert model.config.qformer_config.cross_attention_frequency == 1
    assert model.config.llm_config.model_type == "llama"


def test_save_load_round_trip_gives_identical_logits(model, saved, eval_rows):
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    check_checkpoint(saved)
    assert (saved / "model.safetensors").is_file() and not list(saved.glob("*.bin"))
    loaded = LSMForConditionalGeneration.from_pretrained(saved).eval()
    tok = AutoTokenizer.from_pretrained(saved)
    fe = WhisperFeatureExtractor.from_pretrained(saved)
    assert tok.get_vocab() == model.tokenizer.get_vocab()
    assert fe.to_dict() == model.feature_extractor.to_dict()
    assert loaded.config.window_s == model.config.window_s and loaded.num_windows == model.num_windows
    assert not any(p.requires_grad for p in loaded.encoder.parameters())

    rows, clips = eval_rows
    batch = Collate(tok, fe.feature_size, fe.chunk_length)(rows, clips, with_answer=True)
    with torch.no_grad():
        a = model(**batch.kwargs())
        b = loaded(**batch.kwargs())
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.loss, b.loss)


def test_incomplete_checkpoint_names_what_is_missing(saved, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="feature extractor"):
        LSMForConditionalGeneration.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_checkpoint(tmp_path / "nowhere")


def test_speech_token_count_follows_duration(model):
    # A window is kept when it holds at least one encoder frame (50 Hz) of real audio.
    assert model.num_speech_tokens(3.32) == math.ceil(3.32 * 50 / 17) == 10
    assert model.num_speech_tokens(0.01) == 1
    assert model.num_speech_tokens(0.34) == 1 and model.num_speech_tokens(0.35) == 2
    assert model.num_speech_tokens(30.0) == 88 and model.num_speech_tokens(45.0) == 88
    speech = model.encode_speech(torch.zeros(2, 80, 3000))
    assert speech.shape == (2, 88, model.config.llm_config.hidden_size)


def test_layout_labels_cover_answer_and_eos_only(model, eval_rows):
    rows, clips = eval_rows
    tok = model.tokenizer
    batch = Collate.for_model(model)(rows, clips, with_answer=True)
    with torch.no_grad():
        speech = model.encode_speech(batch.input_features)
        embeds, mask, labels = model.assemble(
            speech, batch.durations_s, batch.prefix_ids, batch.suffix_ids, batch.answer_ids, "right"
        )
    embed = model.llm.get_input_embeddings()
    for i, r in enumerate(rows):
        p, s, a = batch.prefix_ids[i], batch.suffix_ids[i], batch.answer_ids[i]
        n = model.num_speech_tokens(float(batch.durations_s[i]))
        assert n == math.ceil(r["duration_s"] * 50 / 17)
        length = len(p) + n + len(s) + len(a)
        # right padding: real tokens first, then padding that nothing attends to and no loss covers
        assert mask[i].tolist() == [1] * length + [0] * (mask.shape[1] - length)
        assert p[0] == tok.bos_token_id and a[-1] == tok.eos_token_id
        assert a[:-1] == tok(r["answer"], add_special_tokens=False)["input_ids"]
        expected = [-100] * (len(p) + n + len(s)) + a + [-100] * (mask.shape[1] - length)
        assert labels[i].tolist() == expected
        # [prefix][speech tokens of the valid windows only][suffix][answer]
        assert torch.equal(embeds[i, : len(p)], embed(torch.tensor(p)))
        assert torch.equal(embeds[i, len(p) : len(p) + n], speech[i, :n])
        assert torch.equal(embeds[i, len(p) + n : len(p) + n + len(s)], embed(torch.tensor(s)))

    # The model's loss is the mean cross-entropy over exactly those positions.
    with torch.no_grad():
        out = model(**batch.kwargs(), logits="all")
        answer_only = model(**batch.kwargs())
    logits, targets = out.logits[:, :-1], labels[:, 1:]
    keep = targets != -100
    assert keep.sum() == sum(len(a) for a in batch.answer_ids)
    manual = F.cross_entropy(logits[keep].float(), targets[keep])
    assert torch.allclose(out.loss, manual, atol=1e-5)
    # by default the logits are computed at those positions only, in row order
    assert torch.allclose(answer_only.logits, logits[keep], atol=1e-5)
    assert torch.allclose(answer_only.loss, manual, atol=1e-5)


def test_left_padded_batch_decodes_like_one_at_a_time(model, eval_rows):
    rows, clips = eval_rows
    collate = Collate.for_model(model)
    batch = collate(rows, clips, with_answer=False)
    together = model.generate(
        batch.input_features, batch.durations_s, batch.prefix_ids, batch.suffix_ids, max_new_tokens=12
    )
    with torch.no_grad():
        speech = model.encode_speech(batch.input_features)
        embeds, mask, _ = model.assemble(
            speech, batch.durations_s, batch.prefix_ids, batch.suffix_ids, None, "left"
        )
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        last = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, -1]
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padding: every row ends in the last column
    for i in range(len(rows)):
        one = collate([rows[i]], [clips[i]], with_answer=False)
        alone = model.generate(
            one.input_features, one.durations_s, one.prefix_ids, one.suffix_ids, max_new_tokens=12
        )
        assert together[i] == alone[0]
        with torch.no_grad():
            s1 = model.encode_speech(one.input_features)
            e1, m1, _ = model.assemble(s1, one.durations_s, one.prefix_ids, one.suffix_ids, None, "left")
            l1 = model.llm(inputs_embeds=e1, attention_mask=m1).logits[:, -1]
        assert torch.allclose(last[i], l1[0], atol=1e-4)


LORA = dict(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])


def test_flags_say_what_trains(parts):
    torch.manual_seed(0)
    m = LSMForConditionalGeneration.from_parts(
        *parts, TINY_QFORMER, freeze_encoder=False, freeze_qformer=True, freeze_proj=True
    )
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"encoder", "llm"}
    m.train()
    assert m.encoder.training and not m.qformer.training  # a frozen part keeps its dropout off
    with pytest.raises(ValueError, match="lora"):
        LSMForConditionalGeneration.from_parts(*parts, TINY_QFORMER, freeze_llm=True, lora=LORA)


def _adapters(model, enabled: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.llm.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)


def test_lora_trains_adapters_only_and_round_trips(parts, eval_rows, tmp_path):
    torch.manual_seed(0)
    m = LSMForConditionalGeneration.from_parts(*parts, TINY_QFORMER, lora=LORA).eval()
    llm_trainable = [n for n, p in m.llm.named_parameters() if p.requires_grad]
    assert llm_trainable and all("lora_" in n for n in llm_trainable)
    assert {n.rsplit(".", 3)[0].rsplit(".", 1)[1] for n in llm_trainable} == {"q_proj", "v_proj"}
    assert m.proj.weight.requires_grad and not any(p.requires_grad for p in m.encoder.parameters())

    rows, clips = eval_rows
    batch = Collate.for_model(m)(rows, clips, with_answer=True)
    with torch.no_grad():
        with_lora = m(**batch.kwargs())
        _adapters(m, False)
        without = m(**batch.kwargs())
        _adapters(m, True)
    # peft starts B at zero: the adapters change nothing until they train
    assert torch.allclose(with_lora.logits, without.logits, atol=1e-6)

    with torch.no_grad():  # give the adapters weight so that the round trip has something to carry
        for n, p in m.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
        changed = m(**batch.kwargs())
    assert not torch.allclose(changed.logits, without.logits, atol=1e-3)
    m.save_pretrained(tmp_path / "lora")
    loaded = LSMForConditionalGeneration.from_pretrained(tmp_path / "lora").eval()
    with torch.no_grad():
        again = loaded(**batch.kwargs())
    assert torch.equal(changed.logits, again.logits)
    assert all("lora_" in n for n, p in loaded.llm.named_parameters() if p.requires_grad)
    out = loaded.generate(
        batch.input_features, batch.durations_s, batch.prefix_ids, batch.suffix_ids, max_new_tokens=4
    )
    assert len(out) == len(rows)


def test_model_init_writes_one_directory_that_loads_back(parts, tmp_path):
    from click.testing import CliRunner

    from core.paths import REPO_ROOT
    from splsm.cli import main

    whisper_dir, llm_dir = parts
    out = tmp_path / "lsm"
    res = CliRunner().invoke(
        main,
        [
            "model",
            "init",
            "--whisper",
            str(whisper_dir),
            "--llm",
            str(llm_dir),
            "--out",
            str(out),
            "--config",
            str(REPO_ROOT / "configs" / "tiny.yaml"),
        ],
    )
    assert res.exit_code == 0, res.output
    check_checkpoint(out)
    model = LSMForConditionalGeneration.from_pretrained(out)
    assert model.config.qformer_config.hidden_size == 64  # the demo config's connector, not the default 768
    assert model.config.qformer_config.num_hidden_layers == 2 and model.num_windows == 88
    assert model.tokenizer("one two")["input_ids"] and model.feature_extractor.feature_size == 80
    assert not list(tmp_path.glob(".lsm.tmp-*"))
    res = CliRunner().invoke(
        main, ["model", "init", "--whisper", str(tmp_path / "no"), "--llm", str(llm_dir)]
    )
    assert res.exit_code != 0 and "--whisper" in res.output


def reference_window_tokens(durations_s: list[float], window_s: float = 0.33333) -> int:
    """The reference's count, written from its formula (RECIPE.md section 3): T encoder frames of the batch's
    longest clip, kernel = stride = round(T x 0.33333 / 30), F.unfold's floor((T - kernel) / stride) + 1."""
    t = math.ceil(max(durations_s) * 50 - 1e-6)
    kernel = round(t * window_s / 30.0)
    return (t - kernel) // kernel + 1


@pytest.mark.parametrize(
    "durations",
    [[4.8], [6.6, 16.7, 4.8], [1.0, 2.0], [29.9, 0.5], [12.34, 12.34, 3.0], [30.0], [45.0, 3.0]],
)
def test_per_batch_windows_give_every_clip_the_reference_formulas_count(parts, durations):
    torch.manual_seed(0)
    m = LSMForConditionalGeneration.from_parts(
        *parts, TINY_QFORMER.model_copy(update={"window_mode": "per_batch"})
    ).eval()
    want = reference_window_tokens([min(d, 30.0) for d in durations])
    assert (
        75 <= want <= 100
    )  # about 90 speech tokens whatever the durations, unlike fixed windows' 3 per second
    assert m.speech_token_counts(durations) == [want] * len(durations)
    with torch.no_grad():
        speech = m.encode_speech(torch.zeros(len(durations), 80, 3000), torch.tensor(durations))
    assert speech.shape == (len(durations), want, m.config.llm_config.hidden_size)
    # fixed windows (the default) follow each clip's own duration instead
    fixed = LSMForConditionalGeneration.from_parts(*parts, TINY_QFORMER)
    assert fixed.speech_token_counts(durations) == [min(math.ceil(d * 50 / 17), 88) for d in durations]


def test_per_batch_windows_over_padding_are_attended_and_a_tiny_batch_gets_one_frame_windows(parts):
    torch.manual_seed(0)
    m = LSMForConditionalGeneration.from_parts(
        *parts, TINY_QFORMER.model_copy(update={"window_mode": "per_batch"})
    ).eval()
    # The reference's formula gives kernel 0 under about 0.9 s (its unfold fails): one frame per window here.
    assert round(math.ceil(0.5 * 50) * 0.33333 / 30) == 0
    assert m.batch_windows([0.5, 0.3]) == (25, 1, 1, 25)
    # A short clip beside a long one gets the long one's windows, its padding included.
    rows_long, rows_short = torch.randn(1, 80, 3000), torch.randn(1, 80, 3000)
    with torch.no_grad():
        alone = m.encode_speech(rows_short, torch.tensor([2.0]))
        beside = m.encode_speech(torch.cat([rows_short, rows_long]), torch.tensor([2.0, 20.0]))
    assert alone.shape[1] == reference_window_tokens([2.0]) and beside.shape[1] == reference_window_tokens(
        [20.0]
    )
    # the config round-trips through save_pretrained
    assert m.config.to_dict()["window_mode"] == "per_batch"
    with pytest.raises(ValueError, match="window_mode"):
        type(m.config)(window_mode="sliding")


def test_connector_dropout_and_output_norm_are_settings_that_round_trip(parts, eval_rows, tmp_path):
    """``qformer.dropout`` reaches the Q-Former; ``output_norm: rms`` starts the speech tokens at the RMS of the
    LLM's input embeddings (whatever the projection's init), trains with the projection and loads back."""
    torch.manual_seed(0)
    q = TINY_QFORMER.model_copy(update={"dropout": 0.3, "output_norm": "rms", "init_std": 0.5})
    m = LSMForConditionalGeneration.from_parts(*parts, q, freeze_llm=True).eval()
    assert (
        m.config.qformer_config.hidden_dropout_prob
        == 0.3
        == m.config.qformer_config.attention_probs_dropout_prob
    )
    emb_rms = m.llm.get_input_embeddings().weight.pow(2).mean().sqrt().item()
    rows, clips = eval_rows
    batch = Collate.for_model(m)(rows[:2], clips[:2], with_answer=False)
    with torch.no_grad():
        speech = m.encode_speech(batch.input_features, batch.durations_s)
    counts = m.speech_token_counts(batch.durations_s)
    tokens = torch.cat([speech[i, :n] for i, n in enumerate(counts)])
    assert tokens.pow(2).mean(-1).sqrt() == pytest.approx(torch.full((len(tokens),), emb_rms), rel=1e-3)
    assert m.out_norm.weight.requires_grad
    frozen = LSMForConditionalGeneration.from_parts(*parts, q, freeze_llm=True, freeze_proj=True)
    assert not frozen.out_norm.weight.requires_grad
    m.save_pretrained(tmp_path / "ck")
    back = LSMForConditionalGeneration.from_pretrained(tmp_path / "ck").eval()
    with torch.no_grad():
        assert torch.equal(back.encode_speech(batch.input_features, batch.durations_s), speech)
    plain = LSMForConditionalGeneration.from_parts(*parts, TINY_QFORMER)
    assert plain.out_norm is None and plain.config.qformer_config.hidden_dropout_prob == 0.0


def test_ctc_warm_start_loss_reads_the_llm_vocabulary_in_order_and_leaves_the_llm_alone(parts, eval_rows):
    """``ctc_loss`` (train.ctc_warmup_steps): speech tokens that are the transcript tokens' own embeddings, in order,
    score far better than the same tokens in reverse; the gradient reaches the connector and never the LLM, even
    one that trains; the blank is eos, and a row whose target holds it is left out."""
    torch.manual_seed(0)
    m = LSMForConditionalGeneration.from_parts(*parts, TINY_QFORMER, freeze_llm=False)
    table = m.llm.get_input_embeddings().weight.detach()
    rows, clips = eval_rows
    batch = Collate.for_model(m)(rows[:2], clips[:2], with_answer=True)
    targets = [t[:6] for t in batch.transcript_ids]
    assert targets[0] == m.tokenizer(rows[0]["transcript"], add_special_tokens=False)["input_ids"][:6]

    def slot(
        order,
    ) -> torch.Tensor:  # one speech token per target token: e / |e|^2 x 30 scores 30 with itself
        e = torch.stack([table[torch.tensor(order(t))] for t in targets])
        return 30 * e / e.pow(2).sum(-1, keepdim=True)

    counts = [len(t) for t in targets]
    in_order = m.ctc_loss(slot(lambda t: t), counts, targets).item()
    reversed_ = m.ctc_loss(slot(lambda t: t[::-1]), counts, targets).item()
    assert in_order < 0.5 < 5 < reversed_, (in_order, reversed_)

    # too few speech tokens for the targets: nothing to learn from, not an infinite loss; the others' mean stays
    assert m.ctc_loss(slot(lambda t: t), [2, 2], targets).item() == 0.0 and m.ctc_rows == (0, 2)
    assert m.ctc_loss(slot(lambda t: t), [counts[0], 2], targets).item() == pytest.approx(
        m.ctc_loss(slot(lambda t: t)[:1], counts[:1], targets[:1]).item()
    )
    assert m.ctc_rows == (1, 1)
    out = m(**batch.kwargs(), ctc_targets=targets)
    assert out.logits is None and math.isfinite(out.loss.item())
    out.loss.backward()
    assert m.proj.weight.grad is not None and m.proj.weight.grad.abs().sum() > 0
    assert m.query_tokens.grad is not None
    assert all(p.grad is None for p in m.llm.parameters()), "the CTC warm start touched the LLM"
    # a transcript that spells out the eos string holds the blank's token: that row is left out, not the run
    spelt = m.ctc_loss(slot(lambda t: t), counts, [[m.ctc_blank_id, *targets[0][1:]], targets[1]])
    assert m.ctc_rows == (1, 2) and math.isfinite(spelt.item())


def test_ctc_greedy_reads_each_speech_token_as_its_nearest_llm_token_merging_repeats_and_dropping_blanks(
    parts,
):
    """The connector's own transcript (bench/overfit.py's CTC readout): per speech token the best-scoring vocabulary
    entry, a run of one entry read once, the blank (eos) never, and nothing past the row's own count."""
    m = LSMForConditionalGeneration.from_parts(*parts, TINY_QFORMER).eval()
    table = m.llm.get_input_embeddings().weight.detach()
    unit = table / table.pow(2).sum(-1, keepdim=True)  # scores 1 with its own row
    clear = [i for i in range(table.shape[0]) if int((table @ unit[i]).argmax()) == i and i != m.ctc_blank_id]
    a, b, c = clear[:3]
    blank = m.ctc_blank_id
    assert int((table @ unit[blank]).argmax()) == blank
    rows = [[a, a, blank, a, b, b, c], [c, blank, blank, b, a, a, a]]
    speech = torch.stack([unit[torch.tensor(r)] for r in rows])
    assert m.ctc_greedy(speech, [7, 4]) == [[a, a, b, c], [c, b]]


def test_ctc_weight_adds_the_weighted_ctc_loss_of_the_same_speech_to_the_answers_loss(parts, eval_rows):
    """train.ctc_weight after the warm start: one pass, the answers' loss plus w x the CTC loss on the very speech
    tokens the LLM read; the gradient of both reaches the connector."""
    torch.manual_seed(0)
    short = TINY_QFORMER.model_copy(
        update={"window_s": 0.06, "stride_s": 0.06}
    )  # enough tokens for CTC to align
    m = LSMForConditionalGeneration.from_parts(*parts, short, freeze_llm=True).eval()
    rows, clips = eval_rows
    batch = Collate.for_model(m)(rows[:2], clips[:2], with_answer=True)
    speech = m.encode_speech(batch.input_features, batch.durations_s)
    answers = m(**batch.kwargs(), speech=speech).loss
    ctc = m(**batch.kwargs(), speech=speech, ctc_targets=batch.transcript_ids).loss
    both = m(**batch.kwargs(), speech=speech, ctc_targets=batch.transcript_ids, ctc_weight=0.3).loss
    assert (
        ctc.item() > 0
        and m.ctc_rows == (2, 2)
        and both.item() == pytest.approx(answers.item() + 0.3 * ctc.item(), rel=1e-5)
    )
    m.zero_grad()
    m(**batch.kwargs(), ctc_targets=batch.transcript_ids, ctc_weight=0.3).loss.backward()
    assert m.proj.weight.grad is not None and m.proj.weight.grad.abs().sum() > 0


def test_ctc_shrink_keeps_one_token_per_run_drops_blanks_and_is_what_the_llm_reads(parts, eval_rows):
    """train.qformer.ctc_shrink (Soundwave's shrinking): a run of tokens read as one entry becomes their mean, a
    token read as the blank goes; training, the probes and decoding all read the kept tokens."""
    shrinking = TINY_QFORMER.model_copy(update={"ctc_shrink": True})
    m = LSMForConditionalGeneration.from_parts(*parts, shrinking).eval()
    table = m.llm.get_input_embeddings().weight.detach()
    unit = table / table.pow(2).sum(-1, keepdim=True)
    clear = [i for i in range(table.shape[0]) if int((table @ unit[i]).argmax()) == i and i != m.ctc_blank_id]
    a, b, c = clear[:3]
    blank = m.ctc_blank_id
    speech = torch.stack([unit[torch.tensor(r)] for r in ([a, a, blank, a, b, b, c], [blank] * 7)])
    speech[0, 1] *= 1.01  # one run's tokens differ a little: the kept token is their mean
    kept, counts = m.shrink(speech, [7, 7])
    assert counts == [4, 0] and kept.shape == (2, 4, table.shape[1])
    assert torch.allclose(kept[0, 0], (speech[0, 0] + speech[0, 1]) / 2)
    assert torch.equal(kept[0, 1:], torch.stack([unit[a], (unit[b] + unit[b]) / 2, unit[c]]))
    assert counts == [4, 0] and m.shrink(speech, [2, 7])[1] == [1, 0]  # nothing past a row's own count

    rows, clips = eval_rows
    batch = Collate.for_model(m)(rows[:2], clips[:2], with_answer=True)
    full = m.encode_speech(batch.input_features, batch.durations_s)
    mine, n = m.shrink(full, m.speech_token_counts(batch.durations_s))
    assert m(**batch.kwargs()).loss.item() == pytest.approx(
        m(**batch.kwargs(), speech=mine, speech_counts=n).loss.item()
    )
    assert m(**batch.kwargs()).loss.item() != pytest.approx(m(**batch.kwargs(), speech=full).loss.item())
    out = m.generate(batch.input_features, batch.durations_s, batch.prefix_ids, batch.suffix_ids, 3)
    assert len(out) == 2
    from core.lsm.probes import SpeechProbe, probe_batch

    probe = SpeechProbe()
    probe_batch(m, batch, probe)
    assert math.isfinite(probe.summary()["own_later"]) and math.isfinite(probe.summary()["swapped_later"])


def test_ctc_mix_reads_each_kept_token_as_ctc_posterior_times_the_llm_embeddings(parts, eval_rows):
    """train.qformer.ctc_mix (LegoSLM's connector): a kept token becomes softmax(its vocabulary logits, the blank
    left out) @ the LLM's input embeddings: a token CTC is sure of becomes that word's own embedding, none becomes
    the blank's; the gradient reaches the connector through the posterior; training, probes and decoding read it."""
    with pytest.raises(ValueError, match="ctc_mix: needs train.qformer.ctc_shrink"):
        type(TINY_QFORMER).model_validate({**TINY_QFORMER.model_dump(), "ctc_mix": True})
    torch.manual_seed(0)
    mixing = TINY_QFORMER.model_copy(update={"ctc_shrink": True, "ctc_mix": True})
    m = LSMForConditionalGeneration.from_parts(*parts, mixing).eval()
    assert m.config.ctc_mix
    table = m.llm.get_input_embeddings().weight.detach()
    unit = table / table.pow(2).sum(-1, keepdim=True)
    clear = [i for i in range(table.shape[0]) if int((table @ unit[i]).argmax()) == i and i != m.ctc_blank_id]
    a, blank = clear[0], m.ctc_blank_id
    x = torch.randn(1, 3, table.shape[1]) * 0.05
    x[0, 0] = 1e4 * unit[a]  # CTC is sure: the word's own embedding
    x[0, 1] = 1e4 * unit[blank]  # a blank-heavy token still becomes a word's mix, never the blank's embedding
    got = m.mix(x)
    logits = x[0] @ table.T
    logits[:, blank] = float("-inf")
    assert torch.allclose(got[0], logits.softmax(-1) @ table, atol=1e-5)
    assert torch.allclose(got[0, 0], table[a], atol=1e-4)
    assert not torch.allclose(got[0, 1], table[blank], atol=1e-2)
    x.requires_grad_(True)
    m.mix(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad[0, 2].abs().sum() > 0

    rows, clips = eval_rows
    batch = Collate.for_model(m)(rows[:2], clips[:2], with_answer=True)
    full = m.encode_speech(batch.input_features, batch.durations_s)
    kept, n = m.shrink(full, m.speech_token_counts(batch.durations_s))
    read, n2 = m.llm_reads(full, m.speech_token_counts(batch.durations_s))
    assert n2 == n and torch.allclose(read, m.mix(kept))
    assert sum(n) > 0 and not torch.allclose(
        read, kept
    )  # seeded: the untrained connector keeps a token a row
    assert m(**batch.kwargs()).loss.item() == pytest.approx(
        m(**batch.kwargs(), speech=read, speech_counts=n).loss.item()
    )
    assert (
        len(m.generate(batch.input_features, batch.durations_s, batch.prefix_ids, batch.suffix_ids, 3)) == 2
    )
    from core.lsm.probes import SpeechProbe, probe_batch

    probe = SpeechProbe()
    probe_batch(m, batch, probe)
    assert math.isfinite(probe.summary()["own_later"])


def test_a_ctc_head_scores_the_vocabulary_with_weights_of_its_own_that_ctc_trains_and_the_llm_never_sees(
    parts, eval_rows
):
    """train.qformer.ctc_logits head: CTC's logits are a linear layer of the connector's (LegoSLM's CTC head), not
    the embeddings; the CTC loss trains it and it freezes with the projection (the checkpoint: tests/test_train.py)."""
    m = LSMForConditionalGeneration.from_parts(*parts, TINY_QFORMER.model_copy(update={"ctc_logits": "head"}))
    vocab = m.llm.get_input_embeddings().weight.shape[0]
    assert m.ctc_head.weight.shape == (vocab, m.config.llm_config.hidden_size)
    x = torch.randn(2, 3, m.config.llm_config.hidden_size)
    assert torch.allclose(m.vocab_logits(x), x @ m.ctc_head.weight.T + m.ctc_head.bias)
    rows, clips = eval_rows
    short = TINY_QFORMER.model_copy(update={"ctc_logits": "head", "window_s": 0.06, "stride_s": 0.06})
    m = LSMForConditionalGeneration.from_parts(*parts, short, freeze_llm=True)
    batch = Collate.for_model(m)(rows[:2], clips[:2], with_answer=True)
    m(**batch.kwargs(), ctc_targets=batch.transcript_ids).loss.backward()
    assert m.ctc_head.weight.grad is not None and m.ctc_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.llm.parameters())
    frozen = LSMForConditionalGeneration.from_parts(*parts, short, freeze_proj=True)
    assert not frozen.ctc_head.weight.requires_grad


def test_cosine_ctc_logits_are_won_by_direction_not_length(parts):
    """train.qformer.ctc_logits cosine: a token scores each entry by ctc_cosine_scale x the cosine with its
    embedding, so lengthening a token changes nothing; under dot products the same lengthening does."""
    m = LSMForConditionalGeneration.from_parts(
        *parts, TINY_QFORMER.model_copy(update={"ctc_logits": "cosine", "ctc_cosine_scale": 10.0})
    )
    table = m.llm.get_input_embeddings().weight.detach()
    x = torch.randn(1, 3, table.shape[1])
    got = m.vocab_logits(x)
    want = 10.0 * torch.nn.functional.cosine_similarity(x[0, :, None], table[None], dim=-1)
    assert torch.allclose(got[0], want, atol=1e-4) and torch.allclose(m.vocab_logits(7 * x), got, atol=1e-4)
    assert int(m.vocab_logits(table[None, 5:6]).argmax()) == 5  # an embedding is its own best entry
    dot = LSMForConditionalGeneration.from_parts(*parts, TINY_QFORMER)
    assert not torch.allclose(dot.vocab_logits(7 * x), dot.vocab_logits(x))
