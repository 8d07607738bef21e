"""Training across nodes on one machine: two `splsm train --node-rank K` processes of one process each meet
through torchrun's c10d rendezvous at a free localhost port, as two machines sharing a work directory would.
Their trajectory is checked against an independent one-node run of two processes (the same world, so the
same batches and RNG streams per rank); then a run stopped by SIGTERM on the following node resumes on it.
Only node 0 records the run and writes the stage's marker; only node 0 clears what the run will not resume."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers_lsm import build_models, experiment, write_examples
from safetensors.torch import load_file

from core.lineage.store import LineageStore
from core.paths import REPO_ROOT, TrainPaths, WorkPaths
from core.stage import StageError
from stages.registry import STAGES
from stages.train import checkpoint
from stages.train import launcher as train
from stages.train.stage import node_rank

# 20 train rows, 2 processes x batch 2: 5 steps an epoch
STEPS = 5


def settings(**kw):
    base = dict(max_steps=STEPS, warmup_steps=2, lr=1e-3, loggers=[], nproc_per_node=2)
    base.update(kw)
    return experiment(**base)


def two_nodes():
    """2 nodes x 1 process, meeting at a port free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return settings(nproc_per_node=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}", rdzv_id="multinode-test")


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def weights(out: Path) -> dict:
    return load_file(out / "checkpoint" / "model.safetensors")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The train stage's inputs where a work directory has them: tiny models and the examples table."""
    base = tmp_path_factory.mktemp("multinode")
    build_models(base / "inputs" / "models")
    write_examples(WorkPaths(base / "inputs").build.examples)
    return base


def workdir(inputs: Path, name: str) -> Path:
    work = inputs / name
    (work / "build").mkdir(parents=True)
    (work / "models").symlink_to(inputs / "inputs" / "models")
    (work / "build" / "examples.parquet").symlink_to(WorkPaths(inputs / "inputs").build.examples)
    return work


@pytest.fixture(scope="module")
def one_node(inputs):
    """The reference: one node of two processes, through the launcher itself."""
    work = WorkPaths(inputs / "one-node")
    summary = train.train(
        settings().train,
        inputs / "inputs" / "models" / "whisper",
        inputs / "inputs" / "models" / "llm",
        WorkPaths(inputs / "inputs").build.examples,
        work.train,
    )
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    return work.train.dir


