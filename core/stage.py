"""The stage contract, and the one runner every stage goes through: the reuse check and lineage.

A stage is a package under ``stages/`` that declares one ``Stage``: its name, what it reads
(``inputs``), what it writes (``outputs``), the settings its outputs depend on (``params``) and the work
itself (``body``), plus its command-line options as a typed model. ``stages.registry`` lists them; the
CLI, the flows and the container runner all iterate that list, so a stage is one package and one line.

``Stage.run`` checks its inputs exist (naming the command that makes a missing one), then
``run_stage``: if the same code (``core.codehash``: the stage's package and every project module it
imports) already produced the outputs from the same inputs and parameters, and they are still on disk
unchanged, nothing runs and the stage says it reused them. Otherwise the body runs, each output is
hashed, and the run with its inputs and outputs lands in the lineage store.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from core.atomic import DiskFull, is_no_space, remove_stale, write_text
from core.codehash import code_hash
from core.config import ExperimentConfig
from core.digest import fingerprint_dir, sha256_file
from core.lineage.store import DatasetRef, LineageStore
from core.lock import Busy, held, lock_path
from core.log import console
from core.paths import MARKER, WorkPaths
from core.prompts import PromptError
from core.provenance import run_context
from core.tables import MANIFEST, table_identity


class StageError(Exception):
    """A stage cannot go on for a reason its user can fix or retry; the message says which (the CLI shows it
    without a traceback)."""


class MissingInput(StageError, FileNotFoundError):
    """An input of a stage does not exist; the message names the command that makes it."""


@dataclass(frozen=True)
class Artifact:
    """An input or output of a stage: a Parquet table, a directory (corpus, model, checkpoint) or a file.

    ``made_by``: the command that makes a missing input (``harvest``, ``models tiny``), for the error.
    ``keyed``: whether the input's content is part of the reuse key; an unkeyed input is only recorded in
    lineage (harvest reads its own previous table: keying on it would make every rerun look new), and an
    unkeyed output is not checked when a rerun asks whether it may reuse.
    A ``cache`` (the encoder cache) is a folder that runs read and add to; it is recorded, created empty where it
    is missing, and never keyed: what it holds changes how fast a run is, not what it makes.
    """

    role: str
    path: Path
    kind: str  # table / corpus / model / checkpoint / file / shards / cache
    made_by: str | None = None
    keyed: bool = True

    def missing(self) -> MissingInput | None:
        path = Path(self.path)
        if self.kind == "cache":
            return None
        # a parts table's directory without a manifest holds no committed version (a first run killed early)
        if path.exists() and not (self.kind == "table" and path.is_dir() and not (path / MANIFEST).exists()):
            return None
        how = f"; run `splsm {self.made_by}` first" if self.made_by else ""
        return MissingInput(f"{self.role} {self.path} does not exist{how}")

    def ref(self) -> DatasetRef:
        path = Path(self.path).resolve()
        if self.kind == "cache":
            path.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            raise self.missing() or FileNotFoundError(path)
        if self.kind == "table":  # a file, or a parts table named by its manifest (``core.tables``)
            chash, tag, rows = table_identity(path)
            name, _, ver = (tag or "").partition("/v")
            return DatasetRef(
                str(path), self.kind, chash, self.role, name or None, int(ver) if ver else None, rows
            )
        if path.is_dir():
            return DatasetRef(str(path), self.kind, fingerprint_dir(path), self.role)
        return DatasetRef(str(path), self.kind, "sha256:" + sha256_file(path), self.role)


@dataclass
class StageResult:
    stage: str
    reused: bool
    run_id: str | None
    outputs: dict[str, Path]
    seconds: float
    summary: dict = field(default_factory=dict)


class NoOptions(BaseModel):
    """A stage without options of its own (beyond --config, --workdir and --force)."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Context:
    """What a stage's functions get: the validated config, the work directory's paths, its options."""

    cfg: ExperimentConfig | None  # None only for a stage that does not need one (``Stage.needs_config``)
    paths: WorkPaths
    options: BaseModel = field(default_factory=NoOptions)


