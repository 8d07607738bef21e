"""The harvest stage: the config's corpora in, the transcripts and rejects tables out."""

from __future__ import annotations

from core.stage import Artifact, Context, Stage


def _labeller(ctx: Context):
    """The Whisper that labels audio without a transcript, if any: a configured one, or the config's own."""
    h = ctx.cfg.harvest
    if h.label_with_models_whisper:
        return ctx.paths.model_dirs(ctx.cfg)[0]
    return h.whisper_checkpoint


def inputs(ctx: Context) -> list[Artifact]:
    cfg, out = ctx.cfg, ctx.paths.harvest
    arts = [Artifact(f"corpus:{c.name}", c.root, "corpus") for c in cfg.corpora]
    arts += [
        Artifact(f"{key}:{c.name}", path, "file")
        for c in cfg.corpora
        for key, path in c.manifest_files().items()
    ]
    if (whisper := _labeller(ctx)) is not None:
        made_by = ctx.paths.models_made_by(cfg) if cfg.harvest.label_with_models_whisper else None
        arts.append(Artifact("whisper_checkpoint", whisper, "model", made_by=made_by))
    previous = Artifact("previous_transcripts", out.transcripts, "table", keyed=False)
    if previous.missing() is None:  # a committed version (a first run killed early leaves none)
        # A rerun keeps the previous table's unchanged rows: lineage records it as an input, but it is not
        # part of the reuse key (otherwise every rerun would see a "new" input and never be reused).
        arts.append(previous)
    return arts


def outputs(ctx: Context) -> list[Artifact]:
    out = ctx.paths.harvest
    return [Artifact("transcripts", out.transcripts, "table"), Artifact("rejects", out.rejects, "table")]


def params(ctx: Context) -> dict:
    # workers: how many processes probe files, not what the table holds (rows keep reader order)
    return {
        "corpora": [c.model_dump(mode="json") for c in ctx.cfg.corpora],
        **ctx.cfg.harvest.model_dump(mode="json", exclude={"workers"}),
    }


def body(ctx: Context) -> dict:
    from stages.harvest.driver import harvest, print_summary

    h = ctx.cfg.harvest
    s = harvest(
        ctx.cfg.corpora,
        ctx.paths.harvest,
        max_duration_s=h.max_duration_s,
        min_duration_s=h.min_duration_s,
        workers=h.workers,
        whisper_checkpoint=_labeller(ctx),
        whisper_language=h.whisper_language,
        whisper_batch_size=h.whisper_batch_size,
        content_hash=h.content_hash,
        whisper_max_tokens=h.whisper_max_tokens,
        long_audio=h.long_audio,
    )
    print_summary(s)
    return s.__dict__


STAGE = Stage(
    name="harvest",
    help="Read the config's corpora into WORKDIR/harvest/transcripts/ (parts) and rejects.parquet.",
    package="stages.harvest",
    inputs=inputs,
    outputs=outputs,
    params=params,
    body=body,
    retries=2,
    retry_delay_s=10,
)
