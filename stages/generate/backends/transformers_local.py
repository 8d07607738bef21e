"""The LLM in this process, through transformers: static batches over a static cache, or continuous
batching."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from core.config import TransformersBackendConfig
from stages.generate.backends.base import BackendError, Meter, Request, Sink
from stages.generate.cache import Answer


def penalize(logits, counts, frequency: float, presence: float):
    """The OpenAI protocol's penalties on [B, V] ``logits``, from ``counts`` [B, V] of each token in each row's
    answer so far (never its prompt): minus frequency x count, minus presence once a token occurs."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def _penalty_processor(prompt_width: int, frequency: float, presence: float):
    """``penalize`` as a logits processor for ``generate``, which hands it the prompt and the answer so far."""
    from transformers import LogitsProcessor

    class OutputPenalty(LogitsProcessor):
        def __call__(self, input_ids, scores):
            answer = input_ids[:, prompt_width:]
            counts = scores.new_zeros(scores.shape).scatter_add_(1, answer, scores.new_ones(answer.shape))
            return penalize(scores, counts, frequency, presence)

    return OutputPenalty()


def _penalties(sampling: dict) -> tuple[float, float]:
    return sampling.get("frequency_penalty", 0.0), sampling.get("presence_penalty", 0.0)


class TransformersBackend:
    """The LLM in this process. ``batching='continuous'`` uses transformers' continuous batching
    (``generate_batch``, paged attention); ``'static'`` sorts a shard by prompt length and runs large
    left-padded batches. ``'auto'`` picks static on every device: it won on CPU and on an H200 alike, and
    only it gave the reference's greedy answers on CUDA (bench/generate.py, tiny Llama: on the H200 static
    4.8x and compiled 10.3x HF ``generate``'s batches of 32 with 384/384 answers equal; continuous 0.26x
    with 10/48 equal, its paged attention summing in another order)."""

    name = "transformers"

    def __init__(self, llm_dir: Path, settings: TransformersBackendConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch, self.g = torch, settings
        device = (
            settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.tok = AutoTokenizer.from_pretrained(llm_dir, trust_remote_code=False)
        self.tok.padding_side = "left"
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.model = AutoModelForCausalLM.from_pretrained(
            llm_dir, dtype="auto", trust_remote_code=False, use_safetensors=True
        )
        self.model.to(device).eval()
        self.device = device
        self.batching = settings.batching
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
                if self.batching == "continuous" and any(_penalties(s)):
                    raise BackendError(
                        "transformers backend: continuous batching cannot apply frequency_penalty or"
                        " presence_penalty; use batching: static"
                    )
                if self.batching == "continuous":
                    self._continuous(reqs, ids, gc, sink, meter)
                else:
                    self._static(reqs, ids, gc, sink, meter, _penalties(s))

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

    def _static(self, reqs, ids, gc, sink, meter, penalties=(0.0, 0.0)) -> None:
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
                    extra = (
                        {"logits_processor": [_penalty_processor(width, *penalties)]}
                        if any(penalties)
                        else {}
                    )
                    out = self.model.generate(
                        input_ids=input_ids,
                        attention_mask=mask,
                        generation_config=gc,
                        cache_implementation="static",
                        **extra,
                    )[:, width:]
                else:
                    out = self._greedy(input_ids, mask, gc.max_new_tokens, penalties)
            meter.back(len(idx))
            for row, i in enumerate(idx):
                a = self._answer(len(ids[i]), out[row].tolist(), gc.max_new_tokens)
                sink(reqs[i], a)
                meter.answered(a.completion_tokens)

    def _greedy(self, input_ids, mask, max_new_tokens: int, penalties=(0.0, 0.0)):
        """Greedy decoding of one left-padded batch; the new tokens, [B, <= max_new_tokens].

        The same tokens as ``generate(do_sample=False)`` (bench/generate.py compares them answer by answer),
        in a plain loop over a preallocated ``StaticCache``: HF's default cache grows by concatenation, which
        copies every row's keys and values at every step, and ``generate``'s per-step bookkeeping costs
        more than a tiny model's forward pass. Together about 2x on CPU (bench/generate.py). A row that has
        produced eos leaves the batch (its cache rows with it) once a quarter of the rows still decoding have
        finished, so a batch no longer costs its longest answer's length times its size; the rows left decode
        the same tokens (each row's attention and positions are its own). Stops when every row has produced
        eos; a finished row's later positions hold eos. ``penalties`` (frequency, presence) as ``penalize``
        applies them, the same as ``generate`` with ``_penalty_processor``."""
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
        eos = self.tok.eos_token_id
        penalized = any(penalties)
        counts = (
            out.logits.new_zeros(b, out.logits.shape[-1]) if penalized else None
        )  # each row's answer tokens
        nxt = out.logits[:, -1].argmax(-1)
        tokens = torch.full((b, max_new_tokens), eos, dtype=torch.long, device=nxt.device)
        tokens[:, 0] = nxt
        rows = torch.arange(b, device=nxt.device)  # the batch row each row still decoding came from
        done = nxt == eos
        pos = pos[:, -1:]
        step = self._decode_step()
        n = 1
        for t in range(1, max_new_tokens):
            finished = int(done.sum())
            if finished == len(rows):
                break
            if finished and 4 * finished >= len(rows):  # drop the finished rows: later steps skip them
                keep = (~done).nonzero().squeeze(1)
                _keep_cache_rows(cache, keep)
                rows, nxt, pos, full, done = rows[keep], nxt[keep], pos[keep], full[keep], done[keep]
                counts = counts[keep] if penalized else None
            full[:, width + t - 1] = 1
            pos = pos + 1
            prev = nxt  # the token each row just emitted: the input of this step, part of its answer
            # the whole cache's mask (later positions 0): one shape until rows leave, as a compiled step likes
            out = step(
                input_ids=nxt[:, None],
                attention_mask=full,
                position_ids=pos,
                cache_position=torch.tensor([width + t - 1], device=mask.device),
                logits_to_keep=1,
                **{kw: cache},
            )
            logits = out.logits[:, -1]
            if penalized:
                counts[torch.arange(len(rows), device=nxt.device), prev] += 1
                logits = penalize(logits, counts, *penalties)
            nxt = logits.argmax(-1)
            tokens[rows, t] = torch.where(done, eos, nxt)
            done |= nxt == eos
            n = t + 1
        return tokens[:, :n].cpu()

    def _decode_step(self):
        """The model's forward for one-token steps; compiled (torch.compile, shapes dynamic, so one compile
        serves every batch) with ``compile``. Compiling costs tens of seconds once and fuses
        the many small kernels of a small model's step; it needs a C++ compiler on CPU. Where compiling
        fails the step runs uncompiled, with a warning."""
        if not self.g.compile or self._compiled is False:
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


def _keep_cache_rows(cache, keep) -> None:
    """Keep only the batch rows ``keep`` of a static cache's keys and values, in place of the cache."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys = layer.keys.index_select(0, keep)
            layer.values = layer.values.index_select(0, keep)
            layer.batch_size = len(keep)
