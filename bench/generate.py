"""Benchmark of the generate stage's backends against the reference's generation loop.

Same prompts (the demo transcripts under the catalog's instructions, Vicuna v1.1 format), same tiny
Llama, greedy decoding, in one run, side by side:

- reference: the reference's loop: one process, HF ``generate`` on static batches of 32 in corpus
  order, left padding, greedy, waiting for each batch before the next;
- transformers/static: the in-process backend, length-sorted large batches;
- transformers/continuous: the in-process backend on transformers' continuous batching;
- transformers-serve: the HTTP backend against ``transformers serve`` (with and without
  ``--continuous-batching``), many requests in flight.

The reference and the best backend run ``--runs`` times, the slower ones ``--slow-runs`` times, interleaved with the others so that load on the machine hits
them alike; the table quotes medians. Output is compared answer by answer with the reference's.
Ends with one line per goal. Usage: ``.venv/bin/python bench/generate.py [--runs 3]``; on a GPU machine
``python bench/generate.py --device cuda --skip transformers-serve,transformers-serve/continuous`` runs the
reference and the in-process backends on the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.catalog import load_catalog  # noqa: E402
from core.config import (  # noqa: E402
    LLM_TASKS,
    TINY_CONFIG,
    ClientSettings,
    GenerateConfig,
    ServeBackendConfig,
    TransformersBackendConfig,
    load_config,
)
from core.log import console  # noqa: E402
from core.paths import WorkPaths  # noqa: E402
from stages.generate.backends.base import Meter  # noqa: E402
from stages.generate.backends.openai_server import OpenAIBackend  # noqa: E402
from stages.generate.backends.transformers_local import TransformersBackend  # noqa: E402
from stages.generate.backends.transformers_serve import ServerProcess  # noqa: E402
from stages.generate.driver import count_prompt_tokens, plan_requests  # noqa: E402
from stages.registry import STAGES  # noqa: E402


def reference_loop(llm_dir: Path, prompts: list[str], max_new_tokens: int, batch: int = 32, device="cpu"):
    """The reference's generation loop, as its release runs it on each GPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(llm_dir).to(device).eval()

    def run() -> tuple[list[str], int]:
        texts, tokens = [], 0
        for i in range(0, len(prompts), batch):
            enc = tok(prompts[i : i + batch], return_tensors="pt", padding=True).to(device)
            with torch.inference_mode():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
                )
            for row in out[:, enc.input_ids.shape[1] :].tolist():
                n = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
                tokens += n
                texts.append(tok.decode(row[:n], skip_special_tokens=True).strip())
        return texts, tokens

    return run


