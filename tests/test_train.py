"""The train stage: torchrun with 2 gloo processes, metrics, a checkpoint that loads, reuse, failures."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers_lsm import build_models, demo_rows, experiment, write_examples

from conftest import run_stage
from core.catalog import load_catalog
from core.config import TrainConfig
from core.lineage.store import LineageStore
from core.lsm.model import LSMForConditionalGeneration
from core.paths import REPO_ROOT, WorkPaths
from core.recipe import Recipe
from stages.train import launcher as train
from stages.train.trainer import lr_at

STEPS = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("SPLSM_FLOW_RUN_ID", "flow-run-for-test")
    work = tmp_path_factory.mktemp("lsm-train")
    whisper_dir, llm_dir = build_models(WorkPaths(work).models.dir)
    examples = write_examples(WorkPaths(work).build.examples)
    # 2 processes x batch 2 x accumulation 2 = 8 samples a step: 3 steps = 24 > 20 train rows, so the
    # run crosses into a second epoch and exercises the no-sync accumulation path.
    cfg = experiment(max_steps=STEPS, grad_accum=2, warmup_steps=1)
    result = run_stage("train", cfg, work)
    return dict(work=work, whisper=whisper_dir, llm=llm_dir, examples=examples, cfg=cfg, result=result)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.slow
def test_train_stage_writes_metrics_and_a_loadable_checkpoint(trained):
    work, cfg, result = trained["work"], trained["cfg"], trained["result"]
    assert not result.reused
    assert result.outputs["checkpoint"] == WorkPaths(work).train.checkpoint

    lines = [json.loads(x) for x in (WorkPaths(work).train.metrics).read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert math.isfinite(m["loss"]) and m["loss"] > 0
        assert math.isfinite(m["grad_norm"]) and m["samples_per_s"] > 0
        assert m["lr"] == pytest.approx(lr_at(m["step"] - 1, cfg.train))
    assert lines[-1]["samples"] == STEPS * 2 * 2 * 2 and lines[-1]["epoch"] == 1

    s = result.summary
    assert s["steps"] == STEPS and s["world_size"] == 2 and math.isfinite(s["final_loss"])
    assert s["train_rows"] == 20 and s["skipped_audio"] == 0
    assert s["flow_run_id"] == "flow-run-for-test"  # passed through torchrun to the workers unchanged

    ckpt = WorkPaths(work).train.checkpoint
    model = LSMForConditionalGeneration.from_pretrained(ckpt).eval()
    # the checkpoint says how its prompts were laid out, for splsm ask and serve
    recipe, made = Recipe.read(ckpt), Recipe.of_config(cfg)
    assert (recipe.prompt_format, recipe.catalog_hash, recipe.instructions) == (
        made.prompt_format,
        made.catalog_hash,
        made.instructions,
    )
    assert (
        recipe.instruction("asr") == load_catalog(cfg.generate.catalog).categories["asr"].instructions[0].text
    )
    assert not list((work / "train").glob(".checkpoint*"))  # no temp dirs left behind
    # Training moved the connector and the LLM but not the frozen encoder.
    fresh = LSMForConditionalGeneration.from_parts(trained["whisper"], trained["llm"], cfg.train.qformer)
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in fresh.encoder.state_dict().items())
    assert not torch.equal(fresh.proj.weight, model.proj.weight)
    assert not torch.equal(fresh.llm.lm_head.weight, model.llm.lm_head.weight)

    store = LineageStore(WorkPaths(work).lineage)
    rows = store.query("SELECT status, flow_run_id FROM runs WHERE stage = 'train'")
    assert rows == [("succeeded", "flow-run-for-test")]
    up = store.upstream(str(ckpt.resolve()))
    assert {e["role"] for e in up} == {"examples", "whisper", "llm", "encoder_cache"}
    # the frozen encoder's outputs: at most one entry per distinct clip (each clip is asr + one task), made by this
    # run and read by it
    cache = WorkPaths(work).encoder_cache
    assert 0 < len(list(cache.rglob("*.safetensors"))) <= s["train_rows"] // 2
    assert "written" in s["encoder_cache"]
    (run_id,) = store.query("SELECT run_id FROM runs WHERE stage = 'train'")[0]
    io = store.query(
        "SELECT io.direction FROM run_io io JOIN datasets d USING (dataset_id) WHERE io.run_id = ? AND d.kind = 'cache'",
        [run_id],
    )
    assert sorted(r[0] for r in io) == ["input", "output"]


@pytest.mark.slow
def test_rerun_is_reused(trained):
    again = run_stage("train", trained["cfg"], trained["work"])
    assert again.reused and again.run_id == trained["result"].run_id


@pytest.mark.slow
def test_worker_failure_raises_with_the_tail_of_its_output(trained, tmp_path):
    no_train = write_examples(
        tmp_path / "examples.parquet", [r for r in demo_rows() if r["split"] != "train"]
    )
    cfg = experiment(max_steps=1).train
    with pytest.raises(
        train.TrainError, match=r"(?s)exited with status .*no rows with split 'train' in .*examples.parquet"
    ):
        train.train(cfg, trained["whisper"], trained["llm"], no_train, tmp_path / "out")


@pytest.mark.slow
def test_one_epoch_trains_the_steps_the_plan_counts_then_stops(trained, tmp_path):
    from core.lsm.loader import ExampleLoader

    settings = experiment(grad_accum=2, warmup_steps=1).train.model_dump()
    del settings["max_steps"]
    cfg = TrainConfig.model_validate({**settings, "epochs": 1})
    # what the ranks' plans hold: 20 train rows in batches of at most 2, then accumulation over 2
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor.from_pretrained(trained["whisper"])
    plan = ExampleLoader.from_config(
        trained["examples"],
        cfg.loader,
        split="train",
        world_size=2,
        seed=cfg.seed,
        max_batch_size=cfg.batch_size,
        n_mels=fe.feature_size,
        chunk_s=fe.chunk_length,
    ).batches_per_rank(0)
    want = -(-max(plan) // 2)
    summary = train.train(cfg, trained["whisper"], trained["llm"], trained["examples"], tmp_path / "out")
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == want == len(lines)  # the rank with fewer batches may start epoch 1 early
    assert lines[-1]["lr"] == pytest.approx(lr_at(want - 1, cfg.model_copy(update={"max_steps": want})))
    with pytest.raises(ValueError, match="max_steps or epochs"):
        TrainConfig(max_steps=5, epochs=1)


@pytest.mark.slow
def test_validation_logs_held_out_speech_losses_and_keeps_the_best_checkpoint(trained, tmp_path):
    """Every 2 steps (and before the first) the held-out rows' answer-token losses with own, swapped and zeroed
    speech, summed over both ranks; the best step's model kept in OUT/best, whose own-speech loss on those rows,
    computed here from the saved checkpoint, is the one logged."""
    from core.audio import load
    from core.lsm.batch import Collate
    from core.paths import TrainPaths

    cfg = experiment(
        max_steps=4, validation={"every": 2, "splits": ["test-clean", "test-other"], "max_rows": 8}
    ).train
    out = TrainPaths(tmp_path / "out")
    train.train(cfg, trained["whisper"], trained["llm"], trained["examples"], out.dir)
    recs = [json.loads(x) for x in out.metrics.read_text().splitlines()]
    assert [r["step"] for r in recs if "validation" not in r] == [1, 2, 3, 4]
    val = [r for r in recs if "validation" in r]
    held_out = [r for r in demo_rows() if r["split"] == "test-clean"]
    assert [(r["step"], r["validation"], r["rows"]) for r in val] == [
        (s, "test-clean", len(held_out)) for s in (0, 2, 4)
    ]
    for r in val:
        assert all(
            math.isfinite(r[k]) and r[k] > 0 for k in ("own", "own_first", "own_later", "swapped", "zeroed")
        )
        assert r["swap_gap_later"] == pytest.approx(r["swapped_later"] - r["own_later"])
    best = min(val, key=lambda r: r["own"])
    assert json.loads(out.best_record.read_text()) == best
    model = LSMForConditionalGeneration.from_pretrained(out.best).eval()
    batch = Collate.for_model(model)(
        held_out, [load(r["audio_path"], r["offset_s"], r["duration_s"]) for r in held_out], with_answer=True
    )
    with torch.no_grad():
        assert model(**batch.kwargs()).loss.item() == pytest.approx(best["own"], abs=1e-4)
    assert out.loss_plot.stat().st_size > 0


def test_train_rows_whose_audio_is_all_gone_fail_with_a_reason_not_a_hang(trained, tmp_path):
    # the loader skips unreadable clips (each a warning); with none left the workers must stop and say why
    gone = [{**r, "audio_path": str(tmp_path / f"gone-{i}.flac")} for i, r in enumerate(demo_rows())]
    examples = write_examples(tmp_path / "examples.parquet", gone)
    cfg = experiment(max_steps=1).train
    with pytest.raises(train.TrainError, match=r"(?s)no training batch in a whole pass.*clips unreadable"):
        train.train(cfg, trained["whisper"], trained["llm"], examples, tmp_path / "out")


def test_lr_warms_up_then_decays_to_zero():
    for schedule in ("cosine", "linear"):
        cfg = TrainConfig(lr=1e-3, warmup_steps=4, max_steps=20, lr_schedule=schedule)
        lrs = [lr_at(s, cfg) for s in range(cfg.max_steps + 1)]
        assert lrs[:5] == sorted(lrs[:5]) and lrs[0] > 0
        assert max(lrs) == pytest.approx(1e-3)
        assert lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    mid = TrainConfig(lr=1.0, warmup_steps=0, max_steps=10, lr_schedule="cosine")
    assert lr_at(5, mid) == pytest.approx(0.5)


def test_a_restarted_schedule_runs_whole_over_the_ctc_steps_and_again_over_the_answer_steps():
    """train.ctc_schedule restart: the warm start's 10 steps and the answer steps' 30 each warm up and decay to 0 as
    a training of their own would; shared (the default) runs one schedule over all 40."""
    kw = dict(lr=1.0, warmup_steps=2, max_steps=40, ctc_warmup_steps=10, lr_schedule="cosine")
    restart, shared = TrainConfig(**kw, ctc_schedule="restart"), TrainConfig(**kw)
    ctc_alone = TrainConfig(**{**kw, "max_steps": 10, "ctc_warmup_steps": 0})
    answers_alone = TrainConfig(**{**kw, "max_steps": 30, "ctc_warmup_steps": 0})
    assert [lr_at(s, restart) for s in range(10)] == [lr_at(s, ctc_alone) for s in range(10)]
    assert [lr_at(s, restart) for s in range(10, 41)] == [lr_at(s, answers_alone) for s in range(31)]
    assert lr_at(9, restart) < 0.05 and lr_at(12, restart) == pytest.approx(1.0)
    assert lr_at(12, shared) < lr_at(2, shared) == pytest.approx(1.0)
    assert [
        lr_at(s, TrainConfig(**{**kw, "ctc_warmup_steps": 0}, ctc_schedule="restart")) for s in range(41)
    ] == [lr_at(s, TrainConfig(**{**kw, "ctc_warmup_steps": 0})) for s in range(41)]


def test_ctc_lr_is_the_warm_starts_peak_and_the_answer_steps_keep_train_lr():
    kw = dict(lr=0.5, warmup_steps=2, max_steps=40, ctc_warmup_steps=10, lr_schedule="cosine")
    own = TrainConfig(**kw, ctc_schedule="restart", ctc_lr=3.0)
    ctc_alone = TrainConfig(**{**kw, "lr": 3.0, "max_steps": 10, "ctc_warmup_steps": 0})
    answers_alone = TrainConfig(**{**kw, "max_steps": 30, "ctc_warmup_steps": 0})
    assert [lr_at(s, own) for s in range(10)] == [lr_at(s, ctc_alone) for s in range(10)]
    assert [lr_at(s, own) for s in range(10, 41)] == [lr_at(s, answers_alone) for s in range(31)]
    assert max(lr_at(s, own) for s in range(10)) == pytest.approx(3.0)
    assert max(lr_at(s, own) for s in range(10, 41)) == pytest.approx(0.5)
    unset = TrainConfig(**kw, ctc_schedule="restart")
    assert max(lr_at(s, unset) for s in range(10)) == pytest.approx(0.5)  # None: train.lr for both


def test_warmup_decay_is_deepspeeds_warmupdecaylr_as_the_reference_ran_it():
    # DeepSpeed's WarmupDecayLR, warmup_type "log" (its default), min lr 0: gamma = log(step + 1) / log(W) while
    # step < W, then (T - step) / (T - W). Values worked out by hand for W = 100, T = 1000.
    cfg = TrainConfig(lr=2.0, warmup_steps=100, max_steps=1000, lr_schedule="warmup_decay")
    want = {0: 0.0, 9: 1.0, 99: 2.0, 100: 2.0, 550: 1.0, 910: 0.2, 1000: 0.0}
    assert {s: lr_at(s, cfg) for s in want} == pytest.approx(want)
    # logarithmic, not linear: most of the rate comes early in the warm-up
    assert lr_at(9, cfg) > 5 * cfg.lr * 9 / 100


def test_weight_decay_on_all_decays_norms_and_biases_too():
    from torch import nn

    from stages.train.trainer import param_groups

    params = list(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).parameters())  # weight, bias, gain, bias
    groups = param_groups(params, TrainConfig(weight_decay=0.05))
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 0.05), (3, 0.0)]
    groups = param_groups(params, TrainConfig(weight_decay=0.05, weight_decay_on="all"))
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(4, 0.05)]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ctc_warm_start_trains_the_connector_and_leaves_a_trainable_llm_as_it_was(
    trained, tmp_path, strategy
):
    """train.ctc_warmup_steps: the first steps' loss is the connector's CTC over the LLM's vocabulary; the LLM, set
    to train, is the pretrained one at the end of them (the step-2 checkpoint) and trains after them. Under FSDP
    too, where the LLM's embedding matrix the CTC logits read is sharded across the ranks."""
    from helpers_lsm import TINY_QFORMER
    from safetensors.torch import load_file

    from core.paths import TrainPaths

    # 0.1-s windows: enough speech tokens for the tiny tokenizer's many tokens per word (CTC needs one each)
    q = TINY_QFORMER.model_copy(update={"window_s": 0.1, "stride_s": 0.1}).model_dump()
    cfg = experiment(
        max_steps=3,
        freeze_llm=False,
        ctc_warmup_steps=2,
        checkpoint_every=2,
        keep_checkpoints=3,
        qformer=q,
        strategy=strategy,
    ).train
    out = TrainPaths(tmp_path / "out")
    train.train(cfg, trained["whisper"], trained["llm"], trained["examples"], out.dir)
    recs = [json.loads(x) for x in out.metrics.read_text().splitlines()]
    assert [(r["step"], r["objective"]) for r in recs] == [(1, "ctc"), (2, "ctc"), (3, "answers")]
    assert all(r["loss"] > 0 and math.isfinite(r["loss"]) for r in recs)
    assert all(0 < r["ctc_rows_aligned"] <= 1 for r in recs[:2]) and "ctc_rows_aligned" not in recs[2]
    pretrained = load_file(trained["llm"] / "model.safetensors")
    at_2 = load_file(out.step(2) / "model.safetensors")
    llm_at_2 = {k.removeprefix("llm."): v for k, v in at_2.items() if k.startswith("llm.")}
    assert set(llm_at_2) == set(pretrained), "the LLM trains: its weights belong in the checkpoint"
    assert all(torch.equal(llm_at_2[k], pretrained[k]) for k in pretrained), "CTC steps changed the LLM"
    last = LSMForConditionalGeneration.from_pretrained(out.checkpoint).llm.state_dict()
    assert any(not torch.equal(last[k], pretrained[k]) for k in pretrained), (
        "the answer step left the LLM as is"
    )
    with pytest.raises(ValueError, match="more than max_steps"):
        TrainConfig(max_steps=5, ctc_warmup_steps=6)


