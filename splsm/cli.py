"""The ``splsm`` command: one subcommand per stage, the whole DAG, the demo, and lineage queries.

A thin wrapper: every subcommand parses its options and calls a stage's ``run`` or a flow.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from splsm.config import DEMO_CONFIG, ConfigError, TinyModels, load_config, model_dirs
from splsm.lineage import LineageStore, lineage_path
from splsm.log import console

workdir_opt = click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("work"),
    show_default=True,
    help="Where outputs and the lineage database (WORKDIR/lineage.duckdb) live.",
)
config_opt = click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Experiment config (YAML).",
)
force_opt = click.option("--force", is_flag=True, help="Run even if the outputs are up to date.")


@click.group()
@click.version_option(package_name="splsm")
def main() -> None:
    """Self-powered large speech-text models: harvest, generate, build, train, evaluate."""


def _cfg(path: Path):
    try:
        return load_config(path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from e


def _need(path: Path, what: str, command: str) -> Path:
    if not path.exists():
        raise click.ClickException(f"{what} {path} does not exist; run `splsm {command}` first")
    return path


@main.command()
@config_opt
@workdir_opt
@force_opt
def harvest(config_path: Path, workdir: Path, force: bool) -> None:
    """Read the config's corpora into WORKDIR/harvest/{transcripts,rejects}.parquet."""
    from stages import harvest as stage

    stage.run(_cfg(config_path), workdir, force)


@main.group()
def models() -> None:
    """Model directories."""


@models.command("tiny")
@config_opt
@workdir_opt
@force_opt
def models_tiny(config_path: Path, workdir: Path, force: bool) -> None:
    """Write a tiny Whisper and a tiny Llama (tokenizer trained on the harvested text) to WORKDIR/models."""
    from stages import tiny_models

    cfg = _cfg(config_path)
    if cfg.models.tiny is None:
        cfg = cfg.model_copy(update={"models": cfg.models.model_copy(update={"tiny": TinyModels()})})
    _need(workdir / "harvest" / "transcripts.parquet", "transcripts", "harvest")
    tiny_models.run(cfg, workdir, force)


@main.group("model")
def model_group() -> None:
    """The speech-text model."""


@model_group.command("init")
@click.option("--whisper", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--llm", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The model directory to write.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Take the Q-Former sizes and what trains from this config's train section (default: the reference's).",
)
def model_init(whisper: Path, llm: Path, out: Path, config_path: Path | None) -> None:
    """Assemble one Hugging Face model directory from a Whisper directory and an LLM directory."""
    from stages.model import init_model

    path = init_model(whisper, llm, out, _cfg(config_path).train if config_path else None)
    console.print(f"model: wrote {path}")


@main.command()
@config_opt
@workdir_opt
@force_opt
@click.option("--worker", default=0, show_default=True, help="This worker's index, 0..WORKERS-1.")
@click.option(
    "--workers",
    default=1,
    show_default=True,
    help="How many workers split the utterances (by hash); the last one to finish merges.",
)
def generate(config_path: Path, workdir: Path, force: bool, worker: int, workers: int) -> None:
    """Ask the LLM each (utterance, task) instruction; write WORKDIR/generate/responses.parquet."""
    from stages import generate as stage

    cfg = _cfg(config_path)
    if not 0 <= worker < workers:
        raise click.ClickException(f"--worker must be in 0..{workers - 1}")
    _need(workdir / "harvest" / "transcripts.parquet", "transcripts", "harvest")
    _, llm = model_dirs(cfg, workdir)
    if cfg.generate.backend != "openai":
        _need(llm, "LLM directory", "models tiny")
    try:
        stage.run(cfg, workdir, llm if llm and llm.exists() else None, force, worker, workers)
    except stage.GenerateError as e:
        raise click.ClickException(str(e)) from e


@main.command()
@config_opt
@workdir_opt
@force_opt
def build(config_path: Path, workdir: Path, force: bool) -> None:
    """Join transcripts and answers into WORKDIR/build/examples.parquet and the loader's WORKDIR/build/shards/."""
    from stages import build as stage

    _need(workdir / "harvest" / "transcripts.parquet", "transcripts", "harvest")
    stage.run(_cfg(config_path), workdir, force)


