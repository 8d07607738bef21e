"""The completions endpoint of OpenAI-compatible servers: vLLM replicas in production, ``transformers serve``
on a laptop. Many requests in flight, retries with exponential backoff and jitter, several base URLs
balanced by their number of requests in flight.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from core.config import ClientSettings
from core.log import console
from stages.generate.backends.base import BackendError, Meter, Request, ServerDied, Sink
from stages.generate.cache import Answer
from stages.generate.filters import ERROR

WATCH_S = 0.5  # how often a watched server is asked whether it still runs


def _refused(e: BaseException) -> int | None:
    """The status of an error that belongs to this one request (its prompt or parameters), not to the server
    or the setup: an over-long context (400), a body too large (413), parameters the model refuses (422)."""
    import openai

    if isinstance(e, openai.APIStatusError) and e.status_code in (400, 413, 422):
        return e.status_code
    return None


def _server_message(e: BaseException) -> str:
    """What the server said: the ``message`` of its error body (vLLM's and OpenAI's shape), else the error."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        if isinstance(inner.get("message"), str):
            return inner["message"]
    return str(e)


def _retryable(e: BaseException) -> bool:
    import openai

    if isinstance(e, openai.APIConnectionError):  # refused, reset, timed out
        return True
    if isinstance(e, openai.APIStatusError):
        return e.status_code in (408, 409, 429) or e.status_code >= 500
    return False


def served_identity(base_urls: list[str], model: str, api_key: str | None, timeout_s: float = 30.0) -> str:
    """What the servers say ``model`` is: the ``root`` (vLLM: the path or hub id it loaded, and its
    ``max_model_len``) of the entry ``/v1/models`` lists under that name, the same on every replica.

    Raises BackendError when a server cannot be asked, does not list the name, reports nothing beyond the name,
    or when replicas disagree (two models behind one name would mix their answers in one table).
    """
    from openai import OpenAI, OpenAIError

    seen: dict[str, str] = {}
    for url in base_urls:
        client = OpenAI(base_url=url, api_key=api_key or "no-key", timeout=timeout_s, max_retries=2)
        try:
            entries = list(client.models.list())
        except OpenAIError as e:
            raise BackendError(f"{url}: cannot list its models to identify {model!r}: {e}") from e
        finally:
            client.close()
        entry = next((m for m in entries if m.id == model), None)
        if entry is None:
            raise BackendError(
                f"{url} does not serve {model!r} (it serves: {', '.join(m.id for m in entries)})"
            )
        extra = entry.model_extra or {}
        root = extra.get("root")
        if not root or root == model:
            raise BackendError(
                f"{url} reports nothing about {model!r} beyond its name: give generate.backend.model_revision "
                "(a hash or version of the weights it serves) so that cached answers are tied to them"
            )
        seen[url] = f"{root}\0{extra.get('max_model_len')}"
    if len(set(seen.values())) > 1:
        detail = "; ".join(f"{u}: {v.split(chr(0))[0]}" for u, v in seen.items())
        raise BackendError(f"the servers serve different models under {model!r}: {detail}")
    return "served:" + next(iter(seen.values()))


class OpenAIBackend:
    """Completions over the OpenAI protocol. The client's own retries are off: ours wait longer (a
    restarting server needs tens of seconds), add jitter so replicas are not hit in lockstep, and move
    a failed request to another replica.

    A replica that fails (refused, reset, timed out, 429, 5xx) is set aside for a cool-down that doubles with
    each failure in a row (``retry_backoff_s`` up to ``retry_backoff_max_s``) and ends at its next answer:
    new requests go to the others meanwhile, and the failed request is sent to one of them at once. Without
    this, a dead replica, idle and so the least loaded, drew every new request first. Only when every replica
    is set aside does a request wait out its own backoff before trying again."""

    name = "openai"

    def __init__(self, base_urls: list[str], model: str, client: ClientSettings, api_key: str | None = None):
        if not base_urls:
            raise ValueError("OpenAIBackend needs at least one base URL")
        self.urls, self.model, self.g = list(base_urls), model, client
        self.api_key = api_key  # None: the servers need no key
        # For a server this stage started: None while it runs, else why it died (``ServerProcess.death``). Polled
        # during the run, so a dead server ends the run at once instead of after every retry's backoff.
        self.watch: Callable[[], str | None] | None = None

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
        key = self.api_key or "no-key"  # the client insists on a string; a server without auth ignores it
        clients = [
            AsyncOpenAI(base_url=u, api_key=key, timeout=g.request_timeout_s, max_retries=0)
            for u in self.urls
        ]
        load = [0] * len(clients)
        failing = [0] * len(clients)  # failures in a row of each replica
        set_aside = [0.0] * len(clients)  # until when (loop time) a failing replica gets no new requests
        gate = asyncio.Semaphore(g.concurrency)
        fatal: list[BaseException] = []
        loop = asyncio.get_running_loop()

        def pick(avoid: int | None) -> int:
            now = loop.time()
            order = sorted(
                range(len(clients)),
                key=lambda i: (set_aside[i] > now, i == avoid, load[i], random.random()),
            )
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
                            # the protocol's own penalties, sent only when on (a server need not know them)
                            **{
                                k: r.sampling[k]
                                for k in ("frequency_penalty", "presence_penalty")
                                if k in r.sampling
                            },
                        )
                        failing[i], set_aside[i] = 0, 0.0
                        break
                    except Exception as e:
                        status = _refused(e)
                        if status is not None:  # this request only: an error row, the run goes on
                            detail = " ".join(_server_message(e).split())[:500]
                            sink(r, Answer("", f"{ERROR}: HTTP {status}: {detail}", 0, 0))
                            meter.answered(0)
                            return
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
                        failing[i] += 1
                        now = loop.time()
                        set_aside[i] = max(set_aside[i], now + self._delay(failing[i]))
                        avoid = i if len(clients) > 1 else None
                        elsewhere = any(set_aside[j] <= now for j in range(len(clients)) if j != i)
                        delay = 0.0 if elsewhere else self._delay(attempt)
                        console.print(
                            f"[yellow]generate: {self.urls[i]}: {type(e).__name__}; retry {attempt}/"
                            f"{g.max_retries} "
                            + ("on another server now" if elsewhere else f"in {delay:.1f}s")
                            + "[/]"
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

        tasks = [asyncio.ensure_future(one(r)) for r in todo]

        async def watchdog() -> None:
            while True:
                await asyncio.sleep(WATCH_S)
                why = self.watch()
                if why is not None:
                    fatal.insert(0, ServerDied(why))
                    for t in tasks:
                        t.cancel()
                    return

        dog = asyncio.ensure_future(watchdog()) if self.watch is not None else None
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            if not fatal:  # cancelled from outside, not by the watchdog
                raise
        finally:
            if dog is not None:
                dog.cancel()
            for c in clients:
                await c.close()
        if fatal:
            raise fatal[0]
