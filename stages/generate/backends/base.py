"""What every generate backend shares: the request, the sink answers go to, the error, the progress meter.

A backend answers with ``backend.run(shards, sink, meter)``: every request once, each answer handed to
``sink`` as soon as it arrives (the caller commits it to the cache). The backends, one module each:
``openai_server`` (OpenAI-compatible servers: vLLM replicas, or the ``transformers serve`` process that
``transformers_serve`` starts), ``vllm_offline`` (vLLM's engine in this process) and ``transformers_local``
(the LLM in this process).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from stages.generate.cache import Answer


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


class ServerDied(BackendError):
    """A server process the stage started (and watches) exited under the run; the message has its exit code and
    the end of its log."""


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
