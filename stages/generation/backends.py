"""Backends behind one interface: ``backend.run(shards, sink, meter)`` answers every request once.

- ``OpenAIBackend``: the completions endpoint of OpenAI-compatible servers (vLLM replicas in
  production, ``transformers serve`` locally), many requests in flight, retries with exponential
  backoff and jitter, several base URLs balanced by their number of requests in flight;
- ``VLLMBackend``: vLLM's offline engine, one ``LLM.generate`` call per shard;
- ``TransformersBackend``: the model in this process, with transformers' continuous batching
  (``generate_batch``) or length-sorted static batches.

A backend hands each answer to ``sink`` as soon as it has it; the caller commits it to the cache.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from splsm.log import console
from stages.generation.cache import Answer


@dataclass(frozen=True)
class Request:
    utt_id: str
    task: str
    instruction_id: str
    instruction: str
    prompt: str
    key: str
    sampling: dict = field(hash=False, compare=False)


Sink = Callable[[Request, Answer], None]


class BackendError(RuntimeError):
    """A backend could not answer; the message says what is done and how to resume."""


class Meter:
    """Live progress: answers, tokens/s, requests in flight, ETA."""

    def __init__(self, bar=None, task_id=None):
        self.bar, self.task_id = bar, task_id
        self.in_flight = self.tokens = self.done = 0
        self.t0 = time.monotonic()

    def sent(self, n: int = 1) -> None:
        self.in_flight += n

    def back(self, n: int = 1) -> None:
        self.in_flight -= n

    def answered(self, tokens: int, n: int = 1) -> None:
        self.done += n
        self.tokens += tokens
        if self.bar is not None:
            rate = self.tokens / max(time.monotonic() - self.t0, 1e-6)
            self.bar.update(self.task_id, advance=n, status=f"{rate:.0f} tok/s, {self.in_flight} in flight")


# ---------------------------------------------------------------------------------------------- HTTP


def _retryable(e: BaseException) -> bool:
    import openai

    if isinstance(e, openai.APIConnectionError):  # refused, reset, timed out
        return True
    if isinstance(e, openai.APIStatusError):
        return e.status_code in (408, 409, 429) or e.status_code >= 500
    return False


class OpenAIBackend:
    """Completions over the OpenAI protocol. The client's own retries are off: ours wait longer (a
    restarting server needs tens of seconds), add jitter so replicas are not hit in lockstep, and move
    a failed request to another replica."""

    name = "openai"

    def __init__(self, base_urls: list[str], model: str, g):
        if not base_urls:
            raise ValueError("OpenAIBackend needs at least one base URL")
        self.urls, self.model, self.g = list(base_urls), model, g

    def run(self, shards: list[list[Request]], sink: Sink, meter: Meter) -> None:
        todo = [r for s in shards for r in s]
        if todo:
            asyncio.run(self._run(todo, sink, meter))

    def _delay(self, attempt: int) -> float:
        d = min(self.g.retry_backoff_max_s, self.g.retry_backoff_s * 2 ** (attempt - 1))
        return d / 2 + random.uniform(0, d / 2)

    async def _run(self, todo: list[Request], sink: Sink, meter: Meter) -> None:
        from openai import AsyncOpenAI

        g = self.g
        key = os.environ.get(g.api_key_env) or "EMPTY"
        clients = [
            AsyncOpenAI(base_url=u, api_key=key, timeout=g.request_timeout_s, max_retries=0)
            for u in self.urls
        ]
        load = [0] * len(clients)
        gate = asyncio.Semaphore(g.concurrency)
        fatal: list[BaseException] = []

        def pick(avoid: int | None) -> int:
            order = sorted(range(len(clients)), key=lambda i: (i == avoid, load[i], random.random()))
            return order[0]

        async def one(r: Request) -> None:
            async with gate:
                attempt, avoid = 0, None
                while True:
                    if fatal:
                        return  # the run is failing; do not queue more work on a dead server
                    i = pick(avoid)
                    load[i] += 1
                    meter.sent()
                    try:
                        resp = await clients[i].completions.create(
                            model=self.model,
                            prompt=r.prompt,
                            max_tokens=r.sampling["max_tokens"],
                            temperature=r.sampling["temperature"],
                            top_p=r.sampling["top_p"],
                            seed=r.sampling["seed"],
                        )
                        break
                    except Exception as e:
                        if not _retryable(e):
                            fatal.append(
                                BackendError(
                                    f"{self.urls[i]} refused the request for {r.utt_id}/{r.task}: {e}"
                                )
                            )
                            return
                        attempt += 1
                        if attempt > g.max_retries:
                            fatal.append(
                                BackendError(
                                    f"no answer from {', '.join(self.urls)} after {g.max_retries} retries "
                                    f"({type(e).__name__}: {e})"
                                )
                            )
                            return
                        avoid = i if len(clients) > 1 else None
                        delay = self._delay(attempt)
                        console.print(
                            f"[yellow]generate: {self.urls[i]}: {type(e).__name__}; retry {attempt}/"
                            f"{g.max_retries} in {delay:.1f}s[/]"
                        )
                    finally:
                        load[i] -= 1
                        meter.back()
                    await asyncio.sleep(delay)
            choice = resp.choices[0]
            usage = resp.usage
            a = Answer(
                (choice.text or "").strip(),
                choice.finish_reason or "",
                usage.prompt_tokens if usage else 0,
                usage.completion_tokens if usage else 0,
            )
            sink(r, a)
            meter.answered(a.completion_tokens)

        try:
            await asyncio.gather(*(one(r) for r in todo))
        finally:
            for c in clients:
                await c.close()
        if fatal:
            raise fatal[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A ``transformers serve`` process on a loopback port; ``start``/``stop`` may be called again (the
    fault test restarts it on the same port)."""

    def __init__(
        self,
        model_dir: Path,
        log_path: Path,
        port: int | None = None,
        timeout_s: float = 300.0,
        device: str = "auto",
        continuous_batching: bool = False,
    ):
        self.model_dir, self.log_path = Path(model_dir), Path(log_path)
        self.port = port or free_port()
        self.timeout_s, self.device, self.cb = timeout_s, device, continuous_batching
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("transformers")
        cmd = [str(exe) if exe.exists() else "transformers", "serve", str(self.model_dir)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--device", self.device]
        cmd += ["--log-level", "warning"] + (["--continuous-batching"] if self.cb else [])
        console.print(
            f"starting transformers serve for {self.model_dir} on port {self.port} (log: {self.log_path})"
        )
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"transformers serve exited with code {self.proc.returncode} before it was ready:\n{tail}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"transformers serve was not ready after {self.timeout_s}s (log: {self.log_path})"
                )
            time.sleep(0.5)

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill() if kill else self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> str:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------- vLLM offline


