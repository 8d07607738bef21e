"""The evaluate stage: a checkpoint, the examples and the LLM's answers in; predictions, metrics, report out."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from core.paths import WorkPaths
from core.stage import Artifact, Context, Stage


class EvaluateOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Path | None = Field(
        None, description="Checkpoint directory (default WORKDIR/train/checkpoint)."
    )


TABLES = ("predictions", "metrics", "probe", "probe_metrics", "qa", "qa_metrics", "rejects")


def _checkpoint(ctx: Context) -> Path:
    return Path(ctx.options.checkpoint or ctx.paths.train.checkpoint).resolve()


def _responses(ctx: Context) -> Path | None:
    """The generate stage's answers, which the probe asks again with speech (there for ASR-only builds too)."""
    r = ctx.paths.generate.responses
    return r if ctx.cfg.evaluate.probe and r.exists() else None


def _whisper(ctx: Context) -> Path | None:
    """The Whisper the encoder came from, for the reference row (where the config asks for it)."""
    return ctx.paths.model_dirs(ctx.cfg)[0] if ctx.cfg.evaluate.whisper_reference else None


def inputs(ctx: Context) -> list[Artifact]:
    e = ctx.cfg.evaluate
    arts = [
        Artifact("checkpoint", _checkpoint(ctx), "checkpoint", made_by="train"),
        Artifact("examples", ctx.paths.build.examples, "table", made_by="build"),
    ]
    if (whisper := _whisper(ctx)) is not None:
        arts.append(Artifact("whisper", whisper, "model", made_by=ctx.paths.models_made_by(ctx.cfg)))
    if (responses := _responses(ctx)) is not None:
        arts.append(Artifact("responses", responses, "table"))
    if e.qa and e.qa_file is not None:
        arts.append(Artifact("qa_questions", e.qa_file, "file"))
    if e.encoder_cache:  # read and added to; recorded, never keyed
        arts.append(Artifact("encoder_cache", ctx.paths.encoder_cache, "cache", keyed=False))
    if e.baseline is not None:
        arts.append(
            Artifact("baseline_probe", WorkPaths(e.baseline).evaluate.table("probe_metrics"), "table")
        )
    return arts


def outputs(ctx: Context) -> list[Artifact]:
    out = ctx.paths.evaluate
    arts = [Artifact(name, out.table(name), "table") for name in TABLES]
    arts += [
        Artifact("report", out.report, "file"),
        Artifact("report_html", out.report_html, "file"),
        Artifact("report_audio", out.audio, "file"),  # a folder: its fingerprint
        Artifact("qa_questions", out.qa_questions, "file"),
    ]
    arts += [Artifact(role, out.plot(role), "file") for role in out.PLOTS]
    if ctx.cfg.evaluate.encoder_cache:
        arts.append(Artifact("encoder_cache", ctx.paths.encoder_cache, "cache", keyed=False))
    return arts


def params(ctx: Context) -> dict:
    e = ctx.cfg.evaluate
    return {
        **e.model_dump(mode="json", exclude={"encoder_cache"}),  # a cache changes the speed, not the results
        "qa_file": str(e.qa_file) if e.qa_file else None,
        "baseline": str(e.baseline) if e.baseline else None,
        "prompt_format": ctx.cfg.generate.prompt_format,
    }


def body(ctx: Context) -> dict:
    from stages.evaluate.evaluator import check_lsm_checkpoint, evaluate

    check_lsm_checkpoint(_checkpoint(ctx))  # before anything loads: name what is wrong with it
    e = ctx.cfg.evaluate
    return evaluate(
        _checkpoint(ctx),
        ctx.paths.build.examples,
        ctx.paths.evaluate,
        e,
        _responses(ctx),
        e.qa_file if e.qa else None,
        e.baseline,
        ctx.cfg.generate.prompt_format,
        whisper_dir=_whisper(ctx),
        encoder_cache=ctx.paths.encoder_cache if e.encoder_cache else None,
    )


def publish(paths: WorkPaths) -> bool:
    from stages.evaluate.report import publish_artifacts

    return publish_artifacts(paths.evaluate)


STAGE = Stage(
    name="evaluate",
    help="Decode the eval sets: WER, the speech-anchor-bias probe, spoken QA; report in WORKDIR/evaluate.",
    package="stages.evaluate",
    inputs=inputs,
    outputs=outputs,
    params=params,
    body=body,
    options=EvaluateOptions,
    gpu=True,
    publish=publish,
)
