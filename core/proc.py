"""Child processes: start one in its own process group, stream its output, keep the tail, stop the group.

Used wherever the project starts a program that runs for a while: torchrun and its workers (train), a
stage's CLI in a subprocess (the runner), ``transformers serve`` (generate). Each gets the same handling:

- the child starts a session of its own, so stopping it stops everything it started (torchrun's
  workers, a server's threads) and a Ctrl-C meant for us is not delivered to it twice;
- its stdout and stderr arrive as lines, handed to ``on_line`` (a console, a Prefect logger), appended
  to ``log_path`` if given, and the last ``keep`` of them kept for the error message;
- ``stop`` sends SIGTERM to the group, waits ``grace_s`` (a trainer writes its checkpoint then), and
  sends SIGKILL to whatever is left;
- where util-linux is, the child gets SIGTERM when we die, however we die (``PR_SET_PDEATHSIG``): a stage killed with
  SIGKILL leaves no ``transformers serve`` holding a port, no torchrun training on (torchrun passes the
  SIGTERM on to its workers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


def stream_lines(lines: Iterable[str], on_line: Callable[[str], None] | None, keep: int = 80) -> list[str]:
    """Hand each line (without its newline) to ``on_line``; return the last ``keep`` lines."""
    tail: deque[str] = deque(maxlen=keep)
    for line in lines:
        line = line.rstrip("\n")
        if on_line is not None:
            on_line(line)
        tail.append(line)
    return list(tail)


def _die_with_us(cmd: list[str]) -> list[str]:
    """``cmd`` run so that it gets SIGTERM when we die, through util-linux's ``setpriv --pdeathsig`` (the
    setting survives its exec); as it is where there is no setpriv (macOS). Not a ``preexec_fn``: that may
    deadlock a child forked while another thread holds a lock, and flows run in threads."""
    import shutil

    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *cmd] if setpriv else cmd


class Child:
    """One child process and its output; ``with Child(cmd) as c:`` stops it on the way out."""

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        on_line: Callable[[str], None] | None = None,
        log_path: str | os.PathLike | None = None,
        keep: int = 80,
    ):
        self.cmd = [str(c) for c in cmd]
        self.env, self.cwd = env, cwd
        self.on_line = on_line
        self.log_path = Path(log_path) if log_path is not None else None
        self._tail: deque[str] = deque(maxlen=keep)
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> Child:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            _die_with_us(self.cmd),
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._pump, name=f"output of {self.cmd[0]}", daemon=True)
        self._reader.start()
        return self

    def _pump(self) -> None:
        log = open(self.log_path, "a") if self.log_path is not None else None
        try:
            for line in self.proc.stdout:
                line = line.rstrip("\n")
                self._tail.append(line)
                if log is not None:
                    log.write(line + "\n")
                    log.flush()
                if self.on_line is not None:
                    self.on_line(line)
        finally:
            if log is not None:
                log.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int | None = None) -> list[str]:
        lines = list(self._tail)
        return lines if n is None else lines[-n:]

    def wait(self, timeout: float | None = None) -> int:
        """The exit status, once the child has exited and its output is read (TimeoutExpired past ``timeout``)."""
        rc = self.proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=30)
        return rc

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM to the child's process group, SIGKILL after ``grace_s`` (at once when it is 0); the exit
        status, None if never started."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
                self.proc.wait(timeout=grace_s if grace_s > 0 else None)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        # the group may outlive its leader (a worker that ignored SIGTERM): nothing of it stays behind
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._reader is not None:
            self._reader.join(timeout=5)
        return self.proc.returncode

    def __enter__(self) -> Child:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
