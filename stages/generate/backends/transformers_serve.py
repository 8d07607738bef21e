"""A ``transformers serve`` process on a loopback port, for the openai_server backend to talk to."""

from __future__ import annotations

import socket
import sys
import time
import urllib.request
from pathlib import Path

from core.extras import check
from core.log import console
from core.proc import Child


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A ``transformers serve`` process on a loopback port; ``start``/``stop`` may be called again (the
    fault test restarts it on the same port). Its output goes to ``log_path``; the end of it is in the
    error when the server dies before it is ready."""

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
        self.child: Child | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> str:
        check(("fastapi", "uvicorn"), "serving", "generate.backend transformers-serve")
        exe = Path(sys.executable).with_name("transformers")
        cmd = [str(exe) if exe.exists() else "transformers", "serve", str(self.model_dir)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--device", self.device]
        cmd += ["--log-level", "warning"] + (["--continuous-batching"] if self.cb else [])
        console.print(
            f"starting transformers serve for {self.model_dir} on port {self.port} (log: {self.log_path})"
        )
        self.child = Child(cmd, log_path=self.log_path, keep=40).start()
        deadline = time.monotonic() + self.timeout_s
        while True:
            if not self.child.running:
                rc = self.child.wait()
                tail = "\n".join(self.child.tail())
                raise RuntimeError(f"transformers serve exited with code {rc} before it was ready:\n{tail}")
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
        """Stop the server: SIGTERM (SIGKILL after 20 s), or at once with ``kill``."""
        if self.child is not None:
            self.child.stop(grace_s=0.0 if kill else 20.0)

    def __enter__(self) -> str:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
