"""One torchrun process's training: ``setup``, ``fit``, ``cleanup``, in the torchtune manner.

``setup`` joins the process group, opens the data (the build stage's shards streamed by
``core.lsm.loader.ExampleLoader``, each rank its own part), builds the model (``core.lsm.model``) and
wraps it (DDP, or FSDP2 with every LLM decoder layer its own shard unit), makes the optimizer and
schedule, and resumes from the latest resumable checkpoint of the same settings. ``fit`` is one visible
loop in the nanoGPT manner: gradient accumulation, clipping, one small all-reduce of the step's figures,
logs on rank 0 (``stages.train.logs``), checkpoints every ``checkpoint_every`` steps and when a signal
asks to stop. ``cleanup`` closes the logs. The final Hugging Face checkpoint is written by rank 0,
whole or not at all.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from core.atomic import atomic_dir
from core.config import TrainConfig
from core.paths import TrainPaths
from stages.train import checkpoint
from stages.train.logs import TrainLogs
from stages.train.trackers import flatten, open_trackers


def _first_rows(batch, n: int):
    """The first ``n`` rows of a ``SpeechBatch``."""
    from core.lsm.batch import SpeechBatch

    cut = lambda x: None if x is None else x[:n]  # noqa: E731
    return SpeechBatch(
        batch.input_features[:n],
        batch.durations_s[:n],
        cut(batch.prefix_ids),
        cut(batch.suffix_ids),
        cut(batch.answer_ids),
        cut(batch.feature_lengths),
        cut(batch.clip_digests),
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of 0-based ``step``. cosine and linear: linear warm-up from 0 over ``warmup_steps``, then
    that decay to 0 at ``max_steps``. warmup_decay: DeepSpeed's WarmupDecayLR with its default logarithmic
    warm-up (0 at step 0, the full rate at ``warmup_steps``), then linear decay to 0 at ``max_steps``. Under
    ``ctc_schedule: restart`` the CTC warm start's steps and the answer steps after them each run the schedule
    over their own steps, as if each were a training of its own. The CTC steps' rate peaks at ``ctc_lr`` where
    that is set."""
    ctc, total = cfg.ctc_warmup_steps, cfg.max_steps
    peak = cfg.ctc_lr if step < ctc and cfg.ctc_lr is not None else cfg.lr
    if ctc and cfg.ctc_schedule == "restart":
        step, total = (step, ctc) if step < ctc else (step - ctc, total - ctc)
    if cfg.lr_schedule == "warmup_decay":
        if step < cfg.warmup_steps:
            return peak * math.log(step + 1) / math.log(cfg.warmup_steps) if cfg.warmup_steps > 1 else peak
        return peak * max(0.0, (total - step) / max(1, total - cfg.warmup_steps))
    if step < cfg.warmup_steps:
        return peak * (step + 1) / (cfg.warmup_steps + 1)
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_schedule == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(params: list, cfg: TrainConfig) -> list[dict]:
    """AdamW's groups: weight decay on matrices only (nanoGPT's and SALMONN's choice: decaying a norm's gain or a
    bias only pulls it from what it needs), or on every trainable parameter, as the reference did."""
    if cfg.weight_decay_on == "all":
        return [{"params": list(params), "weight_decay": cfg.weight_decay}]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def decoder_layers(llm) -> list:
    """The LLM's decoder layers (its ``_no_split_modules`` classes): the units FSDP shards."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"fsdp: no decoder layers ({sorted(names)}) found in {type(base).__name__}")
    return layers


class Trainer:
    """One process's training: model, optimizer, data position, checkpoints."""

    def __init__(self, args: dict):
        """``args``: what the launcher wrote (``TrainPaths.args``): the model dirs, the examples, the config."""
        self.args = args
        self.cfg = TrainConfig.model_validate(args["train"])
        self.paths = TrainPaths(Path(args["out_dir"]))
        # torchrun gives each process its RANK / WORLD_SIZE / LOCAL_RANK
        self.rank, self.world, self.local_rank = (
            int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        )
        self.master = self.rank == 0
        self.logs: TrainLogs | None = None
        self.resume_from: Path | None = None

    def say(self, msg: str) -> None:
        if self.master:
            print(msg, flush=True)

    # ------------------------------------------------------------------------------------------- setup

    def setup(self) -> Trainer:
        from transformers import AutoTokenizer, WhisperFeatureExtractor

        from core.lsm.loader import ExampleLoader
        from core.lsm.model import LSMForConditionalGeneration, part_flags

        cfg, a = self.cfg, self.args
        if cfg.backend == "nccl":
            if not torch.cuda.is_available():
                raise RuntimeError("train.backend is nccl but no CUDA device is visible; use gloo on CPU")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        dist.init_process_group(backend=cfg.backend)

        # data first (a bad table fails fast): the train split, each rank its own disjoint part; features as
        # the Whisper's own feature extractor makes them (mel bins, and its input length: 30 s, or a tiny
        # Whisper's shorter chunk)
        fe = WhisperFeatureExtractor.from_pretrained(a["whisper_dir"])
        self.loader = ExampleLoader.from_config(
            a["examples"],
            cfg.loader,
            split="train",
            rank=self.rank,
            world_size=self.world,
            seed=cfg.seed,
            tokenizer=AutoTokenizer.from_pretrained(a["llm_dir"]),
            max_batch_size=cfg.batch_size,
            n_mels=fe.feature_size,
            chunk_s=fe.chunk_length,
            pin_memory=self.device.type == "cuda",
        )
        self.n_rows = self.loader.total_rows
        self.val_loaders = self._validation_loaders(fe) if cfg.validation.every else {}
        if cfg.epochs is not None:
            # Every rank counts the same plan, so all agree on the step count without talking.
            per_epoch = [
                -(-max(self.loader.batches_per_rank(e)) // cfg.grad_accum) for e in range(cfg.epochs)
            ]
            self.cfg = cfg = cfg.model_copy(update={"max_steps": sum(per_epoch)})
            self.say(f"data: {cfg.epochs} epochs are {cfg.max_steps} optimizer steps ({per_epoch} per epoch)")
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
        if cfg.init_from is not None:  # first: a resumed run's checkpoint then replaces what it trained
            n = checkpoint.init_from(model, cfg.init_from)
            self.say(f"model: {n} tensors from {cfg.init_from} (train.init_from)")
        self.resume_from = checkpoint.latest(self.paths) if cfg.resume else None
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples_seen": 0}
        if self.resume_from is not None:
            self.state = checkpoint.load_model(
                model, self.resume_from, checkpoint.resume_key(cfg, self.world)
            )
        model.to(self.device)
        model.train()
        # Under FSDP a kept prefix on one rank would skip the decoder layers' all-gathers that the others run.
        model.reuse_prefix_states = cfg.strategy != "fsdp"
        self.encoder_cache = None
        if a.get("encoder_cache") and cfg.encoder_cache and cfg.freeze_encoder:
            from core.lsm.encoder_cache import for_model

            amp = cfg.bf16 and self.device.type == "cuda"  # the encoder then computes in bfloat16
            self.encoder_cache = for_model(
                model, a["encoder_cache"], pad_to=self.loader.pad_to, dtype=torch.bfloat16 if amp else None
            )
            model.use_encoder_cache(self.encoder_cache)
        self.model = model
        n_all = sum(p.numel() for p in model.parameters())
        self.n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.say(
            f"model: {self.n_train / 1e6:.2f}M trainable of {n_all / 1e6:.2f}M parameters; "
            f"{model.window_summary()}, {cfg.qformer.num_queries} queries each; {cfg.strategy}"
        )
        self.wrapped = self._wrap(model)

        self.params = [p for p in model.parameters() if p.requires_grad]  # after FSDP: its DTensors
        self.optimizer = torch.optim.AdamW(
            param_groups(self.params, cfg),
            lr=cfg.lr,
            betas=(0.9, 0.999),
            fused=self.device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_at(step, cfg) / cfg.lr if cfg.lr else 0.0
        )
        # From here on each rank draws its own numbers (dropout masks differ across ranks, as they should);
        # a resumed run restores these streams from the checkpoint just before its first step.
        torch.manual_seed(cfg.seed * 1_000 + self.rank)
        random.seed(cfg.seed * 1_000 + self.rank)
        np.random.seed(cfg.seed * 1_000 + self.rank)
        if self.resume_from is not None:
            self._load_training_state(self.resume_from)
            self.say(f"resumed from {self.resume_from} at step {self.state['step']}")
        # bf16 autocast only on CUDA: CPU autocast would be slow and is not what the recipe runs.
        self.amp = cfg.bf16 and self.device.type == "cuda"
        return self

    def _validation_loaders(self, fe) -> dict:
        """Per ``train.validation`` split, this rank's part of its rows (the same rows at every validation); a
        split without rows is said once and left out."""
        from transformers import AutoTokenizer

        from core.lsm.loader import ExampleLoader

        cfg, a = self.cfg, self.args
        loaders = {}
        for split in cfg.validation.splits:
            try:
                loaders[split] = ExampleLoader(
                    a["examples"],
                    split=split,
                    rank=self.rank,
                    world_size=self.world,
                    seed=cfg.seed,
                    tokenizer=AutoTokenizer.from_pretrained(a["llm_dir"]),
                    max_batch_size=cfg.batch_size,
                    batch_seconds=cfg.loader.batch_seconds,
                    n_mels=fe.feature_size,
                    chunk_s=fe.chunk_length,
                )
            except ValueError as e:  # no rows of this split
                self.say(f"validation: split {split!r} is not validated: {e}")
        if loaders:
            self.say(
                f"validation: every {cfg.validation.every} steps on "
                + ", ".join(
                    f"{s} ({min(v.total_rows, cfg.validation.max_rows)} rows)" for s, v in loaders.items()
                )
            )
        best = checkpoint.read_best(self.paths)
        self.best_loss = best["own"] if best else math.inf
        return loaders

    @torch.no_grad()
    def validate(self) -> None:
        """Each validation split's answer-token losses with own, swapped and zeroed speech (``core.lsm.probes``),
        summed over the ranks; logged, and the best checkpoint kept. A collective: every rank calls it."""
        from core.lsm.probes import SpeechProbe, probe_batch

        variants = ("own", "swapped", "zeroed")
        cfg, step = self.cfg, self.state["step"]
        self.model.eval()  # no dropout: the same rows give the same figures
        first = None
        for split, loader in self.val_loaders.items():
            cap = -(-cfg.validation.max_rows // self.world)  # this rank's share of the split's first rows
            loader.set_epoch(0)
            batches, rows = [], 0
            for b in loader:
                if rows >= cap:
                    break
                batch = b["batch"]
                keep = min(len(batch), cap - rows)
                if keep < len(batch):
                    batch = _first_rows(batch, keep)
                batches.append(batch.to(self.device))
                rows += len(batch)
            # Under FSDP every rank must run as many forward passes (each gathers the layers' shards): a rank with
            # fewer batches repeats its last one without counting it.
            runs = len(batches)
            if cfg.strategy == "fsdp":
                n = torch.tensor([len(batches), -len(batches)], device=self.device)
                dist.all_reduce(n, op=dist.ReduceOp.MAX)
                runs = int(n[0]) if n[1] < 0 else 0  # a rank without a batch: nobody runs (all know it)
            probe, uncounted = SpeechProbe(), SpeechProbe()
            amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()
            for i in range(runs):
                with amp:
                    into = probe if i < len(batches) else uncounted
                    probe_batch(self.model, batches[min(i, len(batches) - 1)], into, variants)
            probe.all_reduce(variants)
            rows_t = torch.tensor(float(rows), device=self.device)
            dist.all_reduce(rows_t)
            rec = {"step": step, "validation": split, "rows": int(rows_t.item()), **probe.summary()}
            first = first or rec
            if self.logs is not None:
                self.logs.validation(rec)
        self.model.train()
        if first is not None and cfg.validation.keep_best and first.get("own", math.inf) < self.best_loss:
            self.best_loss = first["own"]
            self.save_best(first)

    def save_best(self, rec: dict) -> None:
        """OUT/best: this step's Hugging Face checkpoint and its validation figures (a collective)."""
        self._save_hf(self.paths.best, {self.paths.best_record.name: json.dumps(rec, indent=2)})
        self.say(f"validation: best so far at step {rec['step']} ({rec['validation']} loss {rec['own']:.4f})")

    def _wrap(self, model):
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
        # forward, so no unused-parameter search; but a CTC warm-up step leaves a trainable LLM out, and an answers
        # step leaves out a CTC head that neither ctc_mix nor ctc_weight reads.
        q = self.cfg.qformer
        idle_head = q.ctc_logits == "head" and not q.ctc_mix and not self.cfg.ctc_weight
        return DDP(
            model,
            device_ids=[self.local_rank] if self.device.type == "cuda" else None,
            find_unused_parameters=(self.cfg.ctc_warmup_steps > 0 and not self.cfg.freeze_llm) or idle_head,
        )

    def _load_training_state(self, ckpt: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            self.model,
            self.optimizer,
            checkpoint.load_optimizer(ckpt),
            options=StateDictOptions(full_state_dict=True),
        )
        self.scheduler.load_state_dict(checkpoint.load_scheduler(ckpt))
        self.loader.load_state_dict(checkpoint.load_loader(ckpt, self.rank))

    # ------------------------------------------------------------------------------------- checkpoints

    def full_model_state(self) -> dict:
        """Every parameter, gathered whole on rank 0 (a collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def save_resumable(self) -> Path:
        """Write OUT/checkpoints/step-N whole or not at all (a collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        step = self.state["step"]
        final, tmp = self.paths.step(step), checkpoint.staging(self.paths, step)
        msd = self.full_model_state()
        osd = get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.master:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        dist.barrier()
        checkpoint.write_rank(tmp, self.rank, self.loader.state_dict())
        if self.master:
            state = {**self.state, "settings": checkpoint.resume_key(self.cfg, self.world)}
            if self.logs is not None:  # the tracker runs a resumed run continues
                state["trackers"] = self.logs.run_ids()
            keep = checkpoint.saved_names(self.model)
            checkpoint.write_shared(tmp, msd, keep, osd, self.scheduler.state_dict(), state)
        dist.barrier()
        if self.master:
            checkpoint.publish(tmp, final, self.cfg.keep_checkpoints)
        dist.barrier()
        return final

    def save_final(self) -> Path:
        """The Hugging Face checkpoint at OUT/checkpoint (rank 0 writes it atomically; a collective)."""
        return self._save_hf(self.paths.checkpoint)

    def _save_hf(self, dest: Path, extra: dict[str, str] | None = None) -> Path:
        """The whole model as a Hugging Face checkpoint at ``dest`` (and ``extra`` files beside it, and the run's
        ``recipe.json``), written by rank 0 whole or not at all; a collective (under FSDP every rank gathers)."""
        from core.recipe import RECIPE_FILE

        if self.args.get("recipe"):
            extra = {**(extra or {}), RECIPE_FILE: self.args["recipe"]}
        msd = self.full_model_state() if self.cfg.strategy == "fsdp" else None
        if self.master:
            with atomic_dir(dest) as tmp:
                if msd is None:
                    self.model.save_pretrained(tmp)
                else:
                    self._save_unsharded(msd, tmp)
                for name, text in (extra or {}).items():
                    (tmp / name).write_text(text)
        return dest

    def _save_unsharded(self, msd: dict, tmp: Path) -> None:
        # The FSDP model's parameters are shards; a fresh model on rank 0 takes the gathered ones and saves.
        from core.lsm.model import LSMForConditionalGeneration, part_flags

        a = self.args
        fresh = LSMForConditionalGeneration.from_parts(
            a["whisper_dir"], a["llm_dir"], self.cfg.qformer, **part_flags(self.cfg)
        )
        fresh.load_state_dict(msd, strict=True)
        fresh.save_pretrained(tmp)

    # ---------------------------------------------------------------------------------------- the data

    def batches(self):
        """An endless stream of (epoch, batch); its position (epoch, batches delivered) a checkpoint holds."""
        while True:  # the loader moves on to the next epoch at the end of each pass
            got = False
            for b in self.loader:
                got = True
                self.skipped += b["skipped"]  # unreadable clips: each also a warning naming the file
                self.state["epoch"] = self.loader.epoch
                self.state["batch_in_epoch"] = sum(self.loader.consumed)
                yield self.loader.epoch, b["batch"].to(self.device)
            if not got:  # a whole pass without one batch would loop here forever: say why instead
                raise RuntimeError(
                    f"[rank {self.rank}] no training batch in a whole pass over the data: {self.n_rows} train "
                    f"rows for {self.world} processes, {self.skipped} clips unreadable (see the warnings)"
                )

    def tokens(self, batch) -> int:
        """Real (unpadded) LLM positions of a batch: prompt, speech tokens and answer."""
        speech = self.model.speech_token_counts(batch.durations_s)
        return sum(
            len(p) + n + len(s) + len(a)
            for p, n, s, a in zip(batch.prefix_ids, speech, batch.suffix_ids, batch.answer_ids, strict=True)
        )

    # ---------------------------------------------------------------------------------------- the logs

    def open_logs(self, start_step: int) -> TrainLogs:
        """Rank 0's logs: metrics.jsonl and the trackers of ``train.loggers``, given the run's resolved settings
        (after ``epochs`` became steps) and, when resuming, the tracker runs the checkpoint names."""
        cfg, a = self.cfg, self.args
        resume_ids = checkpoint.read_state(self.resume_from).get("trackers") if self.resume_from else None
        trackers = open_trackers(
            cfg.loggers,
            self.paths,
            start_step,
            mlflow_uri=cfg.mlflow_uri,
            project=cfg.tracker_project,
            run_name=a.get("run_name") or self.paths.dir.parent.name,
            resume_ids=resume_ids,
        )
        params = {
            "train": cfg.model_dump(mode="json"),
            **{k: a[k] for k in ("whisper_dir", "llm_dir", "examples")},
            "world_size": self.world,
            "train_rows": self.n_rows,
            "trainable_params": self.n_train,
        }
        return TrainLogs(self.paths, start_step, trackers, flatten(params))

    # ---------------------------------------------------------------------------------------- the loop

    def fit(self) -> dict:
        cfg, model = self.cfg, self.model
        stop = {"signal": 0}

        def on_signal(signum, frame):  # finish the step under way, checkpoint, then exit
            stop["signal"] = signum

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.skipped = 0
        stream = self.batches()
        start_step = self.state["step"]
        if self.master:
            self.logs = self.open_logs(start_step)
        if self.resume_from is not None:  # last, so nothing after it draws numbers before the first step
            checkpoint.restore_rng(self.resume_from, self.rank)
        t_start, loss_avg, stopped = time.time(), float("nan"), False
        if self.val_loaders and start_step == 0:
            self.validate()  # the untrained model's figures: where the learning curve starts
        for step in range(start_step, cfg.max_steps):
            t0 = time.time()
            lr = self.optimizer.param_groups[0]["lr"]
            loss_sum = torch.zeros((), device=self.device)
            # samples, tokens, stop signal; in a CTC step, the rows CTC could align and all rows
            counts = torch.zeros(5, device=self.device)
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
                        # the CTC warm start's steps (train.ctc_warmup_steps) score the connector alone
                        ctc = step < cfg.ctc_warmup_steps
                        extra = {"ctc_targets": batch.transcript_ids} if ctc or cfg.ctc_weight else {}
                        if not ctc and cfg.ctc_weight:  # the answers' loss plus the CTC loss, weighted
                            extra["ctc_weight"] = cfg.ctc_weight
                        loss = self.wrapped(**batch.kwargs(), **extra).loss
                    # Mean over micro-batches: scale so the accumulated gradient is the average, not the sum.
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach() / cfg.grad_accum
                counts[0] += len(batch)
                counts[1] += self.tokens(batch)
                if ctc or cfg.ctc_weight:
                    counts[3:5] += torch.tensor(model.ctc_rows, device=self.device)
            # clip_grad_norm_ with an infinite bound measures the norm (logged) and changes nothing
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip or math.inf)
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
            if self.logs is not None:
                self.logs.step(
                    {
                        "step": step + 1,
                        "epoch": epoch,
                        "objective": "ctc" if step < cfg.ctc_warmup_steps else "answers",
                        **({"ctc_rows_aligned": stats[4].item() / stats[5].item()} if stats[5] > 0 else {}),
                        "loss": loss_avg,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "samples": self.state["samples_seen"],
                        "samples_per_s": step_samples / dt,
                        "tokens_per_s": step_tokens / dt,
                        "step_s": dt,
                        "data_s": data_s,
                    },
                    cfg.max_steps,
                )
            if not math.isfinite(loss_avg):
                raise RuntimeError(f"loss is {loss_avg} at step {step + 1}; stopping")
            every = cfg.validation.every
            if self.val_loaders and ((step + 1) % every == 0 or step + 1 == cfg.max_steps):
                self.validate()
            due = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps
            if stopped or due:
                path = self.save_resumable()
                self.say(f"checkpoint: {path} (step {step + 1})")
                if self.logs is not None:
                    self.logs.plot()
            if stopped:
                break

        if self.encoder_cache is not None:
            print(f"[rank {self.rank}] {self.encoder_cache.summary()}", flush=True)
        skipped_t = torch.tensor(float(self.skipped), device=self.device)
        dist.all_reduce(skipped_t)
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
            "encoder_cache": self.encoder_cache.summary() if self.encoder_cache is not None else None,
        }
        if stopped:
            self.say(
                f"stopped by a signal after step {self.state['step']}; rerun to resume from its checkpoint"
            )
            return {**summary, "stopped": True}
        final = self.save_final()
        if self.logs is not None:
            self.logs.summary(summary)
            self.say(f"saved {final} after {self.state['step']} steps ({summary['seconds']:.1f}s)")
        return summary

    # ------------------------------------------------------------------------------------------ cleanup

    def cleanup(self, stopped: bool = False) -> None:
        """Close the logs (with the loss plot; the trackers' runs marked finished, or stopped when a signal
        stopped the run) and wait for every rank; the process group stays up until the worker exits (see
        ``stages.train.worker``)."""
        if self.logs is not None:
            self.logs.close("stopped" if stopped else "finished")
        dist.barrier()
