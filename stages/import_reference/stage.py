"""The import-reference stage: a reference manifest and the harvested transcripts in, answers out."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from core.catalog import load_catalog
from core.stage import Artifact, Context, Stage


class ImportOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest: Path = Field(
        description="The reference's {instruction, audio, text} JSONL file.",
        json_schema_extra={"argument": True, "exists": True},
    )
    root: Path = Field(
        description="Corpus root the manifest's audio paths are relative to (and confined to)."
    )


def _tokenizer_dir(ctx: Context):
    """The LLM directory whose tokenizer renders ``chat_template`` prompts (None for Vicuna's format)."""
    return ctx.paths.model_dirs(ctx.cfg)[1] if ctx.cfg.generate.prompt_format == "chat_template" else None


def inputs(ctx: Context) -> list[Artifact]:
    from stages.import_reference.mapper import REFERENCE_INSTRUCTIONS

    arts = [
        Artifact("reference_manifest", ctx.options.manifest, "file"),
        Artifact("transcripts", ctx.paths.harvest.transcripts, "table", made_by="harvest"),
        Artifact("catalog", load_catalog(ctx.cfg.generate.catalog).path, "file"),
        Artifact("reference_instructions", REFERENCE_INSTRUCTIONS, "file"),
    ]
    if (llm := _tokenizer_dir(ctx)) is not None:
        arts.append(Artifact("llm", llm, "model", made_by=ctx.paths.models_made_by(ctx.cfg)))
    return arts


def outputs(ctx: Context) -> list[Artifact]:
    out = ctx.paths.imported
    return [Artifact("responses", out.responses, "table"), Artifact("rejects", out.rejects, "table")]


def params(ctx: Context) -> dict:
    o = ctx.options
    g = ctx.cfg.generate
    return {
        "manifest": str(Path(o.manifest).resolve()),
        "root": str(Path(o.root).resolve()),
        # the prompt each answer is recorded with follows these
        "prompt_format": g.prompt_format,
        "transcript_form": g.transcript_form,
    }


def body(ctx: Context) -> dict:
    from core.log import console
    from stages.import_reference.importer import import_reference

    o = ctx.options
    s = import_reference(
        o.manifest,
        o.root,
        ctx.paths.harvest.transcripts,
        ctx.paths.imported,
        load_catalog(ctx.cfg.generate.catalog),
        ctx.cfg.generate.prompt_format,
        _tokenizer_dir(ctx),
        ctx.cfg.generate.transcript_form,
        ctx.cfg.corpus_kinds,
    )
    console.print(
        f"import-reference: {s.lines} lines -> {s.answers} answers {s.by_task}, {s.rejects} rejects "
        f"{s.reject_counts}"
    )
    return s.__dict__


STAGE = Stage(
    name="import-reference",
    help="Import the reference's {instruction, audio, text} answers into WORKDIR/import/; build then uses them.",
    package="stages.import_reference",
    inputs=inputs,
    outputs=outputs,
    params=params,
    body=body,
    options=ImportOptions,
)
