"""Experiment trackers (train.loggers): a real train stage logs to MLflow, W&B (offline) and TensorBoard, and
each library's own reader gives back the steps of metrics.jsonl; a resumed run continues the same runs."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import yaml
from helpers_lsm import build_models, experiment, write_examples

from conftest import run_stage
from core.config import TINY_CONFIG, ConfigError, load_config
from core.paths import REPO_ROOT, TrainPaths, WorkPaths
from stages.train import checkpoint
from stages.train import launcher as train

STEPS = 3
LOGGERS = ["mlflow", "wandb", "tensorboard"]
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


class ProxyTrap:
    """A local listener set as every HTTP(S) proxy: a client that honours the proxy variables (requests,
    urllib3, Sentry's SDK, Go's net/http in wandb-core) reaches it first, so any connection it counts is a
    network attempt. It does not see a raw socket that ignores proxies; W&B's offline mode and MLflow's local
    store have none to make."""

    def __init__(self):
        self.connections: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                self.connections.append(conn.recv(256))
            except OSError:
                self.connections.append(b"")
            conn.close()


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One real train stage (1 gloo process, 3 steps, a resumable checkpoint at step 2) with all three
    trackers, under a proxy trap and with no W&B or MLflow variable of the caller's own."""
    mp = pytest.MonkeyPatch()
    trap = ProxyTrap()
    for k in PROXY_VARS:
        mp.setenv(k, trap.url)
    mp.setenv("NO_PROXY", "")
    mp.setenv("no_proxy", "")
    for k in ("WANDB_MODE", "WANDB_ERROR_REPORTING", "MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY"):
        mp.delenv(k, raising=False)  # the trackers must set what keeps them local themselves
    work = tmp_path_factory.mktemp("trackers")
    build_models(WorkPaths(work).models.dir)
    write_examples(WorkPaths(work).build.examples)
    cfg = experiment(nproc_per_node=1, max_steps=STEPS, checkpoint_every=2, loggers=LOGGERS)
    try:
        result = run_stage("train", cfg, work)
    finally:
        mp.undo()
    yield dict(work=work, cfg=cfg, result=result, trap=trap)
    trap.sock.close()


