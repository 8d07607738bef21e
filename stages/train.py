"""Train: fine-tune the LSM on the examples table with torchrun (DDP), one process per device.

``train()`` is the plain function: it writes the run's arguments to ``OUT/train_args.json`` and
launches ``python -m torch.distributed.run --standalone --nproc_per_node N -m stages.train --worker
OUT/train_args.json``, streaming the workers' output. ``worker()`` is what each process runs: one
visible training loop in the nanoGPT manner. Rank 0 logs every optimizer step to
``OUT/metrics.jsonl`` and, at the end, saves a Hugging Face checkpoint (config, safetensors,
tokenizer, feature extractor) to ``OUT/checkpoint`` atomically. ``run()`` is the stage wrapper.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from contextlib import nullcontext
from pathlib import Path

from splsm.config import ExperimentConfig, TrainConfig
from splsm.log import console
from splsm.stage import REPO_ROOT, Artifact, StageResult, run_stage

CODE_FILES = ["stages/train.py", "stages/model.py", "splsm/audio.py", "schemas/__init__.py"]
TAIL_LINES = 80


class TrainError(RuntimeError):
    """The torchrun workers failed; the message carries the tail of their output."""


# ----------------------------------------------------------------------------------------------------
# the launcher (runs in the stage's process)


def train(cfg: TrainConfig, whisper_dir: Path, llm_dir: Path, examples: Path, out_dir: Path) -> dict:
    """Run torchrun with ``cfg.nproc_per_node`` workers; return rank 0's summary. Raises TrainError."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args_path = out_dir / "train_args.json"
    args_path.write_text(
        json.dumps(
            {
                "whisper_dir": str(Path(whisper_dir).resolve()),
                "llm_dir": str(Path(llm_dir).resolve()),
                "examples": str(Path(examples).resolve()),
                "out_dir": str(out_dir.resolve()),
                "train": cfg.model_dump(mode="json"),
            },
            indent=2,
        )
    )
    (out_dir / "summary.json").unlink(missing_ok=True)
    shutil.rmtree(out_dir / "errors", ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={cfg.nproc_per_node}",
        "-m",
        "stages.train",
        "--worker",
        str(args_path),
    ]
    # The environment passes through unchanged (SPLSM_FLOW_RUN_ID, CUDA_VISIBLE_DEVICES, HF_* ...); we only
    # make sure the workers import this checkout of the project.
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    console.print(f"train: {' '.join(cmd)}", markup=False, highlight=False)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )

    def pump() -> None:  # stream the workers' lines to our console, keeping the last ones for errors
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            console.print(line, markup=False, highlight=False)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        reader.join(timeout=5)
        raise TrainError(
            f"train: torchrun ran past timeout_s={cfg.timeout_s}s and was stopped; last lines:\n"
            + "\n".join(tail)
        ) from None
    except BaseException:
        _stop(proc)
        raise
    reader.join(timeout=30)
    if rc != 0:
        raise TrainError(
            f"train: torchrun exited with status {rc}.\n{_worker_errors(out_dir)}"
            f"Last {len(tail)} lines of its output:\n" + "\n".join(tail)
        )
    summary_path = out_dir / "summary.json"
    if not summary_path.is_file() or not (out_dir / "checkpoint").is_dir():
        raise TrainError(
            f"train: torchrun exited 0 but wrote no summary/checkpoint in {out_dir}; last lines:\n"
            + "\n".join(tail)
        )
    return json.loads(summary_path.read_text())


def _worker_errors(out_dir: Path) -> str:
    """The workers' own exceptions (written by ``main``), the root cause of a failed run, first."""
    parts = []
    for f in sorted((out_dir / "errors").glob("rank*.txt")):
        lines = f.read_text().strip().splitlines()
        parts.append(
            f"worker {f.stem} failed with {lines[-1] if lines else 'no message'}\n"
            + "\n".join(lines[-12:])
            + "\n"
        )
    return "".join(parts)


def _stop(proc: subprocess.Popen) -> None:
    """Stop torchrun and its workers: the process group we started for them, and nothing else."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------------------------------
# the worker (one per process under torchrun)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then linear or cosine decay to 0 at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def shard_indices(n_rows: int, epoch: int, seed: int, rank: int, world: int) -> list[int]:
    """This rank's rows for ``epoch``: one seeded permutation (the same on every rank), wrapped around to a
    multiple of ``world`` so every rank gets as many rows (and so as many steps) as the others, then
    every ``world``-th row from ``rank``."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_rows, generator=g).tolist()
    total = math.ceil(n_rows / world) * world
    perm = (perm * math.ceil(total / n_rows))[:total]
    return perm[rank::world]