def test_a_training_that_is_the_warm_start_alone_leaves_a_connector_another_training_starts_from(
    trained, tmp_path
):
    """ctc_warmup_steps equal to max_steps: every step is CTC, the LLM never trains, and the checkpoint is one that
    ``train.init_from`` loads (bench/reproduce.py's warm start, shared by its two arms)."""
    from helpers_lsm import TINY_QFORMER
    from safetensors.torch import load_file

    from core.paths import TrainPaths
    from stages.train.checkpoint import init_from

    q = TINY_QFORMER.model_copy(update={"window_s": 0.1, "stride_s": 0.1}).model_dump()
    cfg = experiment(max_steps=2, freeze_llm=True, ctc_warmup_steps=2, qformer=q).train
    out = TrainPaths(tmp_path / "out")
    train.train(cfg, trained["whisper"], trained["llm"], trained["examples"], out.dir)
    recs = [json.loads(x) for x in out.metrics.read_text().splitlines() if '"objective"' in x]
    assert [(r["step"], r["objective"]) for r in recs] == [(1, "ctc"), (2, "ctc")]
    held = load_file(out.checkpoint / "model.safetensors")
    fresh = LSMForConditionalGeneration.from_parts(
        trained["whisper"], trained["llm"], TINY_QFORMER.model_copy(update={"window_s": 0.1, "stride_s": 0.1})
    )
    assert not all(torch.equal(fresh.state_dict()[k], v) for k, v in held.items())
    assert init_from(fresh, out.checkpoint) == len(held)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in held.items())


