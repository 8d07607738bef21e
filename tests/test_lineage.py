"""The lineage store and the stage runner that feeds it, on small real files."""

import multiprocessing as mp
from pathlib import Path

import pytest

from splsm.lineage import LineageStore
from splsm.stage import Artifact, run_stage

CODE = ["splsm/stage.py"]


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


def _writer(db: str, n: int, tag: int) -> None:
    from splsm.lineage import DatasetRef

    store = LineageStore(db)
    for i in range(n):
        rid = store.start_run("w", {"i": i, "tag": tag}, "test")
        store.finish_run(
            rid, [DatasetRef("/in", "file", "h")], [DatasetRef(f"/out/{tag}/{i}", "file", f"h{i}")]
        )


def test_concurrent_writers_lose_nothing(tmp_path):
    db = str(tmp_path / "lineage.duckdb")
    LineageStore(db)
    procs = [mp.get_context("spawn").Process(target=_writer, args=(db, 15, t)) for t in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = LineageStore(db)
    assert store.query("SELECT count(*) FROM runs WHERE status = 'succeeded'")[0][0] == 45
    assert store.query("SELECT count(*) FROM run_io WHERE direction = 'output'")[0][0] == 45
    assert store.query("SELECT count(*) FROM datasets WHERE location = '/in'")[0][0] == 1
