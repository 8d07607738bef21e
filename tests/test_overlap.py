"""Runs that overlap on one work directory: one writer per stage output at a time (``core.lock``), a waiting run
that says who it waits for, a killed holder that blocks nobody, and a sweep that never deletes a part a live run
may still commit. Real ``splsm`` processes started at random offsets leave the table one run leaves."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO
from core.atomic import HOST_ID
from core.lock import Busy, held, lock_path
from core.paths import WorkPaths
from core.stage import StageError
from core.tables import MANIFEST, PartsTable, part_name, read_transcripts, run_token

TINY = REPO / "configs" / "tiny.yaml"


def _splsm(*words: str, work: Path, config: Path = TINY) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "splsm.cli", *words, "--config", str(config), "--workdir", str(work)],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def _rows(work: Path) -> list[dict]:
    return read_transcripts(WorkPaths(work).harvest.transcripts).to_pylist()


def _contexts(tiny_config, tmp_path):
    from stages.registry import STAGES

    manifest = tmp_path / "ref.jsonl"
    manifest.write_text("")
    options = {
        "import-reference": {"manifest": manifest, "root": tmp_path},
        "reference-checkpoint": {"checkpoint": tmp_path},
    }
    return [(s, s.context(tiny_config, tmp_path / "w", options.get(n))) for n, s in STAGES.items()]


def test_every_stage_runs_under_its_lock_and_without_waiting_names_the_holder(tiny_config, tmp_path):
    """Each registered stage takes the lock beside its marker before anything else; with ``wait=False`` a held
    lock is an error naming its holder (this process: its pid and host)."""
    for stage, ctx in _contexts(tiny_config, tmp_path):
        with held(lock_path(stage.marker_of(ctx)), "the test"):
            with pytest.raises(StageError) as e:
                stage.run(ctx, wait=False)
        msg = str(e.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in msg, (stage.name, msg)
        assert "--no-wait" in msg and str(lock_path(stage.marker_of(ctx))) in msg


def test_generate_workers_lock_apart_so_they_run_side_by_side(tiny_config, tmp_path):
    from stages.registry import STAGES

    g = STAGES["generate"]
    locks = {
        lock_path(g.marker_of(g.context(tiny_config, tmp_path, {"worker": w, "workers": 3})))
        for w in range(3)
    }
    assert len(locks) == 3
    assert lock_path(g.marker_of(g.context(tiny_config, tmp_path))) not in locks  # the merge's lock


def test_a_waiting_lock_says_who_holds_it_and_takes_it_when_let_go(tmp_path):
    path = tmp_path / "x.lock"
    said: list[str] = []
    got = threading.Event()

    def second():
        with held(path, "second", say=said.append, poll_s=0.02):
            got.set()

    with held(path, "first"):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        assert not got.is_set()  # a thread of the same process is kept out too
        assert len(said) == 1 and f"pid {os.getpid()}" in said[0] and "since" in said[0]
    t.join(timeout=10)
    assert got.is_set()
    with held(path, "first"), pytest.raises(Busy, match="still held after"):
        with held(path, "third", timeout_s=0.1, poll_s=0.02):
            pass


def test_a_killed_holder_blocks_nobody(tmp_path):
    path = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from core.lock import held\nwith held({str(path)!r}, 'h'):\n print('held', flush=True)\n"
            " import time; time.sleep(600)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Busy, match=f"pid {holder.pid} "):
        with held(path, "me", wait=False):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    holder.stdout.close()
    with held(path, "me", wait=False):  # the kernel let go with the process: no stale lock to judge
        pass


def test_a_sweep_spares_a_live_writers_parts_and_removes_a_dead_ones(tmp_path):
    live = subprocess.Popen(["sleep", "600"])
    try:
        dead = subprocess.Popen(["true"])
        dead.wait()
        here = run_token()
        mine = tmp_path / part_name(here, 0)
        theirs = tmp_path / part_name(here.replace(f"-{os.getpid()}-", f"-{live.pid}-"), 0)
        gone = tmp_path / part_name(here.replace(f"-{os.getpid()}-", f"-{dead.pid}-"), 0)
        foreign = tmp_path / part_name(here.replace(f"-h{HOST_ID}-", "-hffffffff-"), 0)
        old_foreign = tmp_path / part_name(here.replace(f"-h{HOST_ID}-", "-heeeeeeee-"), 1)
        legacy = (
            tmp_path / "part-20260101T000000-0123abcd-00000.parquet"
        )  # a name from before writers were named
        kept = tmp_path / "part-kept.parquet"
        for f in (mine, theirs, gone, foreign, old_foreign, legacy, kept):
            f.write_bytes(b"x")
        os.utime(old_foreign, (time.time() - 3 * 86400,) * 2)
        removed = PartsTable.sweep(tmp_path, {kept.name})
        assert sorted(p.name for p in removed) == sorted(f.name for f in (mine, gone, old_foreign, legacy))
        assert theirs.exists() and foreign.exists() and kept.exists()
    finally:
        live.kill()
        live.wait()


def test_overlapping_harvests_leave_the_table_one_run_leaves(tmp_path):
    """Pairs of real `splsm harvest` runs on one work directory, the second started at a random offset (seeded),
    and once with the first killed while it holds the lock: both exit 0 every time, the second waits or reuses,
    and the table reads whole and equal to a lone run's."""
    one = tmp_path / "one"
    _finish(_splsm("harvest", work=one))
    want = _rows(one)
    rng = random.Random(30)
    for i in range(5):
        work = tmp_path / f"pair-{i}"
        first = _splsm("harvest", work=work)
        time.sleep(rng.uniform(0.0, 3.0))
        second = _splsm("harvest", work=work)
        out1, out2 = _finish(first), _finish(second)
        assert _rows(work) == want, i
        assert "reused" in out1 + out2 or "waiting for the run that holds" in out1 + out2
        manifest = WorkPaths(work).harvest.transcripts / MANIFEST
        assert manifest.is_file()
        listed = {p.name for p in manifest.parent.glob("*.parquet")}
        assert listed == {p.name for p in PartsTable.open(manifest.parent, _schema()).files()}
    # the first run is killed while it holds the lock; the second, waiting, takes over and finishes the work
    work = tmp_path / "killed"
    first = _splsm("harvest", work=work)
    for line in first.stdout:
        if "harvest (run " in line:
            break
    second = _splsm("harvest", work=work)
    time.sleep(rng.uniform(0.0, 0.5))
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    first.stdout.close()
    _finish(second)
    assert _rows(work) == want


