"""The launcher: runs torchrun with one worker process per device and watches it.

``train()`` writes the run's arguments (``TrainPaths.args``), clears resumable checkpoints that this run
would not continue, and starts ``python -m torch.distributed.run --standalone --nproc_per_node N -m
stages.train.worker ARGS`` as a child process (``core.proc``): its output streams under a progress bar,
the end of it is kept for the error. SIGTERM to the stage's process (a cancelled flow run, a stopped
container) stops the workers, who finish their step and checkpoint first; a rerun resumes.

Across nodes (``train.nnodes`` > 1) every node runs this launcher with the same config and work directory
on a shared filesystem, and torchrun's c10d rendezvous at ``train.rdzv_endpoint`` joins their workers into
one world. Node 0 does what must happen once, before any worker starts: clear the checkpoints the run would
not continue, drop the previous summary and worker errors, write the arguments. A following node (node
rank > 0) only writes its own arguments (``TrainPaths.node``) and runs its workers: its torchrun cannot pass
the rendezvous before node 0's has joined, so its workers never see what node 0 is about to clear. Global
rank 0, on whichever node the rendezvous puts it, writes the checkpoints, logs and summary as on one node.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from core.atomic import write_text
from core.config import TrainConfig
from core.log import console, progress
from core.paths import REPO_ROOT, TrainPaths
from core.proc import Child
from core.stage import StageError
from stages.train import checkpoint
from stages.train.logs import STEP_LINE

TAIL_LINES = 80
STOPPED_EXIT = 3  # a worker's exit status when a signal stopped it after it wrote a resumable checkpoint


class TrainError(StageError):
    """The torchrun workers failed; the message carries their own errors and the tail of their output."""


def write_args(
    cfg: TrainConfig,
    whisper_dir: Path,
    llm_dir: Path,
    examples: Path,
    out: TrainPaths | Path,
    run_name: str | None = None,
    node_rank: int = 0,
    encoder_cache: Path | None = None,
    recipe: str | None = None,
) -> Path:
    """The arguments every worker reads; resumable checkpoints of other settings are cleared. ``run_name``:
    the experiment's name, the trackers' name for the run (default: the work directory's name). A following
    node (``node_rank`` > 0) only writes its workers' arguments, in its own folder: node 0 clears. ``recipe``:
    the ``recipe.json`` every Hugging Face checkpoint gets (``core.recipe.Recipe``), or None for none."""
    paths = out if isinstance(out, TrainPaths) else TrainPaths(Path(out))
    args = paths.args if node_rank == 0 else paths.node(node_rank) / paths.args.name
    args.parent.mkdir(parents=True, exist_ok=True)
    if node_rank == 0:
        _clear_stale_checkpoints(cfg, paths)
    write_text(
        args,
        json.dumps(
            {
                "whisper_dir": str(Path(whisper_dir).resolve()),
                "llm_dir": str(Path(llm_dir).resolve()),
                "examples": str(Path(examples).resolve()),
                "out_dir": str(paths.dir.resolve()),
                "run_name": run_name,
                # where frozen encoder outputs are kept (WorkPaths.encoder_cache), or None: computed every time
                "encoder_cache": str(Path(encoder_cache).resolve()) if encoder_cache else None,
                "recipe": recipe,
                # with epochs the workers count the steps; a max_steps beside it would contradict them
                "train": cfg.model_dump(mode="json", exclude={"max_steps"} if cfg.epochs else None),
            },
            indent=2,
        ),
    )
    if node_rank == 0:
        paths.summary.unlink(missing_ok=True)
        shutil.rmtree(paths.errors, ignore_errors=True)
    return args


def _clear_stale_checkpoints(cfg: TrainConfig, paths: TrainPaths) -> None:
    """Resume only what this run would continue: same settings, and not already finished."""
    ckpt = checkpoint.latest(paths)
    if ckpt is None:
        return
    state = checkpoint.read_state(ckpt)
    why = None
    if not cfg.resume:
        why = "train.resume is off"
    elif state.get("settings") != checkpoint.resume_key(cfg, cfg.world_size):
        why = "they were written with other settings"
    elif cfg.epochs is None and state.get("step", 0) >= cfg.max_steps:  # with epochs, the trainer counts
        why = "their run already finished"
    if why:
        console.print(f"train: starting afresh; removing the checkpoints in {paths.checkpoints} ({why})")
        shutil.rmtree(paths.checkpoints)
    else:
        console.print(f"train: resuming from {ckpt} (step {state['step']} of {cfg.max_steps})")


def torchrun_command(cfg: TrainConfig, args_path: Path) -> list[str]:
    if cfg.nnodes == 1:
        where = ["--standalone"]
    else:
        # c10d: the torchrun on the endpoint's host serves the rendezvous, and the ranks follow the order the
        # rendezvous gives the nodes (not --node-rank, which only a static rendezvous reads)
        where = [
            f"--nnodes={cfg.nnodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={cfg.rdzv_endpoint}",
            f"--rdzv_id={cfg.rdzv_id}",
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *where,
        f"--nproc_per_node={cfg.nproc_per_node}",
        "-m",
        "stages.train.worker",
        "--args",
        str(args_path),
    ]


def worker_env(nproc_per_node: int = 1) -> dict:
    # The environment passes through unchanged (SPLSM_FLOW_RUN_ID, CUDA_VISIBLE_DEVICES, HF_* ...); we only
    # make sure the workers import this checkout of the project.
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    if nproc_per_node > 1:
        # torchrun's own choice for several workers, made here so that it does not print a banner about it
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def train(
    cfg: TrainConfig,
    whisper_dir: Path,
    llm_dir: Path,
    examples: Path,
    out: TrainPaths | Path,
    run_name: str | None = None,
    node_rank: int = 0,
    encoder_cache: Path | None = None,
    recipe: str | None = None,
) -> dict:
    """Run torchrun with ``cfg.nproc_per_node`` workers (on node ``node_rank`` of ``cfg.nnodes``); return rank
    0's summary. Raises TrainError.

    A rerun after a crash or a stop resumes from the latest resumable checkpoint.
    """
    paths = out if isinstance(out, TrainPaths) else TrainPaths(Path(out))
    if not 0 <= node_rank < cfg.nnodes:
        raise TrainError(f"train: node rank {node_rank} is not one of 0..{cfg.nnodes - 1} (train.nnodes)")
    cmd = torchrun_command(
        cfg,
        write_args(cfg, whisper_dir, llm_dir, examples, paths, run_name, node_rank, encoder_cache, recipe),
    )
    console.print(f"train: {' '.join(cmd)}", markup=False, highlight=False)
    if cfg.nnodes > 1:
        console.print(
            f"train: node {node_rank} of {cfg.nnodes}, waiting for the others at {cfg.rdzv_endpoint}; the "
            "steps show on the node the rendezvous gives rank 0",
            markup=False,
            highlight=False,
        )
    bar = progress()
    task = bar.add_task("train", total=cfg.max_steps, status="")

    def on_line(line: str) -> None:  # the workers' lines on our console; the step lines move the bar
        m = STEP_LINE.match(line)
        if m:
            bar.update(
                task, completed=int(m.group(1)), total=int(m.group("total")), status=f"loss {m.group(3)}"
            )
        bar.console.print(line, markup=False, highlight=False)

    child = Child(cmd, env=worker_env(cfg.nproc_per_node), cwd=REPO_ROOT, on_line=on_line, keep=TAIL_LINES)
    with bar, _sigterm_raises():
        child.start()
        try:
            rc = child.wait(timeout=cfg.timeout_s)
        except subprocess.TimeoutExpired:
            child.stop(cfg.stop_grace_s)
            raise TrainError(
                f"train: torchrun ran past timeout_s={cfg.timeout_s}s and was stopped (a rerun resumes from "
                f"its latest checkpoint); last lines:\n" + "\n".join(child.tail())
            ) from None
        except BaseException:
            child.stop(cfg.stop_grace_s)
            raise
    tail = child.tail()
    if rc != 0:
        ckpt = checkpoint.latest(paths)
        resume = f"A rerun resumes from {ckpt}.\n" if ckpt is not None else ""
        raise TrainError(
            f"train: torchrun exited with status {rc}.\n{resume}{_worker_errors(paths)}"
            f"Last {len(tail)} lines of its output:\n" + "\n".join(tail)
        )
    if not paths.summary.is_file() or not paths.checkpoint.is_dir():
        raise TrainError(
            f"train: torchrun exited 0 but wrote no summary/checkpoint in {paths.dir}; last lines:\n"
            + "\n".join(tail)
        )
    return json.loads(paths.summary.read_text())


class Terminated(BaseException):
    """SIGTERM reached the stage's process while torchrun ran."""


@contextmanager
def _sigterm_raises():
    """While torchrun runs, SIGTERM to this process (a cancelled flow run, a stopped container) becomes an
    exception, so that the workers, in a session of their own, are stopped and checkpoint rather than orphaned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated(f"train: stopped by signal {signum}; a rerun resumes from the latest checkpoint")

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker_errors(paths: TrainPaths) -> str:
    """The workers' own exceptions (written by ``stages.train.worker``), the root cause of a failed run, first."""
    parts = []
    for f in sorted(paths.errors.glob("rank*.txt")):
        lines = f.read_text().strip().splitlines()
        parts.append(
            f"worker {f.stem} failed with {lines[-1] if lines else 'no message'}\n"
            + "\n".join(lines[-12:])
            + "\n"
        )
    return "".join(parts)
