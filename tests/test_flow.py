"""The whole DAG as a Prefect flow on the demo config, then a rerun that does no stage work."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO
from core.lineage.store import LineageStore
from core.paths import WorkPaths
from core.tables import read_table
from schemas import EXAMPLES, METRICS, PREDICTIONS, REJECTS, RESPONSES, TRANSCRIPTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, prefect_api):
    from flows.pipeline import self_powered_pipeline

    work = tmp_path_factory.mktemp("demo")
    summary = self_powered_pipeline(config=str(REPO / "configs" / "tiny.yaml"), workdir=str(work))
    return work, summary


def test_every_stage_leaves_its_outputs(demo_run):
    work, summary = demo_run
    assert read_table(WorkPaths(work).harvest.transcripts, TRANSCRIPTS).num_rows == 17
    assert (
        read_table(WorkPaths(work).harvest.rejects, REJECTS).column("reason").to_pylist()
        == ["missing_audio"] * 2
    )
    assert read_table(WorkPaths(work).generate.responses, RESPONSES).num_rows == 17 * 6
    assert read_table(WorkPaths(work).build.examples, EXAMPLES).num_rows == 17 * 7
    ckpt = WorkPaths(work).train.checkpoint
    assert (ckpt / "config.json").exists() and list(ckpt.glob("*.safetensors"))
    preds = read_table(WorkPaths(work).evaluate.table("predictions"), PREDICTIONS).to_pylist()
    assert len(preds) == 3 and {p["eval_set"] for p in preds} == {"test-clean"}
    (m,) = read_table(WorkPaths(work).evaluate.table("metrics"), METRICS).to_pylist()
    assert m["eval_set"] == "test-clean" and m["n_utterances"] == 3
    assert m["wer"] == pytest.approx(
        (m["substitutions"] + m["deletions"] + m["insertions"]) / m["n_ref_words"]
    )


def test_each_stage_run_is_in_lineage_under_the_flow_run(demo_run):
    work, _ = demo_run
    store = LineageStore(work / "lineage.duckdb")
    rows = store.query("SELECT stage, status, flow_run_id, code_version FROM runs ORDER BY started_at")
    assert [r[0] for r in rows] == ["harvest", "models", "generate", "build", "train", "evaluate"]
    assert {r[1] for r in rows} == {"succeeded"}
    flow_ids = {r[2] for r in rows}
    assert len(flow_ids) == 1 and None not in flow_ids
    assert all(r[3] for r in rows)


def test_upstream_of_the_checkpoint_reaches_corpus_and_llm(demo_run):
    from splsm.cli import main

    work, _ = demo_run
    ckpt = (WorkPaths(work).train.checkpoint).resolve()
    up = LineageStore(work / "lineage.duckdb").upstream(str(ckpt))
    locations = {e["location"] for e in up}
    for table in ("build/examples.parquet", "generate/responses.parquet", "harvest/transcripts"):
        assert str(work.resolve() / table) in locations
    assert str(REPO / "data" / "demo" / "LibriSpeech") in locations
    assert str(work.resolve() / "models" / "llm") in locations
    out = CliRunner().invoke(main, ["lineage", "upstream", str(ckpt), "--workdir", str(work)])
    assert out.exit_code == 0, out.output
    for name in (
        "examples.parquet",
        "responses.parquet",
        "transcripts",
        "data/demo/LibriSpeech",
        "models/llm",
    ):
        assert name in out.output


def test_downstream_of_the_corpus_reaches_the_metrics(demo_run):
    from splsm.cli import main

    work, _ = demo_run
    down = LineageStore(work / "lineage.duckdb").downstream(str(REPO / "data" / "demo" / "LibriSpeech"))
    names = {Path(e["location"]).name for e in down}
    assert {
        "transcripts",
        "responses.parquet",
        "examples.parquet",
        "checkpoint",
        "metrics.parquet",
    } <= names
    out = CliRunner().invoke(
        main, ["lineage", "downstream", str(REPO / "data" / "demo" / "LibriSpeech"), "--workdir", str(work)]
    )
    assert out.exit_code == 0 and "metrics.parquet" in out.output


def test_rerun_with_nothing_changed_does_no_stage_work(demo_run):
    from flows.pipeline import self_powered_pipeline

    work, _ = demo_run
    store = LineageStore(work / "lineage.duckdb")
    before = store.query("SELECT count(*) FROM runs")[0][0]
    metrics = (WorkPaths(work).evaluate.table("metrics")).read_bytes()
    self_powered_pipeline(config=str(REPO / "configs" / "tiny.yaml"), workdir=str(work))
    assert store.query("SELECT count(*) FROM runs")[0][0] == before
    assert (WorkPaths(work).evaluate.table("metrics")).read_bytes() == metrics


def test_until_stops_the_flow_after_that_stage(tmp_path, prefect_api):
    """``splsm run --until build`` (the flow's ``until``): the stages up to it run and are recorded, none after."""
    from flows.pipeline import self_powered_pipeline
    from splsm.cli import main

    work = tmp_path / "w"
    result = self_powered_pipeline(
        config=str(REPO / "configs" / "tiny.yaml"), workdir=str(work), until="build"
    )
    assert set(result) == {"build"}
    assert read_table(WorkPaths(work).build.examples, EXAMPLES).num_rows == 17 * 7
    assert not WorkPaths(work).train.dir.exists() and not WorkPaths(work).evaluate.dir.exists()
    rows = LineageStore(work / "lineage.duckdb").query("SELECT stage FROM runs ORDER BY started_at")
    assert [r[0] for r in rows] == ["harvest", "models", "generate", "build"]
    out = CliRunner().invoke(main, ["run", str(REPO / "configs" / "tiny.yaml"), "--until", "deploy"])
    assert out.exit_code == 2 and "--until" in out.output
