"""The reference-checkpoint stage (``splsm models import-reference CHECKPOINT_DIR [--out DIR]``): the self-powered
paper's released checkpoint in, this project's model directory out (default WORKDIR/models/reference), whole or
not at all. ``splsm evaluate --checkpoint DIR`` then evaluates it as it evaluates a model trained here."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from core.stage import Artifact, Context, Stage, StageError

# what the reference's training leaves beside its weights (train_stage0_sft.py saves the LLM's tokenizer and
# Whisper's feature extractor into its output folder): read as they are
SIDE_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json", "tokenizer.model",
              "special_tokens_map.json", "generation_config.json")  # fmt: skip


class ImportReferenceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Path = Field(
        description="The reference's checkpoint folder (its BlspModel's config.json and weights, its tokenizer "
        "and feature extractor).",
        json_schema_extra={"argument": True, "exists": True},
    )
    out: Path | None = Field(
        None, description="Write the model directory here (default WORKDIR/models/reference)."
    )


def _out(ctx: Context) -> Path:
    return Path(ctx.options.out).resolve() if ctx.options.out else ctx.paths.models.reference


def inputs(ctx: Context) -> list[Artifact]:
    from stages.reference_checkpoint.mapper import ReferenceCheckpointError, weight_files

    ckpt = Path(ctx.options.checkpoint).resolve()
    if not ckpt.is_dir():
        raise StageError(f"models import-reference: {ckpt} is not a folder")
    try:
        weights = weight_files(ckpt)
    except ReferenceCheckpointError as e:
        raise StageError(f"models import-reference: {e}") from e
    side = [ckpt / n for n in SIDE_FILES if (ckpt / n).is_file()]
    return [Artifact(f"checkpoint:{p.name}", p, "model") for p in side + weights]


def outputs(ctx: Context) -> list[Artifact]:
    return [Artifact("model", _out(ctx), "model")]


def params(ctx: Context) -> dict:
    return {}


def body(ctx: Context) -> dict:
    from stages.reference_checkpoint.convert import convert

    ckpt, out = Path(ctx.options.checkpoint).resolve(), _out(ctx)
    return convert(ckpt, out)


STAGE = Stage(
    name="reference-checkpoint",
    command=("models", "import-reference"),
    help="Map the self-powered paper's released checkpoint onto this project's model directory "
    "(WORKDIR/models/reference); splsm evaluate --checkpoint reads it.",
    package="stages.reference_checkpoint",
    inputs=inputs,
    outputs=outputs,
    params=params,
    body=body,
    options=ImportReferenceOptions,
    needs_config=False,
)
