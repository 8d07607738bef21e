"""The whole DAG as one Prefect flow: harvest, (tiny models), generate, build, train, evaluate.

Flows hold no stage logic: each task calls a stage's ``run``, which reuses its outputs when its
inputs, parameters and code are unchanged and records the run in the lineage store.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from splsm.config import load_config, model_dirs
from stages import build, evaluate, generate, harvest, tiny_models, train


@task(name="harvest", cache_policy=NO_CACHE, retries=1)
def harvest_task(config: str, workdir: str, force: bool = False) -> dict:
    return harvest.run(load_config(config), Path(workdir), force).summary


@task(name="tiny-models", cache_policy=NO_CACHE)
def tiny_models_task(config: str, workdir: str, force: bool = False) -> None:
    tiny_models.run(load_config(config), Path(workdir), force)


@task(name="generate", cache_policy=NO_CACHE, retries=1)
def generate_task(config: str, workdir: str, force: bool = False) -> dict:
    cfg = load_config(config)
    _, llm = model_dirs(cfg, Path(workdir))
    return generate.run(cfg, Path(workdir), llm, force).summary


@task(name="build", cache_policy=NO_CACHE)
def build_task(config: str, workdir: str, force: bool = False) -> dict:
    return build.run(load_config(config), Path(workdir), force).summary


@task(name="train", cache_policy=NO_CACHE, tags=["gpu"])
def train_task(config: str, workdir: str, force: bool = False) -> str:
    cfg = load_config(config)
    whisper, llm = model_dirs(cfg, Path(workdir))
    examples = Path(workdir) / "build" / "examples.parquet"
    res = train.run(cfg, Path(workdir), whisper, llm, examples, force)
    return str(res.outputs["checkpoint"])


@task(name="evaluate", cache_policy=NO_CACHE, tags=["gpu"])
def evaluate_task(config: str, workdir: str, checkpoint: str, force: bool = False) -> dict:
    examples = Path(workdir) / "build" / "examples.parquet"
    return evaluate.run(load_config(config), Path(workdir), Path(checkpoint), examples, force).summary


@flow(name="self_powered_pipeline", log_prints=True)
def self_powered_pipeline(config: str, workdir: str = "work", force: bool = False) -> dict:
    """Run every stage of the recipe on one experiment config; returns the evaluation summary."""
    cfg = load_config(config)  # validate before any stage runs
    workdir = str(Path(workdir).resolve())
    harvest_task(config, workdir, force)
    if cfg.models.tiny is not None:
        tiny_models_task(config, workdir, force)
    generate_task(config, workdir, force)
    build_task(config, workdir, force)
    checkpoint = train_task(config, workdir, force)
    return evaluate_task(config, workdir, checkpoint, force)
