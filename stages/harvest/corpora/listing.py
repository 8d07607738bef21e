"""Walking a corpus tree with each file's size and mtime, in a stable order, one directory at a time.

A rerun of harvest over a large corpus is mostly this walk: one ``stat`` per file, however few files
changed. Past the first ``HANDOFF_FILES`` files the rest of the walk goes on in a helper process, which sends
the listings over in batches while the harvest handles the ones it has (compares digests, takes over
unchanged rows, probes new files): the walk and that work overlap on two cores instead of adding up.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import queue
from collections.abc import Iterator

from core.log import console

Listing = tuple[str, list[tuple[str, int, int]]]  # (directory, [(file name, size, mtime_ns)])

HANDOFF_FILES = 50_000  # a tree this small is walked in this process: a helper would cost more than it saves
BATCH_FILES = 8192  # listings go over in batches of about this many files: one pickle per batch, not per file
QUEUED_BATCHES = 16  # the helper waits when this many batches wait to be read: memory stays bounded
_POLL_S = 1.0  # how often a reader waiting for a batch checks that the helper is still alive


def walk(root: str, helper: bool | None = None) -> Iterator[Listing]:
    """(directory, [(file name, size, mtime_ns)]) for every directory under ``root``, sorted, streaming.

    Directories come as real paths: the walk starts at the real path of ``root`` and does not follow
    links to directories, so no directory it yields needs resolving again. Files are stat'ed relative to
    their directory's descriptor (``fstatat``). A link to a file is followed (its target's size and mtime);
    a dangling one is listed with -1. The order is depth first, each directory's entries sorted by name,
    whichever process lists them. ``helper``: walk on in a helper process past ``HANDOFF_FILES`` files
    (default: when this process may use more than one core).
    """
    if helper is None:
        helper = len(os.sched_getaffinity(0)) > 1
    stack = [os.path.realpath(root)]
    files_listed = 0
    while stack:
        if helper and files_listed >= HANDOFF_FILES:
            yield from _walk_in_helper(stack)
            return
        listing = _list(stack.pop(), stack)
        if listing is not None:
            files_listed += len(listing[1])
            yield listing


def _list(d: str, stack: list[str]) -> Listing | None:
    """One directory's files, sorted; its subdirectories go on ``stack`` so the first by name comes off first.
    None for a directory that cannot be read."""
    files, dirs = [], []
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
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
        return None
    finally:
        os.close(fd)
    files.sort()
    stack.extend(sorted(dirs, reverse=True))
    return d, files


def _produce(stack: list[str], out, batch_files: int) -> None:
    """The helper process: walk on from ``stack`` and put batches of listings on ``out``, then None."""
    batch: list[Listing] = []
    n = 0
    while stack:
        listing = _list(stack.pop(), stack)
        if listing is None:
            continue
        batch.append(listing)
        n += len(listing[1])
        if n >= batch_files:
            out.put(batch)
            batch, n = [], 0
    out.put(batch)
    out.put(None)


def _walk_in_helper(stack: list[str], produce=_produce) -> Iterator[Listing]:
    """The listings a helper process makes from ``stack``, in the order this process would make them. If the
    helper cannot start or dies, this process walks the rest itself (from the same stack, skipping the
    directories the helper already sent)."""
    start = list(stack)
    received = 0
    ctx = multiprocessing.get_context("forkserver")  # not fork: this process may hold threads and their locks
    try:
        q = ctx.Queue(maxsize=QUEUED_BATCHES)
        p = ctx.Process(target=produce, args=(start, q, BATCH_FILES), daemon=True, name="harvest-listing")
        p.start()
    except (OSError, AssertionError, RuntimeError, ValueError) as e:  # no processes here (a daemon...)
        console.print(f"[yellow]harvest[/]: no helper process to list the corpus ({e!r}); listing here")
        p = None
    try:
        while p is not None:
            try:
                batch = q.get(timeout=_POLL_S)
            except queue.Empty:
                if p.is_alive():
                    continue
                try:  # it may have put its last batches just before it ended
                    batch = q.get(timeout=_POLL_S)
                except queue.Empty:
                    break
            if batch is None:
                return
            for listing in batch:
                received += 1
                yield listing
    finally:
        if p is not None:
            if p.is_alive():
                p.kill()
            p.join()
            q.close()
            q.cancel_join_thread()
    # the helper never started, or ended without finishing: the same walk here, past what it sent
    if p is not None:
        console.print(
            f"[yellow]harvest[/]: the listing process ended (exit code {p.exitcode}) after {received:,} "
            "directories; listing the rest here"
        )
    rest = list(start)
    skip = received
    while rest:
        listing = _list(rest.pop(), rest)
        if listing is None:
            continue
        if skip:
            skip -= 1
            continue
        yield listing


def digest(files: list[tuple[str, int, int]]) -> str:
    """A directory listing's digest. ``repr`` is exact and cheap, and takes any name the file system holds
    (one that is not valid UTF-8 comes as escapes, not an encoding error)."""
    return hashlib.blake2b(repr(files).encode(), digest_size=16).hexdigest()
