"""The training data loader: streams the build stage's Parquet shards as batches of log-mel features.

Contract (what the training loop may rely on)::

    loader = ExampleLoader(shards, split="train", rank=r, world_size=w, num_workers=k, seed=s)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)          # optional: after a full pass the loader moves on by itself
        for batch in loader:
            ...                          # torch.save(loader.state_dict()) with the model, any time
    loader.load_state_dict(d)            # resume: the next iteration continues exactly where d was taken

``shards``: ``WORKDIR/build/shards`` (or its ``manifest.parquet``), or Parquet files of the examples
table (e.g. ``examples.parquet``) whose ``split`` column is then filtered.

Each batch is a dict:

- ``rows``: the example rows (``example_id, utt_id, split, task, instruction, prefix, suffix, answer,
  transcript, audio_path, offset_s, duration_s, speaker``), only those whose audio was read;
- ``batch``: a ``core.lsm.batch.SpeechBatch`` made by ``Collate``, the function evaluation batches with
  too: float32 ``(B, n_mels, T)`` log-mel features equal to ``WhisperFeatureExtractor``'s (``T = 3000``
  with ``pad_to="30s"``; the batch's longest clip with ``pad_to="longest"``), each clip's frames before
  padding and its seconds (cut at the encoder's input length), and with a ``tokenizer`` the prefix
  (with the tokenizer's special tokens), suffix and answer (+ eos) token ids;
- ``skipped``: clips of this batch (and of earlier batches that lost every clip) whose audio could not be
  read; each is also a ``RuntimeWarning`` naming the example and the file. An unreadable clip never
  stops the epoch.

``chunk_s`` (default 30) is the encoder's input length; a tiny Whisper may take shorter chunks (its
feature extractor's ``chunk_length``), and then "30s" padding, the cut and ``batch_seconds`` use it.

Guarantees:

- **Partition**: per epoch, the split's rows are cut into ``world_size x max(num_workers, 1)``
  contiguous, disjoint slices of a seeded permutation of the row groups; every row is in exactly one
  slice, ranks differ by at most one row. Nothing is dropped: the last batch may be small. Ranks can
  produce different numbers of batches (batches are cut by duration), so a DDP loop must stop all ranks
  together (e.g. a fixed number of steps, or an all-reduced "anyone done" flag).
- **Shuffle**: row-group order by (seed, epoch), then a buffer shuffle of ``shuffle_buffer`` rows per
  slice seeded by (seed, epoch, slice): the same for the same arguments, different each epoch.
- **Batching by duration**: ``bucket_batches`` batches' worth of rows are sorted by duration and cut
  into batches whose padded audio (B x 30 s, or B x the longest clip) stays within ``batch_seconds``
  and ``max_batch_size`` rows, then those batches are shuffled. With ``batching="shuffled"`` (the reference's
  random batches) the rows are cut into batches in the shuffled order they arrive in, under the same limits.
- **Exact resume**: batches come out in a fixed order (round-robin over workers, whatever the process
  timing), and ``state_dict`` counts the batches each worker has delivered; a resumed loader replays
  each worker's plan from the row metadata without reading audio and continues with the next batch.

Token ids are made here, not stored by build: tokenizing a batch costs microseconds next to decoding
its audio, and the same shards then serve any LLM's tokenizer.
"""

from __future__ import annotations

import copy
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core import audio
from core.lsm.batch import Collate
from core.lsm.features import CHUNK_S
from core.paths import shard_manifest
from core.tables import read_table
from schemas import EXAMPLES, SHARDS, check

STATE_VERSION = 1


BATCHINGS = ("duration", "shuffled")  # core.config.LoaderConfig.batching


@dataclass(frozen=True)
class Unit:
    """One row group of one file, and which of its rows belong to the split (None: all of them)."""

    file: str
    row_group: int
    rows: int
    select: tuple[int, ...] | None = None


def _units(shards, split: str) -> list[Unit]:
    """The split's rows as row-group units, in a fixed order, each file's schema checked."""
    if isinstance(shards, str | Path):
        shards = Path(shards)
        manifest = shard_manifest(shards) if shards.is_dir() else shards
        if manifest.name == shard_manifest(shards).name:
            return _units_from_manifest(manifest, split)
        shards = [shards]
    units = []
    for f in sorted(str(Path(s).resolve()) for s in shards):
        pf = pq.ParquetFile(f)
        check(pf.schema_arrow, EXAMPLES, f)
        for g in range(pf.num_row_groups):
            col = pf.read_row_group(g, columns=["split"]).column("split").to_pylist()
            sel = tuple(i for i, s in enumerate(col) if s == split)
            if sel:
                units.append(Unit(f, g, len(sel), None if len(sel) == len(col) else sel))
    return units