def _schema():
    from schemas import TRANSCRIPTS

    return TRANSCRIPTS


def test_overlapping_runs_of_generate_and_build_leave_what_one_run_leaves(tmp_path):
    """generate and build, each started twice on one work directory at a random offset (seeded):
    both exit 0, one runs and the other waits for it and reuses its outputs (one run recorded in the marker),
    and the tables equal those of a lone run in another work directory."""
    import yaml

    from core.tables import read_table
    from schemas import EXAMPLES, RESPONSES

    cfg = yaml.safe_load(TINY.read_text())
    for c in cfg["corpora"]:
        for key in ("root", "manifest"):
            if key in c:
                c[key] = str((TINY.parent / c[key]).resolve())
    cfg["generate"]["backend"] = {"kind": "transformers"}  # in-process: no server start per run
    cfg["generate"]["tasks"] = ["repeat"]
    cfg["train"]["max_steps"] = 2
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))

    lone, pair = tmp_path / "lone", tmp_path / "pair"
    for words in (("harvest",), ("models", "tiny")):
        _finish(_splsm(*words, work=pair, config=config))
    shutil.copytree(pair, lone)  # the same models: a lone run's answers are then the pair's, token for token
    rng = random.Random(31)
    # train and evaluate take the same lock in Stage.run (the first test here): their pairs would only add minutes
    for stage in ("generate", "build"):
        _finish(_splsm(stage, work=lone, config=config))
        first = _splsm(stage, work=pair, config=config)
        time.sleep(rng.uniform(0.0, 4.0))
        second = _splsm(stage, work=pair, config=config)
        out = _finish(first) + _finish(second)
        assert out.count(f"{stage} (run ") == 1, out  # one ran; the other waited, then reused it
        assert "reused" in out
    for path, schema in (
        (WorkPaths(pair).generate.responses, RESPONSES),
        (WorkPaths(pair).build.examples, EXAMPLES),
    ):
        lone_path = WorkPaths(lone).root / path.relative_to(WorkPaths(pair).root)
        want = read_table(lone_path, schema).to_pylist()
        got = read_table(path, schema).to_pylist()
        assert [{k: v for k, v in r.items() if k not in ("model",)} for r in got] == [
            {k: v for k, v in r.items() if k not in ("model",)} for r in want
        ]