@main.command("import-reference")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Corpus root the manifest's audio paths are relative to (and confined to).",
)
@config_opt
@workdir_opt
@force_opt
def import_reference(manifest: Path, root: Path, config_path: Path, workdir: Path, force: bool) -> None:
    """Import the reference's {instruction, audio, text} answers into WORKDIR/import/; build then uses them."""
    from stages import build as stage

    _need(workdir / "harvest" / "transcripts.parquet", "transcripts", "harvest")
    stage.run_import(_cfg(config_path), workdir, manifest, root, force)


@main.command()
@config_opt
@workdir_opt
@force_opt
def train(config_path: Path, workdir: Path, force: bool) -> None:
    """Train the speech-text model with torchrun; the checkpoint lands in WORKDIR/train/checkpoint."""
    from stages import train as stage

    cfg = _cfg(config_path)
    whisper, llm = model_dirs(cfg, workdir)
    examples = _need(workdir / "build" / "examples.parquet", "examples", "build")
    stage.run(
        cfg,
        workdir,
        _need(whisper, "Whisper directory", "models tiny"),
        _need(llm, "LLM directory", "models tiny"),
        examples,
        force,
    )


@main.command()
@config_opt
@workdir_opt
@force_opt
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    default=None,
    help="Checkpoint directory (default WORKDIR/train/checkpoint).",
)
def evaluate(config_path: Path, workdir: Path, force: bool, checkpoint: Path | None) -> None:
    """Decode the eval sets: WER, the speech-anchor-bias probe, spoken QA; report in WORKDIR/evaluate."""
    from stages import evaluate as stage

    ckpt = _need(checkpoint or workdir / "train" / "checkpoint", "checkpoint", "train")
    examples = _need(workdir / "build" / "examples.parquet", "examples", "build")
    from schemas import SchemaError
    from stages.evaluation.qa import QAFileError

    try:
        stage.run(_cfg(config_path), workdir, ckpt, examples, force)
    except (FileNotFoundError, stage.EvaluateInputError, QAFileError, SchemaError) as e:
        raise click.ClickException(str(e)) from e


