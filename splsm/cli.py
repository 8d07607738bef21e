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


@main.command()
@config_opt
@workdir_opt
@force_opt
def generate(config_path: Path, workdir: Path, force: bool) -> None:
    """Ask the LLM each (utterance, task) instruction; write WORKDIR/generate/responses.parquet."""
    from stages import generate as stage

    cfg = _cfg(config_path)
    _need(workdir / "harvest" / "transcripts.parquet", "transcripts", "harvest")
    _, llm = model_dirs(cfg, workdir)
    if cfg.generate.backend == "transformers-serve":
        _need(llm, "LLM directory", "models tiny")
    stage.run(cfg, workdir, llm if llm and llm.exists() else None, force)


@main.command()
@config_opt
@workdir_opt
@force_opt
def build(config_path: Path, workdir: Path, force: bool) -> None:
    """Join transcripts and answers into WORKDIR/build/examples.parquet."""
    from stages import build as stage

    _need(workdir / "harvest" / "transcripts.parquet", "transcripts", "harvest")
    stage.run(_cfg(config_path), workdir, force)


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
    """Decode the eval sets and write WER to WORKDIR/evaluate/{predictions,metrics}.parquet."""
    from stages import evaluate as stage

    ckpt = _need(checkpoint or workdir / "train" / "checkpoint", "checkpoint", "train")
    examples = _need(workdir / "build" / "examples.parquet", "examples", "build")
    stage.run(_cfg(config_path), workdir, ckpt, examples, force)


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


if __name__ == "__main__":
    sys.exit(main())
