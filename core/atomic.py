"""Outputs that appear whole or not at all, and survive a power loss once they have appeared.

Every writer in the project goes through these two context managers:

    with atomic_file(path) as tmp:       # write tmp (a sibling of path), then it becomes path
        table.write(tmp)
    with atomic_dir(path) as tmp:        # fill the directory tmp, then it replaces path
        model.save_pretrained(tmp)

On a clean exit the new bytes are flushed to disk (``fsync`` of the file, or of every file in the
directory and the directory itself) before the rename, and the parent directory is fsynced after it, so
a crash leaves either the old output or the new one, never a zero-length or half-written file under the
final name. On an exception the temporary is removed and the old output is left as it was.

Temporary names start with ``.`` and contain ``.tmp-``, so readers and listings can tell them apart; after the
mark comes the writer's pid and host (``.NAME.tmp-PID-hHOST-RANDOM``), so that a stage clearing what killed
writers left can tell whether it may judge the writer at all.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARK = ".tmp-"
# A pid means something only on the host (and in the pid namespace: a container has its own hostname too)
# where it was taken. Several hosts or containers may write into one shared work directory.
HOST_ID = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# Another host's temporary is left alone, unless no writer could still be at it after this long.
FOREIGN_STALE_S = 24 * 3600


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-h{HOST_ID}-{uuid.uuid4().hex[:8]}")


def _writer(tail: str) -> tuple[int | None, str | None]:
    """(pid, host id) from what follows the mark: ``PID-hHOST-RANDOM``, or ``PID-RANDOM`` (written before
    the host was recorded: taken as this host's)."""
    parts = tail.split("-")
    pid = int(parts[0]) if parts[0].isdigit() else None
    host = parts[1][1:] if len(parts) >= 3 and parts[1].startswith("h") and len(parts[1]) == 9 else HOST_ID
    return pid, host


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (a no-op where the platform cannot)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and /proc-like mounts) refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_file: nothing was written to {tmp} for {path}")
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces ``path`` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.mkdir()
    old = None
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


def remove_stale(dirs: list[Path]) -> list[Path]:
    """Remove the temporaries that killed writers left in ``dirs`` (a stage calls it as it starts); returns
    what went.

    A temporary whose writer is still running (its pid, in the name, is alive on this host) is left alone: two
    workers may share a folder. One another host (or container) wrote is left alone too, since its pid cannot be
    judged from here, until it is ``FOREIGN_STALE_S`` old. ``.NAME.tmp-old-*`` is the previous output an ``atomic_dir`` swap had moved
    aside when it was killed; where NAME itself is missing, it is put back instead of removed.
    """
    gone = []
    for d in {Path(x) for x in dirs}:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            name = e.name
            if not name.startswith(".") or TMP_MARK not in name:
                continue
            final, _, tail = name[1:].partition(TMP_MARK)
            path = Path(e.path)
            if tail.startswith("old-"):
                target = path.with_name(final)
                if not target.exists():
                    os.replace(path, target)
                    continue
            else:
                pid, host = _writer(tail)
                if host != HOST_ID:
                    try:
                        if time.time() - e.stat(follow_symlinks=False).st_mtime < FOREIGN_STALE_S:
                            continue
                    except OSError:
                        continue
                elif pid is not None and (pid == os.getpid() or _alive(pid)):
                    continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            gone.append(path)
    return gone


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)
