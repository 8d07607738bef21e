"""Why the LSM's batch-1 decoding cannot reach half of Whisper tiny.en's RTFx on this CPU in float32.

    .venv/bin/python bench/decode_floor.py [--llm work/throughput/data/models/smollm2-135m-instruct]

A batch-1 decoding step reads every weight of the LLM once. SmolLM2-135M holds 134M parameters (536 MB in
float32); Whisper tiny.en's decoder about 29M. This prints, medians of 3 runs on 2 threads:

- the LLM's own ``generate`` time per new token at batch 1;
- the floor under it: the step's matrix products alone (every linear layer and the LM head on one token);
- the same in bfloat16, with what bfloat16 costs where compute, not memory, bounds a step (a 60-token prefill
  and a batch of 16), on a CPU without bfloat16 units.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(fn, runs: int = 3) -> float:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def measure(path: Path, dtype) -> tuple:
    import torch
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    ids = torch.randint(100, 1000, (1, 60))
    many = torch.randint(100, 1000, (16, 60))
    linears = [m.weight for m in llm.modules() if isinstance(m, torch.nn.Linear)]
    x = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype) for w in linears}

    def gen(batch, n):
        return lambda: llm.generate(batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with torch.inference_mode():
        gen(ids, 2)()  # warm
        per_token = (timed(gen(ids, 41)) - timed(gen(ids, 1))) / 40
        prefill = timed(gen(ids, 1))
        floor = timed(lambda: [torch.nn.functional.linear(x[w.shape[1]], w) for w in linears])
        batch16 = timed(gen(many, 20), runs=1)
    mb = sum(w.numel() for w in linears) * linears[0].element_size() / 1e6
    return str(dtype).removeprefix("torch."), per_token, floor, prefill, batch16, mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", type=Path, default=REPO / "work/throughput/data/models/smollm2-135m-instruct")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    rows = [measure(args.llm, dtype) for dtype in (torch.float32, torch.bfloat16)]
    print("| weights | generate, ms per token at batch 1 | matrix products alone, ms | MB read per token |"
          " 60-token prefill, s | batch 16 x 20 tokens, s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name, tok, floor, pre, b16, mb in rows:
        print(f"| {name} | {tok * 1e3:.1f} | {floor * 1e3:.1f} | {mb:.0f} | {pre:.2f} | {b16:.2f} |")


if __name__ == "__main__":
    main()