@dataclass(frozen=True)
class Stage:
    """One stage's contract (see the module docstring). Every callable takes the ``Context``."""

    name: str
    help: str  # one line: what it reads and writes, for ``splsm --help``
    package: str  # its code; the reuse key hashes this package and every project module it imports
    inputs: Callable[[Context], list[Artifact]]
    outputs: Callable[[Context], list[Artifact]]
    params: Callable[[Context], dict]  # what the outputs depend on besides inputs and code
    body: Callable[[Context], dict | None]  # writes the outputs (each atomically); returns a summary
    options: type[BaseModel] = NoOptions  # typed command-line options; the CLI makes flags of its fields
    command: tuple[str, ...] = ()  # the CLI's words for it, default (name,)
    needs_config: bool = True  # False: the stage reads nothing of the experiment config (--config optional)
    # How its runs are recorded when not as one run (generate's workers, then the merge), and the marker
    # that then holds this invocation's summary; None: one run, its marker in the stage's folder.
    record: Callable[[Stage, Context, bool], StageResult] | None = None
    marker: Callable[[Context], Path] | None = None
    # Orchestration: a GPU stage gets the container's GPU request and the flows' "gpu" concurrency tag;
    # ``image`` says which of the container images it runs in; I/O-bound stages retry (a corpus on
    # network storage, an LLM server restarting).
    gpu: bool = False
    image: Literal["cpu", "train"] = "cpu"
    retries: int = 0
    retry_delay_s: float = 0.0
    # After a run in a flow: publish results (Prefect artifacts) from the flow's own process.
    publish: Callable[[WorkPaths], object] | None = None

    @property
    def words(self) -> tuple[str, ...]:
        return self.command or (self.name,)

    def marker_of(self, ctx: Context) -> Path:
        """The marker this invocation's run leaves (its summary and lineage run id)."""
        return self.marker(ctx) if self.marker is not None else ctx.paths.marker(self.name)

    def context(
        self,
        cfg: ExperimentConfig | None,
        workdir: str | os.PathLike,
        options: dict | BaseModel | None = None,
    ) -> Context:
        """The context a run of this stage gets; ``options`` are validated against the stage's options."""
        opts = options if isinstance(options, self.options) else self.options.model_validate(options or {})
        if cfg is None and self.needs_config:
            raise ValueError(f"stage {self.name} needs an experiment config")
        return Context(cfg, WorkPaths(workdir), opts)

    def run(self, ctx: Context, force: bool = False, wait: bool = True) -> StageResult:
        """Check the inputs exist, then run (or reuse) the stage and record it, holding the lock beside its
        marker throughout (``core.lock``): a second run of it on the same work directory waits for this one
        (``wait=False``: fails at once, naming the holder) and then, as a rule, reuses what this one made."""
        marker = self.marker_of(ctx)
        try:
            with held(lock_path(marker), f"splsm {' '.join(self.words)}", wait=wait, say=console.print):
                return self._run(ctx, force)
        except Busy as e:
            raise StageError(str(e)) from None

    def _run(self, ctx: Context, force: bool) -> StageResult:
        inputs = self.inputs(ctx)
        for a in inputs:
            if (err := a.missing()) is not None:
                raise err
        if self.record is not None:
            return self.record(self, ctx, force)
        return run_stage(
            self.name,
            ctx.paths,
            self.params(ctx),
            inputs,
            self.outputs(ctx),
            lambda: self.body(ctx),
            self.package,
            force,
        )


def run_stage(
    name: str,
    paths: WorkPaths | str | os.PathLike,
    params: dict,
    inputs: list[Artifact],
    outputs: list[Artifact],
    body: Callable[[], dict | None],
    package: str,
    force: bool = False,
    marker: Path | None = None,
) -> StageResult:
    """Run ``body`` unless its outputs are already there from the same inputs, parameters and code.

    ``body`` writes the outputs (each atomically) and may return a summary dict for the marker and logs.
    The run is recorded under ``name``; its marker is ``marker`` (default: the stage folder's). ``package``:
    the code that makes the outputs, for the reuse key (``core.codehash``).
    """
    t0 = time.monotonic()
    paths = paths if isinstance(paths, WorkPaths) else WorkPaths(paths)
    marker = marker or paths.marker(name)
    key, in_refs, done = reuse_check(name, paths, params, inputs, outputs, package, marker, force)
    out_paths = {a.role: Path(a.path) for a in outputs}
    if done is not None:
        console.print(f"[green]{name}[/]: inputs, parameters and code unchanged; reused {marker.parent}")
        return StageResult(
            name, True, done.get("run_id"), out_paths, time.monotonic() - t0, done.get("summary", {})
        )

    store = LineageStore(paths.lineage)
    try:
        run_id = store.start_run(name, params, run_context())
    except Exception as e:
        if is_no_space(e):
            raise DiskFull(paths.lineage) from e
        raise
    console.rule(f"[bold]{name}[/] (run {run_id[:8]})")
    # what a killed run of this stage left half-written (a whole checkpoint, at times) goes before this one
    # a parts table's directory holds its writer's temporaries too
    gone = remove_stale(
        [
            marker.parent,
            *{Path(a.path).parent for a in outputs},
            *(a.path for a in outputs if Path(a.path).is_dir()),
        ]
    )
    if gone:
        console.print(f"{name}: removed {len(gone)} temporaries of an interrupted run ({gone[0].name}, ...)")
    try:
        summary = body() or {}
        out_refs = [a.ref() for a in outputs]
    except BaseException as e:
        try:
            store.finish_run(
                run_id,
                in_refs,
                [],
                status="failed",
                error="".join(traceback.format_exception_only(type(e), e)).strip(),
            )
        except Exception as record_error:  # a full disk fails the record too: the run's own error is the news
            console.print(
                f"[yellow]{name}: the failed run could not be recorded in lineage ({record_error})[/]"
            )
        if isinstance(e, PromptError):  # a setting that does not fit the model: the user's to change
            raise StageError(f"{name}: {e}") from e
        if is_no_space(e) and not isinstance(e, DiskFull):
            # a writer that does not go through core.atomic (a library's own file): name the stage's outputs
            where = getattr(e, "filename", None) or (Path(outputs[0].path) if outputs else marker)
            raise DiskFull(where) from e
        raise
    store.finish_run(run_id, in_refs, out_refs)
    write_text(
        marker,
        json.dumps(
            {
                "key": key,
                "run_id": run_id,
                "summary": summary,
                "outputs": {r.role: r.content_hash for r in out_refs},
                # where each output is: a reader checks the files it takes against these hashes
                "locations": {r.role: r.location for r in out_refs},
            },
            indent=2,
            default=str,
        ),
    )
    return StageResult(name, False, run_id, out_paths, time.monotonic() - t0, summary)


