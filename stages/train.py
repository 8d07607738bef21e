"""Train: fine-tune the LSM on the examples table with torchrun, one process per device.

``train()`` is the plain function: it writes the run's arguments to ``OUT/train_args.json`` and
launches ``python -m torch.distributed.run --standalone --nproc_per_node N -m stages.train --worker
OUT/train_args.json``, streaming the workers' output under a progress bar. ``worker()`` is what each
process runs: one visible training loop in the nanoGPT manner (``Trainer``), under DDP or, by config,
FSDP2 with every LLM decoder layer its own shard unit. Rank 0 logs every optimizer step to
``OUT/metrics.jsonl``, TensorBoard event files (``OUT/tensorboard``) and ``OUT/loss.png``.

Every ``checkpoint_every`` steps, and when SIGTERM or SIGINT arrives, the workers finish the step under
way and write ``OUT/checkpoints/step-N`` (model, optimizer, scheduler, each rank's RNG states and the
data position); a rerun with the same settings resumes from the latest one on the same trajectory.
At the end rank 0 saves a Hugging Face checkpoint (config, safetensors, tokenizer, feature extractor)
to ``OUT/checkpoint`` atomically. ``run()`` is the stage wrapper.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from contextlib import contextmanager, nullcontext
from pathlib import Path

from splsm.config import ExperimentConfig, TrainConfig
from splsm.log import console, progress
from splsm.stage import REPO_ROOT, Artifact, StageResult, run_stage

CODE_FILES = [
    "stages/train.py",
    "stages/model.py",
    "stages/loader.py",
    "splsm/features.py",
    "splsm/audio.py",
    "schemas/__init__.py",
]
TAIL_LINES = 80
STEP_LINE = re.compile(r"^step (\d+)/\d+ \| epoch \d+ \| loss (\S+)")


class TrainError(RuntimeError):
    """The torchrun workers failed; the message carries the tail of their output."""


# ----------------------------------------------------------------------------------------------------
# the launcher (runs in the stage's process)


STOPPED_EXIT = 3  # a worker's exit status when a signal stopped it after it wrote a resumable checkpoint


def write_args(cfg: TrainConfig, whisper_dir: Path, llm_dir: Path, examples: Path, out_dir: Path) -> Path:
    """OUT/train_args.json, what every worker reads; resumable checkpoints of other settings are cleared."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale_checkpoints(cfg, out_dir)
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
    return args_path


def _clear_stale_checkpoints(cfg: TrainConfig, out_dir: Path) -> None:
    """Resume only what this run would continue: same settings, and not already finished."""
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        return
    state = json.loads((ckpt / "trainer_state.json").read_text())
    why = None
    if not cfg.resume:
        why = "train.resume is off"
    elif state.get("settings") != resume_key(cfg, cfg.nproc_per_node):
        why = "they were written with other settings"
    elif state.get("step", 0) >= cfg.max_steps:
        why = "their run already finished"
    if why:
        console.print(
            f"train: starting afresh; removing the checkpoints in {out_dir / 'checkpoints'} ({why})"
        )
        shutil.rmtree(out_dir / "checkpoints")
    else:
        console.print(f"train: resuming from {ckpt} (step {state['step']} of {cfg.max_steps})")