class VLLMBackend:
    """vLLM's offline engine: a whole shard per ``LLM.generate`` call, so the engine schedules it at once."""

    name = "vllm"

    def __init__(self, llm_dir: Path, g):
        try:
            import vllm
        except ImportError as e:
            raise BackendError(
                "generate.backend vllm needs the vllm package, which is not importable here "
                f"({e}); install it on a GPU machine (pip install vllm), or use backend openai with a vLLM "
                "server, or backend transformers"
            ) from e
        self.vllm = vllm
        self.llm = vllm.LLM(
            model=str(llm_dir), tokenizer=str(llm_dir), seed=g.seed, trust_remote_code=False, **g.vllm_args
        )

    def run(self, shards: list[list[Request]], sink: Sink, meter: Meter) -> None:
        for shard in shards:
            params = [
                self.vllm.SamplingParams(
                    temperature=r.sampling["temperature"],
                    top_p=r.sampling["top_p"],
                    max_tokens=r.sampling["max_tokens"],
                    seed=r.sampling["seed"],
                )
                for r in shard
            ]
            meter.sent(len(shard))
            outs = self.llm.generate([r.prompt for r in shard], params, use_tqdm=False)
            meter.back(len(shard))
            for r, o in zip(shard, outs, strict=True):
                c = o.outputs[0]
                a = Answer(c.text.strip(), c.finish_reason or "", len(o.prompt_token_ids), len(c.token_ids))
                sink(r, a)
                meter.answered(a.completion_tokens)


