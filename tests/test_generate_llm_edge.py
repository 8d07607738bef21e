"""Generate's answers depend on the LLM's weights: its lineage records the LLM as an input, and a rerun after the
weights change asks again instead of reusing answers another model gave (they would train the next model)."""

from __future__ import annotations

import shutil

from conftest import run_stage
from core.config import ModelsConfig, TransformersBackendConfig
from core.lineage.store import LineageStore
from core.paths import WorkPaths


def test_a_generate_rerun_after_the_llms_weights_change_is_not_reused_and_lineage_names_the_llm(
    tiny_config, tmp_path
):
    from safetensors.torch import load_file, save_file

    g = tiny_config.generate.model_copy(
        update={"backend": TransformersBackendConfig(), "tasks": ["repeat"], "max_new_tokens": 4}
    )
    made = tmp_path / "made"
    run_stage("harvest", tiny_config, made)  # the tiny tokenizer learns the transcripts
    run_stage("models", tiny_config, made)  # tiny models, then handed over as the user's own directories
    whisper, llm = tmp_path / "whisper", tmp_path / "llm"
    for src, dst in zip(WorkPaths(made).model_dirs(tiny_config), (whisper, llm), strict=True):
        shutil.copytree(src, dst)
    models = ModelsConfig(whisper=whisper, llm=llm)
    cfg = tiny_config.model_copy(update={"generate": g, "models": models})
    work = tmp_path / "w"
    run_stage("harvest", cfg, work)
    first = run_stage("generate", cfg, work)
    assert not first.reused and run_stage("generate", cfg, work).reused

    store = LineageStore(WorkPaths(work).lineage)
    inputs = {e["role"]: e for _, e in store._run_datasets(first.run_id, "input")}
    assert "llm" in inputs and inputs["llm"]["location"] == str(llm.resolve())

    weights = llm / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    tensors[name] = tensors[name] * 1.5  # other weights, the same file size
    save_file(tensors, weights, metadata={"format": "pt"})
    again = run_stage("generate", cfg, work)
    assert not again.reused
    new_inputs = {e["role"]: e for _, e in store._run_datasets(again.run_id, "input")}
    assert new_inputs["llm"]["content_hash"] != inputs["llm"]["content_hash"]
