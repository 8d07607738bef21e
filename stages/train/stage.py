"""The train stage: the examples and the Whisper and LLM directories in, a checkpoint out.

Across machines (``train.nnodes`` > 1) every node runs ``splsm train --node-rank K`` with the same config and
work directory. Node 0 is the stage's run: the reuse check, the lineage record, the clearing before the
workers start, the marker after. A following node asks the same reuse check (reading only), runs its
workers, and leaves its own marker in its own folder (``TrainPaths.node``): it records no lineage run and
removes nothing, so it never races node 0, and a node on another host never judges node 0's temporaries.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from core.config import TrainConfig
from core.stage import Artifact, Context, Stage, StageError, StageResult, reuse_check, run_stage


class TrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_rank: int | None = Field(
        None,
        ge=0,
        description="With train.nnodes > 1: this node's index, 0..NNODES-1 (node 0 prepares and publishes the run).",
    )


def node_rank(ctx: Context) -> int:
    """This node's index; required, and in range, when the training spans nodes."""
    n, k = ctx.cfg.train.nnodes, ctx.options.node_rank
    if n == 1:
        if k not in (None, 0):
            raise StageError(f"train: --node-rank {k}, but train.nnodes is 1")
        return 0
    if k is None:
        raise StageError(
            f"train: train.nnodes is {n}: give each node's `splsm train` its --node-rank (0 on one node, "
            f"1..{n - 1} on the others)"
        )
    if k >= n:
        raise StageError(f"train: --node-rank {k} is not one of 0..{n - 1} (train.nnodes is {n})")
    return k


def inputs(ctx: Context) -> list[Artifact]:
    whisper, llm = ctx.paths.model_dirs(ctx.cfg)
    made_by = ctx.paths.models_made_by(ctx.cfg)
    return [
        Artifact("examples", ctx.paths.build.examples, "table", made_by="build"),
        Artifact("whisper", whisper, "model", made_by=made_by),
        Artifact("llm", llm, "model", made_by=made_by),
        *([Artifact("init_from", ctx.cfg.train.init_from, "checkpoint")] if ctx.cfg.train.init_from else []),
        *_encoder_cache(ctx),
    ]


def outputs(ctx: Context) -> list[Artifact]:
    out = ctx.paths.train
    return [
        Artifact("checkpoint", out.checkpoint, "checkpoint"),
        Artifact("metrics", out.metrics, "file"),
        *_encoder_cache(ctx),
    ]


def _encoder_cache(ctx: Context) -> list[Artifact]:
    """The encoder cache, read and added to (lineage: read by and made by this run), never part of the key."""
    t = ctx.cfg.train
    if not (t.encoder_cache and t.freeze_encoder):
        return []
    return [Artifact("encoder_cache", ctx.paths.encoder_cache, "cache", keyed=False)]


def params(ctx: Context) -> dict:
    # How long we wait and how often we checkpoint do not change what we train: kept out of the reuse key.
    # The recipe's layout and wordings go into the checkpoint's recipe.json, so they are keyed too.
    r = _recipe(ctx)
    return {
        **ctx.cfg.train.model_dump(mode="json", exclude=TrainConfig.RESUME_EXEMPT),
        "recipe": {"prompt_format": r.prompt_format, "catalog": r.catalog_hash},
    }


def _recipe(ctx: Context):
    """How the checkpoint's prompts were laid out (its ``recipe.json``: what ``splsm ask`` and ``serve`` read)."""
    from core.recipe import Recipe

    return Recipe.of_config(ctx.cfg)


