"""Mixing: each task's target share of a split, met by the largest set that has exactly those shares."""

from __future__ import annotations

import math
from collections import defaultdict

from stages.build.seeded import unit


def mix_split(examples: list[dict], mix: dict[str, float], seed: int) -> tuple[list[dict], dict[str, int]]:
    """The largest subset whose task counts follow ``mix``; returns it and the rows left out per task."""
    total = sum(mix.values())
    share = {t: v / total for t, v in mix.items() if v > 0}
    by_task: dict[str, list[dict]] = defaultdict(list)
    for e in examples:
        by_task[e["task"]].append(e)
    # N examples in all: each task t needs share[t] * N of its own; the scarcest task bounds N.
    n = min(len(by_task.get(t, [])) / s for t, s in share.items())
    keep, left = [], {}
    for t, rows in by_task.items():
        k = math.floor(share.get(t, 0.0) * n + 1e-9)
        rows = sorted(rows, key=lambda e: unit(str(seed), "mix", e["example_id"]))
        keep += rows[:k]
        if len(rows) > k:
            left[t] = len(rows) - k
    return keep, left