def worker(args_path: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers.utils import logging as hf_logging

    from schemas import EXAMPLES, read_table
    from splsm import audio
    from stages.model import Collator, LSMForConditionalGeneration

    a = json.loads(Path(args_path).read_text())
    cfg = TrainConfig.model_validate(a["train"])
    out_dir = Path(a["out_dir"])
    hf_logging.disable_progress_bar()

    # -- distributed setup: torchrun gives each process its RANK / WORLD_SIZE / LOCAL_RANK
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    master = rank == 0
    if cfg.backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("train.backend is nccl but no CUDA device is visible; use gloo on CPU")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend=cfg.backend)

    def say(msg: str) -> None:
        if master:
            print(msg, flush=True)

    # -- data first (a bad table fails fast): the train split, read and sharded the same way on every rank
    table = read_table(a["examples"], EXAMPLES)
    rows = [r for r in table.to_pylist() if r["split"] == "train"]
    if not rows:
        raise RuntimeError(f"{a['examples']} has no rows with split == 'train'")
    per_step = cfg.batch_size * cfg.grad_accum * world
    say(
        f"data: {len(rows)} train rows; {per_step} samples per optimizer step "
        f"({cfg.batch_size} x {cfg.grad_accum} accumulation x {world} processes)"
    )

    # -- model: the same seed on every rank builds the same connector (DDP also broadcasts rank 0's weights)
    torch.manual_seed(cfg.seed)
    model = LSMForConditionalGeneration.from_parts(
        a["whisper_dir"],
        a["llm_dir"],
        cfg.qformer,
        freeze_encoder=cfg.freeze_encoder,
        freeze_llm=cfg.freeze_llm,
    )
    model.to(device)
    model.train()
    collate = Collator(model.tokenizer, model.feature_extractor)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train, n_all = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    say(
        f"model: {n_train / 1e6:.2f}M trainable of {n_all / 1e6:.2f}M parameters; "
        f"{model.num_windows} windows of {model.kernel} frames, {cfg.qformer.num_queries} queries each"
    )
    # DDP all-reduces only parameters that require grad (the frozen encoder is left alone). Every trainable
    # parameter (Q-Former, projection, LLM) takes part in every forward, so no unused-parameter search.
    ddp = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None, find_unused_parameters=False)
    # Weight decay on matrices only; norms, biases and other vectors are not decayed (as nanoGPT, SALMONN).
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.999),
        fused=device.type == "cuda",
    )
    # bf16 autocast only on CUDA: CPU autocast would be slow and is not what the recipe runs.
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda" else None

    skipped = 0

    def batches():
        """Endless stream of (epoch, batch): each epoch a fresh seeded shuffle, this rank's shard in order."""
        nonlocal skipped
        epoch = 0
        while True:
            idx = shard_indices(len(rows), epoch, cfg.seed, rank, world)
            for i in range(0, len(idx), cfg.batch_size):
                chunk = [rows[j] for j in idx[i : i + cfg.batch_size]]
                kept, clips = [], []
                for r in chunk:
                    try:
                        clips.append(audio.load(r["audio_path"], r["offset_s"], r["duration_s"]))
                        kept.append(r)
                    except audio.AudioError as e:  # harvest probed every file; warn loudly if one went away
                        skipped += 1
                        print(f"[rank {rank}] warning: skipping example {r['example_id']}: {e}", flush=True)
                if not kept:
                    raise RuntimeError(
                        f"[rank {rank}] no audio in a whole batch could be loaded; see warnings"
                    )
                yield epoch, collate(kept, clips, with_answer=True).to(device)
            epoch += 1

    stream = batches()
    metrics = open(out_dir / "metrics.jsonl", "w") if master else None  # a fresh log per run
    samples_seen, t_start, loss_avg = 0, time.time(), float("nan")

    # -- the loop: max_steps optimizer steps, each of grad_accum micro-batches per process
    for step in range(cfg.max_steps):
        t0 = time.time()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        n_samples = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            epoch, batch = next(stream)
            # Gradients are all-reduced only on the last micro-batch; the earlier ones just accumulate locally.
            last = micro == cfg.grad_accum - 1
            sync = ddp.no_sync() if not last else nullcontext()
            with sync:
                with amp if amp is not None else nullcontext():
                    loss = ddp(**batch.kwargs()).loss
                # Mean over micro-batches: scale so the accumulated gradient is the average, not the sum.
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach() / cfg.grad_accum
            n_samples += len(batch)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # Logging: the loss averaged over ranks (one small all-reduce), throughput over all processes.
        stats = torch.stack([loss_sum, n_samples])
        dist.all_reduce(stats)
        loss_avg, step_samples = stats[0].item() / world, int(stats[1].item())
        samples_seen += step_samples
        dt = time.time() - t0
        if master:
            rec = {
                "step": step + 1,
                "epoch": epoch,
                "loss": loss_avg,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "samples": samples_seen,
                "samples_per_s": step_samples / dt,
                "step_s": dt,
            }
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            print(
                f"step {step + 1}/{cfg.max_steps} | epoch {epoch} | loss {loss_avg:.4f} | lr {lr:.3e} | "
                f"grad-norm {float(grad_norm):.3f} | {step_samples / dt:.2f} samples/s",
                flush=True,
            )
        if not math.isfinite(loss_avg):
            raise RuntimeError(f"loss is {loss_avg} at step {step + 1}; stopping")

    # -- the end: rank 0 writes the checkpoint whole or not at all, the others wait for it
    skipped_t = torch.tensor(float(skipped), device=device)
    dist.all_reduce(skipped_t)
    if master:
        metrics.close()
        final = out_dir / "checkpoint"
        tmp = out_dir / f".checkpoint.tmp-{uuid.uuid4().hex}"
        model.save_pretrained(tmp)
        old = out_dir / f".checkpoint.old-{uuid.uuid4().hex}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        summary = {
            "steps": cfg.max_steps,
            "final_loss": loss_avg,
            "samples_seen": samples_seen,
            "train_rows": len(rows),
            "skipped_audio": int(skipped_t.item()),
            "world_size": world,
            "trainable_params": n_train,
            "seconds": time.time() - t_start,
            "flow_run_id": os.environ.get("SPLSM_FLOW_RUN_ID"),
        }
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        say(f"saved {final} after {cfg.max_steps} steps ({summary['seconds']:.1f}s)")
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# the stage


