"""Content identities: a file's SHA-256, and a cheap version id of a directory tree."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_dir(path: Path) -> str:
    """A cheap version id of a directory: the sorted list of (relative path, size, mtime) hashed.

    Corpora and LLM directories run to hundreds of GB, so we do not read their bytes; any added,
    removed, resized or touched file gives a new fingerprint. A link whose target is gone (or a file
    that cannot be stat'ed) is skipped, named in a warning, and enters the fingerprint as missing: a
    corpus with one dangling link is still a corpus, and the link coming back is a change.
    """
    from core.log import console

    h = hashlib.sha256()
    broken: list[str] = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            rel = p.relative_to(path)
            try:
                st = p.stat()
            except OSError as e:
                broken.append(f"{rel} ({'dangling link' if p.is_symlink() else e.strerror})")
                h.update(f"{rel}\0missing\n".encode())
                continue
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if broken:
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        console.print(
            f"[yellow]warning: {path}: skipped {len(broken)} unreadable entries: {', '.join(broken[:3])}{more}[/]"
        )
    return "listing:" + h.hexdigest()
