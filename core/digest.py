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
    removed, resized or touched file gives a new fingerprint.
    """
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            st = p.stat()
            h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "listing:" + h.hexdigest()
