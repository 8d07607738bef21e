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

import errno
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


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """A write ran out of space (or quota): one line naming what was being written and what is free."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        super().__init__(errno.ENOSPC, no_space_message(path), str(path))

    def __str__(self) -> str:
        return self.strerror


def no_space_message(path: str | os.PathLike) -> str:
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
        free = f"{_size(usage.free)} free of {_size(usage.total)}"
    except OSError:
        free = "free space unknown"
    return (
        f"no space left on the device writing {path} ({free}); the previous version of every output is kept "
        "and no temporary is left: free some space and run again"
    )


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def is_no_space(e: BaseException) -> bool:
    """Whether an error is a full disk (or quota), however a library reports it (pyarrow: an OSError with
    errno 28; DuckDB: its own IOException whose message carries the system's)."""
    if isinstance(e, OSError) and e.errno in NO_SPACE:
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text


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
    except Exception as e:
        if is_no_space(e) and not isinstance(e, DiskFull):
            raise DiskFull(path) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def same_tree(a: Path, b: Path) -> bool:
    """Whether two directories hold the same files with the same bytes (names relative to each)."""
    import filecmp

    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())

    if not b.is_dir():
        return False
    names = files(a)
    if names != files(b):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


@contextmanager
def atomic_dir(path: str | os.PathLike, keep_identical: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces ``path`` whole.

    ``keep_identical``: where ``path`` already holds the same files with the same bytes, it is left as it is (its
    files keep their modification times, so a fingerprint of the folder that reads them stays the same)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.mkdir()
    old = None
    try:
        yield tmp
        if keep_identical and same_tree(tmp, path):
            return
        _fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except Exception as e:
        if is_no_space(e) and not isinstance(e, DiskFull):
            raise DiskFull(path) from e
        raise
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
