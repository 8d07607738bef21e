"""After a crash: temporaries a killed writer left are removed when the stage starts again, a previous output
an interrupted swap had moved aside is put back, and a marker cut short reruns the stage with a warning."""

import os
import subprocess
import sys

from core.atomic import TMP_MARK, atomic_dir, remove_stale
from core.stage import read_marker, run_stage


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # exited and reaped: no process has it (for the few microseconds that matter here)


def test_temporaries_of_dead_writers_go_and_those_of_live_ones_stay(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    stale_file = tmp_path / f".examples.parquet{TMP_MARK}{dead}-0123abcd"
    stale_file.write_bytes(b"half a table")
    stale_dir = tmp_path / f".checkpoint{TMP_MARK}{dead}-89abcdef"
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "model.safetensors").write_bytes(b"x" * 1000)
    busy = tmp_path / f".responses.parquet{TMP_MARK}{live}-00000000"  # another worker writing right now
    busy.write_bytes(b"in progress")
    staging = tmp_path / ".tmp-step-00000100"  # train's checkpoint staging folder
    staging.mkdir()
    kept = tmp_path / "examples.parquet"
    kept.write_bytes(b"the real one")
    gone = remove_stale([tmp_path])
    assert sorted(gone) == sorted([stale_file, stale_dir, staging])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([busy.name, kept.name])


def test_temporaries_of_other_hosts_are_left_alone_until_no_writer_could_still_be_at_them(tmp_path):
    """Workers on several hosts (or in several containers) share one work directory: a pid in another host's
    name says nothing here, so its temporary stays, however dead that pid is locally, until it is a day old.
    The names this host writes carry its id, and a writer's own name is judged as this host's."""
    import time

    from core.atomic import FOREIGN_STALE_S, HOST_ID, atomic_file

    other = "0" * 8 if HOST_ID != "0" * 8 else "1" * 8
    dead = _dead_pid()
    theirs = tmp_path / f".responses.parquet{TMP_MARK}{dead}-h{other}-0123abcd"
    theirs.write_bytes(b"another host writing")
    old = tmp_path / f".examples.parquet{TMP_MARK}{dead}-h{other}-89abcdef"
    old.write_bytes(b"left by a host that died yesterday")
    past = time.time() - FOREIGN_STALE_S - 60
    os.utime(old, (past, past))
    ours = tmp_path / f".cache.sqlite{TMP_MARK}{dead}-h{HOST_ID}-00000000"
    ours.write_bytes(b"ours, writer dead")
    assert sorted(remove_stale([tmp_path])) == sorted([old, ours])
    assert [p.name for p in tmp_path.iterdir()] == [theirs.name]
    with atomic_file(tmp_path / "new.txt") as tmp:
        assert f"{TMP_MARK}{os.getpid()}-h{HOST_ID}-" in tmp.name
        tmp.write_text("new")


def test_an_output_moved_aside_by_an_interrupted_swap_is_put_back(tmp_path):
    out = tmp_path / "checkpoint"
    with atomic_dir(out) as tmp:
        (tmp / "w").write_text("first")
    aside = tmp_path / f".checkpoint{TMP_MARK}old-1234abcd"
    os.replace(out, aside)  # killed between the two renames of the next swap
    remove_stale([tmp_path])
    assert (out / "w").read_text() == "first" and not aside.exists()


def test_a_marker_cut_short_reruns_the_stage_with_a_warning(tmp_path, capsys):
    calls = []

    def body():
        calls.append(1)
        (tmp_path / "out.txt").write_text("made")
        return {"n": len(calls)}

    from core.stage import Artifact

    outputs = [Artifact("out", tmp_path / "out.txt", "file")]
    marker = tmp_path / "work" / "stage" / "_stage.json"
    run_stage("s", tmp_path / "work", {"p": 1}, [], outputs, body, "core", marker=marker)
    run_stage("s", tmp_path / "work", {"p": 1}, [], outputs, body, "core", marker=marker)
    assert len(calls) == 1  # reused
    marker.write_bytes(b"")  # a power loss: the rename reached the disk, the data did not
    capsys.readouterr()
    assert read_marker(marker) is None
    run_stage("s", tmp_path / "work", {"p": 1}, [], outputs, body, "core", marker=marker)
    assert len(calls) == 2 and "cannot be read" in capsys.readouterr().out


