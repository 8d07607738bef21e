"""Experiment trackers for rank 0's training record: TensorBoard, MLflow, Weights & Biases (``train.loggers``).

Each tracker is one small object with the same three calls (``Tracker``): ``log_params`` once at the start
(the run's resolved settings, flattened to ``a.b`` keys), ``log_step`` once per optimizer step (the scalars
of ``SCALARS`` as ``train/<name>``), ``close`` at the end with how the run ended. ``TrainLogs`` holds the
configured ones and fans every call out, so the training loop calls one thing.

Where the files go, all under the train stage's output directory unless configured otherwise:

- tensorboard: ``train/tensorboard/`` (event files; a resumed run purges the steps after its checkpoint).
- mlflow: a local SQLite store ``train/mlflow/mlflow.db`` with artifacts under ``train/mlflow/artifacts``
  (MLflow 3 refuses its old file store ``./mlruns`` without an opt-out and recommends a database:
  ``mlflow ui --backend-store-uri sqlite:///WORKDIR/train/mlflow/mlflow.db``), or ``train.mlflow_uri``.
- wandb: always offline, ``train/wandb/offline-run-*`` (``wandb sync`` uploads them later, from a machine
  that may reach the network); this process never talks to a server.

A resumed run continues the same MLflow run and the same W&B run id: the ids are kept in each resumable
checkpoint (``trainer_state.json``, key ``trackers``). MLflow reopens the run and appends; its metric history
keeps every value ever logged, so steps logged after the checkpoint by the interrupted attempt appear twice
(the later value is the resumed run's). W&B cannot reopen an offline run: the resumed attempt writes a second
``offline-run-*-<id>`` folder with the same id, and ``wandb sync`` uploads both folders, in order of start
time, into one run.

mlflow and wandb are imported only when configured, and a missing package is an error naming the extra to
install (``pip install 'splsm[trackers]'``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Literal, Protocol

from core.paths import TrainPaths

SCALARS = ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s")
Ending = Literal["finished", "stopped", "failed"]  # stopped: by a signal, after a resumable checkpoint
EXTRA_HINT = "pip install 'splsm[trackers]'"


class TrackerMissing(RuntimeError):
    """A configured tracker's package is not installed."""


class Tracker(Protocol):
    name: str

    def log_params(self, params: dict) -> None: ...

    def log_step(self, metrics: dict, step: int) -> None: ...

    def close(self, ending: Ending = "finished") -> None: ...

    def run_id(self) -> str | None:
        """The id a resumed run continues (kept in the checkpoint), or None when there is nothing to continue."""
        ...


def flatten(obj: dict, prefix: str = "") -> dict[str, str | int | float | bool | None]:
    """Nested settings as one level of dotted keys (``train.qformer.num_queries``); lists as JSON text, since
    neither MLflow's params nor TensorBoard's text hold a list."""
    out: dict = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def step_scalars(rec: dict) -> dict[str, float]:
    return {f"train/{k}": float(rec[k]) for k in SCALARS}


# ------------------------------------------------------------------------------------------- TensorBoard


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, paths: TrainPaths, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise TrackerMissing(
                "train.loggers has tensorboard but the tensorboard package is missing: pip install tensorboard"
            ) from e
        # A resumed run drops the events after its checkpoint's step, so the curves have no repeats.
        self.writer = SummaryWriter(str(paths.tensorboard), purge_step=start_step + 1 if start_step else None)
        self.start_step = start_step

    def log_params(self, params: dict) -> None:
        table = "| setting | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in params.items())
        self.writer.add_text("params", table, self.start_step)

    def log_step(self, metrics: dict, step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self, ending: Ending = "finished") -> None:
        self.writer.close()

    def run_id(self) -> str | None:
        return None  # the event files continue by their folder


# ------------------------------------------------------------------------------------------------ MLflow


def default_mlflow_uri(paths: TrainPaths) -> str:
    return f"sqlite:///{paths.mlflow.resolve() / 'mlflow.db'}"


