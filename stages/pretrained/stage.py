"""The pretrained-models stage (``splsm models pretrained [--out DIR]``): the weights packages in, two Hugging
Face directories out (Whisper tiny.en and SmolLM2-135M-Instruct), each whole or not at all."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from core.paths import ModelsPaths
from core.stage import Artifact, Context, Stage, StageError
from stages.pretrained.packages import SMOLLM2_135M, WHISPER_TINY_EN, PackageMissing


class PretrainedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path | None = Field(
        None, description="Write the two model directories here (default WORKDIR/models)."
    )


def _out(ctx: Context) -> ModelsPaths:
    return ModelsPaths(Path(ctx.options.out).resolve()) if ctx.options.out else ctx.paths.models


def inputs(ctx: Context) -> list[Artifact]:
    arts = []
    for pkg in (WHISPER_TINY_EN, SMOLLM2_135M):
        try:
            paths = pkg.paths()
        except PackageMissing as e:
            raise StageError(str(e)) from e
        arts += [Artifact(f"{pkg.distribution}=={pkg.version()}:{p.name}", p, "model") for p in paths]
    return arts


def outputs(ctx: Context) -> list[Artifact]:
    out = _out(ctx)
    return [
        Artifact("whisper", out.pretrained_whisper, "model"),
        Artifact("llm", out.pretrained_llm, "model"),
    ]


def params(ctx: Context) -> dict:
    # Not the output folder: a work dir copied elsewhere (hard links, as bench/reproduce.py shares one) keeps its
    # converted models, and their unchanged files keep the LLM fingerprint that generate's answer cache keys on.
    return {"packages": {p.distribution: p.version() for p in (WHISPER_TINY_EN, SMOLLM2_135M)}}


def body(ctx: Context) -> dict:
    # A conversion that gives the bytes already there (a rerun after a code change elsewhere in the project, which
    # changes this stage's code hash) leaves the folders as they are: the LLM's fingerprint, which generate's
    # reuse key and answer cache key on, stays, and twenty minutes of answers are not asked again.
    from core.atomic import atomic_dir
    from core.log import console
    from stages.pretrained import ct2_whisper, gguf_llm

    out = _out(ctx)
    model_bin, _, _ = WHISPER_TINY_EN.paths()
    with atomic_dir(out.pretrained_whisper, keep_identical=True) as tmp:
        ct2_whisper.convert(model_bin.parent, tmp)
    console.print(
        f"models pretrained: Whisper tiny.en ({WHISPER_TINY_EN.distribution}) -> {out.pretrained_whisper}"
    )
    (gguf,) = SMOLLM2_135M.paths()
    with atomic_dir(out.pretrained_llm, keep_identical=True) as tmp:
        gguf_llm.convert(gguf, tmp)
    console.print(
        f"models pretrained: SmolLM2-135M-Instruct ({SMOLLM2_135M.distribution}) -> {out.pretrained_llm}"
    )
    return {"whisper": str(out.pretrained_whisper), "llm": str(out.pretrained_llm)}


STAGE = Stage(
    name="pretrained",
    command=("models", "pretrained"),
    help="Convert the bundled Whisper tiny.en and SmolLM2-135M-Instruct to Hugging Face directories (WORKDIR/models).",
    package="stages.pretrained",
    inputs=inputs,
    outputs=outputs,
    params=params,
    body=body,
    options=PretrainedOptions,
    needs_config=False,
)
