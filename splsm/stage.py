"""What every stage shares: content hashes, the reuse check, and recording the run in lineage.

A stage calls ``run_stage`` with its parameters, its inputs and the outputs it promises. If the same
stage code already produced those outputs from the same inputs and parameters, and they are still
on disk unchanged, nothing runs and the stage says it reused them. Otherwise the body runs, each
output is hashed, and the run with its inputs and outputs lands in the lineage store.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from schemas import META_KEY
from splsm import __version__
from splsm.lineage import DatasetRef, LineageStore, RunContext, lineage_path
from splsm.log import console

REPO_ROOT = Path(__file__).resolve().parents[1]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_dir(path: Path) -> str:
    """A cheap version id of a directory: the sorted list of (relative path, size, mtime) hashed.

    Corpora and LLM directories run to hundreds of GB, so we do not read their bytes; any added,
    removed, resized or touched file gives a new fingerprint.
    """
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            st = p.stat()
            h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "listing:" + h.hexdigest()


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The project's git commit (``-dirty`` with uncommitted changes): SPLSM_GIT_COMMIT where set (images
    have no .git; the build or the flow passes it), else asked of git, else None."""
    if os.environ.get("SPLSM_GIT_COMMIT"):
        return os.environ["SPLSM_GIT_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def code_version() -> str:
    """The git commit of the project, else the package version."""
    return git_commit() or f"splsm-{__version__}"


def code_hash(files: list[str]) -> str:
    """Hash of the source files a stage's output depends on: a code change invalidates reuse."""
    h = hashlib.sha256(__version__.encode())
    for rel in sorted(files):
        h.update(rel.encode())
        h.update((REPO_ROOT / rel).read_bytes())
    return h.hexdigest()


def flow_run_id() -> str | None:
    """The Prefect flow run this stage runs under, if any (subprocesses get it through the environment)."""
    if os.environ.get("SPLSM_FLOW_RUN_ID"):
        return os.environ["SPLSM_FLOW_RUN_ID"]
    try:
        from prefect.runtime import flow_run

        rid = flow_run.id
        return str(rid) if rid else None
    except Exception:
        return None


def run_context() -> RunContext:
    """What the lineage row says about where this run came from: code, Prefect runs, image."""
    flow_name = os.environ.get("SPLSM_FLOW_NAME")
    task_run_id = os.environ.get("SPLSM_TASK_RUN_ID")
    if not (flow_name and task_run_id):
        try:
            from prefect.runtime import flow_run, task_run

            flow_name = flow_name or (str(flow_run.flow_name) if flow_run.id else None)
            task_run_id = task_run_id or (str(task_run.id) if task_run.id else None)
        except Exception:
            pass
    return RunContext(
        code_version=code_version(),
        git_commit=git_commit(),
        flow_run_id=flow_run_id(),
        flow_name=flow_name,
        task_run_id=task_run_id,
        image=os.environ.get("SPLSM_IMAGE"),
        image_digest=os.environ.get("SPLSM_IMAGE_DIGEST"),
    )


@dataclass(frozen=True)
class Artifact:
    """An input or output of a stage: a Parquet table, a directory (corpus, model, checkpoint) or a file."""

    role: str
    path: Path
    kind: str  # table / corpus / model / checkpoint / file
    schema: object | None = None  # schemas.TableSchema for tables

    def ref(self) -> DatasetRef:
        path = Path(self.path).resolve()
        if not path.exists():
            raise FileNotFoundError(f"{self.role}: {path} does not exist")
        if path.is_dir():
            chash = fingerprint_dir(path)
            return DatasetRef(str(path), self.kind, chash, self.role)
        chash = "sha256:" + sha256_file(path)
        if self.kind == "table":
            meta = pq.read_metadata(path)
            tag = (meta.schema.to_arrow_schema().metadata or {}).get(META_KEY, b"").decode()
            name, _, ver = tag.partition("/v")
            return DatasetRef(
                str(path), self.kind, chash, self.role, name or None, int(ver) if ver else None, meta.num_rows
            )
        return DatasetRef(str(path), self.kind, chash, self.role)


@dataclass
class StageResult:
    stage: str
    reused: bool
    run_id: str | None
    outputs: dict[str, Path]
    seconds: float
    summary: dict = field(default_factory=dict)


def run_stage(
    stage: str,
    workdir: Path,
    params: dict,
    inputs: list[Artifact],
    outputs: list[Artifact],
    body: Callable[[], dict | None],
    code_files: list[str],
    force: bool = False,
) -> StageResult:
    """Run ``body`` unless its outputs are already there from the same inputs, parameters and code.

    ``body`` writes the outputs (each atomically) and may return a summary dict for the marker and logs.
    """
    t0 = time.monotonic()
    workdir = Path(workdir)
    marker = workdir / stage / "_stage.json"
    in_refs = [a.ref() for a in inputs]
    key = hashlib.sha256(
        json.dumps(
            {
                "stage": stage,
                "params": params,
                "code": code_hash(code_files),
                "inputs": [(r.role, r.location, r.content_hash) for r in in_refs],
            },
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()
    out_paths = {a.role: Path(a.path) for a in outputs}

    if not force and marker.exists():
        done = json.loads(marker.read_text())
        if done.get("key") == key and _outputs_unchanged(outputs, done.get("outputs", {})):
            console.print(f"[green]{stage}[/]: inputs, parameters and code unchanged; reused {marker.parent}")
            return StageResult(
                stage, True, done.get("run_id"), out_paths, time.monotonic() - t0, done.get("summary", {})
            )

    store = LineageStore(lineage_path(workdir))
    run_id = store.start_run(stage, params, run_context())
    console.rule(f"[bold]{stage}[/] (run {run_id[:8]})")
    try:
        summary = body() or {}
        out_refs = [a.ref() for a in outputs]
    except BaseException as e:
        store.finish_run(
            run_id,
            in_refs,
            [],
            status="failed",
            error="".join(traceback.format_exception_only(type(e), e)).strip(),
        )
        raise
    store.finish_run(run_id, in_refs, out_refs)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "key": key,
                "run_id": run_id,
                "summary": summary,
                "outputs": {r.role: r.content_hash for r in out_refs},
            },
            indent=2,
            default=str,
        )
    )
    os.replace(tmp, marker)
    return StageResult(stage, False, run_id, out_paths, time.monotonic() - t0, summary)


def _outputs_unchanged(outputs: list[Artifact], recorded: dict[str, str]) -> bool:
    for a in outputs:
        if not Path(a.path).exists():
            return False
        if recorded.get(a.role) != a.ref().content_hash:
            return False
    return True