@pytest.mark.slow
def test_a_ctc_head_trains_in_the_warm_start_and_is_kept_in_the_checkpoint(trained, tmp_path):
    """train.qformer.ctc_logits head: the connector's own CTC head learns in the CTC steps, an answers step that
    reads no CTC (no ctc_mix, no ctc_weight) leaves it out without stopping DDP, and the checkpoint holds it."""
    from helpers_lsm import TINY_QFORMER

    from core.paths import TrainPaths

    q = TINY_QFORMER.model_copy(update={"window_s": 0.1, "stride_s": 0.1, "ctc_logits": "head"}).model_dump()
    cfg = experiment(
        max_steps=4, freeze_llm=True, ctc_warmup_steps=2, checkpoint_every=1, keep_checkpoints=4, qformer=q
    ).train  # two answers steps: DDP notices a parameter that took no gradient at the step after
    out = TrainPaths(tmp_path / "out")
    train.train(cfg, trained["whisper"], trained["llm"], trained["examples"], out.dir)
    recs = [json.loads(x) for x in out.metrics.read_text().splitlines() if '"objective"' in x]
    assert [(r["step"], r["objective"]) for r in recs] == [
        (1, "ctc"),
        (2, "ctc"),
        (3, "answers"),
        (4, "answers"),
    ]
    from safetensors.torch import load_file

    heads = [load_file(out.step(k) / "model.safetensors")["ctc_head.weight"] for k in (1, 2)]
    assert not torch.equal(heads[0], heads[1]), "a CTC step left the head as it was"
    last = LSMForConditionalGeneration.from_pretrained(out.checkpoint)  # after the answers steps
    assert last.ctc_head is not None
    assert torch.equal(last.ctc_head.weight, heads[1]), "an answers step that reads no CTC moved the head"


