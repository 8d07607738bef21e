"""vLLM's offline engine in this process (needs the vllm package, on a GPU machine)."""

from __future__ import annotations

from pathlib import Path

from core.config import VLLMBackendConfig
from stages.generate.backends.base import BackendError, Meter, Request, Sink
from stages.generate.cache import Answer


class VLLMBackend:
    """vLLM's offline engine: a whole shard per ``LLM.generate`` call, so the engine schedules it at once."""

    name = "vllm"

    def __init__(self, llm_dir: Path, settings: VLLMBackendConfig, seed: int):
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
            model=str(llm_dir),
            tokenizer=str(llm_dir),
            seed=seed,
            trust_remote_code=False,
            **settings.engine_args,
        )

    def run(self, shards: list[list[Request]], sink: Sink, meter: Meter) -> None:
        for shard in shards:
            params = [
                self.vllm.SamplingParams(
                    temperature=r.sampling["temperature"],
                    top_p=r.sampling["top_p"],
                    max_tokens=r.sampling["max_tokens"],
                    seed=r.sampling["seed"],
                    frequency_penalty=r.sampling.get("frequency_penalty", 0.0),
                    presence_penalty=r.sampling.get("presence_penalty", 0.0),
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
