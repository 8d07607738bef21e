"""The ``splsm`` command: one subcommand per stage of the registry, the whole DAG, the demo, lineage queries.

A thin wrapper: the stage subcommands are made from ``stages.registry`` (their options from each stage's
typed options), parse their options and call ``Stage.run``; ``run`` and ``demo`` call the flow.
"""

from __future__ import annotations

import os
import sys
import typing
from pathlib import Path

import click
from pydantic import BaseModel, ValidationError

from core.atomic import DiskFull, is_no_space, no_space_message
from core.config import DEMO_CONFIG, ConfigError, load_config
from core.lineage.store import LineageStore
from core.log import console
from core.paths import WorkPaths, lineage_path
from core.stage import Stage, StageError
from schemas import SchemaError
from stages.registry import STAGES

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
no_wait_opt = click.option(
    "--no-wait",
    is_flag=True,
    help="Where another run of this stage holds the work directory, fail at once (naming it) instead of waiting.",
)


@click.group()
@click.version_option(package_name="splsm")
def main() -> None:
    """Self-powered large speech-text models: harvest, generate, build, train, evaluate."""
    # Every stage prints its own progress bar and summary. transformers' progress bar for each model load and
    # its notes about its own generation defaults are noise beside them; it reads these variables when first
    # imported, which is after this. Set any of them to see its output again.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF reader's bar is a plain tqdm
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _cfg(path: Path):
    try:
        return load_config(path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from e


# ----- one command per stage, from the registry -----


def _option_params(options: type[BaseModel]) -> list[click.Parameter]:
    """Click parameters for a stage's typed options: a field is ``--name VALUE`` (``--name/--no-name`` for a
    flag), or a positional argument where its ``json_schema_extra`` says ``argument``."""
    params: list[click.Parameter] = []
    for name, f in options.model_fields.items():
        extra = f.json_schema_extra or {}
        kinds = {a for a in typing.get_args(f.annotation) if a is not type(None)} or {f.annotation}
        dash = name.replace("_", "-")
        if Path in kinds:
            typ = click.Path(path_type=Path, exists=bool(extra.get("exists")))
        elif bool in kinds:
            params.append(click.Option([f"--{dash}/--no-{dash}"], default=f.default, help=f.description))
            continue
        else:
            typ = next(iter(kinds))
        if extra.get("argument"):
            params.append(click.Argument([name], type=typ))
        else:
            params.append(
                click.Option(
                    [f"--{dash}", name],
                    type=typ,
                    required=f.is_required(),
                    default=None if f.is_required() else f.default,
                    show_default=not f.is_required() and f.default is not None,
                    help=f.description,
                )
            )
    return params


def _stage_command(stage: Stage) -> click.Command:
    def run(config_path: Path | None, workdir: Path, force: bool, no_wait: bool, **options) -> None:
        cfg = _cfg(config_path) if config_path is not None else None
        try:
            ctx = stage.context(cfg, workdir, options)
        except ValidationError as e:
            raise click.ClickException(f"splsm {' '.join(stage.words)}: {e}") from e
        try:
            stage.run(ctx, force, wait=not no_wait)
        except (StageError, SchemaError, FileNotFoundError, DiskFull) as e:
            raise click.ClickException(str(e)) from e
        except Exception as e:
            if is_no_space(e):  # out of space before any writer could name its file
                raise click.ClickException(no_space_message(workdir)) from e
            raise

    cmd = click.Command(stage.words[-1], callback=run, help=stage.help, short_help=stage.help.split(";")[0])
    optional_config = click.option(
        "--config",
        "config_path",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="Experiment config (YAML); this stage does not need one.",
    )
    for deco in (config_opt if stage.needs_config else optional_config, workdir_opt, force_opt, no_wait_opt):
        deco(cmd)
    cmd.params += _option_params(stage.options)
    return cmd


GROUPS = {"models": "Model directories the pipeline starts from."}


def _group(name: str) -> click.Group:
    group = main.commands.get(name)
    if group is None:
        group = click.Group(name, help=GROUPS.get(name, f"The {name} stages."))
        main.add_command(group)
    return group


for _s in STAGES.values():
    _parent = main if len(_s.words) == 1 else _group(_s.words[0])
    _parent.add_command(_stage_command(_s))


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
    from core.lsm.model import init_model

    path = init_model(whisper, llm, out, _cfg(config_path).train if config_path else None)
    console.print(f"model: wrote {path}")


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=DEMO_CONFIG,
    show_default=True,
    help="The experiment config whose recipe to show.",
)
@click.option("--task", required=True, help="A category of the config's catalog: asr, repeat, keywords, ...")
@click.option("--text", required=True, help="The transcript as harvested (the corpus's own line).")
@click.option(
    "--instruction", default=None, help="An instruction wording (default: the catalog's seeded draw)."
)
@click.option(
    "--utt-id", default="example", show_default=True, help="The utterance id the draw is seeded on."
)
@click.option(
    "--corpus-kind",
    default="librispeech",
    show_default=True,
    help="The kind of corpus the line comes from (the reference transcript form depends on it).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the readable view.")