# ------------------------------------------------------------------------------- transformers in-process


class TransformersBackend:
    """The LLM in this process. ``batching='continuous'`` uses transformers' continuous batching
    (``generate_batch``, paged attention); ``'static'`` sorts a shard by prompt length and runs large
    left-padded batches. ``'auto'`` picks static on every device: it won on CPU and on an H200 alike, and
    only it gave the reference's greedy answers on CUDA (bench/generate.py, tiny Llama: on the H200 static
    4.8x and compiled 10.3x HF ``generate``'s batches of 32 with 384/384 answers equal; continuous 0.26x
    with 10/48 equal, its paged attention summing in another order)."""

    name = "transformers"

    def __init__(self, llm_dir: Path, g):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch, self.g = torch, g
        device = g.device if g.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(llm_dir, trust_remote_code=False)
        self.tok.padding_side = "left"
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype="auto", trust_remote_code=False)
        self.model.to(device).eval()
        self.device = device
        self.batching = g.transformers_batching
        self._compiled = None
        # transformers 5.x renames forward's past_key_values to cache; take whichever this version has
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        if self.batching == "auto":
            self.batching = "static"

    def _gen_config(self, max_new_tokens: int, sampling: dict):
        from transformers import GenerationConfig

        sample = sampling["temperature"] > 0
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=sampling["temperature"] if sample else None,
            top_p=sampling["top_p"] if sample else None,
            eos_token_id=self.tok.eos_token_id,
            pad_token_id=self.pad_id,
        )

    def _answer(self, prompt_len: int, tokens: list[int], budget: int) -> Answer:
        eos = self.tok.eos_token_id
        cut = tokens.index(eos) if eos in tokens else None
        if cut is not None:
            return Answer(
                self.tok.decode(tokens[:cut], skip_special_tokens=True).strip(), "stop", prompt_len, cut + 1
            )
        text = self.tok.decode(tokens, skip_special_tokens=True).strip()
        return Answer(text, "length" if len(tokens) >= budget else "stop", prompt_len, len(tokens))

    def run(self, shards: list[list[Request]], sink: Sink, meter: Meter) -> None:
        for shard in shards:
            groups: dict[str, list[Request]] = {}
            for r in shard:  # one generation config per distinct sampling; greedy ignores the seed
                s = r.sampling if r.sampling["temperature"] > 0 else {**r.sampling, "seed": None}
                groups.setdefault(repr(sorted(s.items())), []).append(r)
            for reqs in groups.values():
                s = reqs[0].sampling
                if s["temperature"] > 0:
                    self.torch.manual_seed(s["seed"])
                gc = self._gen_config(s["max_tokens"], s)
                ids = self.tok([r.prompt for r in reqs]).input_ids
                if self.batching == "continuous":
                    self._continuous(reqs, ids, gc, sink, meter)
                else:
                    self._static(reqs, ids, gc, sink, meter)

    def _continuous(self, reqs, ids, gc, sink, meter) -> None:
        meter.sent(len(reqs))
        out = self.model.generate_batch(ids, generation_config=gc, progress_bar=False)
        meter.back(len(reqs))
        # generate_batch names requests req_0, req_1, ... in input order; match them by prompt ids too
        by_id = {o.request_id: o for o in out.values()}
        for i, r in enumerate(reqs):
            o = by_id[f"req_{i}"]
            if list(o.prompt_ids) != ids[i]:
                raise BackendError(f"continuous batching returned another prompt for request {i}")
            a = self._answer(len(ids[i]), list(o.generated_tokens), gc.max_new_tokens)
            sink(r, a)
            meter.answered(a.completion_tokens)

    def _static(self, reqs, ids, gc, sink, meter) -> None:
        torch = self.torch
        order = sorted(range(len(reqs)), key=lambda i: len(ids[i]))  # little padding per batch
        bs = self.g.batch_size
        for b in range(0, len(order), bs):
            idx = order[b : b + bs]
            width = max(len(ids[i]) for i in idx)
            input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
                mask[row, width - len(ids[i]) :] = 1
            meter.sent(len(idx))
            with torch.inference_mode():
                input_ids, mask = input_ids.to(self.device), mask.to(self.device)
                if gc.do_sample:
                    out = self.model.generate(
                        input_ids=input_ids,
                        attention_mask=mask,
                        generation_config=gc,
                        cache_implementation="static",
                    )[:, width:]
                else:
                    out = self._greedy(input_ids, mask, gc.max_new_tokens)
            meter.back(len(idx))
            for row, i in enumerate(idx):
                a = self._answer(len(ids[i]), out[row].tolist(), gc.max_new_tokens)
                sink(reqs[i], a)
                meter.answered(a.completion_tokens)

    def _greedy(self, input_ids, mask, max_new_tokens: int):
        """Greedy decoding of one left-padded batch; the new tokens, [B, <= max_new_tokens].

        The same tokens as ``generate(do_sample=False)`` (bench/generate.py compares them answer by answer),
        in a plain loop over a preallocated ``StaticCache``: HF's default cache grows by concatenation, which
        copies every row's keys and values at every step, and ``generate``'s per-step bookkeeping costs
        more than a tiny model's forward pass. Together about 2x on CPU (bench/generate.py). Stops when
        every row has produced eos; tokens after a row's eos are ignored by ``_answer``."""
        from transformers import StaticCache

        torch = self.torch
        b, width = input_ids.shape
        cache = StaticCache(config=self.model.config, max_cache_len=width + max_new_tokens)
        kw = self._cache_kw
        full = torch.zeros(b, width + max_new_tokens, dtype=mask.dtype, device=mask.device)
        full[:, :width] = mask
        # positions count real tokens only, as generate's do: a row's answer does not depend on its padding
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=pos,
            cache_position=torch.arange(width, device=mask.device),
            logits_to_keep=1,
            **{kw: cache},
        )
        nxt = out.logits[:, -1].argmax(-1)
        tokens = [nxt]
        done = nxt == self.tok.eos_token_id
        pos = pos[:, -1:]
        step = self._decode_step()
        for t in range(1, max_new_tokens):
            if bool(done.all()):
                break
            full[:, width + t - 1] = 1
            pos = pos + 1
            # the whole cache's mask (later positions 0): one shape per batch, which a compiled step needs
            out = step(
                input_ids=nxt[:, None],
                attention_mask=full,
                position_ids=pos,
                cache_position=torch.tensor([width + t - 1], device=mask.device),
                logits_to_keep=1,
                **{kw: cache},
            )
            nxt = out.logits[:, -1].argmax(-1)
            tokens.append(nxt)
            done |= nxt == self.tok.eos_token_id
        return torch.stack(tokens, 1).cpu()

    def _decode_step(self):
        """The model's forward for one-token steps; compiled (torch.compile, shapes dynamic, so one compile
        serves every batch) with ``transformers_compile``. Compiling costs tens of seconds once and fuses
        the many small kernels of a small model's step; it needs a C++ compiler on CPU. Where compiling
        fails the step runs uncompiled, with a warning."""
        if not self.g.transformers_compile or self._compiled is False:
            return self.model
        if self._compiled is None:
            self._compiled = self.torch.compile(self.model.forward, dynamic=True)

        def step(**kw):
            if self._compiled is not False:
                try:
                    return self._compiled(**kw)
                except Exception as e:  # noqa: BLE001 - any compiler failure: decode uncompiled, say so
                    print(
                        f"generate: torch.compile failed ({e!r:.300}); decoding uncompiled", file=sys.stderr
                    )
                    self._compiled = False
            return self.model(**kw)

        return step
