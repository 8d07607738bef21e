"""The lineage store and the stage runner that feeds it, on small real files."""

import multiprocessing as mp
from pathlib import Path

import pytest

from core.lineage.store import LineageStore, RunContext
from core.stage import Artifact, run_stage

CODE = "schemas"  # the package whose code (and what it imports) keys reuse


def _copy_stage(work: Path, name: str, src: Path, dst: Path, extra: str = ""):
    def body():
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(src.read_text() + extra)
        return {"bytes": dst.stat().st_size}

    return run_stage(
        name,
        work,
        {"extra": extra},
        [Artifact("in", src, "file")],
        [Artifact("out", dst, "file")],
        body,
        CODE,
    )


def test_upstream_and_downstream_walk_the_chain(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello")
    src = corpus / "a.txt"
    a, b, c = tmp_path / "a.out", tmp_path / "b.out", tmp_path / "c.out"
    _copy_stage(tmp_path, "one", src, a)
    _copy_stage(tmp_path, "two", a, b)
    _copy_stage(tmp_path, "three", b, c)
    store = LineageStore(tmp_path / "lineage.duckdb")

    up = store.upstream(str(c.resolve()))
    assert [(e["depth"], Path(e["location"]).name, e["via_stage"]) for e in up] == [
        (1, "b.out", "three"),
        (2, "a.out", "two"),
        (3, "a.txt", "one"),
    ]
    down = store.downstream(str(src.resolve()))
    assert [(e["depth"], Path(e["location"]).name, e["via_stage"]) for e in down] == [
        (1, "a.out", "one"),
        (2, "b.out", "two"),
        (3, "c.out", "three"),
    ]
    with pytest.raises(KeyError):
        store.upstream(str(tmp_path / "nothing"))


def test_rerun_is_reused_and_a_change_makes_a_new_version(tmp_path):
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("v1")
    assert not _copy_stage(tmp_path, "s", src, out).reused
    assert _copy_stage(tmp_path, "s", src, out).reused
    src.write_text("v2")
    assert not _copy_stage(tmp_path, "s", src, out).reused
    assert not _copy_stage(tmp_path, "s", src, out, extra="!").reused  # a parameter changed
    out.write_text("tampered")
    assert not _copy_stage(tmp_path, "s", src, out, extra="!").reused  # an output changed on disk
    store = LineageStore(tmp_path / "lineage.duckdb")
    versions = store.query("SELECT count(*) FROM datasets WHERE location = ?", [str(src.resolve())])[0][0]
    assert versions == 2
    assert store.query("SELECT count(*) FROM runs WHERE stage = 's' AND status = 'succeeded'")[0][0] == 4


def test_a_failed_run_is_recorded_with_its_error(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("x")

    def body():
        raise ValueError("bad row 7")

    with pytest.raises(ValueError):
        run_stage(
            "broken",
            tmp_path,
            {},
            [Artifact("in", src, "file")],
            [Artifact("out", tmp_path / "o", "file")],
            body,
            CODE,
        )
    store = LineageStore(tmp_path / "lineage.duckdb")
    ((status, error, ended),) = store.query("SELECT status, error, ended_at FROM runs WHERE stage = 'broken'")
    assert status == "failed" and "bad row 7" in error and ended is not None


def _stage_runs(db: str, root: str, n: int, tag: int) -> None:
    """``n`` real stage runs through run_stage, each reading a shared input and writing its own output."""
    import os

    os.environ["SPLSM_LINEAGE_DB"] = db  # every process shares one store, as containers on a volume do
    os.environ["SPLSM_FLOW_RUN_ID"] = f"flow-{tag}"
    src = Path(root) / "shared.txt"
    for i in range(n):
        out = Path(root) / f"p{tag}" / f"{i}.txt"

        def body(out=out, i=i):
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(f"{tag}:{i}")

        run_stage(
            f"s{tag}",
            Path(root) / f"w{tag}-{i}",
            {"i": i},
            [Artifact("in", src, "file")],
            [Artifact("out", out, "file")],
            body,
            CODE,
        )


@pytest.mark.slow
def test_four_processes_of_a_hundred_stage_runs_lose_nothing(tmp_path):
    db = str(tmp_path / "store" / "lineage.duckdb")
    (tmp_path / "shared.txt").write_text("input")
    procs = [
        mp.get_context("spawn").Process(target=_stage_runs, args=(db, str(tmp_path), 100, t))
        for t in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
        assert p.exitcode == 0
    store = LineageStore(db)
    per = store.query(
        "SELECT flow_run_id, count(*), count(DISTINCT params) FROM runs "
        "WHERE status = 'succeeded' GROUP BY 1 ORDER BY 1"
    )
    assert per == [(f"flow-{t}", 100, 100) for t in range(4)]
    assert store.query("SELECT count(*) FROM runs WHERE status <> 'succeeded'")[0][0] == 0
    outs = store.query(
        "SELECT d.location, count(*) FROM run_io io JOIN datasets d USING (dataset_id) "
        "WHERE direction = 'output' GROUP BY 1"
    )
    assert len(outs) == 400 and {n for _, n in outs} == {1}
    # the shared input is one dataset version, read by all 400 runs
    assert (
        store.query(
            "SELECT count(*) FROM datasets WHERE location = ?", [str((tmp_path / "shared.txt").resolve())]
        )[0][0]
        == 1
    )
    assert store.query("SELECT count(*) FROM run_io WHERE direction = 'input'")[0][0] == 400


def test_runs_record_the_git_commit_image_and_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLSM_IMAGE", "splsm:cpu")
    monkeypatch.setenv("SPLSM_IMAGE_DIGEST", "sha256:" + "ab" * 32)
    monkeypatch.setenv("SPLSM_FLOW_NAME", "self_powered_pipeline")
    src = tmp_path / "in.txt"
    src.write_text("x")
    _copy_stage(tmp_path, "s", src, tmp_path / "out.txt")
    (row,) = LineageStore(tmp_path / "lineage.duckdb").dicts(
        "SELECT git_commit, code_version, image, image_digest, flow_name FROM runs"
    )
    from core.provenance import git_commit

    assert row["git_commit"] == git_commit() and row["code_version"]
    assert row["image"] == "splsm:cpu" and row["image_digest"] == "sha256:" + "ab" * 32
    assert row["flow_name"] == "self_powered_pipeline"


def test_a_store_from_before_the_new_columns_gains_them(tmp_path):
    import duckdb

    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    con.execute(
        "CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, stage VARCHAR NOT NULL, params JSON, code_version VARCHAR,"
        " status VARCHAR NOT NULL, started_at TIMESTAMPTZ NOT NULL, ended_at TIMESTAMPTZ, flow_run_id VARCHAR,"
        " error VARCHAR, host VARCHAR, image VARCHAR)"
    )
    con.execute(
        "INSERT INTO runs VALUES ('r1', 'old', '{}', 'v', 'succeeded', now(), now(), NULL, NULL, 'h', NULL)"
    )
    con.close()
    store = LineageStore(db)
    store.start_run("new", {}, RunContext("v"))
    rows = store.dicts("SELECT stage, git_commit FROM runs ORDER BY stage")
    assert [r["stage"] for r in rows] == ["new", "old"]


def test_openlineage_export_has_a_start_and_an_end_event_per_run(tmp_path):
    import json
    import uuid

    from click.testing import CliRunner

    from splsm.cli import main

    src, mid, out = tmp_path / "in.txt", tmp_path / "mid.txt", tmp_path / "out.txt"
    src.write_text("x")
    ok1 = _copy_stage(tmp_path, "one", src, mid)
    ok2 = _copy_stage(tmp_path, "two", mid, out)

    def body():
        raise ValueError("bad row 7")

    with pytest.raises(ValueError):
        run_stage(
            "broken",
            tmp_path,
            {},
            [Artifact("in", mid, "file")],
            [Artifact("o", tmp_path / "o", "file")],
            body,
            CODE,
        )

    path = tmp_path / "ol" / "events.jsonl"
    res = CliRunner().invoke(main, ["lineage", "export-openlineage", str(path), "--workdir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["job"]["name"], e["eventType"]) for e in events] == [
        ("one", "START"),
        ("one", "COMPLETE"),
        ("two", "START"),
        ("two", "COMPLETE"),
        ("broken", "START"),
        ("broken", "FAIL"),
    ]
    for e in events:
        assert {"eventType", "eventTime", "run", "job", "inputs", "outputs", "producer", "schemaURL"} <= set(
            e
        )
        uuid.UUID(e["run"]["runId"])
        assert e["job"]["namespace"] == "splsm"
    end_one, end_two = events[1], events[3]
    assert end_one["run"]["runId"] == str(uuid.UUID(ok1.run_id))
    # the dataset one wrote is the dataset two read: same namespace and name join them in Marquez
    assert end_one["outputs"][0]["name"] == end_two["inputs"][0]["name"] == str(mid.resolve())
    assert end_one["outputs"][0]["facets"]["splsm_dataset"]["contentHash"].startswith("sha256:")
    assert end_two["run"]["runId"] == str(uuid.UUID(ok2.run_id))
    assert "bad row 7" in events[5]["run"]["facets"]["errorMessage"]["message"]
    assert events[5]["outputs"] == []
