"""Walking a corpus tree with each file's size and mtime, in a stable order, one directory at a time.

A rerun of harvest over a large corpus is mostly this walk: one ``stat`` per file, however few files
changed. (Walking on in a helper process that sends the listings over was tried: at 1,000,000 files the
helper walked slower than this process does, and the harvest gained nothing; see
bench/results/harvest-1m.txt.)
"""

from __future__ import annotations

import hashlib
import marshal
import os
from collections.abc import Iterator

Listing = tuple[str, list[tuple[str, int, int]]]  # (directory, [(file name, size, mtime_ns)])


def walk(root: str) -> Iterator[Listing]:
    """(directory, [(file name, size, mtime_ns)]) for every directory under ``root``, sorted, streaming.

    Directories come as real paths: the walk starts at the real path of ``root`` and does not follow
    links to directories, so no directory it yields needs resolving again. Files are stat'ed relative to
    their directory's descriptor (``fstatat``). A link to a file is followed (its target's size and mtime);
    a dangling one is listed with -1. The order is depth first, each directory's entries sorted by name.
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


def digest(files: list[tuple[str, int, int]]) -> str:
    """A directory listing's digest. marshal's version 2 format is exact, has no back-references (its bytes
    depend on the values only), takes any name the file system holds (one that is not valid UTF-8 as well),
    and costs about a fifth of formatting the listing as text: a rerun makes one per directory."""
    return hashlib.blake2b(marshal.dumps(files, 2), digest_size=16).hexdigest()
