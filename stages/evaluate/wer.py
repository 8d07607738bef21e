"""WER the way the ASR community computes it.

openai-whisper's English text normalizer on references and hypotheses alike, then word alignment
with jiwer. A set's WER is corpus-level: all errors (substitutions + deletions + insertions) over all
reference words, not a mean of per-utterance rates. A reference that is empty once normalized has
no defined WER: the utterance is kept in the predictions but left out of the metrics and counted.
"""

from __future__ import annotations

from collections import Counter

COUNTS = ("substitutions", "deletions", "insertions", "hits")


def word_errors(reference_norm: str, hypothesis_norm: str) -> dict:
    """Alignment counts of one utterance (normalized texts); an empty reference has only insertions."""
    import jiwer

    if not reference_norm.split():
        return dict(substitutions=0, deletions=0, insertions=len(hypothesis_norm.split()), hits=0)
    o = jiwer.process_words(reference_norm, hypothesis_norm)
    return dict(substitutions=o.substitutions, deletions=o.deletions, insertions=o.insertions, hits=o.hits)


def utterance_wer(reference_norm: str, hypothesis_norm: str) -> float:
    """Errors over reference words of one pair; NaN for an empty reference."""
    c = word_errors(reference_norm, hypothesis_norm)
    n = c["substitutions"] + c["deletions"] + c["hits"]
    return (c["substitutions"] + c["deletions"] + c["insertions"]) / n if n else float("nan")


def corpus_metrics(eval_set: str, preds: list[dict], task: str = "asr") -> dict:
    """WER fields of one METRICS row: errors summed over the set's utterances with a non-empty reference.

    Each prediction needs ``ref_words`` and the alignment counts (``substitutions``, ``deletions``,
    ``insertions``, ``hits``, as ``word_errors`` gives them) either at top level or under ``_counts``.
    """
    scored = [p for p in preds if p["ref_words"] > 0]
    tot = Counter()
    for p in scored:
        counts = p.get("_counts", p)
        tot.update({k: counts[k] for k in COUNTS})
    n_ref = tot["substitutions"] + tot["deletions"] + tot["hits"]
    errors = tot["substitutions"] + tot["deletions"] + tot["insertions"]
    return dict(
        eval_set=eval_set,
        task=task,
        n_utterances=len(scored),
        n_ref_words=n_ref,
        substitutions=tot["substitutions"],
        deletions=tot["deletions"],
        insertions=tot["insertions"],
        hits=tot["hits"],
        wer=errors / n_ref if n_ref else float("nan"),
        empty_references=len(preds) - len(scored),
    )
