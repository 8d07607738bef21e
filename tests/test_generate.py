"""The generate stage against real OpenAI-compatible servers (transformers serve) on a tiny Llama."""

import pytest

from conftest import GEN_TASKS as TASKS
from core.catalog import load_catalog
from core.config import TransformersBackendConfig
from core.paths import GeneratePaths, WorkPaths
from core.prompts import VICUNA_V11_SYSTEM, text_prompt
from core.tables import read_table
from schemas import GENERATE_STATS, RESPONSES, TRANSCRIPTS
from stages.generate.backends.transformers_serve import ServerProcess
from stages.generate.driver import NOT_REQUESTED, generate


@pytest.fixture(scope="module")
def first_run(generated):
    return generated


def test_one_answer_per_utterance_and_task_through_a_started_server(first_run, harvested, tiny_models_dir):
    from transformers import AutoTokenizer

    out, g, summary = first_run
    utts = read_table(WorkPaths(harvested).harvest.transcripts, TRANSCRIPTS).to_pylist()
    rows = read_table(GeneratePaths(out).responses, RESPONSES).to_pylist()
    assert sorted((r["utt_id"], r["task"]) for r in rows) == sorted(
        (u["utt_id"], t) for u in utts for t in TASKS
    )
    catalog = load_catalog()
    tok = AutoTokenizer.from_pretrained(tiny_models_dir / "llm")
    text = {u["utt_id"]: u["text"] for u in utts}
    sent = [r for r in rows if r["finish_reason"] != NOT_REQUESTED]
    too_long = [r for r in rows if r["finish_reason"] == NOT_REQUESTED]
    assert summary.requested == len(sent) and summary.cached == 0 and summary.too_long == len(too_long)
    for r in rows:
        assert r["prompt"] == text_prompt(r["instruction"], text[r["utt_id"]])
        assert r["prompt"].startswith(VICUNA_V11_SYSTEM + " USER: ") and r["prompt"].endswith(" ASSISTANT:")
        assert r["instruction"] in [i.text for i in catalog.categories[r["task"]].instructions]
        n_prompt = len(tok(r["prompt"]).input_ids)
        if r in too_long:  # the reference's prompt filter, applied before paying for an answer
            assert (
                n_prompt >= g.max_prompt_tokens
                and r["rejected_by"] == "prompt_too_long"
                and r["answer"] == ""
            )
        else:
            assert (
                n_prompt < g.max_prompt_tokens and r["prompt_tokens"] == n_prompt
            )  # the server counts alike
            assert 0 < r["completion_tokens"] <= 8 and r["finish_reason"] in ("length", "stop")
            assert (r["rejected_by"] == "truncated") == (r["finish_reason"] == "length")
    assert too_long, "the demo data has transcripts long enough to hit the 150-token prompt filter"
    assert (out / "server.log").exists()


def test_stats_count_every_rejection_of_every_filter(first_run):
    out, g, _ = first_run
    rows = read_table(GeneratePaths(out).responses, RESPONSES).to_pylist()
    stats = read_table(GeneratePaths(out).stats, GENERATE_STATS).to_pylist()
    catalog = load_catalog()
    for task in TASKS:
        mine = [r for r in rows if r["task"] == task]
        by_filter = {s["filter"]: s for s in stats if s["task"] == task}
        assert set(by_filter) == set(catalog.categories[task].filters)
        for f, s in by_filter.items():
            assert s["rejected"] == sum(r["rejected_by"] == f for r in mine)
            assert s["rejected"] <= s["failed"] <= s["applied"] <= len(mine)
        # every row is either kept or rejected by a counted filter
        kept = sum(r["rejected_by"] is None for r in mine)
        assert kept + sum(s["rejected"] for s in by_filter.values()) == len(mine)


def test_rerun_requests_nothing_and_gives_the_same_answers(first_run, harvested, tiny_models_dir):
    out, g, _ = first_run
    before = read_table(GeneratePaths(out).responses, RESPONSES).to_pylist()
    again = generate(WorkPaths(harvested).harvest.transcripts, out, g, tiny_models_dir / "llm")
    assert again.requested == 0 and again.cached + again.too_long == len(before)
    assert read_table(GeneratePaths(out).responses, RESPONSES).to_pylist() == before


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_in_process_backend_gives_the_servers_greedy_answers(
    first_run, harvested, tiny_models_dir, tmp_path, batching
):
    out, g, _ = first_run
    # continuous batching is slow on CPU: one task is enough to compare it
    tasks = TASKS if batching == "static" else TASKS[:1]
    g2 = g.model_copy(
        update={
            "backend": TransformersBackendConfig(batching=batching, batch_size=5),
            "tasks": tasks,
        }
    )
    s = generate(WorkPaths(harvested).harvest.transcripts, tmp_path / "gen", g2, tiny_models_dir / "llm")
    assert s.requested > 0 and s.cached == 0

    def answers(d):
        return {
            (r["utt_id"], r["task"]): (
                r["answer"],
                r["finish_reason"],
                r["completion_tokens"],
                r["request_key"],
            )
            for r in read_table(GeneratePaths(d).responses, RESPONSES).to_pylist()
        }

    served = {k: v for k, v in answers(out).items() if k[1] in tasks}
    assert served == answers(tmp_path / "gen")


def test_a_server_that_cannot_start_is_a_clear_error(tmp_path):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    with pytest.raises(RuntimeError, match="transformers serve exited"):
        with ServerProcess(bad, tmp_path / "server.log", timeout_s=120):
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
    assert c.categories["translation"].target_language == "zh"
    assert "wrong_script" in c.categories["translation"].filters
    assert "wrong_script" not in c.categories["repeat"].filters
    assert all(cat.max_new_tokens == 225 for cat in c.categories.values())
    picks = [c.draw("sentiment", f"utt{i}", 1).id for i in range(200)]
    assert picks == [c.draw("sentiment", f"utt{i}", 1).id for i in range(200)]
    assert len(set(picks)) == 5  # every wording gets used
    assert c.content_hash.startswith("sha256:")