@workdir_opt
def prompts(
    config_path: Path,
    task: str,
    text: str,
    instruction: str | None,
    utt_id: str,
    corpus_kind: str,
    as_json: bool,
    workdir: Path,
) -> None:
    """Exactly what the recipe gives the models for one transcript: the LLM's prompt, the training example
    around the speech tokens, the ASR evaluation prompt."""
    import json

    from core.recipe import recipe_prompts

    cfg = _cfg(config_path)
    tokenizer = None
    if cfg.generate.prompt_format == "chat_template":  # the LLM's own template renders the prompts
        tokenizer = WorkPaths(workdir).model_dirs(cfg)[1]
        if not (tokenizer / "tokenizer_config.json").is_file():
            raise click.ClickException(
                f"prompt format chat_template needs the LLM's tokenizer, and {tokenizer} has none: run the "
                f"config's models stage first (splsm {WorkPaths(workdir).models_made_by(cfg) or 'run'}), or "
                "point --workdir at a work directory that has it"
            )
    try:
        view = recipe_prompts(cfg, task, text, instruction, utt_id, tokenizer, corpus_kind)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(view, ensure_ascii=False))
        return
    for key, value in view.items():
        console.print(f"[bold]{key}[/]", markup=True)
        console.print(repr(value) if isinstance(value, str) else str(value), markup=False, highlight=False)


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
    from stages.evaluate import compare as cmp

    try:
        c = cmp.compare(workdir_a, workdir_b)
    except (FileNotFoundError, SchemaError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(cmp.markdown(c, workdir_a.name, workdir_b.name))
    if out is not None:
        for path in cmp.write(c, out, workdir_a.name, workdir_b.name):
            console.print(f"wrote {path}")


def _recipe_of(config_path: Path | None):
    """The recipe a --config gives (None: the checkpoint's own recipe.json)."""
    from core.recipe import Recipe

    return Recipe.of_config(_cfg(config_path), f"config {config_path}") if config_path else None


recipe_config_opt = click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Lay prompts out as this config's recipe does (default: the checkpoint's recipe.json).",
)
device_opt = click.option(
    "--device", default=None, help="torch device (default: cuda where there is one, else cpu)."
)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("audio", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--instruction", default=None, help="What to ask about each clip (default: the recipe's ASR wording)."
)
@click.option("--task", default=None, help="Ask the first wording of this category of the recipe's catalog.")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object per clip instead of the readable view."
)
@recipe_config_opt
@device_opt
def ask(
    checkpoint: Path,
    audio: tuple[Path, ...],
    instruction: str | None,
    task: str | None,
    max_new_tokens: int,
    batch_size: int,
    as_json: bool,
    config_path: Path | None,
    device: str | None,
) -> None:
    """Ask CHECKPOINT about each AUDIO clip (wav, flac, mp3, ogg; any rate; at most the model's 30 s window):
    one answer per clip, a single clip's streamed as it decodes."""
    from splsm.serving.ask import AskError
    from splsm.serving.ask import ask as run_ask

    def note(line: str) -> None:
        click.echo(f"ask: note: {line}", err=True)

    try:
        run_ask(
            checkpoint,
            list(audio),
            instruction,
            task,
            max_new_tokens,
            batch_size,
            as_json,
            _recipe_of(config_path),
            device,
            note=note,
        )
    except AskError as e:
        raise click.ClickException(f"ask: {e}") from e


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key-env",
    default=None,
    help="The environment variable holding the API key clients send (Authorization: Bearer KEY).",
)
@click.option("--no-api-key", is_flag=True, help="Ask no key: only on a loopback host.")
@click.option(
    "--served-model-name",
    default=None,
    help="The model name requests give and /v1/models lists (default: CHECKPOINT as given).",
)
@click.option(
    "--max-tokens", default=1024, show_default=True, type=click.IntRange(min=1), help="Cap on max_tokens."
)
@click.option(
    "--default-max-tokens",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="max_tokens of a request that gives none.",
)
@click.option(
    "--max-audio-s",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    help="Longest clip taken (default and at most: the model's window, 30 s).",
)
@click.option("--max-body-mb", default=20.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option(
    "--max-concurrent",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests held at once (queued or decoding); the next gets HTTP 429.",
)
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--batch-wait-ms",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="How long the first request of a batch waits for others.",
)
@click.option(
    "--workdir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="The work directory whose lineage store recorded CHECKPOINT, for the page's lineage panel (default: "
    "SPLSM_LINEAGE_DB, else the one CHECKPOINT lies in as WORKDIR/train/checkpoint).",
)
@click.option("--no-page", is_flag=True, help="Serve the API only, without the web page at /.")
@recipe_config_opt
@device_opt
def serve(
    checkpoint: Path,
    host: str,
    port: int,
    api_key_env: str | None,
    no_api_key: bool,
    served_model_name: str | None,
    max_tokens: int,
    default_max_tokens: int,
    max_audio_s: float | None,
    max_body_mb: float,
    max_concurrent: int,
    max_batch: int,
    batch_wait_ms: float,
    workdir: Path | None,
    no_page: bool,
    config_path: Path | None,
    device: str | None,
) -> None:
    """Serve CHECKPOINT over the OpenAI chat-completions protocol (input_audio parts, streaming), batching
    requests that arrive together, with a web page at / that asks it and shows its lineage."""
    from splsm.serving.app import ServeSettings
    from splsm.serving.engine import Engine
    from splsm.serving.page import lineage_store_for
    from splsm.serving.server import ServeError, api_key
    from splsm.serving.server import serve as run_serve

    try:
        key = api_key(api_key_env, no_api_key, host)
        engine = Engine(checkpoint, device, _recipe_of(config_path), max_tokens, load=False)
    except (ServeError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(f"serve: {e}") from e
    if engine.recipe_note:
        click.echo(f"serve: note: {engine.recipe_note}", err=True)
    settings = ServeSettings(
        served_model_name=served_model_name or str(checkpoint),
        api_key=key,
        max_body_bytes=int(max_body_mb * 2**20),
        max_audio_s=max_audio_s,
        max_pending=max_concurrent,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        default_max_tokens=default_max_tokens,
        page=not no_page,
        lineage_store=lineage_store_for(checkpoint, workdir),
    )
    try:
        run_serve(engine, settings, host, port, say=lambda line: click.echo(line, err=True))
    except ServeError as e:
        raise click.ClickException(f"serve: {e}") from e


def _run_flow(config_path: Path, workdir: Path, force: bool, until: str = "evaluate") -> dict:
    _cfg(config_path)  # a bad config fails here, before Prefect starts
    # No telemetry from a command line run: Prefect's temporary server sends it to a host that a cluster node
    # or a laptop offline cannot reach, and logs the failure (and, racing its own SQLite file, a traceback).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import get_current_settings

    quiet = (
        "PREFECT_LOGGING_LEVEL" not in os.environ
        and "PREFECT_LOGGING_LOGGERS_PREFECT_LEVEL" not in os.environ
    )
    if quiet and not get_current_settings().api.url:
        # A temporary server for this run only: nobody reads its per-task state lines, the stages print
        # their own progress and summaries. Against a real server (PREFECT_API_URL) the run logs stay.
        # Prefect configured its loggers when imported; an incremental setup applies the override.
        from prefect.logging.configuration import setup_logging

        os.environ["PREFECT_LOGGING_LOGGERS_PREFECT_LEVEL"] = "WARNING"
        setup_logging()
    from flows.pipeline import self_powered_pipeline

    return self_powered_pipeline(
        config=str(config_path.resolve()), workdir=str(workdir.resolve()), force=force, until=until
    )


@main.command()
@click.argument("config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@workdir_opt
@force_opt
@click.option(
    "--until",
    type=click.Choice(["harvest", "generate", "build", "train", "evaluate"]),
    default="evaluate",
    show_default=True,
    help="The last stage to run (the stages before it run as usual).",
)
def run(config_path: Path, workdir: Path, force: bool, until: str) -> None:
    """Run the whole DAG on CONFIG as a Prefect flow."""
    _run_flow(config_path, workdir, force, until)
    _show_results(workdir)


@main.command()
@workdir_opt
@force_opt
def demo(workdir: Path, force: bool) -> None:
    """Run the whole DAG on the bundled demo data with the real pretrained models (Whisper tiny.en and
    SmolLM2-135M-Instruct), then show WER, lineage, and the commands that ask the checkpoint."""
    _run_flow(DEMO_CONFIG, workdir, force)
    _show_results(workdir)
    ckpt = WorkPaths(workdir).train.checkpoint
    if ckpt.is_dir():
        from splsm.serving.ask import commands_to_try

        console.print("Ask the checkpoint yourself (README: Asking a checkpoint):")
        for line in commands_to_try(ckpt):
            console.print(f"  {line}", markup=False, highlight=False)


def _show_results(workdir: Path) -> None:
    from rich.table import Table

    from core.tables import read_table
    from schemas import METRICS

    paths = WorkPaths(workdir)
    metrics = paths.evaluate.table("metrics")
    if metrics.exists():
        t = Table(
            "eval set", "system", "task", "utterances", "ref words", "S", "D", "I", "WER %", title="WER"
        )
        for m in read_table(metrics, METRICS).to_pylist():
            t.add_row(
                m["eval_set"],
                m["system"],
                m["task"],
                str(m["n_utterances"]),
                str(m["n_ref_words"]),
                str(m["substitutions"]),
                str(m["deletions"]),
                str(m["insertions"]),
                f"{100 * m['wer']:.1f}",
            )
        console.print(t)
    ckpt = paths.train.checkpoint
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
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path), required=False)
@workdir_opt
@click.option("--namespace", default="splsm", show_default=True, help="OpenLineage job namespace.")
@click.option(
    "--url",
    default=None,
    help="Send the events to this OpenLineage HTTP endpoint (Marquez: http://HOST:5000).",
)
@click.option(
    "--endpoint", default="api/v1/lineage", show_default=True, help="The path under --url events go to."
)
@click.option(
    "--api-key",
    envvar="OPENLINEAGE_API_KEY",
    default=None,
    help="Bearer token for --url (or OPENLINEAGE_API_KEY).",
)
@click.option("--timeout", "timeout_s", default=5.0, show_default=True, help="Seconds per HTTP request.")
@click.option("--console", "to_console", is_flag=True, help="Print the events to stdout, one JSON line each.")
def lineage_export_openlineage(
    out: Path | None,
    workdir: Path,
    namespace: str,
    url: str | None,
    endpoint: str,
    api_key: str | None,
    timeout_s: float,
    to_console: bool,
) -> None:
    """Every recorded run as OpenLineage run events, for Marquez and the like, through the OpenLineage
    client's transports: to the file OUT (JSON lines), to an HTTP endpoint (--url), or to stdout (--console)."""
    from core.lineage import openlineage as ol

    if sum([out is not None, url is not None, to_console]) != 1:
        raise click.UsageError("give exactly one of OUT, --url URL or --console")
    db = lineage_path(workdir)
    if not db.exists():
        raise click.ClickException(f"no lineage store at {db}")
    store = LineageStore(db)
    try:
        if out is not None:
            n = ol.export_openlineage(store, out, namespace)
            console.print(f"{n} OpenLineage events written to {out}")
        elif url is not None:
            n = ol.send_openlineage(store, ol.http_transport(url, endpoint, api_key, timeout_s), namespace)
            console.print(f"{n} OpenLineage events sent to {url.rstrip('/')}/{endpoint.lstrip('/')}")
        else:
            with ol.console_output():
                ol.send_openlineage(store, ol.console_transport(), namespace)
    except (ol.OpenLineageSendError, ValueError) as e:
        raise click.ClickException(str(e)) from e


