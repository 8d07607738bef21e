"""Duplicates: the same utterance twice (exact), and LLM answers that nearly repeat one another (near).

- **exact**: utterances with the same normalized transcript and the same audio (file bytes, offset,
  duration) are one utterance; the copy in a corpus-defined eval split wins, then the smallest id.
- **near**: within each task, an LLM answer whose word 3-gram Jaccard similarity with an earlier kept
  answer reaches the threshold is dropped (MinHash LSH proposes, the exact Jaccard decides).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from core.digest import sha256_file
from core.text import normalize
from schemas import reject_row
from stages.build.seeded import unit


def audio_keys(rows: list[dict], workers: int = 8) -> list[str]:
    """Identity of each row's audio: the file's bytes (sha256, once per file) with the segment's bounds."""
    paths = sorted({r["audio_path"] for r in rows})

    def digest(p: str) -> str:
        try:
            return sha256_file(Path(p))
        except OSError as e:  # a file that went away since harvest: its own identity, never a duplicate
            return f"unreadable:{p}:{e.errno}"

    with ThreadPoolExecutor(workers) as pool:
        by_path = dict(zip(paths, pool.map(digest, paths), strict=True))
    return [f"{by_path[r['audio_path']]}@{r['offset_s']:.4f}+{r['duration_s']:.4f}" for r in rows]


def dedup_utterances(rows: list[dict], eval_splits: list[str]) -> tuple[list[dict], list[dict]]:
    """Keep one utterance per (normalized transcript, audio); the others become rejects naming the kept one.

    Only utterances whose normalized transcript occurs more than once can be duplicates, so only their
    audio is read and hashed: a rebuild of a large corpus does not reread all of its audio.
    """
    same_text = Counter(r["text_norm"] for r in rows)
    suspects = [i for i, r in enumerate(rows) if same_text[r["text_norm"]] > 1]
    keys = dict(zip(suspects, audio_keys([rows[i] for i in suspects]), strict=True))
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["split"] not in eval_splits, rows[i]["utt_id"]))
    kept_by_key: dict[tuple[str, str], dict] = {}
    keep, rejects = [], []
    for i in order:
        r = rows[i]
        k = (r["text_norm"], keys.get(i, f"unique:{i}"))
        if k in kept_by_key:
            first = kept_by_key[k]
            rejects.append(
                reject_row(
                    r["corpus"],
                    r["audio_path"],
                    r["utt_id"],
                    "utterance",
                    "duplicate_utterance",
                    f"same normalized transcript and audio as {first['utt_id']} ({first['split']})",
                )
            )
        else:
            kept_by_key[k] = r
            keep.append(r)
    return keep, rejects


def shingles(text: str, n: int = 3) -> set[str]:
    words = normalize(text).split() or text.split()
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


def _lsh(MinHashLSH, threshold: float, num_perm: int):
    """An LSH index that proposes every pair at or above ``threshold`` with the usual high probability. For a
    high threshold on few permutations (1.0 on any number; 0.9 on 16) datasketch finds no band layout of two or
    more bands and refuses; the index is then built for the highest threshold it takes below the asked one:
    more candidates, each still decided by the exact Jaccard, so the same pairs are dropped, a little later."""
    t = threshold
    while True:
        try:
            return MinHashLSH(threshold=t, num_perm=num_perm)
        except ValueError:
            if t <= 0.05:
                raise
            t = round(t - 0.05, 4)


def near_duplicates(examples: list[dict], threshold: float, num_perm: int, seed: int) -> dict[str, str]:
    """``{dropped example_id: the kept example_id it nearly repeats}``, within each task.

    Examples are visited in a seeded hash order of their ids, so which copy survives does not depend on
    the order rows arrived in. LSH proposes candidates; the exact Jaccard of the shingle sets decides.
    """
    from datasketch import MinHash, MinHashLSH

    dropped: dict[str, str] = {}
    by_task: dict[str, list[dict]] = defaultdict(list)
    for e in examples:
        by_task[e["task"]].append(e)
    for _task, rows in sorted(by_task.items()):
        rows = sorted(rows, key=lambda e: unit(str(seed), "near", e["example_id"]))
        lsh = _lsh(MinHashLSH, threshold, num_perm)
        # Kept answers' shingles as sorted 64-bit hashes: a few hundred bytes each, for millions of answers.
        sets: dict[str, np.ndarray] = {}
        for e in rows:
            sh = shingles(e["answer"])
            if not sh:
                continue
            encoded = [x.encode() for x in sh]
            m = MinHash(num_perm=num_perm, seed=seed)
            m.update_batch(encoded)
            mine = np.unique(
                np.array(
                    [int.from_bytes(hashlib.blake2b(x, digest_size=8).digest(), "big") for x in encoded],
                    np.uint64,
                )
            )
            hit = next((c for c in sorted(lsh.query(m)) if _jaccard(mine, sets[c]) >= threshold), None)
            if hit is not None:
                dropped[e["example_id"]] = hit
            else:
                lsh.insert(e["example_id"], m)
                sets[e["example_id"]] = mine
    return dropped