def _units_from_manifest(manifest: Path, split: str) -> list[Unit]:
    units = []
    for m in read_table(manifest, SHARDS).to_pylist():
        if m["split"] != split:
            continue
        f = str((manifest.parent / m["file"]).resolve())
        if not Path(f).is_file():
            raise FileNotFoundError(f"shard {f} listed in {manifest} does not exist")
        pf = pq.ParquetFile(f)
        check(pf.schema_arrow, EXAMPLES, f)
        md = pf.metadata
        if md.num_rows != m["rows"] or md.num_row_groups != m["row_groups"]:
            raise ValueError(
                f"shard {f}: {md.num_rows} rows in {md.num_row_groups} row groups, but {manifest} lists "
                f"{m['rows']} rows in {m['row_groups']} (the shard was changed after build)"
            )
        units += [Unit(f, g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
    return units


def _slices(units: list[Unit], seed: int, epoch: int, consumers: int) -> list[list[tuple[Unit, int, int]]]:
    """Per consumer: (unit, start, end) pieces of a seeded permutation of the units, cut into equal slices."""
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(units))
    total = sum(u.rows for u in units)
    bounds = [total * c // consumers for c in range(consumers + 1)]
    out: list[list[tuple[Unit, int, int]]] = [[] for _ in range(consumers)]
    pos = 0
    for i in order:
        u = units[i]
        lo, hi = pos, pos + u.rows
        for c in range(consumers):
            a, b = max(lo, bounds[c]), min(hi, bounds[c + 1])
            if a < b:
                out[c].append((u, a - lo, b - lo))
        pos = hi
    return out


class _Stream(IterableDataset):
    """One epoch of batches for one rank; each worker (or the main process) takes its own slice."""

    def __init__(self, loader: ExampleLoader, epoch: int, skip: list[int]):
        self.loader = loader
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        yield from self.worker_batches(worker)
        yield {"_worker": worker, "_end": True}

    # -- the plan: rows -> shuffled rows -> batches (metadata only) --

    def rows(self, worker: int, rng: np.random.Generator) -> Iterator[dict]:
        ld = self.loader
        consumer = ld.rank * ld.workers + worker
        files: dict[str, pq.ParquetFile] = {}
        buf: list[dict] = []
        for u, a, b in _slices(ld.units, ld.seed, self.epoch, ld.world_size * ld.workers)[consumer]:
            pf = files.get(u.file) or files.setdefault(u.file, pq.ParquetFile(u.file))
            rows = pf.read_row_group(u.row_group).to_pylist()
            if u.select is not None:
                rows = [rows[i] for i in u.select]
            for r in rows[a:b]:
                if len(buf) < ld.shuffle_buffer:
                    buf.append(r)
                    continue
                j = int(rng.integers(len(buf)))
                buf[j], r = r, buf[j]
                yield r
        rng.shuffle(buf)
        yield from buf

    def plans(self, worker: int) -> Iterator[list[dict]]:
        ld = self.loader
        rng = np.random.default_rng([ld.seed, self.epoch, ld.rank, worker])
        pool: list[dict] = []
        pool_size = ld.bucket_batches * ld.max_batch_size
        rows = self.rows(worker, rng)
        while True:
            pool.clear()
            for r in rows:
                pool.append(r)
                if len(pool) >= pool_size:
                    break
            if not pool:
                return
            chunk = ld.chunk_s
            if ld.batching == "duration":  # "shuffled": as they came out of the shuffle
                pool.sort(key=lambda r: (min(r["duration_s"], chunk), r["example_id"]))
            batches, cur = [], []
            for r in pool:
                cand = len(cur) + 1
                longest = chunk if ld.pad_to == "30s" else min(r["duration_s"], chunk)
                if cur and (cand > ld.max_batch_size or cand * longest > ld.batch_seconds):
                    batches.append(cur)
                    cur = []
                cur.append(r)
            batches.append(cur)
            for i in rng.permutation(len(batches)):
                yield batches[i]

    # -- the work: audio and features, for the batches not yet delivered --

    def worker_batches(self, worker: int) -> Iterator[dict]:
        for index, plan in enumerate(self.plans(worker)):
            if index < self.skip[worker]:
                continue
            yield self.load(plan, worker, index)

    def load(self, plan: list[dict], worker: int, index: int) -> dict:
        ld = self.loader
        kept, clips, skipped = [], [], 0
        for r in plan:
            try:
                clips.append(audio.load(r["audio_path"], r["offset_s"], r["duration_s"]))
                kept.append(r)
            except audio.AudioError as e:
                skipped += 1
                warnings.warn(
                    f"loader: skipped example {r['example_id']} ({ld.split}, epoch {self.epoch}): {e}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        batch = {"_worker": worker, "_index": index, "rows": kept, "skipped": skipped}
        if kept:
            batch["batch"] = ld.collate(kept, clips, with_answer=ld.tokenizer is not None)
        return batch


class ExampleLoader:
    """Batches of one split's examples for one rank; see the module docstring for the contract."""

    def __init__(
        self,
        shards: str | Path | list[str | Path],
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 1,
        batch_seconds: float = 360.0,
        max_batch_size: int = 64,
        shuffle_buffer: int = 2048,
        bucket_batches: int = 16,
        batching: str = "duration",
        n_mels: int = 80,
        pad_to: str = "30s",
        tokenizer=None,
        prefetch_batches: int = 2,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
        chunk_s: float = CHUNK_S,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {', '.join(BATCHINGS)}, not {batching!r}")
        self.batching = batching
        if pad_to not in ("30s", "longest"):
            raise ValueError(f"pad_to must be '30s' or 'longest', not {pad_to!r}")
        self.split, self.rank, self.world_size, self.seed = split, rank, world_size, seed
        self.num_workers = num_workers
        self.workers = max(num_workers, 1)
        self.batch_seconds, self.max_batch_size = batch_seconds, max_batch_size
        self.shuffle_buffer, self.bucket_batches = shuffle_buffer, bucket_batches
        self.n_mels, self.pad_to, self.tokenizer = n_mels, pad_to, tokenizer
        self.prefetch_batches, self.pin_memory = prefetch_batches, pin_memory
        self.mp_context = multiprocessing_context
        self.chunk_s = float(chunk_s)  # the encoder's input: 30 s, or a tiny Whisper's shorter chunk
        self.collate = Collate(tokenizer, n_mels, self.chunk_s, pad_to)
        self.units = _units(shards, split)
        if not self.units:
            raise ValueError(f"loader: no rows with split {split!r} in {shards}")
        self.epoch = 0
        self.consumed = [0] * self.workers  # batches delivered from each worker in this epoch
        self.skipped = 0  # unreadable clips this epoch

    @classmethod
    def from_config(cls, shards, cfg, **kw) -> ExampleLoader:
        """From a ``core.config.LoaderConfig``; ``kw`` gives the rest (split, rank, tokenizer, the batch's row
        cap, the Whisper's mel bins and input length, ...)."""
        return cls(
            shards,
            num_workers=cfg.num_workers,
            batch_seconds=cfg.batch_seconds,
            shuffle_buffer=cfg.shuffle_buffer,
            bucket_batches=cfg.bucket_batches,
            batching=cfg.batching,
            prefetch_batches=cfg.prefetch_batches,
            **kw,
        )

    @property
    def total_rows(self) -> int:
        """Rows of the split over all ranks."""
        return sum(u.rows for u in self.units)

    @property
    def num_rows(self) -> int:
        """Rows this rank sees per epoch (before unreadable clips are skipped)."""
        total = self.total_rows
        return total * (self.rank + 1) // self.world_size - total * self.rank // self.world_size

    def batches_per_rank(self, epoch: int) -> list[int]:
        """How many batches each rank's plan holds in ``epoch``: the plan replayed from row metadata, no audio
        read. Every rank computes the same list (the plans depend on seed, epoch, rank and worker only)."""
        counts = []
        for rank in range(self.world_size):
            other = copy.copy(self)
            other.rank = rank
            stream = _Stream(other, epoch, [0] * self.workers)
            counts.append(sum(sum(1 for _ in stream.plans(w)) for w in range(self.workers)))
        return counts

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning at the next iteration."""
        self.epoch, self.consumed, self.skipped = int(epoch), [0] * self.workers, 0

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "consumed": list(self.consumed),
            "skipped": self.skipped,
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "rows": self.total_rows,
        }

    def load_state_dict(self, d: dict) -> None:
        mine = self.state_dict()
        for k in ("version", "split", "rank", "world_size", "num_workers", "seed", "rows"):
            if d.get(k) != mine[k]:
                raise ValueError(
                    f"loader state: {k} is {d.get(k)!r} in the saved state but {mine[k]!r} here; "
                    "an exact resume needs the same data, split, seed, ranks and workers"
                )
        self.epoch, self.consumed, self.skipped = d["epoch"], list(d["consumed"]), d["skipped"]

    def __iter__(self) -> Iterator[dict]:
        stream = _Stream(self, self.epoch, list(self.consumed))
        if self.num_workers == 0:
            source = iter(stream)
        else:
            source = iter(
                DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=self.num_workers,
                    prefetch_factor=self.prefetch_batches,
                    pin_memory=self.pin_memory,
                    multiprocessing_context=self.mp_context,
                )
            )
        pending: dict[int, deque] = {w: deque() for w in range(self.workers)}
        live = set(range(self.workers))
        carried = 0  # skipped clips of batches that lost every clip, reported with the next batch
        while live:
            # The fixed order: the live worker that has delivered the fewest batches, lowest id first.
            w = min(live, key=lambda i: (self.consumed[i], i))
            while not pending[w]:
                item = next(source)
                pending[item["_worker"]].append(item)
            item = pending[w].popleft()
            if item.get("_end"):
                live.discard(w)
                continue
            self.consumed[w] += 1
            self.skipped += item["skipped"]
            if not item["rows"]:
                carried += item["skipped"]
                continue
            item["skipped"] += carried
            carried = 0
            del item["_worker"], item["_index"]
            yield item
        if carried:
            warnings.warn(
                f"loader: the last {carried} clips of epoch {self.epoch} could not be read",
                RuntimeWarning,
                stacklevel=2,
            )
        self.set_epoch(self.epoch + 1)
