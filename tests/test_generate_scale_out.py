"""Generation scaled out (issue 18, point 4): two `splsm generate` worker processes (``--worker 0/1 --workers
2``) at once, against two real `transformers serve` processes listed as replicas (``generate.backend.base_urls``)
serving the tiny Llama. One server is SIGKILLed once answers have started coming in; the run completes on the
other. The merged table is checked against a plan computed here from the harvested transcripts and the
configured tasks, and against the answers an undisturbed run gave."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from core.config import OpenAIBackendConfig
from core.digest import sha256_file
from core.lineage.store import LineageStore
from core.paths import GeneratePaths, WorkPaths, lineage_path
from core.tables import read_table
from schemas import RESPONSES, TRANSCRIPTS
from stages.generate.backends.transformers_serve import ServerProcess

pytestmark = pytest.mark.slow
WORKERS = 2


def _answers_in(caches: list[Path]) -> int:
    """Answers committed so far to the workers' answer caches (each worker writes its own SQLite file)."""
    n = 0
    for path in caches:
        if not path.exists():
            continue
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            try:
                n += con.execute("SELECT count(*) FROM answers").fetchone()[0]
            finally:
                con.close()
        except sqlite3.OperationalError:  # created but its table not yet
            continue
    return n


def _worker(work: Path, config: Path, w: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "splsm.cli", "generate", "--config", str(config), "--workdir", str(work)]
            + ["--worker", str(w), "--workers", str(WORKERS)],
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_two_workers_on_two_replicas_one_killed_mid_run_complete_with_every_pair_once(
    generated, harvested, tiny_models_dir, tmp_path
):
    served, g, _ = generated  # the undisturbed answers: same settings, one transformers serve
    llm = tiny_models_dir / "llm"
    work = tmp_path / "work"
    shutil.copytree(WorkPaths(harvested).harvest.dir, WorkPaths(work).harvest.dir)
    servers = [ServerProcess(llm, tmp_path / f"server-{i}.log", timeout_s=300) for i in range(2)]
    procs: list[subprocess.Popen] = []
    try:
        for s in servers:
            s.start()
        backend = OpenAIBackendConfig(
            base_urls=[s.url for s in servers],
            served_model=str(llm),  # what transformers serve calls the model it loaded
            api_key_env=None,  # transformers serve needs no key
            concurrency=2,
            max_retries=30,
            retry_backoff_s=0.2,
            retry_backoff_max_s=1.0,
        )
        cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
        cfg["models"] = {"whisper": str(tiny_models_dir / "whisper"), "llm": str(llm)}
        cfg["generate"] = g.model_copy(update={"backend": backend}).model_dump(mode="json")
        config = tmp_path / "scale-out.yaml"
        config.write_text(yaml.safe_dump(cfg))

        logs = [tmp_path / f"worker-{w}.log" for w in range(WORKERS)]
        procs = [_worker(work, config, w, logs[w]) for w in range(WORKERS)]
        caches = [WorkPaths(work).generate.cache(w, WORKERS) for w in range(WORKERS)]
        deadline = time.monotonic() + 600
        while (at_kill := _answers_in(caches)) < 2:
            assert time.monotonic() < deadline, "no answers after 600 s"
            assert all(p.poll() is None for p in procs), [log.read_text()[-3000:] for log in logs]
            time.sleep(0.01)
        servers[0].stop(kill=True)  # SIGKILL: whatever it had in flight gets no answer
        rcs = [p.wait(timeout=600) for p in procs]
        outs = [log.read_text() for log in logs]
        assert rcs == [0, 0], "\n\n".join(o[-4000:] for o in outs)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=60)
        for s in servers:
            s.stop()

    # The plan, made here: every harvested utterance gets every configured task (tasks_per_utterance unset).
    utts = read_table(WorkPaths(work).harvest.transcripts, TRANSCRIPTS).column("utt_id").to_pylist()
    assert g.tasks_per_utterance is None and len(set(g.tasks)) == 2
    expected = {(u, t) for u in utts for t in g.tasks}
    assert 0 < at_kill < len(expected), "the kill did not land mid-run"
    # a request hit the dead server and was moved to the live one at once
    assert any("retry 1/30 on another server now" in " ".join(o.split()) for o in outs), outs

    rows = read_table(WorkPaths(work).generate.responses, RESPONSES).to_pylist()
    pairs = Counter((r["utt_id"], r["task"]) for r in rows)
    assert set(pairs) == expected and max(pairs.values()) == 1
    # no request failed for good: an error row would be a request that found no server
    assert not [r for r in rows if r["finish_reason"].startswith("error")]
    # the same greedy answers, row for row, as one undisturbed server gave for the same prompts
    before = {
        (r["utt_id"], r["task"]): (r["prompt"], r["answer"], r["finish_reason"], r["rejected_by"])
        for r in read_table(GeneratePaths(served).responses, RESPONSES).to_pylist()
    }
    got = {
        (r["utt_id"], r["task"]): (r["prompt"], r["answer"], r["finish_reason"], r["rejected_by"])
        for r in rows
    }
    assert got == {p: before[p] for p in expected}
    sent = [r for r in rows if r["finish_reason"] != "not_requested"]
    assert sent and all(r["answer"] for r in sent)

    # each worker did its own part: its shards hold only pairs no other worker's shards hold, together all
    gen = WorkPaths(work).generate
    by_worker = [
        Counter(
            (r["utt_id"], r["task"])
            for shard in gen.parts(w, WORKERS).glob("shard-*.parquet")
            for r in read_table(shard, RESPONSES).to_pylist()
        )
        for w in range(WORKERS)
    ]
    assert all(by_worker) and not set(by_worker[0]) & set(by_worker[1])
    assert by_worker[0] + by_worker[1] == Counter(expected)

    # each worker's run is recorded, and the merge as the stage's run, with the table as it is on disk
    store = LineageStore(lineage_path(work))
    runs = store.dicts("SELECT run_id, stage, status FROM runs ORDER BY started_at")
    for w in range(WORKERS):
        name = f"generate-worker-{w:04d}-of-{WORKERS:04d}"
        assert [r["status"] for r in runs if r["stage"] == name] == ["succeeded"], runs
        marker = json.loads(gen.worker_marker(w, WORKERS).read_text())
        assert marker["summary"]["requests"] == sum(by_worker[w].values())
    merges = [r for r in runs if r["stage"] == "generate"]
    assert merges and all(r["status"] == "succeeded" for r in merges), runs
    table_hash = "sha256:" + sha256_file(gen.responses)
    for m in merges:
        written = store.query(
            "SELECT d.content_hash FROM run_io io JOIN datasets d USING (dataset_id) "
            "WHERE io.run_id = ? AND io.direction = 'output' AND io.role = 'responses'",
            [m["run_id"]],
        )
        assert written == [(table_hash,)]