def reuse_check(
    name: str,
    paths: WorkPaths,
    params: dict,
    inputs: list[Artifact],
    outputs: list[Artifact],
    package: str,
    marker: Path,
    force: bool = False,
) -> tuple[str, list[DatasetRef], dict | None]:
    """The run's reuse key, its inputs' references, and ``marker``'s content where that run can be reused
    (same key, outputs unchanged; never with ``force``), else None. Reads only: a process that takes part in a
    run another one records (a following node of a training across machines) asks it too."""
    in_refs = [a.ref() for a in inputs]
    _check_published(paths, name, inputs, in_refs)
    key = hashlib.sha256(
        json.dumps(
            {
                "stage": name,
                "params": params,
                "code": code_hash(package),
                "inputs": [
                    (r.role, r.location, r.content_hash)
                    for a, r in zip(inputs, in_refs, strict=True)
                    if a.keyed
                ],
            },
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()
    if force:
        return key, in_refs, None
    done = read_marker(marker)
    if done is not None and done.get("key") == key and _outputs_unchanged(outputs, done.get("outputs", {})):
        return key, in_refs, done
    return key, in_refs, None


def _check_published(paths: WorkPaths, name: str, inputs: list[Artifact], refs: list[DatasetRef]) -> None:
    """Refuse inputs that are not one published version of the stage that made them.

    A stage publishes several files one at a time, then its marker, last, with each file's hash: the marker
    is the version. An input whose hash differs from the one its maker's marker holds was written by a run
    that has not finished (still running, or killed between two files), so it may sit beside a sibling of
    the previous run: read it now and the two are mixed. The maker's rerun publishes a consistent set.
    """
    made: dict[str, tuple[str, Path]] = {}
    for m in [*paths.root.glob(f"*/{MARKER}"), *paths.root.glob(f"*/*/{MARKER}")]:
        done = read_marker(m)
        if done is None:
            continue
        for role, loc in (done.get("locations") or {}).items():
            h = (done.get("outputs") or {}).get(role)
            if h is not None:
                made[loc] = (h, m)
    for a, r in zip(inputs, refs, strict=True):
        if not a.keyed or r.location not in made:
            continue
        h, m = made[r.location]
        if r.content_hash != h:
            raise StageError(
                f"{name}: input {r.location} is not the version its stage published ({m} records another): "
                f"a run of that stage is still writing or was interrupted. Rerun it (`splsm {m.parent.name}`"
                " with the same config) so that its outputs are one version again."
            )


def read_marker(marker: Path) -> dict | None:
    """A stage's marker, or None where there is none or it cannot be read: a marker cut short by a power
    loss reruns the stage (with a warning) rather than failing it."""
    try:
        done = json.loads(Path(marker).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        console.print(
            f"[yellow]warning: {marker} cannot be read ({type(e).__name__}); the stage runs again[/]"
        )
        return None
    if not isinstance(done, dict):
        console.print(f"[yellow]warning: {marker} is not a stage marker; the stage runs again[/]")
        return None
    return done


def _outputs_unchanged(outputs: list[Artifact], recorded: dict[str, str]) -> bool:
    for a in outputs:
        if not a.keyed:
            continue
        if not Path(a.path).exists():
            return False
        if recorded.get(a.role) != a.ref().content_hash:
            return False
    return True
