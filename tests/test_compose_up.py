"""`docker-compose up` for real: the stack of docker-compose.yml on a real engine, end to end.

The engine is rootful podman serving the Docker Engine API (scripts/container-engine.sh); Debian's
docker-compose 1.29 drives it, as a user's `docker compose` would drive Docker. Everything the stack runs is
built from images/Dockerfile by compose itself, FROM the local debootstrap base (no registry here; the CPU
torch wheel and the egress proxy's CA go in through images/local/, as images/local/README.md says).

One test, in order: build and start the always-on services (the Prefect server on SQLite and a process
worker), wait for the server's health, check that the API refuses a request without the auth string, deploy
the demo deployment from inside the worker, run it with every stage in its own container started by the
worker through the engine's socket, check the flow run completed and the lineage database on the shared
volume holds a run of every stage from that flow run, in the stack's image, then `down -v` and check that
nothing of the stack is left. The GPU profile (vLLM, the train image) is checked by config validation only
(tests/test_deploy_files.py): neither can run here.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from conftest import REPO, ca_bundle, local_wheels
from core.lineage.store import LineageStore

STAGES = {"pretrained", "harvest", "generate", "build", "train", "evaluate"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """docker-compose over a copy of the repository, with the test's own project, volumes, network and port."""

    def __init__(self, root: Path, engine: str, name: str):
        self.root, self.name, self.port = root, name, _free_port()
        self.auth = f"splsm:{secrets.token_hex(16)}"
        sock = engine.removeprefix("unix://")
        (root / "empty.env").write_text("")  # keep a developer's own .env out of it
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SPLSM_"))},
            "DOCKER_HOST": engine,
            "COMPOSE_PROJECT_NAME": name,
            "SPLSM_STACK": name,
            "PREFECT_AUTH_STRING": self.auth,
            "POSTGRES_PASSWORD": secrets.token_hex(16),
            "VLLM_API_KEY": secrets.token_hex(16),
            "PREFECT_PORT": str(self.port),
            "BASE_IMAGE": "localhost/base:bookworm",
            "TORCH_INDEX_URL": "https://pypi.org/simple",
            "DOCKER_SOCKET": sock,
            "DOCKER_GID": str(os.stat(sock).st_gid),
        }

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [shutil.which("docker-compose"), "--env-file", "empty.env", "-f", "docker-compose.yml", *args]
        proc = subprocess.run(
            cmd, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check:
            assert proc.returncode == 0, (
                f"`{' '.join(args)}` failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    def api(self, method: str, path: str, auth: bool = True, **kw) -> httpx.Response:
        user, _, password = self.auth.partition(":")
        return httpx.request(
            method,
            f"http://127.0.0.1:{self.port}/api{path}",
            auth=(user, password) if auth else None,
            timeout=30,
            **kw,
        )


def _wait_healthy(stack: Stack, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if stack.api("GET", "/health", auth=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(2)
    logs = stack.compose("logs", "--tail", "40", "prefect-server", check=False)
    pytest.fail(f"the Prefect server was not healthy within {timeout_s}s:\n{logs.stdout[-4000:]}")


def _engine_client(engine: str):
    import docker

    return docker.DockerClient(base_url=engine, timeout=120)


@pytest.mark.slow
def test_compose_up_runs_the_demo_deployment_with_stages_in_containers_then_leaves_nothing(engine, tmp_path):
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    root = tmp_path / "repo"
    root.mkdir()
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    for wheel in local_wheels():
        shutil.copy2(wheel, root / "images" / "local" / wheel.name)
    if (ca := ca_bundle()) is not None:
        shutil.copy2(ca, root / "images" / "local" / "ca.pem")
    name = f"splsmtest{os.getpid()}"
    stack = Stack(root, engine, name)
    client = _engine_client(engine)
    try:
        stack.compose("build", timeout=1800)
        stack.compose("up", "-d", "--no-build", timeout=600)
        _wait_healthy(stack)

        # issue 17, point 1: the stack's API wants the auth string; the health check alone does not
        assert stack.api("POST", "/flows/filter", auth=False, json={}).status_code == 401
        assert stack.api("POST", "/flows/filter", json={}).status_code == 200

        stack.compose("exec", "-T", "prefect-worker", "prefect", "--no-prompt", "deploy", "--name", "demo")
        run = stack.compose(
            "exec", "-T", "prefect-worker",
            "prefect", "deployment", "run", "self_powered_pipeline/demo",
            "--param", "workdir=/data/work/demo",
            "--param", 'execution={"mode": "container"}',
            "--watch", "--watch-timeout", "1500",
            timeout=1700, check=False,
        )  # fmt: skip
        flow_runs = stack.api("POST", "/flow_runs/filter", json={}).json()
        assert len(flow_runs) == 1, flow_runs
        (fr,) = flow_runs
        assert fr["state"]["type"] == "COMPLETED", (
            f"flow run {fr['state']}:\n{run.stdout[-3000:]}\n"
            + stack.compose("logs", "--tail", "80", "prefect-worker", check=False).stdout[-6000:]
        )
        assert fr["parameters"]["workdir"] == "/data/work/demo"

        # the lineage store on the stack's shared volume: one succeeded run of every stage, each from this flow
        # run, each in a container of the image compose built (the worker alone runs no stage)
        volume = client.volumes.get(f"{name}-lineage").attrs["Mountpoint"]
        rows = LineageStore(Path(volume) / "lineage.duckdb").dicts(
            "SELECT stage, status, flow_run_id, image, image_digest FROM runs"
        )
        assert {r["stage"] for r in rows} == STAGES, rows
        image = client.images.get("splsm:cpu")
        built = {image.id, *(image.attrs.get("RepoDigests") or [])}
        for r in rows:
            assert r["status"] == "succeeded" and r["flow_run_id"] == fr["id"], r
            assert r["image"] == "splsm:cpu" and r["image_digest"] in built, (r, built)
        # and the stages' outputs on the work volume: the evaluation's metrics of the trained model on the held-out set
        from core.paths import WorkPaths

        work = WorkPaths(Path(client.volumes.get(f"{name}-work").attrs["Mountpoint"]) / "demo")
        metrics = pq.read_table(work.evaluate.table("metrics")).to_pylist()
        assert {(m["eval_set"], m["system"]) for m in metrics} >= {("test-clean", "lsm")}, metrics
        assert all(m["n_utterances"] == 3 for m in metrics), metrics  # the three held-out test-clean clips
    finally:
        stack.compose("down", "-v", "--remove-orphans", timeout=300, check=False)
    left = client.containers.list(all=True, filters={"label": f"com.docker.compose.project={name}"})
    assert not left, f"containers left behind: {[c.name for c in left]}"
    stages_left = [c for c in client.containers.list(all=True) if c.labels.get("splsm.stage")]
    assert not stages_left, f"stage containers left behind: {[c.name for c in stages_left]}"
    volumes_left = [v.name for v in client.volumes.list() if v.name.startswith(f"{name}-")]
    assert not volumes_left, f"volumes left behind: {volumes_left}"
    assert not [n.name for n in client.networks.list() if n.name == name]


def test_compose_stack_names_are_the_stacks_own(tmp_path):
    """What `down -v` removes is named after the stack (SPLSM_STACK), so a test stack or a second stack on the
    host never touches another's work or lineage; and every folder the worker sees on a volume or a host folder,
    stage containers get from that same volume or folder (SPLSM_CONTAINER_VOLUMES), as compose resolves it."""
    import yaml

    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    (tmp_path / "empty.env").write_text("")
    for corpora in ("", "/srv/corpora"):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SPLSM_", "CORPORA_"))}
        env.update(SPLSM_STACK="mystack", PREFECT_AUTH_STRING="a:b", POSTGRES_PASSWORD="p", VLLM_API_KEY="k")
        if corpora:
            env["CORPORA_DIR"] = corpora
        out = subprocess.run(
            [shutil.which("docker-compose"), "--env-file", str(tmp_path / "empty.env"), "-f",
             str(REPO / "docker-compose.yml"), "config"],
            env=env, capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
        cfg = yaml.safe_load(out)
        names = {key: v.get("name", key) for key, v in cfg["volumes"].items()}
        for key in ("prefect-db", "postgres-db", "work", "lineage", "demo-work"):
            assert names[key] == f"mystack-{key}", (key, names[key])
        assert cfg["networks"]["default"]["name"] == "mystack"
        worker = cfg["services"]["prefect-worker"]
        seen = {}
        for m in worker["volumes"]:  # SOURCE:TARGET:MODE, SOURCE a volume key or a host path
            src, target, _ = m.split(":")
            seen[target] = names.get(src, src)
        policy = [v.split(":") for v in worker["environment"]["SPLSM_CONTAINER_VOLUMES"].split(",")]
        assert {p[1] for p in policy} == {"/data/work", "/data/lineage", "/data/corpora", "/models"}
        for name, point, *mode in policy:
            assert seen[point] == name, (point, name, seen[point])
            assert mode == (["ro"] if point in ("/data/corpora", "/models") else [])
        assert seen["/data/corpora"] == (corpora or "splsm-corpora")
        assert worker["environment"]["SPLSM_CONTAINER_IMAGE_PATHS"] == "/app"
