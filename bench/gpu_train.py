"""The train stage's CUDA path, checked on a GPU: NCCL, bf16 autocast, fused AdamW, pinned loader memory,
DDP and FSDP2 with a bf16 mixed-precision policy, resumable checkpoints and greedy decoding on the device.

    python bench/gpu_train.py [--steps 40] [--batch 8]

CPU tests cover every one of these code paths with gloo; none of them runs on CUDA there. On one GPU
(torchrun with 1 process, so DDP and FSDP run over a one-rank NCCL group), each variant trains the demo's
tiny models on the bundled LibriSpeech clips:

- ddp fp32, ddp bf16, fsdp bf16: samples/s and tokens/s (median over the steps after the first), the
  first and last loss;
- resume (ddp fp32): 2N straight steps with a resumable checkpoint at N; then the same command in a fresh
  directory that holds only that checkpoint resumes at N and runs to 2N; the two final losses are compared.
  CUDA kernels are not bit-deterministic, so the figure is their difference, not an equality;
- the saved checkpoint loads with one ``from_pretrained`` and decodes greedily on the GPU through the
  evaluate stage's ``decode``.

Ends with one goal line per check. It needs a CUDA device and the project's dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def run_variant(name: str, work: Path, whisper: Path, llm: Path, examples: Path, **overrides) -> dict:
    from helpers_lsm import experiment

    from stages.train import launcher as train

    cfg = experiment(nproc_per_node=1, backend="nccl", loggers=[], **overrides).train
    out = work / name
    t0 = time.monotonic()
    summary = train.train(cfg, whisper, llm, examples, out)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tail = recs[1:] or recs
    return {
        "name": name,
        "steps": summary["steps"],
        "wall_s": time.monotonic() - t0,
        "samples_per_s": statistics.median(r["samples_per_s"] for r in tail),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in tail),
        "first_loss": recs[0]["loss"],
        "last_loss": recs[-1]["loss"],
        "losses": [r["loss"] for r in recs],
        "out": out,
    }


def decode_on_gpu(checkpoint: Path, examples: Path, device: str = "cuda") -> tuple[int, list[str]]:
    """Greedy decoding of every test-clean row on the GPU, through the evaluate stage's own decoding."""
    from core.lsm.model import LSMForConditionalGeneration
    from core.tables import read_table
    from schemas import EXAMPLES
    from stages.evaluate.decoding import Item, decode

    model = LSMForConditionalGeneration.from_pretrained(checkpoint).to(device).eval()
    rows = [r for r in read_table(examples, EXAMPLES).to_pylist() if r["split"] == "test-clean"]
    items = [Item.of_row(r["example_id"], r, 8) for r in rows]
    done = decode(model, items, batch_size=len(items))
    return len(rows), [done.texts[it.key] for it in items if it.key in done.texts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8, help="examples per step")
    ap.add_argument("--keep", type=Path, default=None, help="copy metrics and logs here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check is for a GPU machine")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, cuda {torch.version.cuda}")
    from helpers_lsm import build_models, write_examples

    work = Path(tempfile.mkdtemp(prefix="gpu-train-"))
    whisper, llm = build_models(work / "models")
    examples = write_examples(work / "examples.parquet")
    common = dict(max_steps=args.steps, batch_size=args.batch, lr=5e-4, warmup_steps=2, freeze_encoder=False)
    results = [
        run_variant("ddp-fp32", work, whisper, llm, examples, **common),
        run_variant("ddp-bf16", work, whisper, llm, examples, bf16=True, **common),
        run_variant("fsdp-bf16", work, whisper, llm, examples, bf16=True, strategy="fsdp", **common),
    ]
    # resume: 2N straight steps writing a resumable checkpoint at step N; then a fresh directory holding only
    # that checkpoint, and the same command, which resumes from it for the last N steps
    n = max(2, args.steps // 4)
    rs = dict(common, max_steps=2 * n, checkpoint_every=n)
    straight = run_variant("straight", work, whisper, llm, examples, **rs)
    (work / "resumed").mkdir()
    shutil.copytree(straight["out"] / "checkpoints", work / "resumed" / "checkpoints")
    resumed = run_variant("resumed", work, whisper, llm, examples, **rs)
    resume_diff = abs(resumed["losses"][-1] - straight["losses"][-1])
    n_test, hyps = decode_on_gpu(results[1]["out"] / "checkpoint", examples)

    print()
    print(f"{'variant':12}{'samples/s':>12}{'tokens/s':>12}{'first loss':>12}{'last loss':>12}{'wall s':>9}")
    for r in results:
        print(
            f"{r['name']:12}{r['samples_per_s']:>12.1f}{r['tokens_per_s']:>12.0f}{r['first_loss']:>12.4f}"
            f"{r['last_loss']:>12.4f}{r['wall_s']:>9.1f}"
        )
    print(
        f"resume: from step {n} to {resumed['steps']}, {len(resumed['losses'])} steps run; final loss {resumed['losses'][-1]:.6f} "
        f"against {straight['losses'][-1]:.6f} straight (difference {resume_diff:.2e})"
    )
    print(f"greedy decoding on the GPU (the evaluate stage's decode): {hyps}")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        for r in results:
            shutil.copy(r["out"] / "metrics.jsonl", args.keep / f"metrics-{r['name']}.jsonl")
    print()

    def goal(name: str, measured: str, target: str, met: bool) -> None:
        print(f"goal {name}: {measured} (target {target}) {'met' if met else 'not met'}")

    for r in results:
        fell = r["last_loss"] < r["first_loss"]
        finite = all(x == x and abs(x) != float("inf") for x in r["losses"])
        goal(
            f"{r['name']}_learns",
            f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}",
            "finite and falling",
            fell and finite,
        )
    goal("resume_cuda", f"{resume_diff:.2e}", "< 1e-2 (CUDA kernels are not bit-exact)", resume_diff < 1e-2)
    goal(
        "decode_cuda",
        f"{len(hyps)} rows decoded",
        f"{n_test} rows (every test-clean row)",
        len(hyps) == n_test,
    )


if __name__ == "__main__":
    main()
