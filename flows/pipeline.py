"""The flows: the whole DAG, incremental dataset regeneration, training with evaluation, evaluation alone.

Flows hold no stage logic: each is a short sequence of the stages' tasks (``flows.tasks``), each task
running its stage in the mode ``execution`` picks (in-process, subprocess, or the stage's container
image); a stage reuses its outputs when its inputs, parameters and code are unchanged and records the
run, with this flow run's id, in the lineage store. Parameters are typed; Prefect validates them (and a
deployment's) before the run starts, and the config file is validated before any stage runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow

from core.config import load_config
from core.paths import WorkPaths
from flows.tasks import TASKS
from splsm.runner import ExecutionConfig


def _prepare(config: str, workdir: str):
    cfg = load_config(config)  # a bad config fails here, before any stage runs
    return cfg, str(Path(config).resolve()), str(Path(workdir).resolve())


Until = Literal["harvest", "generate", "build", "train", "evaluate"]


@flow(name="self_powered_pipeline", log_prints=True)
def self_powered_pipeline(
    config: str,
    workdir: str = "work",
    force: bool = False,
    execution: ExecutionConfig | None = None,
    until: Until = "evaluate",
) -> dict:
    """Run the stages of the recipe on one experiment config, every one or those up to ``until``; returns the
    evaluation summary, or ``{until: that stage's result}`` when the run stops before evaluation."""
    execution = execution or ExecutionConfig()
    cfg, config, workdir = _prepare(config, workdir)
    if cfg.models.pretrained is not None:  # before harvest, whose pseudo-labels may come from its Whisper
        TASKS["pretrained"](config, workdir, force, execution)
    result = TASKS["harvest"](config, workdir, force, execution)
    if until == "harvest":
        return {until: result}
    if cfg.models.tiny is not None:
        TASKS["models"](config, workdir, force, execution)
    for stage in ("generate", "build", "train"):
        result = TASKS[stage](config, workdir, force, execution)
        if until == stage:
            return {until: result}
    return TASKS["evaluate"](config, workdir, force, execution)


@flow(name="regenerate_dataset", log_prints=True)
def regenerate_dataset(
    config: str, workdir: str = "work", force: bool = False, execution: ExecutionConfig | None = None
) -> dict:
    """Harvest the corpora again, ask the LLM only what its answer cache lacks, rebuild the examples.

    Meant for a schedule: new utterances in the corpora get answers, the rest come from the cache.
    The LLM is kept as it is: tiny demo models are built once, when missing, not rebuilt on new
    transcripts (that would change the LLM and invalidate every cached answer).
    """
    execution = execution or ExecutionConfig()
    cfg, config, workdir = _prepare(config, workdir)
    if cfg.models.pretrained is not None and not WorkPaths(workdir).model_dirs(cfg)[1].exists():
        TASKS["pretrained"](config, workdir, force, execution)
    harvested = TASKS["harvest"](config, workdir, force, execution)
    if cfg.models.tiny is not None and not WorkPaths(workdir).model_dirs(cfg)[1].exists():
        TASKS["models"](config, workdir, force, execution)
    generated = TASKS["generate"](config, workdir, force, execution)
    built = TASKS["build"](config, workdir, force, execution)
    return {"harvest": harvested, "generate": generated, "build": built}


@flow(name="train_and_evaluate", log_prints=True)
def train_and_evaluate(
    config: str, workdir: str = "work", force: bool = False, execution: ExecutionConfig | None = None
) -> dict:
    """Train on the build stage's examples, then evaluate the checkpoint; returns the evaluation summary."""
    execution = execution or ExecutionConfig()
    _, config, workdir = _prepare(config, workdir)
    TASKS["train"](config, workdir, force, execution)
    return TASKS["evaluate"](config, workdir, force, execution)


@flow(name="evaluate_checkpoint", log_prints=True)
def evaluate_checkpoint(
    config: str,
    workdir: str = "work",
    checkpoint: str | None = None,
    force: bool = False,
    execution: ExecutionConfig | None = None,
) -> dict:
    """Evaluate a checkpoint (default WORKDIR/train/checkpoint) on the config's eval sets."""
    execution = execution or ExecutionConfig()
    _, config, workdir = _prepare(config, workdir)
    options = {"checkpoint": str(Path(checkpoint).resolve())} if checkpoint else None
    return TASKS["evaluate"](config, workdir, force, execution, options)