class MlflowTracker:
    """One MLflow run through ``MlflowClient`` (no global active run: nothing else in the process is touched)."""

    name = "mlflow"
    STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}

    def __init__(
        self, paths: TrainPaths, uri: str | None, experiment: str, run_name: str, run_id: str | None
    ):
        # MLflow sends usage telemetry unless told not to; a training job should not, unless its owner asks.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        try:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException
        except ImportError as e:
            raise TrackerMissing(f"train.loggers has mlflow but mlflow is not installed: {EXTRA_HINT}") from e
        artifacts = None
        if uri is None:
            paths.mlflow.mkdir(parents=True, exist_ok=True)
            uri, artifacts = default_mlflow_uri(paths), (paths.mlflow.resolve() / "artifacts").as_uri()
        self.uri, self.client = uri, MlflowClient(uri)
        self.id: str | None = None
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
                self.id = run_id
                print(f"mlflow: continuing run {run_id} in {uri}", flush=True)
            except MlflowException as e:
                print(
                    f"mlflow: the checkpoint's run {run_id} is not in {uri} ({e}); starting a new run",
                    flush=True,
                )
        if self.id is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = (
                exp.experiment_id
                if exp is not None
                else self.client.create_experiment(experiment, artifact_location=artifacts)
            )
            run = self.client.create_run(exp_id, run_name=run_name, tags={"splsm.train_dir": str(paths.dir)})
            self.id = run.info.run_id
            print(f"mlflow: run {self.id} in {uri}", flush=True)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        # A param cannot change within a run; a resumed run keeps the first attempt's (only the settings that
        # do not change what trains may differ: TrainConfig.RESUME_EXEMPT) and adds what it lacks.
        have = self.client.get_run(self.id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):  # log_batch takes at most 100 params a call
            self.client.log_batch(self.id, params=new[i : i + 100])

    def log_step(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, v, ms, step) for k, v in metrics.items()])

    def close(self, ending: Ending = "finished") -> None:
        self.client.set_terminated(self.id, status=self.STATUS[ending])

    def run_id(self) -> str | None:
        return self.id


# ---------------------------------------------------------------------------------------- Weights & Biases


def offline_wandb_env() -> None:
    """W&B in this process writes files and nothing else: offline mode, no error reports to its Sentry. Set
    here, not left to the caller's environment, so no setting outside the config makes training reach out."""
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_ERROR_REPORTING"] = "false"


class WandbTracker:
    name = "wandb"
    EXIT = {"finished": 0, "stopped": 3, "failed": 1}  # 3: the worker's exit status after a stop (launcher)

    def __init__(self, paths: TrainPaths, project: str, run_name: str, run_id: str | None):
        offline_wandb_env()
        try:
            import wandb
        except ImportError as e:
            raise TrackerMissing(f"train.loggers has wandb but wandb is not installed: {EXTRA_HINT}") from e
        self.run = wandb.init(
            project=project,
            name=run_name,
            dir=str(paths.dir),  # the runs land in OUT/wandb/offline-run-*
            mode="offline",
            # the same id again: W&B 0.31 cannot reopen an offline run (it ignores resume offline), but a
            # second folder with the same id is synced into the same run
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", silent=True),  # stdout stays the launcher's to parse
        )

    def log_params(self, params: dict) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_step(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, ending: Ending = "finished") -> None:
        self.run.finish(exit_code=self.EXIT[ending])

    def run_id(self) -> str | None:
        return self.run.id


def open_trackers(
    names: list[str],
    paths: TrainPaths,
    start_step: int,
    *,
    mlflow_uri: str | None,
    project: str,
    run_name: str,
    resume_ids: dict[str, str] | None = None,
) -> list[Tracker]:
    """The configured trackers, opened in the config's order; ``resume_ids`` (from the checkpoint this run
    resumes) makes MLflow and W&B continue those runs. If one fails to open, those already open are closed."""
    ids = resume_ids or {}
    out: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                out.append(TensorBoardTracker(paths, start_step))
            elif name == "mlflow":
                out.append(MlflowTracker(paths, mlflow_uri, project, run_name, ids.get("mlflow")))
            elif name == "wandb":
                out.append(WandbTracker(paths, project, run_name, ids.get("wandb")))
            else:  # the config allows only the names above
                raise ValueError(f"train.loggers: unknown logger {name!r}")
    except BaseException:
        for t in out:
            t.close("failed")
        raise
    return out


def run_ids(trackers: list[Tracker]) -> dict[str, str]:
    return {t.name: rid for t in trackers if (rid := t.run_id()) is not None}