def body(ctx: Context) -> dict:
    from core.atomic import remove_stale
    from core.log import console
    from stages.train.launcher import train

    # a checkpoint the ranks were writing when the run was killed (as big as the trainable weights and their
    # optimizer state): resuming starts from the last published one, so the staging folder only takes space
    gone = remove_stale([ctx.paths.train.checkpoints])
    if gone:
        console.print(
            f"train: removed {len(gone)} unfinished checkpoints of an interrupted run ({gone[0].name})"
        )
    whisper, llm = ctx.paths.model_dirs(ctx.cfg)
    summary = train(
        ctx.cfg.train,
        whisper,
        llm,
        ctx.paths.build.examples,
        ctx.paths.train,
        run_name=ctx.cfg.name,
        encoder_cache=ctx.paths.encoder_cache if _encoder_cache(ctx) else None,
        recipe=_recipe(ctx).to_json(),
    )
    console.print(
        f"train: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
        f"{summary['samples_seen']} samples in {summary['seconds']:.1f}s"
        + (
            f", [yellow]{summary['skipped_audio']} examples skipped for missing audio[/]"
            if summary["skipped_audio"]
            else ""
        )
    )
    return summary


def record(stage: Stage, ctx: Context, force: bool) -> StageResult:
    """Node 0 (or the only node): the stage's run. A following node: its part of that run (``follow``)."""
    k = node_rank(ctx)
    inputs_, outputs_ = stage.inputs(ctx), stage.outputs(ctx)
    if k == 0:
        return run_stage(
            stage.name,
            ctx.paths,
            stage.params(ctx),
            inputs_,
            outputs_,
            lambda: body(ctx),
            stage.package,
            force,
        )
    return follow(stage, ctx, k, inputs_, outputs_, force)


def follow(
    stage: Stage, ctx: Context, k: int, inputs_: list[Artifact], outputs_: list[Artifact], force: bool
) -> StageResult:
    """Node ``k`` > 0: where node 0 reuses, so does it (neither starts torchrun); otherwise its workers join
    node 0's at the rendezvous, and once they are done, its marker holds rank 0's summary."""
    from core.atomic import write_text
    from core.log import console
    from stages.train.launcher import train

    t0 = time.monotonic()
    out_paths = {a.role: Path(a.path) for a in outputs_}
    lead = ctx.paths.marker(stage.name)
    _, _, done = reuse_check(
        stage.name, ctx.paths, stage.params(ctx), inputs_, outputs_, stage.package, lead, force
    )
    if done is not None:
        console.print(f"[green]{stage.name}[/]: inputs, parameters and code unchanged; reused {lead.parent}")
        return StageResult(
            stage.name, True, done.get("run_id"), out_paths, time.monotonic() - t0, done.get("summary", {})
        )
    t = ctx.cfg.train
    console.rule(f"[bold]{stage.name}[/] (node {k} of {t.nnodes}; node 0 records the run)")
    whisper, llm = ctx.paths.model_dirs(ctx.cfg)
    summary = train(
        t,
        whisper,
        llm,
        ctx.paths.build.examples,
        ctx.paths.train,
        run_name=ctx.cfg.name,
        node_rank=k,
        encoder_cache=ctx.paths.encoder_cache if _encoder_cache(ctx) else None,
        recipe=_recipe(ctx).to_json(),  # global rank 0, which writes the checkpoint, may run on any node
    )
    console.print(f"train: node {k} done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}")
    write_text(
        marker(ctx),
        json.dumps({"node_rank": k, "nnodes": t.nnodes, "run_id": None, "summary": summary}, indent=2),
    )
    return StageResult(stage.name, False, None, out_paths, time.monotonic() - t0, summary)


def marker(ctx: Context) -> Path:
    k = node_rank(ctx)
    return ctx.paths.marker("train") if k == 0 else ctx.paths.train.node(k) / "_node.json"


STAGE = Stage(
    name="train",
    help="Train the speech-text model with torchrun; the checkpoint lands in WORKDIR/train/checkpoint.",
    package="stages.train",
    inputs=inputs,
    outputs=outputs,
    params=params,
    body=body,
    options=TrainOptions,
    record=record,
    marker=marker,
    gpu=True,
    image="train",
)
