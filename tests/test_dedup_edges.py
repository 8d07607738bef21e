"""Near-duplicate answers at the edges of their settings: a pair exactly at the threshold is a duplicate
("reaches"), one just below is not; threshold 1.0 (identical shingles only) and few permutations run instead of
crashing datasketch."""

from __future__ import annotations

import numpy as np
import pytest

from stages.build.dedup import _jaccard, near_duplicates, shingles

A = "the cat sat on the mat and looked at the dog"
B = "the cat sat on the mat and looked at a bird"  # shares 7 of 9 shingles with A


def _ex(i: int, answer: str) -> dict:
    return {"example_id": f"e{i}", "task": "repeat", "answer": answer}


def _similarity(a: str, b: str) -> float:
    import hashlib

    def enc(t):
        return np.unique(
            np.array(
                [
                    int.from_bytes(hashlib.blake2b(x.encode(), digest_size=8).digest(), "big")
                    for x in shingles(t)
                ],
                np.uint64,
            )
        )

    return _jaccard(enc(a), enc(b))


def test_a_pair_exactly_at_the_threshold_is_a_duplicate_and_just_below_it_is_not():
    j = _similarity(A, B)
    assert 0.5 < j < 0.9  # 7 shared shingles of 11 in all
    pair = [_ex(0, A), _ex(1, B)]
    dropped = near_duplicates(pair, j, 128, seed=3)  # seed 3: LSH proposes the pair (else nothing is dropped)
    assert len(dropped) == 1 and set(dropped.items()) <= {("e0", "e1"), ("e1", "e0")}
    assert near_duplicates(pair, j + 1e-9, 128, seed=3) == {}


@pytest.mark.parametrize("perms", [16, 128, 1024])
@pytest.mark.parametrize("threshold", [0.9, 0.99, 1.0])
def test_the_highest_thresholds_on_few_permutations_run_and_keep_what_differs(threshold, perms):
    rows = [_ex(0, A), _ex(1, A), _ex(2, B), _ex(3, "an answer of its own, nothing like the others at all")]
    dropped = near_duplicates(rows, threshold, perms, seed=0)
    assert set(dropped) & {"e0", "e1"} and len(dropped) == 1  # the identical pair, one copy kept
    assert dropped.get("e0", dropped.get("e1")) in {"e0", "e1"}
