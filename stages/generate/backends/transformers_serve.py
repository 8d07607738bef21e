"""A ``transformers serve`` process on a loopback port, for the openai_server backend to talk to."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path

from core.extras import check
from core.log import console
from core.proc import Child
from stages.generate.backends.base import ServerDied

CB_BLOCK_TOKENS = (
    256  # tokens per block of the continuous-batching engine's paged KV cache (its page_size default)
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_inodes(port: int) -> set[str] | None:
    """The socket inodes listening on 127.0.0.1:``port`` (or any address), from /proc/net/tcp; None where
    there is no /proc to ask (macOS)."""
    found: set[str] = set()
    wanted = f":{port:04X}"
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        return None
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[1].endswith(wanted) and f[3] == "0A":  # 0A: LISTEN
                found.add(f[9])
    return found


def holds_socket(pid: int, inodes: set[str]) -> bool:
    """Whether process ``pid`` has one of the socket ``inodes`` open."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        try:
            target = os.readlink(fd_dir / name)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


class PortTaken(RuntimeError):
    """Another process took the port between choosing it and the server binding it."""


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
        cb_cache_tokens: int | None = None,
        cb_max_batch_tokens: int | None = None,
    ):
        self.model_dir, self.log_path = Path(model_dir), Path(log_path)
        self.fixed_port = (
            port is not None
        )  # a port of our own choosing may be taken before the server binds it
        self.port = port or free_port()
        self.timeout_s, self.device, self.cb = timeout_s, device, continuous_batching
        self.cb_cache_tokens, self.cb_max_batch_tokens = cb_cache_tokens, cb_max_batch_tokens
        self.child: Child | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> str:
        """Start the server and wait until it answers; returns its URL.

        The port is chosen free, then the server binds it: another process may take it in between. The
        server then dies (address in use) and is started again on another port, up to three times; and
        ``ready`` only believes a health check when the listening socket belongs to our own process, so an
        impostor answering on the port is never taken for it."""
        check(("fastapi", "uvicorn"), "serving", "generate.backend transformers-serve")
        for attempt in range(3):
            try:
                return self._start_once()
            except PortTaken:
                if self.fixed_port or attempt == 2:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self) -> str:
        exe = Path(sys.executable).with_name("transformers")
        cmd = [str(exe) if exe.exists() else "transformers", "serve", str(self.model_dir)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--device", self.device]
        cmd += ["--log-level", "warning"] + (["--continuous-batching"] if self.cb else [])
        if self.cb and self.cb_cache_tokens:  # else the engine sizes its paged cache from the device's memory
            cmd += ["--cb-num-blocks", str(-(-self.cb_cache_tokens // CB_BLOCK_TOKENS))]
        if self.cb and self.cb_max_batch_tokens:
            cmd += ["--cb-max-batch-tokens", str(self.cb_max_batch_tokens)]
        console.print(
            f"starting transformers serve for {self.model_dir} on port {self.port} (log: {self.log_path})"
        )
        self.child = Child(cmd, log_path=self.log_path, keep=40).start()
        self._warned = False
        deadline = time.monotonic() + self.timeout_s
        while True:
            if not self.child.running:
                rc = self.child.wait()
                tail = "\n".join(self.child.tail())
                if "address already in use" in tail.lower():
                    raise PortTaken(
                        f"port {self.port} was taken before transformers serve could bind it:\n{tail}"
                    )
                raise ServerDied(f"transformers serve exited with code {rc} before it was ready:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200 and self._answered_by_us():
                        return self.url
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerDied(  # a BackendError: the stage says it in one line, how to resume included
                    f"transformers serve was not ready after {self.timeout_s}s (generate.backend.start_timeout_s; "
                    f"log: {self.log_path})"
                )
            time.sleep(0.5)

    def death(self) -> str | None:
        """None while the server runs (or was never started); once it has exited, what a user needs to know: its
        exit code (a signal named, with the usual sender of SIGKILL) and the end of its log."""
        if self.child is None or self.child.proc is None or self.child.running:
            return None
        rc = self.child.wait(timeout=30)
        why = f"exit code {rc}"
        if rc < 0:
            name = signal.Signals(-rc).name
            why += f" (killed by {name}" + (
                ": the kernel's OOM killer sends it when memory runs out; see `dmesg`)"
                if name == "SIGKILL"
                else ")"
            )
        tail = "\n".join(self.child.tail(20)) or "(nothing)"
        return f"transformers serve (pid {self.child.proc.pid}) died with {why}; the end of {self.log_path}:\n{tail}"

    def _answered_by_us(self) -> bool:
        """Whether the socket listening on our port is our server's. Without /proc (macOS) it cannot be told:
        the health check is believed, and only the port choice guards it."""
        inodes = listening_inodes(self.port)
        if inodes is None:
            return True
        pid = self.child.proc.pid if self.child is not None and self.child.proc is not None else None
        if pid is not None and holds_socket(pid, inodes):
            return True
        if inodes and not self._warned:
            # someone else listens there while ours is still loading: it cannot bind, it will die and say so
            console.print(f"[yellow]generate: port {self.port} is answered by another process; not ours[/]")
            self._warned = True
        return False

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