@lineage.command("diff")
@click.argument("path", type=click.Path(path_type=Path))
@workdir_opt
@click.option(
    "--from",
    "before",
    default=None,
    help="Version: number (1 = oldest), content-hash or run-id prefix. Default: the one before --to.",
)
@click.option("--to", "after", default=None, help="Version, as --from. Default: the latest.")
@click.option(
    "--from-data",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="A kept copy of the --from version's data (its hash is checked): splsm keeps only the latest.",
)
@click.option(
    "--to-data",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="A kept copy of the --to version's data.",
)
@click.option(
    "--key", default=None, help="Comma-separated columns that identify a row (default: the table's own key)."
)
@click.option("--sample", default=5, show_default=True, help="Keys shown of each of added, removed, changed.")
@click.option("--json", "as_json", is_flag=True, help="The whole result as one JSON object.")
def lineage_diff(
    path: Path,
    workdir: Path,
    before: str | None,
    after: str | None,
    from_data: Path | None,
    to_data: Path | None,
    key: str | None,
    sample: int,
    as_json: bool,
) -> None:
    """What changed between two versions of PATH (a table, a checkpoint): the runs, parameters, code and input
    versions that made them, and, where both versions' data exist, the rows added, removed and changed."""
    from core.lineage.diff import DiffError, diff_versions

    db = lineage_path(workdir)
    if not db.exists():
        raise click.ClickException(f"no lineage store at {db}")
    keys = tuple(k.strip() for k in key.split(",") if k.strip()) if key else None
    try:
        d = diff_versions(LineageStore(db), path, before, after, from_data, to_data, keys, sample)
    except DiffError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        import dataclasses
        import json

        click.echo(json.dumps(dataclasses.asdict(d), default=str, ensure_ascii=False))
        return
    _print_diff(d)


