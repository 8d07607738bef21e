"""The batching queue: requests that arrive together are decoded as one batch by the one thread that owns the model.

The thread takes the first waiting request, then gathers others for up to ``wait_ms`` or until it holds
``max_batch``, and decodes them with ``Engine.answer`` (batched greedy). Each request hears its text pieces (if
it streams) and its answer through its own asyncio queue, as soon as its row is done. Streaming and plain
requests share batches. At most ``max_pending`` requests are admitted at once (queued or decoding);
``submit`` refuses the next with ``Busy`` (HTTP 429) rather than queueing without bound.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from splsm.serving.engine import Answer, Engine, Query


class Busy(Exception):
    """The server holds as many requests as it admits."""


@dataclass
class Job:
    """One request in the queue; ``events`` yields ("text", piece), then ("done", Answer) or ("error", message)."""

    query: Query
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # its client left: skipped if it has not started decoding

    def emit(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass


class Batcher:
    def __init__(self, engine: Engine, max_batch: int = 8, wait_ms: float = 10.0, max_pending: int = 64):
        self.engine = engine
        self.max_batch = max_batch if engine.batchable else 1
        self.wait_s = wait_ms / 1000
        self.max_pending = max_pending
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # the latest batches' sizes, for tests and health
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self._pending

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="splsm-decoder", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=60)
            self._thread = None

    def submit(self, query: Query, stream: bool) -> Job:
        """Queue a checked query (from the event loop's thread); Busy when ``max_pending`` are held."""
        with self._lock:
            if self._pending >= self.max_pending:
                raise Busy(f"the server holds {self._pending} requests, its limit; retry shortly")
            self._pending += 1
        job = Job(query, stream, asyncio.get_running_loop())
        self._queue.put(job)
        return job

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = [first], False
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            self._decode(batch)
            if stop:
                return

    def _decode(self, batch: list[Job]) -> None:
        live = [j for j in batch if not j.cancelled]
        done = set()

        def on_text(i: int, piece: str) -> None:
            if live[i].stream:
                live[i].emit("text", piece)

        def on_done(i: int, answer: Answer) -> None:
            done.add(i)
            self._release()
            live[i].emit("done", answer)

        try:
            if live:
                self.batch_sizes.append(len(live))
                self.engine.answer([j.query for j in live], on_text, on_done)
        except Exception as e:  # the model failed (out of memory, ...): every request of the batch hears it
            for i, j in enumerate(live):
                if i not in done:
                    self._release()
                    j.emit("error", f"decoding failed: {type(e).__name__}: {e}")
        for _ in range(len(batch) - len(live)):
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1