def test_init_from_loads_every_weight_a_checkpoint_holds_and_refuses_one_of_another_layout(trained, tmp_path):
    """train.init_from (stages.train.checkpoint.init_from): the trained connector replaces a fresh one; weights this
    model has no place for, of other shapes, or a checkpoint without the connector, are errors that say so."""
    from helpers_lsm import TINY_QFORMER
    from safetensors.torch import load_file, save_file

    from stages.train.checkpoint import init_from

    src = WorkPaths(trained["work"]).train.checkpoint
    held = load_file(src / "model.safetensors")
    torch.manual_seed(123)
    fresh = LSMForConditionalGeneration.from_parts(trained["whisper"], trained["llm"], TINY_QFORMER)
    assert not torch.equal(fresh.query_tokens, held["query_tokens"])
    assert init_from(fresh, src) == len(held)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in held.items())

    def errs(sd: dict, match: str, model=None):
        d = tmp_path / f"ckpt-{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        if sd is not None:
            save_file({k: v.contiguous() for k, v in sd.items()}, d / "model.safetensors")
        with pytest.raises(RuntimeError, match=match):
            init_from(model or fresh, d)

    errs(None, "holds no model")
    errs({**held, "ctc_head.weight": torch.zeros(3, 3)}, r"no place for: \['ctc_head.weight'\]")
    errs({k: v for k, v in held.items() if k != "proj.weight"}, r"lacks the connector's \['proj.weight'\]")
    wider = LSMForConditionalGeneration.from_parts(
        trained["whisper"],
        trained["llm"],
        TINY_QFORMER.model_copy(update={"hidden_size": 2 * TINY_QFORMER.hidden_size}),
    )
    errs(held, "other shapes", wider)


