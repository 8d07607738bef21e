"""Crash safety and scale-out of the generate stage, with the tiny Llama answering in process."""

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

from conftest import GEN_TASKS, REPO, run_stage
from core.config import GenerateConfig, TransformersBackendConfig, load_config
from core.paths import GeneratePaths, WorkPaths
from core.tables import read_table
from schemas import RESPONSES, TRANSCRIPTS
from stages.generate.backends.base import BackendError
from stages.generate.driver import NOT_REQUESTED, generate, worker_of


def _cache_count(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT count(*) FROM answers").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_exactly_one_answer_each(harvested, tiny_models_dir, tmp_path):
    work = tmp_path / "work"
    paths = WorkPaths(work)
    paths.harvest.dir.mkdir(parents=True)
    shutil.copytree(WorkPaths(harvested).harvest.transcripts, paths.harvest.transcripts)
    paths.models.dir.mkdir()
    os.symlink(tiny_models_dir / "llm", paths.models.llm)
    cfg_path = tmp_path / "gen.yaml"
    cfg_path.write_text(
        "name: kill\ncorpora: []\nmodels: {tiny: {}}\n"
        "generate: {backend: {kind: transformers, batch_size: 1}, "
        f"tasks: {GEN_TASKS}, max_new_tokens: 12, shard_size: 2}}\n"
    )
    cache = WorkPaths(work).generate.cache()
    cmd = [
        str(Path(sys.executable).with_name("splsm")),
        "generate",
        "--config",
        str(cfg_path),
        "--workdir",
        str(work),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while _cache_count(cache) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the stage finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    committed = _cache_count(cache)
    shards = list(paths.generate.parts(0, 1).glob("shard-*.parquet"))
    assert not (WorkPaths(work).generate.responses).exists()
    assert committed >= 3 and shards, "answers and whole shards were committed before the kill"

    cfg = load_config(cfg_path)
    # batch size only changes speed, so the rerun may use a larger one and still resume
    backend = cfg.generate.backend.model_copy(update={"batch_size": 32})
    cfg = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"backend": backend})})
    res = run_stage("generate", cfg, work)
    s = res.summary
    rows = read_table(WorkPaths(work).generate.responses, RESPONSES).to_pylist()
    utts = read_table(WorkPaths(work).harvest.transcripts, TRANSCRIPTS).column("utt_id").to_pylist()
    assert Counter((r["utt_id"], r["task"]) for r in rows) == Counter((u, t) for u in utts for t in GEN_TASKS)
    sent = [r for r in rows if r["finish_reason"] != NOT_REQUESTED]
    # nothing committed before the kill was asked again
    assert s["requested"] == len({r["request_key"] for r in sent}) - committed
    assert _cache_count(cache) == len({r["request_key"] for r in sent})
    # every answer in the table is the one in the cache
    con = sqlite3.connect(cache)
    stored = dict(con.execute("SELECT key, answer FROM answers"))
    con.close()
    assert all(stored[r["request_key"]] == r["answer"] for r in sent)
    again = run_stage("generate", cfg, work)
    assert again.reused


def test_workers_split_by_utterance_hash_without_overlap_and_the_last_one_merges(
    generated, harvested, tiny_models_dir, tmp_path
):
    served, g, _ = generated
    g3 = g.model_copy(update={"backend": TransformersBackendConfig(), "tasks": ["repeat"], "shard_size": 3})
    transcripts = WorkPaths(harvested).harvest.transcripts
    seen = Counter()
    for w in range(3):
        assert not (GeneratePaths(tmp_path).responses).exists()
        s = generate(transcripts, tmp_path, g3, tiny_models_dir / "llm", worker=w, workers=3)
        assert s.merged == (w == 2)
        for shard in GeneratePaths(tmp_path).parts(w, 3).glob("shard-*.parquet"):
            rows = read_table(shard, RESPONSES).to_pylist()
            assert {worker_of(r["utt_id"], 3) for r in rows} == {w}
            seen.update((r["utt_id"], r["task"]) for r in rows)
    utts = read_table(transcripts, TRANSCRIPTS).column("utt_id").to_pylist()
    assert seen == Counter((u, "repeat") for u in utts)  # each pair done by exactly one worker
    merged = read_table(GeneratePaths(tmp_path).responses, RESPONSES).to_pylist()
    one = {
        (r["utt_id"], r["task"]): (r["answer"], r["rejected_by"])
        for r in read_table(GeneratePaths(served).responses, RESPONSES).to_pylist()
        if r["task"] == "repeat"
    }
    assert {(r["utt_id"], r["task"]): (r["answer"], r["rejected_by"]) for r in merged} == one


def test_vllm_backend_without_vllm_is_a_clear_error(harvested, tiny_models_dir, tmp_path):
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    g = GenerateConfig(backend="vllm", tasks=["repeat"], max_new_tokens=4)
    with pytest.raises(BackendError, match="needs the vllm package"):
        generate(WorkPaths(harvested).harvest.transcripts, tmp_path, g, tiny_models_dir / "llm")
