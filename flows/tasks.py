"""The Prefect tasks the flows chain: one per stage, each running the stage's CLI in the chosen mode.

Tasks hold no stage logic. They use no Prefect result cache: a stage's own reuse check (``run_stage``:
content hashes of its inputs, its parameters and a hash of its code) is the cache, and it also sees
a changed config file or a deleted output, which a cache keyed on task arguments would not. So a
retried or rerun flow skips every stage that already finished, in any execution mode.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from splsm.containers import ExecutionConfig, run_stage_cli

GPU_TAG = "gpu"  # a tag concurrency limit: `prefect concurrency-limit create gpu N`


def stage_summary(workdir: str | Path, stage: str) -> dict:
    """The summary the stage's last run left in its marker (WORKDIR/<stage>/_stage.json)."""
    marker = Path(workdir) / stage / "_stage.json"
    if not marker.exists():
        raise RuntimeError(f"{stage} finished but left no marker at {marker}")
    done = json.loads(marker.read_text())
    return {"run_id": done.get("run_id"), **done.get("summary", {})}


def _run(stage: str, config: str, workdir: str, force: bool, execution: ExecutionConfig, *extra: str) -> dict:
    run_stage_cli(stage, Path(config), Path(workdir), force, execution, extra)
    return stage_summary(workdir, stage)


# Retries on the I/O-bound stages: corpora on network storage, an LLM server that restarts.
@task(name="harvest", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def harvest_task(config: str, workdir: str, force: bool, execution: ExecutionConfig) -> dict:
    return _run("harvest", config, workdir, force, execution)


@task(name="tiny-models", cache_policy=NO_CACHE)
def tiny_models_task(config: str, workdir: str, force: bool, execution: ExecutionConfig) -> dict:
    return _run("models", config, workdir, force, execution)


@task(name="generate", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=30)
def generate_task(config: str, workdir: str, force: bool, execution: ExecutionConfig) -> dict:
    return _run("generate", config, workdir, force, execution)


@task(name="build", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10)
def build_task(config: str, workdir: str, force: bool, execution: ExecutionConfig) -> dict:
    return _run("build", config, workdir, force, execution)


@task(name="train", cache_policy=NO_CACHE, tags=[GPU_TAG])
def train_task(config: str, workdir: str, force: bool, execution: ExecutionConfig) -> str:
    _run("train", config, workdir, force, execution)
    return str(Path(workdir) / "train" / "checkpoint")


@task(name="evaluate", cache_policy=NO_CACHE, tags=[GPU_TAG])
def evaluate_task(
    config: str, workdir: str, checkpoint: str, force: bool, execution: ExecutionConfig
) -> dict:
    summary = _run("evaluate", config, workdir, force, execution, "--checkpoint", checkpoint)
    from stages.evaluate import publish_artifacts

    publish_artifacts(Path(workdir))  # in this process, whatever the mode the stage ran in
    return summary
