"""Walking a corpus tree with each file's size and mtime, in a stable order, one directory at a time."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator


def walk(root: str) -> Iterator[tuple[str, list[tuple[str, int, int]]]]:
    """(directory, [(file name, size, mtime_ns)]) for every directory under ``root``, sorted, streaming.

    Directories come as real paths: the walk starts at the real path of ``root`` and does not follow
    links to directories, so no directory it yields needs resolving again. Files are stat'ed relative to
    their directory's descriptor (``fstatat``): a rerun over an unchanged corpus is mostly these stats.
    A link to a file is followed (its target's size and mtime); a dangling one is listed with -1.
    """
    stack = [os.path.realpath(root)]
    while stack:
        d = stack.pop()
        files, dirs = [], []
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            with os.scandir(fd) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        dirs.append(os.path.join(d, e.name))
                    else:
                        try:
                            st = e.stat()
                            files.append((e.name, st.st_size, st.st_mtime_ns))
                        except OSError:  # a dangling link: listed with no size, the harvest rejects it
                            files.append((e.name, -1, -1))
        except OSError:
            continue
        finally:
            os.close(fd)
        files.sort()
        yield d, files
        stack.extend(sorted(dirs, reverse=True))


def digest(files: list[tuple[str, int, int]], *extra: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update("\n".join(f"{n}\0{s}\0{m}" for n, s, m in files).encode())
    for x in extra:
        h.update(b"\0")
        h.update(x)
    return h.hexdigest()
