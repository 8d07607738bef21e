"""Where a run came from, for its lineage row: the code (git commit or version), the Prefect flow and task
runs it belongs to, the image it ran in. Subprocesses and containers get these through the environment
(``CONTEXT_ENV``), so a stage records the same whichever way it was started.
"""

from __future__ import annotations

import functools
import os
import subprocess

from core import __version__
from core.lineage.store import RunContext
from core.paths import REPO_ROOT

# Variables a stage reads to record where it ran; the runner passes them to subprocesses and containers.
CONTEXT_ENV = (
    "SPLSM_FLOW_RUN_ID",
    "SPLSM_FLOW_NAME",
    "SPLSM_TASK_RUN_ID",
    "SPLSM_GIT_COMMIT",
    "SPLSM_IMAGE",
    "SPLSM_IMAGE_DIGEST",
    "SPLSM_LINEAGE_DB",
)


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


def context_env() -> dict[str, str]:
    """The Prefect run this call belongs to and the code it runs, for a child process's lineage row."""
    env = {k: os.environ[k] for k in CONTEXT_ENV if os.environ.get(k)}
    try:
        from prefect.runtime import flow_run, task_run

        if flow_run.id:
            env["SPLSM_FLOW_RUN_ID"] = str(flow_run.id)
            env["SPLSM_FLOW_NAME"] = str(flow_run.flow_name)
        if task_run.id:
            env["SPLSM_TASK_RUN_ID"] = str(task_run.id)
    except Exception:
        pass
    if "SPLSM_GIT_COMMIT" not in env:
        commit = git_commit()
        if commit:
            env["SPLSM_GIT_COMMIT"] = commit
    return env