def backend_runner(backend, reqs):
    def run() -> tuple[list[str], int]:
        got = {}
        backend.run([reqs], lambda r, a: got.__setitem__(r.key, a), Meter())
        return [got[r.key].text for r in reqs], sum(got[r.key].completion_tokens for r in reqs)

    return run


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs of the reference and of transformers/static")
    ap.add_argument(
        "--slow-runs",
        type=int,
        default=1,
        help="runs of the backends 3-20x slower than the reference on CPU (continuous batching, HTTP)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--slow-prompts", type=int, default=48, help="prompts for the slow backends")
    ap.add_argument("--prompts", type=int, default=384, help="at most this many prompts")
    ap.add_argument(
        "--instruction-seeds", type=int, default=8, help="instruction draws per (utterance, task)"
    )
    ap.add_argument("--batch-size", type=int, default=128, help="transformers/static batch size")
    ap.add_argument("--concurrency", type=int, default=32, help="HTTP requests in flight")
    ap.add_argument(
        "--skip", default="", help="comma-separated backends to leave out (e.g. transformers-serve)"
    )
    ap.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, or auto (cuda where there is one): every backend and the reference",
    )
    args = ap.parse_args()
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")

    from stages.tiny_models.models import build_tiny_models, corpus_texts

    tmp = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    cfg = load_config(TINY_CONFIG)
    STAGES["harvest"].run(STAGES["harvest"].context(cfg, tmp))
    paths = WorkPaths(tmp)
    transcripts = paths.harvest.transcripts
    _, llm = build_tiny_models(corpus_texts(transcripts), paths.models, cfg.models.tiny)

    local = TransformersBackendConfig(batching="static", batch_size=args.batch_size, device=device)
    client = ClientSettings(concurrency=args.concurrency)
    g = GenerateConfig(backend=local, tasks=list(LLM_TASKS), max_new_tokens=args.max_new_tokens)
    from transformers import AutoTokenizer

    # Each instruction seed draws another instruction per (utterance, task): more distinct prompts from the
    # same demo transcripts, so that a run lasts long enough to measure more than start-up costs.
    tok = AutoTokenizer.from_pretrained(llm)
    reqs = [
        r
        for seed in range(args.instruction_seeds)
        for r in plan_requests(
            transcripts, load_catalog(), g.model_copy(update={"seed": seed}), str(llm), "bench", tok
        )
    ]
    n_tok = count_prompt_tokens(reqs, AutoTokenizer.from_pretrained(llm))
    reqs = [r for r in {r.prompt: r for r in reqs}.values() if n_tok[r.key] < g.max_prompt_tokens][
        : args.prompts
    ]
    prompts = [r.prompt for r in reqs]
    console.print(
        f"bench: {len(reqs)} prompts ({min(n_tok[r.key] for r in reqs)}-{max(n_tok[r.key] for r in reqs)} "
        f"tokens), greedy, at most {args.max_new_tokens} new tokens, tiny Llama {llm}, {args.runs} runs each, on {device}"
    )

    runners = {
        "reference (HF generate, batch 32)": reference_loop(llm, prompts, args.max_new_tokens, device=device)
    }
    runners["transformers/static"] = backend_runner(TransformersBackend(llm, local), reqs)
    if "transformers/static+compile" not in args.skip:
        tb = TransformersBackend(llm, local.model_copy(update={"compile": True}))
        # compiling is a one-time cost, like a server's start: paid here, before the timed runs, and printed
        t0 = time.monotonic()
        backend_runner(tb, reqs[:8])()
        runners["transformers/static+compile"] = backend_runner(tb, reqs)
        console.print(f"transformers/static+compile: compiled in {time.monotonic() - t0:.1f}s")
    cont = local.model_copy(update={"batching": "continuous"})
    # the slow backends answer the first --slow-prompts prompts only: at 20-100x slower than the reference
    # on CPU, all of them would take many minutes; their rate and output are compared on that subset
    slow_reqs = reqs[: args.slow_prompts]
    runners["transformers/continuous"] = backend_runner(TransformersBackend(llm, cont), slow_reqs)
    skip = set(filter(None, args.skip.split(",")))
    servers = []
    failed: dict[str, str] = {}  # backend -> why it has no figures
    for name, cb in (("transformers-serve", False), ("transformers-serve/continuous", True)):
        if name in skip:
            continue
        defaults = ServeBackendConfig()  # the stage's own bounds on the engine's memory
        srv = ServerProcess(
            llm,
            tmp / f"{name.replace('/', '-')}.log",
            continuous_batching=cb,
            cb_cache_tokens=defaults.cb_cache_tokens,
            cb_max_batch_tokens=defaults.cb_max_batch_tokens,
        )
        t0 = time.monotonic()
        try:
            srv.start()
        except Exception as e:  # a backend that cannot start is reported; the others are measured
            failed[name] = f"did not start: {_first_line(e)}"
            srv.stop()
            continue
        console.print(f"{name}: ready in {time.monotonic() - t0:.1f}s")
        servers.append(srv)
        backend = OpenAIBackend([srv.url], str(llm), client)
        backend.watch = srv.death  # a server that dies is news at once, as in the stage
        runners[name] = backend_runner(backend, slow_reqs)
    runners = {k: v for k, v in runners.items() if k not in skip}
    ref_name = next(iter(runners))

    rates: dict[str, list[float]] = {k: [] for k in runners}
    outputs: dict[str, list[str]] = {}
    try:
        for i in range(args.runs):
            for name, run in runners.items():  # interleaved: load on the machine hits every backend alike
                if name in failed or (
                    name not in (ref_name, "transformers/static", "transformers/static+compile")
                    and i >= args.slow_runs
                ):
                    continue
                t0 = time.perf_counter()
                try:
                    texts, tokens = run()
                except Exception as e:  # one backend failing does not cost the others their figures
                    if name == ref_name:
                        raise
                    failed[name] = f"failed in run {i + 1}: {_first_line(e)}"
                    console.print(f"[red]run {i + 1}: {name}: {failed[name]}[/]")
                    continue
                dt = time.perf_counter() - t0
                rates[name].append(tokens / dt)
                outputs.setdefault(name, texts)
                console.print(f"run {i + 1}: {name}: {tokens} tokens in {dt:.2f}s = {tokens / dt:.1f} tok/s")
    finally:
        for srv in servers:
            srv.stop()
    measured = [n for n in runners if n not in failed]

    from rich.table import Table

    ref_out = outputs[ref_name]
    t = Table(
        "backend",
        "median tok/s",
        "runs (tok/s)",
        "vs reference (median of paired runs)",
        "answers equal to reference",
        title="generate",
    )

    def speedup(name: str) -> float:
        # paired with the reference's run of the same round: load on the machine drifts between rounds
        return statistics.median(r / ref for r, ref in zip(rates[name], rates[ref_name], strict=False))

    for name, why in failed.items():
        t.add_row(name, "-", "-", "-", f"[red]{why}[/]")
    for name in measured:
        med = statistics.median(rates[name])
        same = sum(a == b for a, b in zip(outputs[name], ref_out, strict=False))
        t.add_row(
            name,
            f"{med:.1f}",
            " ".join(f"{r:.0f}" for r in rates[name]),
            f"{speedup(name):.2f}x",
            f"{same}/{len(outputs[name])}",
        )
    console.print(t)
    for name, why in failed.items():
        print(f"backend {name}: {why}")
    best = max((n for n in measured if n != ref_name), key=speedup)
    gain = speedup(best)
    equal = sum(a == b for a, b in zip(outputs[best], ref_out, strict=False)) / len(outputs[best])
    print(
        f"goal best_backend_speedup: {gain:.2f}x with {best} (target 2x) {'met' if gain >= 2 else 'not met'}"
    )
    print(
        f"goal equal_output: {equal:.3f} of answers equal to the reference's (target 1.000) {'met' if equal == 1 else 'not met'}"
    )


if __name__ == "__main__":
    main()
