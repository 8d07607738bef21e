"""Shards: the examples as ``SPLIT-NNNNN.parquet`` files a distributed loader streams, with a manifest."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from core.atomic import atomic_dir
from core.config import BuildConfig
from core.digest import sha256_file
from core.paths import shard_manifest
from core.tables import write_table
from schemas import EXAMPLES, SHARDS, to_table
from stages.build.seeded import unit


def write_shards(examples: list[dict], out: Path, b: BuildConfig) -> list[dict]:
    """Write ``out/{split}-NNNNN.parquet`` and the manifest into a fresh folder, then swap it in whole."""
    by_split: dict[str, list[dict]] = defaultdict(list)
    for e in examples:
        by_split[e["split"]].append(e)
    manifest = []
    with atomic_dir(out) as tmp:
        for split, rows in sorted(by_split.items()):
            # A hash order spreads tasks, speakers and durations evenly over shards and row groups.
            rows = sorted(rows, key=lambda e: unit(str(b.seed), "order", e["example_id"]))
            for i in range(0, len(rows), b.rows_per_shard):
                chunk = rows[i : i + b.rows_per_shard]
                name = f"{split}-{i // b.rows_per_shard:05d}.parquet"
                path = write_table(to_table(chunk, EXAMPLES), tmp / name, EXAMPLES, b.row_group_rows)
                manifest.append(
                    dict(
                        file=name,
                        split=split,
                        rows=len(chunk),
                        row_groups=pq.ParquetFile(path).num_row_groups,
                        bytes=path.stat().st_size,
                        sha256=sha256_file(path),
                        audio_s=float(sum(e["duration_s"] for e in chunk)),
                    )
                )
        write_table(to_table(manifest, SHARDS), shard_manifest(tmp), SHARDS)
    return manifest