@main.command()
@click.argument("workdir_a", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("workdir_b", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write compare.md and anchor_rate.png to this directory.",
)
def compare(workdir_a: Path, workdir_b: Path, out: Path | None) -> None:
    """Compare two evaluated workdirs side by side: WER, anchor rate and chrF per category, QA accuracy.

    Typically A is the ASR-only baseline (configs/demo-asr-only.yaml), B the self-powered model.
    """
    from schemas import SchemaError
    from stages.evaluation import compare as cmp

    try:
        c = cmp.compare(workdir_a, workdir_b)
    except (FileNotFoundError, SchemaError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(cmp.markdown(c, workdir_a.name, workdir_b.name))
    if out is not None:
        for path in cmp.write(c, out, workdir_a.name, workdir_b.name):
            console.print(f"wrote {path}")


def _run_flow(config_path: Path, workdir: Path, force: bool) -> dict:
    from flows.pipeline import self_powered_pipeline

    _cfg(config_path)  # a bad config fails here, before Prefect starts
    return self_powered_pipeline(
        config=str(config_path.resolve()), workdir=str(workdir.resolve()), force=force
    )


@main.command()
@click.argument("config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@workdir_opt
@force_opt
def run(config_path: Path, workdir: Path, force: bool) -> None:
    """Run the whole DAG on CONFIG as a Prefect flow."""
    _run_flow(config_path, workdir, force)
    _show_results(workdir)


@main.command()
@workdir_opt
@force_opt
def demo(workdir: Path, force: bool) -> None:
    """Run the whole DAG on the bundled demo data with tiny models, then show WER and lineage."""
    _run_flow(DEMO_CONFIG, workdir, force)
    _show_results(workdir)


def _show_results(workdir: Path) -> None:
    from rich.table import Table

    from schemas import METRICS, read_table

    metrics = workdir / "evaluate" / "metrics.parquet"
    if metrics.exists():
        t = Table("eval set", "task", "utterances", "ref words", "S", "D", "I", "WER %", title="WER")
        for m in read_table(metrics, METRICS).to_pylist():
            t.add_row(
                m["eval_set"],
                m["task"],
                str(m["n_utterances"]),
                str(m["n_ref_words"]),
                str(m["substitutions"]),
                str(m["deletions"]),
                str(m["insertions"]),
                f"{100 * m['wer']:.1f}",
            )
        console.print(t)
    ckpt = workdir / "train" / "checkpoint"
    if ckpt.exists():
        _print_lineage(workdir, ckpt, "upstream")


@main.group()
def lineage() -> None:
    """Query the lineage store (WORKDIR/lineage.duckdb)."""


def _print_lineage(workdir: Path, path: Path, direction: str) -> None:
    from rich.tree import Tree

    db = lineage_path(workdir)
    if not db.exists():
        raise click.ClickException(f"no lineage store at {db}")
    store = LineageStore(db)
    location = str(path.resolve())
    try:
        edges = store.upstream(location) if direction == "upstream" else store.downstream(location)
    except KeyError as e:
        raise click.ClickException(str(e.args[0])) from e
    edge = "input of" if direction == "upstream" else "output of"
    root = Tree(f"[bold]{location}[/] ({direction})")
    stack = [(0, root)]
    for e in edges:
        while stack[-1][0] >= e["depth"]:
            stack.pop()
        rows = f", {e['row_count']} rows" if e["row_count"] is not None else ""
        label = (
            f"[bold]{e['role']}[/] {e['location']} ({e['kind']}{rows}, {e['content_hash'][:19]}) "
            f"[dim]{edge} [cyan]{e['via_stage']}[/cyan] run {e['via_run'][:8]}[/]"
        )
        stack.append((e["depth"], stack[-1][1].add(label)))
    console.print(root)


@lineage.command("upstream")
@click.argument("path", type=click.Path(path_type=Path))
@workdir_opt
def lineage_upstream(path: Path, workdir: Path) -> None:
    """What PATH was made from, back to the corpora and model directories."""
    _print_lineage(workdir, path, "upstream")


@lineage.command("downstream")
@click.argument("path", type=click.Path(path_type=Path))
@workdir_opt
def lineage_downstream(path: Path, workdir: Path) -> None:
    """Everything made from PATH (any version of it)."""
    _print_lineage(workdir, path, "downstream")


@lineage.command("runs")
@workdir_opt
@click.option("--limit", default=20, show_default=True)
def lineage_runs(workdir: Path, limit: int) -> None:
    """The most recent stage runs."""
    from rich.table import Table

    store = LineageStore(lineage_path(workdir))
    t = Table("run", "stage", "status", "started", "seconds", "flow run", "code")
    for run_id, stage, status, started, ended, frid, code in store.query(
        "SELECT run_id, stage, status, started_at, ended_at, flow_run_id, code_version FROM runs "
        "ORDER BY started_at DESC LIMIT ?",
        [limit],
    ):
        secs = f"{(ended - started).total_seconds():.1f}" if ended else ""
        t.add_row(
            run_id[:8],
            stage,
            status,
            f"{started:%Y-%m-%d %H:%M:%S}",
            secs,
            (frid or "")[:8],
            (code or "")[:12],
        )
    console.print(t)


@lineage.command("export-openlineage")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@workdir_opt
@click.option("--namespace", default="splsm", show_default=True, help="OpenLineage job namespace.")
def lineage_export_openlineage(out: Path, workdir: Path, namespace: str) -> None:
    """Write every recorded run as OpenLineage run events (JSON lines) to OUT, for Marquez and the like."""
    from splsm.lineage import export_openlineage

    db = lineage_path(workdir)
    if not db.exists():
        raise click.ClickException(f"no lineage store at {db}")
    n = export_openlineage(LineageStore(db), out, namespace)
    console.print(f"{n} OpenLineage events written to {out}")


if __name__ == "__main__":
    sys.exit(main())
