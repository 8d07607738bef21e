"""One writer at a time per stage output: an exclusive lock beside the stage's marker.

Two runs of a stage on one work directory (a scheduled rerun and a manual one, two operators, a retried flow
run whose first attempt is still alive, two hosts on a shared volume) would otherwise write and sweep the same
files. ``held`` takes the lock for the whole run (the reuse check included, so the second run, once it has the
lock, usually finds the first's outputs and reuses them) and either waits for it, saying who holds it, or gives
up at once with that message.

The lock is the kernel's (``flock``), not a file's existence: it goes with its holder, so a holder that was
killed (or whose machine died) blocks nobody, and no one has to judge whether a pid is still alive. Each open of
the lock file is its own claim, so two threads of one process exclude each other too. On NFS, Linux maps
``flock`` onto the protocol's byte-range locks, which the server keeps for every client and frees when a
client's lease lapses: hosts sharing a volume exclude each other. Once held, the file's content says who holds
it (host, pid, start time, command line), for the message a waiter prints. The lock file itself is never
removed (removing it would let two runs each lock a different file of the same name).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path


class Busy(RuntimeError):
    """The lock is held by another run and the caller asked not to wait (or waited its limit)."""


def lock_path(marker: str | os.PathLike) -> Path:
    """The lock that guards the run a marker records: ``DIR/_stage.json`` -> ``DIR/_stage.json.lock``."""
    marker = Path(marker)
    return marker.with_name(marker.name + ".lock")


def holder(path: str | os.PathLike) -> str:
    """Who holds (or last held) the lock, in words: host, pid, since when, doing what."""
    try:
        h = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        h = {}
    if not h:
        return "a run that has not said who it is yet"
    return f"pid {h.get('pid')} on {h.get('host')} since {h.get('started')} ({h.get('command', '?')})"


@contextmanager
def held(
    path: str | os.PathLike,
    what: str,
    wait: bool = True,
    timeout_s: float | None = None,
    say: Callable[[str], object] | None = None,
    poll_s: float = 0.25,
) -> Iterator[Path]:
    """Hold the exclusive lock ``path`` for the block; ``what`` names the guarded run in messages.

    ``wait=False``: raise ``Busy`` at once where another run holds it; else wait (polling, so that an interrupt
    is served at once), saying once who holds it, and raise ``Busy`` after ``timeout_s`` where one is given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        t0 = time.monotonic()
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            who = holder(path)
            if not wait:
                raise Busy(
                    f"{what}: another run holds {path}: {who}; wait for it, or run again without --no-wait"
                )
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise Busy(f"{what}: still held after {timeout_s:.0f}s by {who} ({path})")
            if not said and say is not None:
                say(f"{what}: waiting for the run that holds {path}: {who}")
                said = True
            time.sleep(poll_s)
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing releases the lock
