"""The build stage: transcripts and the LLM's (or the reference's) answers in, examples and shards out."""

from __future__ import annotations

from core.catalog import load_catalog, sample_tasks
from core.stage import Artifact, Context, Stage


def _answer_tables(ctx: Context) -> list[Artifact]:
    """The responses tables this build joins: none for an ASR-only build; the generated answers, and the
    reference's imported ones when ``splsm import-reference`` has made them."""
    if all(t == "asr" for t in ctx.cfg.build.tasks):
        return []
    arts = [Artifact("responses", ctx.paths.generate.responses, "table", made_by="generate")]
    if ctx.paths.imported.responses.exists():
        arts.append(Artifact("imported_responses", ctx.paths.imported.responses, "table"))
    return arts


def _tokenizer_dir(ctx: Context):
    """The LLM directory whose tokenizer renders ``chat_template`` prompts (None for the other layouts)."""
    return ctx.paths.model_dirs(ctx.cfg)[1] if ctx.cfg.generate.prompt_format == "chat_template" else None


def _llm_dir(ctx: Context):
    """The LLM directory build reads: its chat template, or its tokenizer to count answer tokens with."""
    if _tokenizer_dir(ctx) is not None or ctx.cfg.build.answer_tokens_between is not None:
        return ctx.paths.model_dirs(ctx.cfg)[1]
    return None


def inputs(ctx: Context) -> list[Artifact]:
    arts = [
        Artifact("transcripts", ctx.paths.harvest.transcripts, "table", made_by="harvest"),
        Artifact("catalog", load_catalog(ctx.cfg.generate.catalog).path, "file"),
        *_answer_tables(ctx),
    ]
    if (llm := _llm_dir(ctx)) is not None:
        arts.append(Artifact("llm", llm, "model", made_by=ctx.paths.models_made_by(ctx.cfg)))
    return arts


def outputs(ctx: Context) -> list[Artifact]:
    out = ctx.paths.build
    return [
        Artifact("examples", out.examples, "table"),
        Artifact("shard_manifest", out.shard_manifest, "table"),
        Artifact("shards", out.shards, "shards"),
        Artifact("rejects", out.rejects, "table"),
    ]


def params(ctx: Context) -> dict:
    g = ctx.cfg.generate
    sampling = {"tasks": g.tasks, "tasks_per_utterance": g.tasks_per_utterance, "seed": g.seed}
    return {
        **ctx.cfg.build.model_dump(),
        "prompt_format": g.prompt_format,
        "transcript_form": g.transcript_form,
        "generate_sampling": sampling,
    }


def _sampled(ctx: Context):
    """Which LLM tasks generate asked about an utterance (None: all of them)."""
    g = ctx.cfg.generate
    if g.tasks_per_utterance is None:
        return None
    return lambda utt_id: sample_tasks(utt_id, g.tasks, g.tasks_per_utterance, g.seed)


def body(ctx: Context) -> dict:
    from stages.build.examples import build, print_summary

    s = build(
        ctx.paths.harvest.transcripts,
        [a.path for a in _answer_tables(ctx)] or None,
        ctx.paths.build,
        ctx.cfg.build,
        load_catalog(ctx.cfg.generate.catalog),
        ctx.cfg.generate.prompt_format,
        _tokenizer_dir(ctx),
        _sampled(ctx),
        ctx.cfg.generate.transcript_form,
        _llm_dir(ctx),
        ctx.cfg.corpus_kinds,
    )
    print_summary(s)
    return s.__dict__


STAGE = Stage(
    name="build",
    help="Join transcripts and answers into WORKDIR/build/examples.parquet and the loader's WORKDIR/build/shards/.",
    package="stages.build",
    inputs=inputs,
    outputs=outputs,
    params=params,
    body=body,
    retries=1,
    retry_delay_s=10,
)