def start_nodes(cfg, work: Path) -> list[subprocess.Popen]:
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
    return [
        subprocess.Popen(
            [sys.executable, "-m", "splsm.cli", "train", "--config", str(config), "--workdir", str(work)]
            + ["--node-rank", str(k)],
            cwd=REPO_ROOT,
            env=train.worker_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for k in range(cfg.train.nnodes)
    ]


def finish(procs: list[subprocess.Popen], timeout_s: float = 600) -> list[tuple[int, str]]:
    try:
        out = [p.communicate(timeout=timeout_s)[0] for p in procs]
    finally:
        for p in procs:  # nothing of a failed test outlives it
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [(p.returncode, o) for p, o in zip(procs, out, strict=True)]


def run_nodes(cfg, work: Path) -> list[str]:
    done = finish(start_nodes(cfg, work))
    for k, (rc, out) in enumerate(done):
        assert rc == 0, f"node {k} exited with {rc}:\n{out[-4000:]}"
    return [out for _, out in done]


def train_runs(work: Path) -> list[str]:
    store = LineageStore(WorkPaths(work).lineage)
    return [r[0] for r in store.query("SELECT status FROM runs WHERE stage = 'train' ORDER BY started_at")]


def same_trajectory(out: Path, ref: Path) -> None:
    a, b = losses(ref), losses(out)
    assert sorted(b) == list(range(1, STEPS + 1))  # every step logged once
    for step in range(1, STEPS + 1):
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    w_ref, w = weights(ref), weights(out)
    assert w.keys() == w_ref.keys()
    # Float noise between the two layouts (the losses agree within 1e-5), which Adam's division by the root of
    # small second moments enlarges: 2.1e-6 at most, on the LLM's embeddings, since the Q-Former has no dropout by
    # default (under 1e-6 with 0.1). A rank on the wrong batches or a missed all-reduce moves weights by about lr
    # (1e-3).
    for k, v in w_ref.items():
        assert torch.allclose(w[k], v, atol=1e-5), (k, float((w[k] - v).abs().max()), float(v.abs().max()))


def test_multinode_torchrun_meets_at_the_endpoint_and_one_node_stays_standalone(tmp_path):
    one = train.torchrun_command(settings().train, tmp_path / "args.json")
    assert one[one.index("torch.distributed.run") + 1 :] == [
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "stages.train.worker",
        "--args",
        str(tmp_path / "args.json"),
    ]
    cfg = settings(nproc_per_node=4, nnodes=3, rdzv_endpoint="node0:29400", rdzv_id="job-7").train
    many = train.torchrun_command(cfg, tmp_path / "args.json")
    assert "--standalone" not in many and cfg.world_size == 12
    assert many[many.index("torch.distributed.run") + 1 : many.index("-m", 3)] == [
        "--nnodes=3",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node0:29400",
        "--rdzv_id=job-7",
        "--nproc_per_node=4",
    ]


def test_multinode_every_node_needs_its_own_node_rank_in_range(tmp_path):
    stage = STAGES["train"]
    cfg = settings(nproc_per_node=1, nnodes=2, rdzv_endpoint="node0:29400")
    for k, says in [(None, r"give each node's `splsm train` its --node-rank"), (2, r"not one of 0\.\.1")]:
        with pytest.raises(StageError, match=says):
            node_rank(stage.context(cfg, tmp_path, {"node_rank": k}))
    assert node_rank(stage.context(cfg, tmp_path, {"node_rank": 1})) == 1
    assert node_rank(stage.context(settings(), tmp_path)) == 0  # one node: as before, no option needed
    with pytest.raises(StageError, match=r"--node-rank 1, but train\.nnodes is 1"):
        node_rank(stage.context(settings(), tmp_path, {"node_rank": 1}))
    # only node 0's run leaves the stage's marker; a following node's is its own
    assert stage.marker_of(stage.context(cfg, tmp_path, {"node_rank": 0})) == WorkPaths(tmp_path).marker(
        "train"
    )
    assert stage.marker_of(stage.context(cfg, tmp_path, {"node_rank": 1})).parent == WorkPaths(
        tmp_path
    ).train.node(1)


def test_multinode_only_node_0_clears_and_the_resume_key_counts_every_node(tmp_path):
    cfg = settings(nproc_per_node=1, nnodes=2, rdzv_endpoint="node0:29400", max_steps=4).train
    paths = TrainPaths(tmp_path / "train")

    def leave(
        settings_: dict,
    ) -> None:  # a checkpoint at step 1, a summary and a worker error of an earlier run
        step = paths.step(1)
        step.mkdir(parents=True, exist_ok=True)
        (step / "trainer_state.json").write_text(json.dumps({"step": 1, "settings": settings_}))
        paths.summary.write_text("{}")
        paths.errors.mkdir(exist_ok=True)
        paths.error("1").write_text("old")

    leave({"other": "settings"})
    args = train.write_args(cfg, tmp_path, tmp_path, tmp_path, paths, node_rank=1)
    assert args == paths.node(1) / "train_args.json" and json.loads(args.read_text())["train"]["nnodes"] == 2
    assert checkpoint.latest(paths) is not None and paths.summary.exists() and paths.errors.exists()
    assert train.write_args(cfg, tmp_path, tmp_path, tmp_path, paths) == paths.args  # node 0 clears
    assert checkpoint.latest(paths) is None and not paths.summary.exists() and not paths.errors.exists()
    # what 2 nodes x 1 process wrote (a world of 2) resumes them; a world of 1 would not be theirs
    leave(checkpoint.resume_key(cfg, 2))
    train.write_args(cfg, tmp_path, tmp_path, tmp_path, paths)
    assert checkpoint.latest(paths) is not None
    leave(checkpoint.resume_key(cfg, 1))
    train.write_args(cfg, tmp_path, tmp_path, tmp_path, paths)
    assert checkpoint.latest(paths) is None


@pytest.mark.slow
def test_multinode_two_nodes_of_one_process_train_as_one_node_of_two(inputs, one_node):
    work = workdir(inputs, "two-nodes")
    cfg = two_nodes()
    out0, out1 = run_nodes(cfg, work)
    assert "--rdzv_backend=c10d" in out0 and "--standalone" not in out0
    same_trajectory(work / "train", one_node)
    # node 0 published the run, once; node 1 left only its own marker and recorded nothing
    p = WorkPaths(work)
    lead = json.loads(p.marker("train").read_text())
    assert lead["summary"]["world_size"] == 2 and lead["summary"]["steps"] == STEPS
    follower = json.loads((p.train.node(1) / "_node.json").read_text())
    assert follower["run_id"] is None and follower["summary"]["final_loss"] == lead["summary"]["final_loss"]
    assert train_runs(work) == ["succeeded"]
    # rerun: both nodes see the same reuse check and neither starts torchrun (or it would wait for the other)
    cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"rdzv_endpoint": two_nodes().train.rdzv_endpoint})}
    )
    again = run_nodes(cfg, work)
    assert all("reused" in out and "torch.distributed.run" not in out for out in again), again
    assert train_runs(work) == ["succeeded"]


@pytest.mark.slow
def test_multinode_run_stopped_on_the_following_node_resumes_on_the_same_trajectory(inputs, one_node):
    work = workdir(inputs, "two-nodes-stopped")
    procs = start_nodes(two_nodes(), work)
    metrics, deadline = work / "train" / "metrics.jsonl", time.monotonic() + 300
    try:
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert all(p.poll() is None for p in procs), [p.stdout.read() for p in procs]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)  # the node that does not publish: every rank must still stop
    finally:
        done = finish(procs, timeout_s=300)
    (rc0, out0), (rc1, out1) = done
    assert rc0 != 0 and rc1 != 0, done
    assert "stopped by signal" in out1 and "A rerun resumes from" in out0, done
    ckpt = checkpoint.latest(TrainPaths(work / "train"))
    assert ckpt is not None and not (work / "train" / "checkpoint").exists()
    stopped_at = checkpoint.read_state(ckpt)["step"]
    assert 1 <= stopped_at < STEPS
    assert {f.name for f in ckpt.glob("rng-rank*.safetensors")} == {
        "rng-rank0.safetensors",
        "rng-rank1.safetensors",
    }
    assert not WorkPaths(work).marker("train").exists()

    run_nodes(two_nodes(), work)  # both nodes again, at another port: resumed
    summary = json.loads(WorkPaths(work).marker("train").read_text())["summary"]
    assert summary["resumed_from_step"] == stopped_at and summary["steps"] == STEPS
    same_trajectory(work / "train", one_node)
    assert train_runs(work) == ["failed", "succeeded"]  # node 0's two runs; node 1 recorded none