def jsonl_losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def mlflow_client(out: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{out.resolve() / 'mlflow' / 'mlflow.db'}")


def wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (``run-ID.wandb``), parsed with W&B's own ``Record``.

    wandb 0.31 has no Python reader of its own any more (its ``sdk.internal.datastore`` went with the Go core),
    so this reads the framing its Go writer uses, LevelDB's log format: the header ``:W&B``, magic 0xBEE1,
    version 0; then 32 KiB blocks of chunks (crc32 of type+data, length, type: 1 full, 2 first, 3 middle,
    4 last). Every chunk's checksum is checked, so a misread file fails here rather than parsing garbage."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), f"{path}: not a W&B log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + n]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: bad chunk at byte {pos}"
        pos, pending = pos + 7 + n, pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec
            pending = b""


def wandb_run(run_dir: Path) -> dict:
    """A W&B offline run folder read back: its id, config, history ({step: {key: value}}) and exit code."""
    (log,) = run_dir.glob("run-*.wandb")
    out: dict = {"config": {}, "history": {}, "exit_code": None}
    for rec in wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["project"], out["name"] = rec.run.run_id, rec.run.project, rec.run.display_name
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            out["history"][rec.history.step.num] = items
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


@pytest.mark.slow
def test_mlflow_run_holds_each_steps_loss_and_the_settings(tracked):
    out = WorkPaths(tracked["work"]).train
    assert tracked["result"].summary["steps"] == STEPS
    client = mlflow_client(out.dir)
    exp = client.get_experiment_by_name("splsm")  # train.tracker_project's default
    assert exp.artifact_location == (out.dir.resolve() / "mlflow" / "artifacts").as_uri()  # not ./mlruns
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "lsm-test"  # the experiment's name
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(jsonl_losses(out.dir), rel=1e-12)
    assert len(history) == STEPS
    recs = [json.loads(x) for x in out.metrics.read_text().splitlines()]
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/lr")}
    assert lrs == pytest.approx({r["step"]: r["lr"] for r in recs}, rel=1e-12)
    params = run.data.params
    assert float(params["train.lr"]) == tracked["cfg"].train.lr
    assert params["train.qformer.hidden_size"] == "64" and params["world_size"] == "1"
    assert json.loads(params["train.loggers"]) == LOGGERS
    # the checkpoint names the run a resumed run continues
    state = checkpoint.read_state(checkpoint.latest(out))
    assert state["trackers"]["mlflow"] == run.info.run_id


@pytest.mark.slow
def test_wandb_offline_run_holds_each_steps_loss_and_the_settings(tracked):
    out = WorkPaths(tracked["work"]).train
    (run_dir,) = (out.dir / "wandb").glob("offline-run-*")  # offline: no run-* (online) folder
    run = wandb_run(run_dir)
    assert run_dir.name.endswith(f"-{run['id']}") and run["project"] == "splsm" and run["name"] == "lsm-test"
    assert sorted(run["history"]) == list(range(1, STEPS + 1))
    losses = {step: items["train/loss"] for step, items in run["history"].items()}
    assert losses == pytest.approx(jsonl_losses(out.dir), rel=1e-12)
    assert run["config"]["train.lr"] == tracked["cfg"].train.lr
    assert run["config"]["train.max_steps"] == STEPS
    assert run["exit_code"] == 0
    state = checkpoint.read_state(checkpoint.latest(out))
    assert state["trackers"]["wandb"] == run["id"]
    # the third tracker of the list wrote its events beside them
    assert list(out.tensorboard.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_mlflow_and_wandb_reach_no_network(tracked):
    """With WANDB_MODE and MLflow's variables unset by the caller, the trackers set what keeps them local:
    not one connection reached the proxy every HTTP client here was pointed at."""
    assert tracked["trap"].connections == []


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_mlflow_and_wandb_runs(tracked, tmp_path):
    """A rerun resumes from the step-2 checkpoint and logs step 3 again: into the same MLflow run, and into a
    second W&B offline folder with the same run id (what ``wandb sync`` uploads as one run)."""
    work = tmp_path / "work"
    shutil.copytree(tracked["work"], work)
    w = WorkPaths(work)
    client = mlflow_client(w.train.dir)
    (before,) = client.search_runs([client.get_experiment_by_name("splsm").experiment_id])
    (first_dir,) = (w.train.dir / "wandb").glob("offline-run-*")
    first = wandb_run(first_dir)

    cfg = tracked["cfg"]
    summary = train.train(cfg.train, *w.model_dirs(cfg), w.build.examples, w.train, run_name="lsm-test")
    assert summary["resumed_from_step"] == 2 and summary["steps"] == STEPS

    (run,) = client.search_runs([client.get_experiment_by_name("splsm").experiment_id])
    assert run.info.run_id == before.info.run_id and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    # MLflow keeps every value logged: step 3 twice, the first attempt's and the resumed one's (the same loss)
    assert sorted(m.step for m in history) == [1, 2, 3, 3]
    again = jsonl_losses(w.train.dir)
    assert sorted(again) == [1, 2, 3]
    assert all(m.value == pytest.approx(again[m.step], abs=1e-5) for m in history)

    dirs = sorted((w.train.dir / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and first_dir in dirs
    (second_dir,) = [d for d in dirs if d != first_dir]
    second = wandb_run(second_dir)
    assert second["id"] == first["id"]
    assert sorted(second["history"]) == [3]
    assert second["history"][3]["train/loss"] == pytest.approx(again[3], rel=1e-12)
    assert checkpoint.read_state(checkpoint.latest(TrainPaths(w.train.dir)))["trackers"] == {
        "mlflow": run.info.run_id,
        "wandb": first["id"],
    }


LAUNCH = """
import sys
from pathlib import Path
from core.config import TrainConfig
from stages.train import launcher as train
cfg = TrainConfig.model_validate_json(sys.argv[1])
train.train(cfg, *map(Path, sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_ends_mlflow_killed_and_wandb_exit_3_then_resumes_both(tracked, tmp_path):
    """SIGTERM to the stage (a cancelled flow run): the workers checkpoint, the MLflow run is KILLED and the W&B
    run exits with the worker's stop status 3; the rerun resumes, and both runs end finished with every step."""
    w, cfg = WorkPaths(tracked["work"]), tracked["cfg"]
    settings = experiment(nproc_per_node=1, max_steps=12, loggers=["mlflow", "wandb"]).train
    inputs = [*w.model_dirs(cfg), w.build.examples]
    out = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, settings.model_dump_json(), *map(str, inputs), str(out)],
        cwd=REPO_ROOT,
        env=train.worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0 and "stopped by signal" in output, output[-3000:]
    stopped_at = checkpoint.read_state(checkpoint.latest(TrainPaths(out)))["step"]
    assert 1 <= stopped_at < settings.max_steps

    client = mlflow_client(out)
    (run,) = client.search_runs([client.get_experiment_by_name("splsm").experiment_id])
    assert run.info.status == "KILLED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(
        range(1, stopped_at + 1)
    )
    (first_dir,) = (out / "wandb").glob("offline-run-*")
    first = wandb_run(first_dir)
    assert first["exit_code"] == 3 and sorted(first["history"]) == list(range(1, stopped_at + 1))

    resumed = train.train(settings, *inputs, out)
    assert resumed["resumed_from_step"] == stopped_at and resumed["steps"] == settings.max_steps
    (again,) = client.search_runs([client.get_experiment_by_name("splsm").experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(jsonl_losses(out), rel=1e-12)
    assert len(history) == settings.max_steps  # the stop checkpointed its last step: nothing logged twice
    (second_dir,) = [d for d in (out / "wandb").glob("offline-run-*") if d != first_dir]
    second = wandb_run(second_dir)
    assert second["id"] == first["id"] and second["exit_code"] == 0
    assert sorted(second["history"]) == list(range(stopped_at + 1, settings.max_steps + 1))


# ------------------------------------------------------------------------------------------- config


def write_config(tmp_path: Path, **train) -> Path:
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    raw["train"] = {**raw.get("train", {}), **train}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_config_rejects_a_logger_other_than_tensorboard_mlflow_wandb_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, loggers=["tensorboard", "neptune"]))
    msg = str(e.value)
    assert "train.loggers" in msg and "neptune" in msg and "'mlflow'" in msg and "'wandb'" in msg
    with pytest.raises(ConfigError, match=r"train.loggers: 'wandb' appears twice"):
        load_config(write_config(tmp_path, loggers=["wandb", "wandb"]))
    with pytest.raises(ConfigError, match=r"train.mlflow_uri is set but mlflow is not in train.loggers"):
        load_config(write_config(tmp_path, mlflow_uri="http://tracking:5000"))


def test_config_old_tensorboard_key_points_to_loggers_of_mlflow_wandb(tmp_path):
    for value in (True, False):
        with pytest.raises(ConfigError) as e:
            load_config(write_config(tmp_path, tensorboard=value))
        msg = str(e.value)
        assert "train.tensorboard is gone: train.loggers replaces it" in msg
        assert "loggers: [tensorboard]" in msg and "loggers: []" in msg


def test_config_default_loggers_and_a_relative_mlflow_sqlite_uri(tmp_path):
    cfg = load_config(write_config(tmp_path))
    assert cfg.train.loggers == ["tensorboard"]  # what train.tensorboard: true was, the old default
    cfg = load_config(write_config(tmp_path, loggers=["mlflow"], mlflow_uri="sqlite:///runs/mlflow.db"))
    # relative to the config file, as every path of a config is (the workers run from the repository root)
    assert cfg.train.mlflow_uri == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
