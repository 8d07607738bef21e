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
    assert cfg.generate.prompt_format == "vicuna_v1.1"


def test_demo_paths_resolve_relative_to_the_config():
    cfg = load_config(REPO / "configs" / "demo.yaml")
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
