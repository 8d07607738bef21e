"""The generate stage against real OpenAI-compatible servers (transformers serve) on a tiny Llama."""

import pytest

from conftest import GEN_TASKS as TASKS
from schemas import RESPONSES, TRANSCRIPTS, read_table
from stages.generate import generate, transformers_server
from stages.instructions import load_catalog
from stages.prompts import VICUNA_V11_SYSTEM, text_prompt


@pytest.fixture(scope="module")
def first_run(generated):
    return generated


def test_one_answer_per_utterance_and_task_through_a_started_server(first_run, harvested):
    out, g, summary = first_run
    utts = read_table(harvested / "harvest" / "transcripts.parquet", TRANSCRIPTS).to_pylist()
    rows = read_table(out / "responses.parquet", RESPONSES).to_pylist()
    assert sorted((r["utt_id"], r["task"]) for r in rows) == sorted(
        (u["utt_id"], t) for u in utts for t in TASKS
    )
    assert summary.requested == len(rows) and summary.cached == 0
    catalog = load_catalog()
    text = {u["utt_id"]: u["text"] for u in utts}
    for r in rows:
        assert r["prompt"] == text_prompt(r["instruction"], text[r["utt_id"]])
        assert r["prompt"].startswith(VICUNA_V11_SYSTEM + " USER: ") and r["prompt"].endswith(" ASSISTANT:")
        assert r["instruction"] in [i.text for i in catalog.categories[r["task"]].instructions]
        assert 0 < r["completion_tokens"] <= 8 and r["prompt_tokens"] > 20
        assert r["finish_reason"] in ("length", "stop")
    assert (out / "server.log").exists()


def test_rerun_requests_nothing_and_gives_the_same_answers(first_run, harvested, tiny_models_dir):
    out, g, _ = first_run
    before = read_table(out / "responses.parquet", RESPONSES).to_pylist()
    again = generate(harvested / "harvest" / "transcripts.parquet", out, g, tiny_models_dir / "llm")
    assert again.requested == 0 and again.cached == len(before)
    assert read_table(out / "responses.parquet", RESPONSES).to_pylist() == before


def test_user_given_base_url_gives_the_same_greedy_answers(first_run, harvested, tiny_models_dir, tmp_path):
    out, g, _ = first_run
    llm = tiny_models_dir / "llm"
    with transformers_server(llm, tmp_path / "server.log") as url:
        g2 = g.model_copy(update={"backend": "openai", "base_url": url, "served_model": str(llm)})
        s = generate(harvested / "harvest" / "transcripts.parquet", tmp_path / "gen", g2, llm)
    assert s.requested > 0
    a = {
        (r["utt_id"], r["task"]): r["answer"]
        for r in read_table(out / "responses.parquet", RESPONSES).to_pylist()
    }
    b = {
        (r["utt_id"], r["task"]): r["answer"]
        for r in read_table(tmp_path / "gen" / "responses.parquet", RESPONSES).to_pylist()
    }
    assert a == b


def test_a_server_that_cannot_start_is_a_clear_error(tmp_path):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    with pytest.raises(RuntimeError, match="transformers serve exited"):
        with transformers_server(bad, tmp_path / "server.log", timeout_s=120):
            pass


def test_catalog_has_seven_categories_of_five_and_draws_deterministically():
    c = load_catalog()
    assert set(c.categories) == {
        "asr",
        "repeat",
        "keywords",
        "intent",
        "sentiment",
        "continuation",
        "translation",
    }
    assert all(len(cat.instructions) >= 5 for cat in c.categories.values())
    assert c.categories["translation"].settings["target_language"] == "zh"
    picks = [c.draw("sentiment", f"utt{i}", 1).id for i in range(200)]
    assert picks == [c.draw("sentiment", f"utt{i}", 1).id for i in range(200)]
    assert len(set(picks)) == 5  # every wording gets used
    assert c.content_hash.startswith("sha256:")