@pytest.mark.slow
def test_a_training_with_init_from_starts_where_the_checkpoint_ended(trained, tmp_path):
    """One optimizer step from a checkpoint whose queries sit 1.0 away from where a fresh connector's start: they
    end a step (lr 1e-4) from the checkpoint's; and the checkpoint's content is an input of the train stage."""
    from safetensors.torch import load_file, save_file

    from core.paths import TrainPaths

    held = load_file(WorkPaths(trained["work"]).train.checkpoint / "model.safetensors")
    held["query_tokens"] = held["query_tokens"] + 1.0
    src = tmp_path / "moved"
    src.mkdir()
    save_file(held, src / "model.safetensors")
    cfg = experiment(max_steps=1, init_from=str(src), lr=1e-4, warmup_steps=0)
    out = TrainPaths(tmp_path / "out")
    train.train(cfg.train, trained["whisper"], trained["llm"], trained["examples"], out.dir)
    after = load_file(out.checkpoint / "model.safetensors")["query_tokens"]
    assert (after - held["query_tokens"]).abs().max() < 5e-4
    from stages.registry import STAGES

    s = STAGES["train"]
    roles = [a.role for a in s.inputs(s.context(cfg, tmp_path / "w"))]
    assert "init_from" in roles


def test_the_reproductions_shared_warm_start_gives_each_arm_the_rates_of_its_own(tmp_path):
    """bench/reproduce.py trains a restarted CTC warm start once and starts both arms from it (init_from): the warm
    start alone and an arm's answer steps run, step for step, at the rates of one training holding both; a shared
    schedule, where the answer steps run at the schedule's tail, is not split."""
    import sys

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from reproduce import set_dotted, shared_warm_start

    one = TrainConfig(max_steps=140, ctc_warmup_steps=100, ctc_schedule="restart", ctc_lr=3e-3, lr=5e-4)

    def split(overrides: dict) -> TrainConfig:
        d = one.model_dump()
        for k, v in overrides.items():
            set_dotted(d, k.removeprefix("train."), v)
        return TrainConfig(**d)

    warm, arms = (split(o) for o in shared_warm_start(one, tmp_path / "warm-start"))
    assert warm.ctc_warmup_steps == warm.max_steps == 100 and arms.ctc_warmup_steps == 0
    assert arms.init_from == tmp_path / "warm-start" / "train" / "checkpoint"
    assert [lr_at(s, one) for s in range(140)] == [lr_at(s, warm) for s in range(100)] + [
        lr_at(s, arms) for s in range(40)
    ]
    assert shared_warm_start(one.model_copy(update={"ctc_schedule": "shared"}), tmp_path) is None
    assert shared_warm_start(TrainConfig(max_steps=10), tmp_path) is None