def test_a_reader_refuses_outputs_of_a_run_that_did_not_finish_publishing(tmp_path):
    """Harvest killed after its new transcripts table, before its rejects and marker: build must not read the
    new transcripts beside the old rejects; the harvest's rerun makes them one version again."""
    import pytest

    from core.stage import Artifact, StageError

    work = tmp_path / "work"
    made = work / "maker"
    a, b = made / "a.txt", made / "b.txt"

    def maker(version: str):
        def body():
            a.parent.mkdir(parents=True, exist_ok=True)
            a.write_text(f"a {version}")
            b.write_text(f"b {version}")

        return body

    outs = [Artifact("a", a, "file"), Artifact("b", b, "file")]
    run_stage("maker", work, {"v": 1}, [], outs, maker("1"), "core")
    reader_out = [Artifact("r", work / "reader" / "r.txt", "file")]

    def reader():
        (work / "reader").mkdir(exist_ok=True)
        (work / "reader" / "r.txt").write_text(a.read_text() + b.read_text())

    ins = [Artifact("a", a, "file"), Artifact("b", b, "file")]
    run_stage("reader", work, {}, ins, reader_out, reader, "core")
    a.write_text("a 2")  # the second run of maker got this far
    with pytest.raises(
        StageError, match=r"a.txt is not the version its stage published .*Rerun it [(]`splsm maker`"
    ):
        run_stage("reader", work, {}, ins, reader_out, reader, "core")
    run_stage("maker", work, {"v": 2}, [], outs, maker("2"), "core")
    run_stage("reader", work, {}, ins, reader_out, reader, "core")
    assert (work / "reader" / "r.txt").read_text() == "a 2b 2"


def test_the_marker_that_holds_an_invocations_summary(tmp_path, tiny_config):
    """What the runner reads back after a stage ran: one generate worker of several leaves its own marker
    under parts/; a stage run as one run leaves the marker in its folder (import-reference's is import/)."""
    from stages.registry import STAGES

    cases = [
        (
            "generate",
            {"worker": 1, "workers": 3},
            tmp_path / "generate" / "parts" / "of-0003" / "worker-0001.json",
        ),
        ("generate", {}, tmp_path / "generate" / "_stage.json"),
        ("harvest", {}, tmp_path / "harvest" / "_stage.json"),
        (
            "import-reference",
            {"manifest": "train.jsonl", "root": "corpus"},
            tmp_path / "import" / "_stage.json",
        ),
    ]
    for name, options, marker in cases:
        stage = STAGES[name]
        assert stage.marker_of(stage.context(tiny_config, tmp_path, options)) == marker, name


def test_atomic_dir_keeps_a_folder_with_the_same_bytes_and_replaces_one_that_differs(tmp_path):
    from core.atomic import atomic_dir

    out = tmp_path / "m"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("weights")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("tokenizer")
    old_inode = (out / "a.txt").stat().st_ino
    with atomic_dir(out, keep_identical=True) as tmp:  # the same bytes: the folder stays, file for file
        (tmp / "a.txt").write_text("weights")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("tokenizer")
    assert (out / "a.txt").stat().st_ino == old_inode
    for changed in ({"a.txt": "other weights", "sub/b.txt": "tokenizer"}, {"a.txt": "weights"}):
        with atomic_dir(out, keep_identical=True) as tmp:  # other bytes, or a file fewer: replaced
            for name, text in changed.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_text(text)
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(changed)
        assert (out / "a.txt").read_text() == changed["a.txt"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