def _print_diff(d) -> None:
    from rich.table import Table

    def short(h: str | None) -> str:
        return "" if h is None else h.split(":", 1)[-1][:12]

    t = Table(
        "",
        "version",
        "content",
        "rows",
        "written by",
        "at",
        title=f"{d.location}: {len(d.versions)} versions",
    )
    for v in d.versions:
        mark = "from" if v is d.before else "to" if v is d.after else ""
        w = v.writer
        t.add_row(
            mark,
            str(v.number),
            short(v.content_hash),
            "" if v.row_count is None else str(v.row_count),
            f"{w.stage} {w.run_id[:8]}" if w else "(read only)",
            f"{v.recorded_at:%Y-%m-%d %H:%M:%S}",
        )
    console.print(t)
    for title, changes in (("run", d.run_changes), ("parameters", d.param_changes)):
        if changes:
            ct = Table(
                "field", f"version {d.before.number}", f"version {d.after.number}", title=f"{title} changed"
            )
            for c in changes:
                ct.add_row(c.name, str(c.before), str(c.after))
            console.print(ct)

    def rows(n: int | None) -> str:
        return "" if n is None else f" ({n} rows)"

    if d.input_changes:
        it = Table(
            "input",
            "location",
            f"version {d.before.number}",
            f"version {d.after.number}",
            "",
            title="inputs changed",
        )
        for c in d.input_changes:
            it.add_row(
                c.role,
                c.location,
                (short(c.before) or "-") + rows(c.before_rows),
                (short(c.after) or "-") + rows(c.after_rows),
                c.status,
            )
        console.print(it)
    elif d.before.writer and d.after.writer:
        console.print("inputs: the same versions")
    r = d.rows
    if r is None:
        console.print(f"[yellow]rows not compared[/]: {d.rows_unavailable}")
    else:
        how = f"by ({', '.join(r.key)})" if r.key else "as whole rows"
        changed = "" if r.changed is None else f", {r.changed} changed, {r.unchanged} unchanged"
        console.print(
            f"rows {how}: {r.before_rows} -> {r.after_rows}: [green]{r.added} added[/], [red]{r.removed} removed[/]{changed}"
        )
        if r.changed_columns:
            console.print("changed columns: " + ", ".join(f"{c} ({n})" for c, n in r.changed_columns.items()))
        for c in r.columns_added:
            console.print(f"column added: {c}")
        for c in r.columns_removed:
            console.print(f"column removed: {c}")
        for kind, keys in r.samples.items():
            if keys:
                console.print(
                    f"  {kind}: " + "; ".join(", ".join(f"{k}={v}" for k, v in s.items()) for s in keys),
                    markup=False,
                )
    for n in d.notes:
        console.print(f"[dim]note: {n}[/]")


