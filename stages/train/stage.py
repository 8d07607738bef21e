"""The train stage: the examples and the Whisper and LLM directories in, a checkpoint out."""

from __future__ import annotations

from core.config import TrainConfig
from core.stage import Artifact, Context, Stage


def inputs(ctx: Context) -> list[Artifact]:
    whisper, llm = ctx.paths.model_dirs(ctx.cfg)
    made_by = ctx.paths.models_made_by(ctx.cfg)
    return [
        Artifact("examples", ctx.paths.build.examples, "table", made_by="build"),
        Artifact("whisper", whisper, "model", made_by=made_by),
        Artifact("llm", llm, "model", made_by=made_by),
    ]


def outputs(ctx: Context) -> list[Artifact]:
    out = ctx.paths.train
    return [Artifact("checkpoint", out.checkpoint, "checkpoint"), Artifact("metrics", out.metrics, "file")]


def params(ctx: Context) -> dict:
    # How long we wait and how often we checkpoint do not change what we train: kept out of the reuse key.
    return ctx.cfg.train.model_dump(mode="json", exclude=TrainConfig.RESUME_EXEMPT)


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
        ctx.cfg.train, whisper, llm, ctx.paths.build.examples, ctx.paths.train, run_name=ctx.cfg.name
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


STAGE = Stage(
    name="train",
    help="Train the speech-text model with torchrun; the checkpoint lands in WORKDIR/train/checkpoint.",
    package="stages.train",
    inputs=inputs,
    outputs=outputs,
    params=params,
    body=body,
    gpu=True,
    image="train",
)
