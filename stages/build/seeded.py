"""Seeded positions: a hash of the seed and an id gives a number in [0, 1), the same on every run.

Every choice the build stage makes (split, which near-duplicate survives, which examples a mix keeps,
the order rows are sharded in) comes from such a number, so a rebuild, or a build with more data,
moves nothing it does not have to.
"""

from __future__ import annotations

import hashlib


def unit(*parts: str) -> float:
    """A number in [0, 1) from a hash: the same input always lands in the same place."""
    h = hashlib.sha256("\0".join(parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64