@main.group("export")
def export() -> None:
    """Write a work directory's transcripts and examples in the formats other tools read."""


@export.command("hf")
@workdir_opt
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="The dataset directory."
)
@click.option("--embed-audio", is_flag=True, help="Carry each clip as 16 kHz FLAC in an audio column.")
@click.option("--name", default=None, help="The dataset's title on its card (default: OUT's name).")
def export_hf(workdir: Path, out: Path, embed_audio: bool, name: str | None) -> None:
    """The built examples as a Hugging Face dataset: data/{split}-*.parquet and a dataset card (README.md)
    with the recipe, models, counts and lineage; datasets.load_dataset(OUT) loads it."""
    from core.export.hf import ExportError
    from core.export.hf import export_hf as run_export

    try:
        done = run_export(workdir, out, embed_audio=embed_audio, name=name)
    except ExportError as e:
        raise click.ClickException(str(e)) from e
    counts = ", ".join(f"{s} {n}" for s, n in done.rows_per_split.items())
    console.print(f"export hf: {sum(done.rows_per_split.values())} examples ({counts}) -> {done.out}")


@export.command("lhotse")
@workdir_opt
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for splsm_cuts_transcripts.jsonl.gz and splsm_cuts_examples.jsonl.gz.",
)
def export_lhotse_cmd(workdir: Path, out: Path) -> None:
    """The harvest transcripts and the built examples as lhotse CutSets (instruction, answer in custom)."""
    from core.export.lhotse import ExportError, export_lhotse

    try:
        res = export_lhotse(workdir, out)
    except ExportError as e:
        raise click.ClickException(str(e)) from e
    for part, path in res.files.items():
        console.print(f"{res.cuts[part]} cuts of the {part} written to {path}")
    for part, path in res.absent.items():
        console.print(f"no {part} in the work directory ({path}): not exported")


if __name__ == "__main__":
    sys.exit(main())