def run(
    cfg: ExperimentConfig,
    workdir: Path,
    whisper_dir: Path,
    llm_dir: Path,
    examples: Path,
    force: bool = False,
) -> StageResult:
    out = Path(workdir) / "train"

    def body() -> dict:
        summary = train(cfg.train, whisper_dir, llm_dir, examples, out)
        console.print(
            f"train: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
            f"{summary['samples_seen']} samples in {summary['seconds']:.1f}s"
            + (
                f", [yellow]{summary['skipped_audio']} examples skipped for missing audio[/]"
                if summary["skipped_audio"]
                else ""
            )
        )
        return summary

    # timeout_s changes how long we wait, not what we train: keep it out of the reuse key.
    params = cfg.train.model_dump(mode="json", exclude={"timeout_s"})
    return run_stage(
        "train",
        workdir,
        params,
        inputs=[
            Artifact("examples", examples, "table"),
            Artifact("whisper", whisper_dir, "model"),
            Artifact("llm", llm_dir, "model"),
        ],
        outputs=[
            Artifact("checkpoint", out / "checkpoint", "checkpoint"),
            Artifact("metrics", out / "metrics.jsonl", "file"),
        ],
        body=body,
        code_files=CODE_FILES,
        force=force,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.train", description="The torchrun worker of the train stage."
    )
    parser.add_argument("--worker", type=Path, required=True, help="train_args.json written by train()")
    args = parser.parse_args(argv)
    try:
        worker(args.worker)
    except BaseException as e:
        # Leave the traceback where the launcher finds it: torchrun's own report buries it in the output.
        rank = os.environ.get("RANK", "0")
        try:
            err_dir = Path(json.loads(args.worker.read_text())["out_dir"]) / "errors"
            err_dir.mkdir(parents=True, exist_ok=True)
            (err_dir / f"rank{rank}.txt").write_text("".join(traceback.format_exception(e)))
        except Exception:
            pass
        raise


if __name__ == "__main__":
    main()
