"""The tiny-models stage (``splsm models tiny``): the harvested transcripts in, WORKDIR/models out."""

from __future__ import annotations

from core.config import TinyModels
from core.stage import Artifact, Context, Stage


def _tiny(ctx: Context) -> TinyModels:
    # ``splsm models tiny`` builds them for any config; one that names no tiny: section gets the defaults
    return ctx.cfg.models.tiny or TinyModels()


def inputs(ctx: Context) -> list[Artifact]:
    return [Artifact("transcripts", ctx.paths.harvest.transcripts, "table", made_by="harvest")]


def outputs(ctx: Context) -> list[Artifact]:
    m = ctx.paths.models
    return [Artifact("whisper", m.whisper, "model"), Artifact("llm", m.llm, "model")]


def params(ctx: Context) -> dict:
    return {"tiny": _tiny(ctx).model_dump(), "seed": ctx.cfg.seed}


def body(ctx: Context) -> dict:
    from stages.tiny_models.models import build_tiny_models, corpus_texts

    texts = corpus_texts(ctx.paths.harvest.transcripts, ctx.cfg.generate.catalog)
    build_tiny_models(texts, ctx.paths.models, _tiny(ctx), ctx.cfg.seed)
    return {}


STAGE = Stage(
    name="models",
    command=("models", "tiny"),
    help="Write a tiny Whisper and a tiny Llama (tokenizer trained on the harvested text) to WORKDIR/models.",
    package="stages.tiny_models",
    inputs=inputs,
    outputs=outputs,
    params=params,
    body=body,
)
