"""prefect.yaml against a real Prefect server: deploy every flow onto a process work pool, start a
worker, run the demo deployment and the scheduled regeneration through `prefect deployment run`.

The server is `prefect server start` on a free loopback port with its own PREFECT_HOME and SQLite
database; only the CLI processes (server, deploy, worker, run) see it, so other tests' Prefect
settings are untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import REPO, copy_librispeech
from core.lineage.store import LineageStore
from core.paths import WorkPaths
from core.tables import read_table
from schemas import EXAMPLES, TRANSCRIPTS

pytestmark = pytest.mark.slow
PREFECT = str(Path(sys.executable).parent / "prefect")
FIRST = ["1988-24833-0000", "1988-24833-0001", "1988-24833-0002", "1988-24833-0003"]
ADDED = ["2412-153948-0000", "3752-4944-0000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


AUTH = ("splsm", "test-only-" + os.urandom(8).hex())  # the server requires it, every client sends it


class Server:
    def __init__(self, home: Path, port: int):
        self.url = f"http://127.0.0.1:{port}/api"
        self.env = {
            "PREFECT_SERVER_API_AUTH_STRING": ":".join(AUTH),
            "PREFECT_API_AUTH_STRING": ":".join(AUTH),
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.url,
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_CLI_PROMPT": "false",
        }
        for name in ("PREFECT_API_KEY", "SPLSM_LINEAGE_DB", "SPLSM_FLOW_RUN_ID"):
            self.env.pop(name, None)

    def cli(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [PREFECT, *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def api(self, method: str, path: str, **kw):
        r = httpx.request(method, self.url + path, timeout=60, auth=AUTH, **kw)
        r.raise_for_status()
        return r.json()

    def run_deployment(self, name: str, **params) -> dict:
        """`prefect deployment run NAME --watch` with parameters; returns the flow run (id, state) it made."""
        args = ["deployment", "run", name, "--watch", "--watch-timeout", "900"]
        for k, v in params.items():
            args += ["--param", f"{k}={v}"]
        proc = self.cli(*args, timeout=960, check=False)
        ids = re.findall(r"UUID: ([0-9a-f-]{36})", proc.stdout)
        assert ids, f"no flow run id in:\n{proc.stdout}\n{proc.stderr}"
        run = self.api("GET", f"/flow_runs/{ids[0]}")
        assert run["state"]["type"] == "COMPLETED", (
            f"{name} ended {run['state']['type']}: {run['state'].get('message')}\n{proc.stdout[-3000:]}"
            f"\n{proc.stderr[-3000:]}\nworker log:\n{_tail(self.worker_log)}"
        )
        return run


def _tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _stop(p: subprocess.Popen | None) -> None:
    if p is not None and p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@contextmanager
def prefect_server(home: Path) -> Iterator[Server]:
    """`prefect server start` on a free loopback port with its own home and database, requiring the auth
    string; stopped on exit. tests/test_deploy_k8s.py starts one too."""
    srv = Server(home, _free_port())
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", srv.url.split(":")[2].split("/")[0]],
        env=srv.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(srv.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, f"prefect server exited:\n{_tail(home / 'server.log')}"
            assert time.monotonic() < deadline, f"prefect server did not start:\n{_tail(home / 'server.log')}"
            time.sleep(1)
        yield srv
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    with prefect_server(home) as srv:
        worker = None
        try:
            srv.cli("work-pool", "create", "splsm", "--type", "process")
            srv.cli("concurrency-limit", "create", "gpu", "1")
            srv.deploy = srv.cli("--no-prompt", "deploy", "--all", timeout=600)
            srv.worker_log = home / "worker.log"
            worker = subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", "splsm", "--prefetch-seconds", "5"],
                cwd=REPO,
                env=srv.env,
                stdout=open(srv.worker_log, "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            yield srv
        finally:
            _stop(worker)


def test_the_api_refuses_a_request_without_the_auth_string(server):
    """The deploy, the worker and every flow run below reach the API with the string; nothing else does."""
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # probes stay open
    for auth in (None, ("splsm", "wrong")):
        r = httpx.post(server.url + "/deployments/filter", json={}, auth=auth, timeout=30)
        assert r.status_code == 401, r.text
    assert httpx.post(server.url + "/deployments/filter", json={}, auth=AUTH, timeout=30).status_code == 200


def test_every_flow_is_deployed_with_its_pool_and_the_regeneration_with_its_cron(server):
    deployments = server.api("POST", "/deployments/filter", json={})
    by_name = {(d["name"], d["entrypoint"]) for d in deployments}
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert {(d["name"], d["entrypoint"]) for d in spec["deployments"]} == by_name
    entrypoints = {e.split(":")[1] for _, e in by_name}
    assert entrypoints == {
        "self_powered_pipeline",
        "regenerate_dataset",
        "train_and_evaluate",
        "evaluate_checkpoint",
    }
    assert {d["work_pool_name"] for d in deployments} == {"splsm"}
    (regen,) = [d for d in deployments if d["name"] == "regenerate"]
    crons = [s["schedule"].get("cron") for s in regen["schedules"]]
    assert crons == ["0 3 * * *"] and regen["schedules"][0]["active"]
    assert regen["parameters"]["config"] == "configs/paper.yaml"
    # the deployment's pull step points the worker at this checkout
    assert json.dumps(regen["pull_steps"]).count(str(REPO)) == 1
    (limit,) = server.api("POST", "/concurrency_limits/filter", json={})
    assert limit["tag"] == "gpu" and limit["concurrency_limit"] == 1


def test_demo_deployment_run_completes_and_its_lineage_is_there(server, tmp_path):
    work = tmp_path / "demo"
    # the demo deployment, on the tiny models: the deployment's mechanics, not the real models (tests/test_demo.py)
    run = server.run_deployment(
        "self_powered_pipeline/demo", config=str(REPO / "configs" / "tiny.yaml"), workdir=str(work)
    )
    store = LineageStore(WorkPaths(work).lineage)
    rows = store.dicts("SELECT stage, status, flow_run_id, flow_name, git_commit, task_run_id FROM runs")
    assert sorted(r["stage"] for r in rows) == sorted(
        ["harvest", "models", "generate", "build", "train", "evaluate"]
    )
    assert {r["status"] for r in rows} == {"succeeded"}
    assert {r["flow_run_id"] for r in rows} == {run["id"]}
    assert {r["flow_name"] for r in rows} == {"self_powered_pipeline"}
    assert all(r["git_commit"] for r in rows)
    # each stage ran under its own task run of this flow run, the GPU stages tagged for the gpu limit
    tasks = server.api("POST", "/task_runs/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}}})
    by_id = {t["id"]: t for t in tasks}
    assert {r["task_run_id"] for r in rows} <= set(by_id)
    gpu = {
        by_id[r["task_run_id"]]["name"].split("-")[0]
        for r in rows
        if "gpu" in by_id[r["task_run_id"]]["tags"]
    }
    assert gpu == {"train", "evaluate"}
    assert (WorkPaths(work).evaluate.table("metrics")).exists()
    # exported for Marquez: every stage run a child of this flow run
    from openlineage.client.serde import Serde

    from core.lineage.openlineage import openlineage_events

    events = [Serde.to_dict(e) for e in openlineage_events(store)]
    assert len(events) == 12
    assert {e["run"]["facets"]["parent"]["run"]["runId"] for e in events} == {run["id"]}
    assert {e["run"]["facets"]["parent"]["job"]["name"] for e in events} == {"self_powered_pipeline"}


def _regen_config(tmp_path: Path, corpus: Path) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["corpora"] = [{"name": "ls", "kind": "librispeech", "root": str(corpus), "split": "train"}]
    cfg["generate"].update(tasks=["repeat", "translation"], max_new_tokens=8)
    cfg["build"]["tasks"] = ["asr", "repeat", "translation"]
    path = tmp_path / "regen.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_scheduled_regeneration_after_new_clips_asks_only_for_their_answers(server, tmp_path):
    corpus = copy_librispeech(tmp_path / "corpus", FIRST)
    config, work = _regen_config(tmp_path, corpus), tmp_path / "work"

    first = server.run_deployment("regenerate_dataset/regenerate", config=str(config), workdir=str(work))
    gen1 = json.loads(WorkPaths(work).marker("generate").read_text())["summary"]
    assert (gen1["requests"], gen1["requested"], gen1["cached"]) == (8, 8, 0)
    llm_files = {p: p.stat().st_mtime_ns for p in (WorkPaths(work).models.llm).iterdir()}

    copy_librispeech(corpus, ADDED)  # new clips land in the corpus
    second = server.run_deployment("regenerate_dataset/regenerate", config=str(config), workdir=str(work))
    gen2 = json.loads(WorkPaths(work).marker("generate").read_text())["summary"]
    harvest2 = json.loads(WorkPaths(work).marker("harvest").read_text())["summary"]
    assert harvest2["transcripts"] == 6
    # only the two new clips' answers were requested (2 clips x 2 tasks); the rest came from the cache
    assert (gen2["requests"], gen2["requested"], gen2["cached"]) == (12, 4, 8)
    transcripts = read_table(WorkPaths(work).harvest.transcripts, TRANSCRIPTS)
    assert sorted(transcripts.column("utt_id").to_pylist()) == sorted(FIRST + ADDED)
    # the examples were rebuilt over all six clips (LLM answers may be filtered; every clip has its ASR example)
    examples = read_table(WorkPaths(work).build.examples, EXAMPLES).to_pylist()
    assert sorted(e["utt_id"] for e in examples if e["task"] == "asr") == sorted(FIRST + ADDED)
    assert {e["utt_id"] for e in examples} == set(FIRST + ADDED)
    # the LLM was not rebuilt, which would have invalidated every cached answer
    assert {p: p.stat().st_mtime_ns for p in (WorkPaths(work).models.llm).iterdir()} == llm_files

    store = LineageStore(WorkPaths(work).lineage)
    rows = store.dicts("SELECT stage, flow_run_id FROM runs WHERE status = 'succeeded' ORDER BY started_at")
    assert [r["stage"] for r in rows] == [
        "harvest",
        "models",
        "generate",
        "build",
        "harvest",
        "generate",
        "build",
    ]
    assert [r["flow_run_id"] for r in rows] == [first["id"]] * 4 + [second["id"]] * 3
    shutil.rmtree(WorkPaths(work).models.dir)  # keep tmp small