def torchrun_command(cfg: TrainConfig, args_path: Path) -> list[str]:
    return [
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


def worker_env() -> dict:
    # The environment passes through unchanged (SPLSM_FLOW_RUN_ID, CUDA_VISIBLE_DEVICES, HF_* ...); we only
    # make sure the workers import this checkout of the project.
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def train(cfg: TrainConfig, whisper_dir: Path, llm_dir: Path, examples: Path, out_dir: Path) -> dict:
    """Run torchrun with ``cfg.nproc_per_node`` workers; return rank 0's summary. Raises TrainError.

    A rerun after a crash or a stop resumes from the latest resumable checkpoint in OUT/checkpoints.
    """
    out_dir = Path(out_dir)
    args_path = write_args(cfg, whisper_dir, llm_dir, examples, out_dir)
    cmd = torchrun_command(cfg, args_path)
    console.print(f"train: {' '.join(cmd)}", markup=False, highlight=False)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    bar = progress()
    task = bar.add_task("train", total=cfg.max_steps, status="")

    def pump() -> None:  # stream the workers' lines to our console, keeping the last ones for errors
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            m = STEP_LINE.match(line)
            if m:
                bar.update(task, completed=int(m.group(1)), status=f"loss {m.group(2)}")
            bar.console.print(line, markup=False, highlight=False)

    reader = threading.Thread(target=pump, daemon=True)
    with bar, _sigterm_raises():
        reader.start()
        try:
            rc = proc.wait(timeout=cfg.timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc, cfg.stop_grace_s)
            reader.join(timeout=5)
            raise TrainError(
                f"train: torchrun ran past timeout_s={cfg.timeout_s}s and was stopped (a rerun resumes from "
                f"its latest checkpoint); last lines:\n" + "\n".join(tail)
            ) from None
        except BaseException:
            _stop(proc, cfg.stop_grace_s)
            raise
        reader.join(timeout=30)
    if rc != 0:
        ckpt = latest_checkpoint(out_dir)
        resume = f"A rerun resumes from {ckpt}.\n" if ckpt is not None else ""
        raise TrainError(
            f"train: torchrun exited with status {rc}.\n{resume}{_worker_errors(out_dir)}"
            f"Last {len(tail)} lines of its output:\n" + "\n".join(tail)
        )
    summary_path = out_dir / "summary.json"
    if not summary_path.is_file() or not (out_dir / "checkpoint").is_dir():
        raise TrainError(
            f"train: torchrun exited 0 but wrote no summary/checkpoint in {out_dir}; last lines:\n"
            + "\n".join(tail)
        )
    return json.loads(summary_path.read_text())


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


def _stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop torchrun and its workers: the process group we started for them, and nothing else. SIGTERM first,
    so that the workers finish their step and write a resumable checkpoint; SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
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


# -- resumable checkpoints: OUT/checkpoints/step-NNNNNNNN/
#    model.safetensors       trainable parameters and the connector (the pretrained parts come from their dirs)
#    optimizer.safetensors   optimizer tensors, keyed "<parameter name>::<state name>"; optimizer.json the rest
#    scheduler.json          the LR scheduler's state
#    rng-rank{R}.safetensors / rng-rank{R}.json   torch (+cuda) / python and numpy RNG states of each rank
#    loader-rank{R}.json     each rank's data position (ExampleLoader.state_dict: epoch, batches delivered)
#    trainer_state.json      step, rank 0's data position (epoch, batch within the epoch), samples seen, settings
# Tensors go to safetensors and everything else to JSON, so resuming unpickles nothing.

# Settings that change how long or how often, not what is trained: a checkpoint resumes across them.
RESUME_EXEMPT = {"timeout_s", "checkpoint_every", "keep_checkpoints", "resume", "tensorboard", "stop_grace_s"}


def resume_key(cfg: TrainConfig, world: int) -> dict:
    return {"world_size": world, **cfg.model_dump(mode="json", exclude=RESUME_EXEMPT)}


def latest_checkpoint(out_dir: Path) -> Path | None:
    done = sorted(
        p for p in (Path(out_dir) / "checkpoints").glob("step-*") if (p / "trainer_state.json").is_file()
    )
    return done[-1] if done else None


def flatten_optimizer(osd: dict) -> tuple[dict, dict]:
    """An optimizer state dict keyed by parameter name -> (tensors for safetensors, the rest for JSON)."""
    import torch

    tensors, rest = {}, {}
    for name, state in osd.get("state", {}).items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}::{k}"] = v.detach().cpu().contiguous()
            else:
                rest.setdefault(name, {})[k] = v
    return tensors, {"state": rest, "param_groups": osd.get("param_groups", [])}


def unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, t in tensors.items():
        name, _, k = key.rpartition("::")
        state.setdefault(name, {})[k] = t
    for name, extra in meta["state"].items():
        state.setdefault(name, {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict, dict]:
    import random

    import numpy as np
    import torch

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return tensors, {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
    }


def set_rng_state(tensors: dict, meta: dict) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def saved_names(model) -> set[str]:
    """What a resumable checkpoint holds: every trainable parameter, and the connector whole."""
    return {
        n for n, p in model.named_parameters() if p.requires_grad or not n.startswith(("encoder.", "llm."))
    }


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def decoder_layers(llm) -> list:
    """The LLM's decoder layers (its ``_no_split_modules`` classes): the units FSDP shards."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"fsdp: no decoder layers ({sorted(names)}) found in {type(base).__name__}")
    return layers


class Trainer:
    """One process's training loop (``worker`` builds it): model, optimizer, data position, checkpoints."""

    def __init__(self, a: dict):
        import torch
        import torch.distributed as dist
        from transformers import AutoTokenizer, WhisperFeatureExtractor

        from stages.loader import ExampleLoader
        from stages.model import LSMForConditionalGeneration, part_flags

        self.cfg = cfg = TrainConfig.model_validate(a["train"])
        self.out_dir = Path(a["out_dir"])
        self.args = a
        # torchrun gives each process its RANK / WORLD_SIZE / LOCAL_RANK
        self.rank, self.world, self.local_rank = (
            int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        )
        self.master = self.rank == 0
        if cfg.backend == "nccl":
            if not torch.cuda.is_available():
                raise RuntimeError("train.backend is nccl but no CUDA device is visible; use gloo on CPU")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        dist.init_process_group(backend=cfg.backend)

        # data first (a bad table fails fast): the train split streamed by the build stage's loader, each rank
        # its own disjoint part; features padded to the encoder's chunk (30 s, or a tiny Whisper's shorter one)
        fe = WhisperFeatureExtractor.from_pretrained(a["whisper_dir"])
        self.loader = ExampleLoader(
            a["examples"],
            split="train",
            rank=self.rank,
            world_size=self.world,
            seed=cfg.seed,
            tokenizer=AutoTokenizer.from_pretrained(a["llm_dir"]),
            max_batch_size=cfg.batch_size,
            batch_seconds=cfg.loader.batch_seconds,
            num_workers=cfg.loader.num_workers,
            shuffle_buffer=cfg.loader.shuffle_buffer,
            bucket_batches=cfg.loader.bucket_batches,
            prefetch_batches=cfg.loader.prefetch_batches,
            n_mels=fe.feature_size,
            chunk_s=fe.chunk_length,
            pin_memory=self.device.type == "cuda",
        )
        self.n_rows = sum(u.rows for u in self.loader.units)
        self.say(
            f"data: {self.n_rows} train rows; up to {cfg.batch_size * cfg.grad_accum * self.world} samples per "
            f"optimizer step ({cfg.batch_size} x {cfg.grad_accum} accumulation x {self.world} processes; batches "
            f"of similar durations, at most {cfg.loader.batch_seconds:.0f} s of padded audio each)"
        )

        # model: the same seed on every rank builds the same connector (DDP also broadcasts rank 0's weights)
        torch.manual_seed(cfg.seed)
        model = LSMForConditionalGeneration.from_parts(
            a["whisper_dir"], a["llm_dir"], cfg.qformer, **part_flags(cfg)
        )
        self.resumed_from = latest_checkpoint(self.out_dir) if cfg.resume else None
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples_seen": 0}
        if self.resumed_from is not None:
            self._load_model(model, self.resumed_from)
        model.to(self.device)
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("train: every part of the model is frozen; nothing would train")
        n_train, n_all = sum(p.numel() for p in self.params), sum(p.numel() for p in model.parameters())
        self.n_train = n_train
        self.say(
            f"model: {n_train / 1e6:.2f}M trainable of {n_all / 1e6:.2f}M parameters; {model.num_windows} "
            f"windows of {model.kernel} frames, {cfg.qformer.num_queries} queries each; {cfg.strategy}"
        )
        self.wrapped = self._wrap(model)
        # Weight decay on matrices only; norms, biases and other vectors are not decayed (as nanoGPT, SALMONN).
        self.params = [p for p in model.parameters() if p.requires_grad]  # FSDP replaced them with DTensors
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.999),
            fused=self.device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_at(step, cfg) / cfg.lr if cfg.lr else 0.0
        )
        # From here on each rank draws its own numbers (dropout masks differ across ranks, as they should);
        # a resumed run restores these streams from the checkpoint just before its first step.
        import random

        import numpy as np

        torch.manual_seed(cfg.seed * 1_000 + self.rank)
        random.seed(cfg.seed * 1_000 + self.rank)
        np.random.seed(cfg.seed * 1_000 + self.rank)
        if self.resumed_from is not None:
            self._load_training_state(self.resumed_from)
            self.say(f"resumed from {self.resumed_from} at step {self.state['step']}")
        # bf16 autocast only on CUDA: CPU autocast would be slow and is not what the recipe runs.
        self.amp = cfg.bf16 and self.device.type == "cuda"

    def say(self, msg: str) -> None:
        if self.master:
            print(msg, flush=True)

    def _wrap(self, model):
        import torch

        if self.cfg.strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            mp = MixedPrecisionPolicy()
            if self.cfg.bf16 and self.device.type == "cuda":
                mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for layer in decoder_layers(model.llm):
                fully_shard(layer, mesh=mesh, mp_policy=mp)
            fully_shard(
                model, mesh=mesh, mp_policy=mp
            )  # the rest (encoder, connector, embeddings) as one unit
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP all-reduces only parameters that require grad. Every trainable parameter takes part in every
        # forward, so no unused-parameter search.
        return DDP(
            model,
            device_ids=[self.local_rank] if self.device.type == "cuda" else None,
            find_unused_parameters=False,
        )

    # -- checkpoints

    def _load_model(self, model, ckpt: Path) -> None:
        from safetensors.torch import load_file

        state = json.loads((ckpt / "trainer_state.json").read_text())
        want = resume_key(self.cfg, self.world)
        if state["settings"] != want:
            diff = sorted(k for k in want if state["settings"].get(k) != want[k])
            raise RuntimeError(f"checkpoint {ckpt} was written with other settings ({', '.join(diff)})")
        sd = load_file(ckpt / "model.safetensors")
        missing = saved_names(model) - sd.keys()
        if missing:
            raise RuntimeError(f"checkpoint {ckpt}: model.safetensors lacks {sorted(missing)[:5]}")
        result = model.load_state_dict(sd, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"checkpoint {ckpt}: unexpected parameters {result.unexpected_keys[:5]}")
        self.state = {k: state[k] for k in ("step", "epoch", "batch_in_epoch", "samples_seen")}

    def _load_training_state(self, ckpt: Path) -> None:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        osd = unflatten_optimizer(
            load_file(ckpt / "optimizer.safetensors"), json.loads((ckpt / "optimizer.json").read_text())
        )
        set_optimizer_state_dict(
            self.model, self.optimizer, osd, options=StateDictOptions(full_state_dict=True)
        )
        self.scheduler.load_state_dict(json.loads((ckpt / "scheduler.json").read_text()))
        self.loader.load_state_dict(json.loads((ckpt / f"loader-rank{self.rank}.json").read_text()))
        self.rng_to_restore = ckpt

    def full_model_state(self) -> dict:
        """Every parameter, gathered whole on rank 0 (a collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def save_resumable(self) -> Path:
        """Write OUT/checkpoints/step-N whole or not at all (a collective: every rank calls it)."""
        import torch.distributed as dist
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        step = self.state["step"]
        root = self.out_dir / "checkpoints"
        final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
        msd = self.full_model_state()
        osd = get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.master:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        tensors, meta = rng_state()
        save_file(tensors, tmp / f"rng-rank{self.rank}.safetensors")
        _write_json(tmp / f"rng-rank{self.rank}.json", meta)
        # each rank's own data position: ranks may cut their parts into different numbers of batches
        _write_json(tmp / f"loader-rank{self.rank}.json", self.loader.state_dict())
        if self.master:
            keep = saved_names(self.model)
            save_file({k: v.contiguous() for k, v in msd.items() if k in keep}, tmp / "model.safetensors")
            o_tensors, o_meta = flatten_optimizer(osd)
            save_file(o_tensors, tmp / "optimizer.safetensors")
            _write_json(tmp / "optimizer.json", o_meta)
            _write_json(tmp / "scheduler.json", self.scheduler.state_dict())
            _write_json(
                tmp / "trainer_state.json", {**self.state, "settings": resume_key(self.cfg, self.world)}
            )
        dist.barrier()
        if self.master:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            done = sorted(root.glob("step-*"))
            for old in done[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def save_final(self) -> Path:
        """The Hugging Face checkpoint at OUT/checkpoint (rank 0 writes it atomically; a collective)."""
        msd = self.full_model_state() if self.cfg.strategy == "fsdp" else None
        final = self.out_dir / "checkpoint"
        if self.master:
            tmp = self.out_dir / f".checkpoint.tmp-{uuid.uuid4().hex}"
            if msd is None:
                self.model.save_pretrained(tmp)
            else:
                self._save_unsharded(msd, tmp)
            old = self.out_dir / f".checkpoint.old-{uuid.uuid4().hex}"
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _save_unsharded(self, msd: dict, tmp: Path) -> None:
        # The FSDP model's parameters are shards; a fresh model on rank 0 takes the gathered ones and saves.
        from stages.model import LSMForConditionalGeneration, part_flags

        a = self.args
        fresh = LSMForConditionalGeneration.from_parts(
            a["whisper_dir"], a["llm_dir"], self.cfg.qformer, **part_flags(self.cfg)
        )
        fresh.load_state_dict(msd, strict=True)
        fresh.save_pretrained(tmp)

    # -- the data: an endless stream whose position (epoch, batches delivered) a checkpoint holds per rank

    def batches(self):
        from stages.model import SpeechBatch

        while True:  # the loader moves on to the next epoch at the end of each pass
            got = False
            for b in self.loader:
                got = True
                self.skipped += b["skipped"]  # unreadable clips: each also a warning naming the file
                self.state["epoch"] = self.loader.epoch
                self.state["batch_in_epoch"] = sum(self.loader.consumed)
                batch = SpeechBatch(
                    b["input_features"], b["durations"], b["prefix_ids"], b["suffix_ids"], b["answer_ids"]
                )
                yield self.loader.epoch, batch.to(self.device)
            if not got:  # a whole pass without one batch would loop here forever: say why instead
                raise RuntimeError(
                    f"[rank {self.rank}] no training batch in a whole pass over the data: {self.n_rows} train "
                    f"rows for {self.world} processes, {self.skipped} clips unreadable (see the warnings)"
                )

    def tokens(self, batch) -> int:
        """Real (unpadded) LLM positions of a batch: prompt, speech tokens and answer."""
        return sum(
            len(p) + self.model.num_speech_tokens(float(d)) + len(s) + len(a)
            for p, d, s, a in zip(
                batch.prefix_ids, batch.durations_s, batch.suffix_ids, batch.answer_ids, strict=True
            )
        )

    # -- the loop

    def fit(self) -> dict:
        import torch
        import torch.distributed as dist
        from safetensors.torch import load_file

        cfg, model = self.cfg, self.model
        stop = {"signal": 0}

        def on_signal(signum, frame):  # finish the step under way, checkpoint, then exit
            stop["signal"] = signum

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.skipped = 0
        stream = self.batches()
        start_step = self.state["step"]
        writer = self._open_logs(start_step)
        if getattr(self, "rng_to_restore", None) is not None:  # last, so nothing after it draws numbers
            ckpt = self.rng_to_restore
            set_rng_state(
                load_file(ckpt / f"rng-rank{self.rank}.safetensors"),
                json.loads((ckpt / f"rng-rank{self.rank}.json").read_text()),
            )
        t_start, loss_avg, stopped = time.time(), float("nan"), 0
        for step in range(start_step, cfg.max_steps):
            t0 = time.time()
            lr = self.optimizer.param_groups[0]["lr"]
            loss_sum = torch.zeros((), device=self.device)
            counts = torch.zeros(3, device=self.device)  # samples, tokens, stop signal
            data_s = 0.0
            for micro in range(cfg.grad_accum):
                td = time.time()
                epoch, batch = next(stream)
                data_s += time.time() - td
                # Gradients are all-reduced only on the last micro-batch; the earlier ones just accumulate.
                last = micro == cfg.grad_accum - 1
                if cfg.strategy == "fsdp":
                    model.set_requires_gradient_sync(last)
                    sync = nullcontext()
                else:
                    sync = self.wrapped.no_sync() if not last else nullcontext()
                with sync:
                    amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()
                    with amp:
                        loss = self.wrapped(**batch.kwargs()).loss
                    # Mean over micro-batches: scale so the accumulated gradient is the average, not the sum.
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach() / cfg.grad_accum
                counts[0] += len(batch)
                counts[1] += self.tokens(batch)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

            # One small all-reduce: the loss averaged over ranks, throughput over all processes, and whether
            # any rank was told to stop (so that all of them stop after the same step).
            counts[2] = float(stop["signal"] != 0)
            stats = torch.cat([loss_sum.reshape(1), counts])
            dist.all_reduce(stats)
            loss_avg, step_samples, step_tokens = stats[0].item() / self.world, int(stats[1]), int(stats[2])
            stopped = stats[3].item() > 0
            self.state["step"] = step + 1
            self.state["samples_seen"] += step_samples
            dt = time.time() - t0
            if self.master:
                rec = {
                    "step": step + 1,
                    "epoch": epoch,
                    "loss": loss_avg,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "samples": self.state["samples_seen"],
                    "samples_per_s": step_samples / dt,
                    "tokens_per_s": step_tokens / dt,
                    "step_s": dt,
                    "data_s": data_s,
                }
                self.metrics.write(json.dumps(rec) + "\n")
                self.metrics.flush()
                if writer is not None:
                    for k in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s"):
                        writer.add_scalar(f"train/{k}", rec[k], step + 1)
                print(
                    f"step {step + 1}/{cfg.max_steps} | epoch {epoch} | loss {loss_avg:.4f} | lr {lr:.3e} | "
                    f"grad-norm {float(grad_norm):.3f} | {step_samples / dt:.2f} samples/s | "
                    f"{step_tokens / dt:.0f} tokens/s",
                    flush=True,
                )
            if not math.isfinite(loss_avg):
                raise RuntimeError(f"loss is {loss_avg} at step {step + 1}; stopping")
            due = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps
            if stopped or due:
                path = self.save_resumable()
                self.say(f"checkpoint: {path} (step {step + 1})")
                if self.master:
                    plot_loss(self.out_dir)
            if stopped:
                break

        skipped_t = torch.tensor(float(self.skipped), device=self.device)
        dist.all_reduce(skipped_t)
        if self.master:
            self.metrics.close()
            if writer is not None:
                writer.close()
            plot_loss(self.out_dir)
        summary = {
            "steps": self.state["step"],
            "final_loss": loss_avg,
            "samples_seen": self.state["samples_seen"],
            "train_rows": self.n_rows,
            "skipped_audio": int(skipped_t.item()),
            "world_size": self.world,
            "strategy": cfg.strategy,
            "trainable_params": self.n_train,
            "resumed_from_step": start_step,
            "seconds": time.time() - t_start,
            "flow_run_id": os.environ.get("SPLSM_FLOW_RUN_ID"),
        }
        if stopped:
            self.say(
                f"stopped by a signal after step {self.state['step']}; rerun to resume from its checkpoint"
            )
            return {**summary, "stopped": True}
        final = self.save_final()
        if self.master:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.say(f"saved {final} after {self.state['step']} steps ({summary['seconds']:.1f}s)")
        return summary

    def _open_logs(self, start_step: int):
        """Rank 0: metrics.jsonl (cut back to the resumed step) and TensorBoard event files."""
        if not self.master:
            return None
        path = self.out_dir / "metrics.jsonl"
        kept = []
        if start_step and path.is_file():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
        self.metrics = open(path, "w")
        self.metrics.writelines(ln + "\n" for ln in kept)
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise RuntimeError(
                "train.tensorboard is on but the tensorboard package is missing: pip install tensorboard"
            ) from e
        return SummaryWriter(
            str(self.out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
        )


def plot_loss(out_dir: Path) -> Path | None:
    """OUT/loss.png from OUT/metrics.jsonl (written aside, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(out_dir) / "metrics.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines() if x] if path.is_file() else []
    if not recs:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
    ax.set(xlabel="optimizer step", ylabel="loss", title="training loss")
    ax2.plot([r["step"] for r in recs], [r["lr"] for r in recs], color="tab:orange")
    ax2.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    out = Path(out_dir) / "loss.png"
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def worker(args_path: Path) -> tuple[Trainer, int]:
    """Train; returns the trainer (still alive, see ``main``) and the exit status for this process."""
    import torch.distributed as dist
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    trainer = Trainer(json.loads(Path(args_path).read_text()))
    summary = trainer.fit()
    dist.barrier()
    return trainer, STOPPED_EXIT if summary.get("stopped") else 0


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

    # How long we wait and how often we checkpoint do not change what we train: keep them out of the reuse key.
    params = cfg.train.model_dump(mode="json", exclude=RESUME_EXEMPT)
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
        # Everything is written and every rank has passed the final barrier. Leave without running any
        # destructor: freeing the trainer tears down DDP's reducer and with it the gloo process group, which
        # joins gloo's worker thread while holding the GIL, and that thread may be waiting for the GIL to free
        # a tensor (a deadlock seen on CPU runs). So the trainer stays referenced here until os._exit.
        trainer, status = worker(args.worker)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
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
