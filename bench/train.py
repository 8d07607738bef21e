"""Training throughput on CPU at the demo shapes: 1 process (the baseline) against 2, and where a step goes.

    .venv/bin/python bench/train.py [--runs 3] [--steps 8]

1. ``stages.train.train`` (torchrun, gloo, DDP) with 1 and then 2 processes, ``--runs`` times each, on the
   demo's tiny models and connector and the bundled LibriSpeech clips (batch 2 per process). Each run's figure
   is the median over its steps after the first (warm-up); the table quotes the median over runs.
   Scaling efficiency = samples/s with 2 processes / (2 x samples/s with 1).
2. In one process, the share of a training step spent in data loading (ExampleLoader: audio + log-mel), the
   Whisper encoder, the connector (LayerNorm, windows, Q-Former, projection; forward and backward) and the
   LLM (sequence assembly, forward and backward), medians over ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the demo examples table and tiny models the tests use

SCALING_TARGET = 0.70  # 2 processes on 2 cores should give at least 70% of twice one process
BATCH = 2


def throughput(work: Path, whisper: Path, llm: Path, examples: Path, nproc: int, steps: int) -> dict:
    from helpers_lsm import experiment

    from stages.train import launcher as train

    cfg = experiment(nproc_per_node=nproc, max_steps=steps, batch_size=BATCH, loggers=[]).train
    out = work / f"run-{nproc}-{time.monotonic_ns()}"
    train.train(cfg, whisper, llm, examples, out)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {
        "samples_per_s": statistics.median(r["samples_per_s"] for r in recs),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in recs),
    }


def breakdown(whisper: Path, llm: Path, examples: Path, steps: int) -> dict[str, float]:
    import torch
    from helpers_lsm import TINY_QFORMER

    from core.lsm.loader import ExampleLoader
    from core.lsm.model import LSMForConditionalGeneration

    torch.set_num_threads(1)  # as one torchrun worker runs
    torch.manual_seed(1)
    model = LSMForConditionalGeneration.from_parts(whisper, llm, TINY_QFORMER).train()
    # the train stage's data path: the loader over the examples table, inline (num_workers 0, as the demo)
    loader = ExampleLoader(examples, max_batch_size=BATCH, tokenizer=model.tokenizer, num_workers=0)

    def stream():
        while True:
            yield from loader

    batches = stream()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    parts: dict[str, list[float]] = {"data": [], "encoder": [], "connector": [], "llm": [], "optimizer": []}
    for step in range(steps + 1):
        t = [time.perf_counter()]
        b = next(batches)
        batch = b["batch"]
        t.append(time.perf_counter())
        frames = model.encode_frames(batch.input_features)
        t.append(time.perf_counter())
        speech = model.connect(frames)
        t.append(time.perf_counter())
        # The LLM's share, then the connector's backward from the gradient the LLM hands back.
        cut = speech.detach().requires_grad_()
        embeds, mask, labels = model.assemble(
            cut, batch.durations_s, batch.prefix_ids, batch.suffix_ids, batch.answer_ids
        )
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, labels=labels).loss.backward()
        t.append(time.perf_counter())
        speech.backward(cut.grad)
        t.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        if step == 0:
            continue  # warm-up
        d = [b - a for a, b in zip(t, t[1:], strict=False)]
        parts["data"].append(d[0])
        parts["encoder"].append(d[1])
        parts["connector"].append(d[2] + d[4])
        parts["llm"].append(d[3])
        parts["optimizer"].append(d[5])
    return {k: statistics.median(v) for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="torchrun runs per process count")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is warm-up)")
    args = ap.parse_args()

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # torchrun sets one thread per worker only when it starts several; one process gets the same, so that the
    # comparison is one core against two rather than two threads against two processes.
    os.environ["OMP_NUM_THREADS"] = "1"
    from helpers_lsm import build_models, write_examples
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        whisper, llm = build_models(work / "models")
        examples = write_examples(work / "examples.parquet")
        results: dict[int, list[dict]] = {1: [], 2: []}
        for _ in range(args.runs):  # interleaved, so that a noisy spell hits both alike
            for nproc in (1, 2):
                results[nproc].append(throughput(work, whisper, llm, examples, nproc, args.steps))
        shares = breakdown(whisper, llm, examples, args.steps * 2)

    med = {
        n: {k: statistics.median(r[k] for r in rs) for k in ("samples_per_s", "tokens_per_s")}
        for n, rs in results.items()
    }
    table = Table(
        title=f"train throughput, demo shapes, CPU, batch {BATCH}/process (median of {args.runs} runs)"
    )
    for col in ("processes", "samples/s", "tokens/s", "runs (samples/s)"):
        table.add_column(col, justify="right")
    for n in (1, 2):
        runs = ", ".join(f"{r['samples_per_s']:.2f}" for r in results[n])
        table.add_row(
            f"{n}" + (" (baseline)" if n == 1 else ""),
            f"{med[n]['samples_per_s']:.2f}",
            f"{med[n]['tokens_per_s']:.0f}",
            runs,
        )
    console.print(table)
    total = sum(shares.values())
    t2 = Table(title=f"share of a training step, 1 process, batch {BATCH} (median of {args.steps * 2} steps)")
    for col in ("part", "ms", "share"):
        t2.add_column(col, justify="right")
    for k, v in shares.items():
        t2.add_row(k, f"{v * 1e3:.1f}", f"{v / total:.0%}")
    console.print(t2)

    eff = med[2]["samples_per_s"] / (2 * med[1]["samples_per_s"])
    print(f"scaling efficiency 2 processes vs 1: {eff:.2f}")
    print(
        f"goal scaling_efficiency: {eff:.2f} (target {SCALING_TARGET:.2f}) {'met' if eff >= SCALING_TARGET else 'not met'}"
    )


if __name__ == "__main__":
    main()
