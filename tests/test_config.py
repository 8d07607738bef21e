import pytest

from conftest import REPO
from core.config import ConfigError, load_config


@pytest.mark.parametrize("name", ["demo", "paper"])
def test_bundled_configs_validate(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.name == name and cfg.corpora


def test_paper_config_carries_the_reference_settings():
    cfg = load_config(REPO / "configs" / "paper.yaml")
    t = cfg.train
    assert (t.lr, t.weight_decay, t.warmup_steps, t.grad_clip, t.bf16, t.seed) == (
        2e-5,
        0.05,
        100,
        1.0,
        True,
        1,
    )
    assert t.batch_size * t.grad_accum * t.nproc_per_node == 384
    assert (t.qformer.window_s, t.qformer.num_queries, t.qformer.num_layers, t.qformer.hidden_size) == (
        0.33333,
        1,
        2,
        768,
    )
    assert cfg.generate.max_new_tokens == 225 and cfg.generate.temperature == 0.0
    g = cfg.generate
    assert (g.prompt_format, g.catalog.stem, g.transcript_form, g.tasks_per_utterance) == (
        "reference",
        "reference",
        "reference",
        1,
    )
    assert t.qformer.window_mode == "per_batch" and cfg.evaluate.asr_prompt == "fixed"
    assert (t.lr_schedule, t.weight_decay_on, t.epochs) == ("warmup_decay", "all", 1)
    assert (cfg.build.answer_tokens_between, cfg.harvest.long_audio) == ((5, 2048), "cut")
    # LibriSpeech-960 (three training folders), Common Voice 4.0 English and GigaSpeech-L
    kinds = [
        (c.kind, c.subset if c.kind == "gigaspeech" else None) for c in cfg.corpora if "test" not in c.name
    ]
    assert (
        kinds.count(("librispeech", None)) == 3
        and ("commonvoice", None) in kinds
        and ("gigaspeech", "L") in kinds
    )


def test_demo_paths_resolve_relative_to_the_config():
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    assert all(c.root.is_dir() for c in cfg.corpora)


def test_unknown_key_and_bad_value_are_errors_naming_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ncorpora: []\nmodels: {tiny: {}}\ntrain: {max_stpes: 3}\n")
    with pytest.raises(ConfigError, match=r"c.yaml[\s\S]*max_stpes"):
        load_config(p)
    p.write_text("name: x\ncorpora: []\nmodels: {tiny: {}}\ngenerate: {tasks: [poetry]}\n")
    with pytest.raises(ConfigError, match="unknown task 'poetry'"):
        load_config(p)
    p.write_text("name: x\ncorpora: []\nmodels: {}\n")
    with pytest.raises(ConfigError, match="give both whisper and llm"):
        load_config(p)


def _load(tmp_path, body: str):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ncorpora: []\nmodels: {tiny: {}}\n" + body)
    return load_config(p)


@pytest.mark.parametrize(
    "body, says",
    [
        # a window must hold at least one encoder frame (20 ms) and fit Whisper's 30 s input
        ("train: {qformer: {window_s: 0}}", r"train\.qformer\.window_s[\s\S]*greater than 0"),
        (
            "train: {qformer: {stride_s: 0.005}}",
            r"train\.qformer\.stride_s: 0\.005 s is under one encoder frame",
        ),
        (
            "train: {qformer: {window_s: 31}}",
            r"train\.qformer\.window_s: 31\.0 s is longer than Whisper's 30 s",
        ),
        (
            "train: {qformer: {hidden_size: 100, num_heads: 12}}",
            r"train\.qformer\.hidden_size: 100 is not a multiple",
        ),
        (
            "train: {freeze_encoder: true, freeze_qformer: true, freeze_proj: true, freeze_llm: true}",
            r"train: every part is frozen",
        ),
        ("train: {freeze_llm: true, lora: {}}", r"train\.lora: LoRA trains the LLM through adapters"),
        ("train: {nproc_per_node: 0}", r"train\.nproc_per_node"),
        ("train: {nnodes: 0}", r"train\.nnodes"),
        ("train: {nnodes: 2}", r"train\.nnodes is 2 but train\.rdzv_endpoint is not set"),
        ("train: {rdzv_endpoint: 'node0:29400'}", r"train\.rdzv_endpoint is set but train\.nnodes is 1"),
        ("train: {nnodes: 2, rdzv_endpoint: node0}", r"train\.rdzv_endpoint: 'node0' is not HOST:PORT"),
        ("train: {nnodes: 2, rdzv_endpoint: 'node0:0'}", r"train\.rdzv_endpoint: 'node0:0' is not HOST:PORT"),
        ("train: {nnodes: 2, rdzv_endpoint: 'node0:1', rdzv_id: 'a b'}", r"train\.rdzv_id"),
        (
            "evaluate: {eval_sets: [dev]}",
            r"evaluate\.eval_sets: 'dev' is a split the build stage never writes",
        ),
        (
            "train: {validation: {every: 10}}",
            r"train\.validation\.splits: 'dev' is a split the build stage never writes",
        ),
        (
            "generate: {frequency_penalty: 0.5}",
            r"frequency_penalty / presence_penalty: the transformers-serve backend cannot honour them",
        ),
        ("build: {tasks: [repeat]}", r"build\.tasks: evaluate decodes the eval sets' asr examples"),
        (
            "generate: {tasks: [repeat]}\nevaluate: {probe_tasks: [keywords]}",
            r"evaluate\.probe_tasks: 'keywords' is not in generate\.tasks",
        ),
        # a key only one backend reads cannot be given to another
        (
            "generate: {backend: {kind: transformers, base_urls: [http://x/v1]}}",
            r"generate\.backend\.transformers\.base_urls",
        ),
        (
            "generate: {backend: {kind: transformers-serve, batch_size: 4}}",
            r"backend\.transformers-serve\.batch_size",
        ),
        ("generate: {backend: openai}", r"generate\.backend\.openai\.base_urls[\s\S]*required"),
        ("generate: {backend: tgi}", r"unknown backend 'tgi'"),
    ],
)
def test_checks_that_need_no_stage_output_fail_at_load_time_naming_the_key(tmp_path, body, says):
    with pytest.raises(ConfigError, match=says):
        _load(tmp_path, body + "\n")


def test_dev_is_an_eval_set_once_the_build_makes_one(tmp_path):
    cfg = _load(tmp_path, "build: {dev_fraction: 0.1}\nevaluate: {eval_sets: [dev]}\n")
    assert cfg.evaluate.eval_sets == ["dev"]
    cfg = _load(tmp_path, "build: {dev_fraction: 0.1}\ntrain: {validation: {every: 10}}\n")
    assert cfg.train.validation.splits == ["dev"]


def test_the_catalog_must_have_every_task_of_the_config(tmp_path):
    catalog = tmp_path / "cat.yaml"
    catalog.write_text(
        "version: 1\ncategories:\n  asr: {answer_source: transcript, instructions: [Say it.]}\n"
        "  repeat: {instructions: [Repeat it.]}\n"
    )
    cfg = _load(tmp_path, "generate: {catalog: cat.yaml, tasks: [repeat]}\nbuild: {tasks: [asr, repeat]}\n")
    assert cfg.generate.catalog == catalog
    with pytest.raises(
        ConfigError, match=r"generate\.tasks: the catalog .*cat\.yaml has no category 'sentiment'"
    ):
        _load(tmp_path, "generate: {catalog: cat.yaml, tasks: [repeat, sentiment]}\n")
    with pytest.raises(ConfigError, match=r"generate\.catalog: .*nope\.yaml"):
        _load(tmp_path, "generate: {catalog: nope.yaml}\n")


def test_a_bare_backend_name_takes_that_backends_defaults(tmp_path):
    g = _load(tmp_path, "generate: {backend: transformers}\n").generate
    assert (g.backend.kind, g.backend.batching, g.backend.batch_size) == ("transformers", "auto", 128)
    g = _load(
        tmp_path, "generate: {backend: {kind: openai, base_urls: [http://a/v1, http://b/v1]}}\n"
    ).generate
    assert g.backend.base_urls == ["http://a/v1", "http://b/v1"] and g.backend.concurrency == 128


def test_every_path_resolves_relative_to_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "c.yaml"
    p.write_text(
        "name: x\ncorpora: [{name: a, kind: jsonl, root: ../data, manifest: ../data/m.jsonl}]\n"
        "models: {whisper: ../models/w, llm: ../models/l}\n"
        "harvest: {whisper_checkpoint: ../ckpt/tiny.pt}\n"
        "evaluate: {qa_file: ../qa/q.jsonl, baseline: ../runs/asr-only}\n"
    )
    cfg = load_config(p)
    assert (
        cfg.corpora[0].root == tmp_path / "data" and cfg.corpora[0].manifest == tmp_path / "data" / "m.jsonl"
    )
    assert (cfg.models.whisper, cfg.models.llm) == (tmp_path / "models" / "w", tmp_path / "models" / "l")
    assert cfg.harvest.whisper_checkpoint == tmp_path / "ckpt" / "tiny.pt"
    assert cfg.evaluate.qa_file == tmp_path / "qa" / "q.jsonl"
    assert cfg.evaluate.baseline == tmp_path / "runs" / "asr-only"


@pytest.mark.parametrize("bounds", [(5, 6), (10, 3), (-1, 8)])
def test_an_answer_length_rule_that_keeps_no_length_is_an_error(bounds):
    from core.config import BuildConfig

    with pytest.raises(ValueError, match="answer_tokens_between"):
        BuildConfig(answer_tokens_between=bounds)
    BuildConfig(answer_tokens_between=(5, 2048))  # the reference's keeps 6 to 2047 tokens


def test_a_ctc_warm_start_needs_a_connector_that_trains_and_at_most_max_steps():
    from core.config import TrainConfig

    with pytest.raises(ValueError, match="both are frozen"):
        TrainConfig(max_steps=5, ctc_warmup_steps=2, freeze_qformer=True, freeze_proj=True)
    with pytest.raises(ValueError, match="more than max_steps"):
        TrainConfig(max_steps=5, ctc_warmup_steps=6)
    assert TrainConfig(max_steps=5, ctc_warmup_steps=5).ctc_warmup_steps == 5  # the warm start alone
    assert TrainConfig(max_steps=5, ctc_warmup_steps=4, freeze_qformer=True).ctc_warmup_steps == 4
