"""The generate stage: transcripts and the instruction catalog in, the LLM's answers out.

Several workers (``--worker i --workers N``) split the utterances by hash; each records its own run
(its shards), and whichever finishes last merges every worker's shards and records the stage's run.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.catalog import load_catalog
from core.config import OpenAIBackendConfig
from core.lock import held, lock_path
from core.log import console
from core.stage import Artifact, Context, Stage, StageResult, run_stage


class GenerateOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker: int = Field(0, ge=0, description="This worker's index, 0..WORKERS-1.")
    workers: int = Field(
        1, ge=1, description="How many workers split the utterances (by hash); the last one to finish merges."
    )

    @model_validator(mode="after")
    def _in_range(self):
        if self.worker >= self.workers:
            raise ValueError(f"--worker must be in 0..{self.workers - 1}, not {self.worker}")
        return self


def _llm(ctx: Context):
    _, llm = ctx.paths.model_dirs(ctx.cfg)
    return llm


def inputs(ctx: Context) -> list[Artifact]:
    g = ctx.cfg.generate
    arts = [
        Artifact("transcripts", ctx.paths.harvest.transcripts, "table", made_by="harvest"),
        Artifact("catalog", load_catalog(g.catalog).path, "file"),
    ]
    llm = _llm(ctx)
    # a served model may live only on the server; a local LLM directory is an input where there is one
    if not isinstance(g.backend, OpenAIBackendConfig) or (llm is not None and llm.exists()):
        made_by = ctx.paths.models_made_by(ctx.cfg)
        arts.append(Artifact("llm", llm, "model", made_by=made_by))
    return arts


def outputs(ctx: Context) -> list[Artifact]:
    out = ctx.paths.generate
    return [Artifact("responses", out.responses, "table"), Artifact("stats", out.stats, "table")]


def params(ctx: Context) -> dict:
    """The settings answers depend on: not the backend's (how fast they come), except the served name."""
    g = ctx.cfg.generate
    served = g.backend.served_model if isinstance(g.backend, OpenAIBackendConfig) else None
    out = {
        **g.model_dump(mode="json", exclude={"backend", "shard_size"}),
        "served_model": served,
        "catalog_hash": load_catalog(g.catalog).content_hash,
    }
    llm = _llm(ctx)
    if served and (llm is None or not llm.exists()):
        # no local copy to fingerprint as an input: which weights answer is the given or reported revision
        from stages.generate.driver import model_revision

        out["served_revision"] = model_revision(g, None, served)
    return out


def body(ctx: Context) -> dict:
    from core.log import console
    from stages.generate.driver import generate

    o = ctx.options
    llm = _llm(ctx)
    s = generate(
        ctx.paths.harvest.transcripts,
        ctx.paths.generate,
        ctx.cfg.generate,
        llm if llm is not None and llm.exists() else None,
        o.worker,
        o.workers,
        ctx.cfg.corpus_kinds,
    )
    console.print(
        f"generate: {s.requests} answers ({s.requested} requested, {s.cached} cached, "
        f"{s.completion_tokens} new tokens) in {s.seconds:.1f}s"
        + (f"; {s.kept} kept, rejected: {s.rejected}" if s.merged else "")
    )
    return s.__dict__


def record(stage: Stage, ctx: Context, force: bool) -> StageResult:
    """One worker of several: its own run and marker for its shards; the merge, when it happens, as the
    stage's run with the merged tables as outputs."""
    o = ctx.options
    inputs_, params_ = stage.inputs(ctx), stage.params(ctx)
    if o.workers == 1:
        return run_stage(
            stage.name,
            ctx.paths,
            params_,
            inputs_,
            stage.outputs(ctx),
            lambda: body(ctx),
            stage.package,
            force,
        )
    res = run_stage(
        f"generate-worker-{o.worker:04d}-of-{o.workers:04d}",
        ctx.paths,
        {**params_, "worker": o.worker, "workers": o.workers},
        inputs_,
        [Artifact("shards", ctx.paths.generate.parts(o.worker, o.workers), "shards")],
        lambda: body(ctx),
        stage.package,
        force,
        marker=marker(ctx),
    )
    if res.summary.get("merged"):  # this worker finished last: record the merged tables as the stage's output
        with held(lock_path(ctx.paths.marker(stage.name)), "generate merge", say=console.print):
            return run_stage(
                stage.name,
                ctx.paths,
                {**params_, "workers": o.workers},
                inputs_,
                stage.outputs(ctx),
                lambda: res.summary,
                stage.package,
                True,
            )
    return res


def marker(ctx: Context):
    o = ctx.options
    g = ctx.paths.generate
    return g.worker_marker(o.worker, o.workers) if o.workers > 1 else ctx.paths.marker("generate")


STAGE = Stage(
    name="generate",
    help="Ask the LLM each (utterance, task) instruction; write WORKDIR/generate/responses.parquet.",
    package="stages.generate",
    inputs=inputs,
    outputs=outputs,
    params=params,
    body=body,
    options=GenerateOptions,
    record=record,
    marker=marker,
    retries=2,
    retry_delay_s=30,
)
