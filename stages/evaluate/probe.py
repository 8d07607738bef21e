"""The speech-anchor-bias probe: does the model follow a non-ASR instruction, or just transcribe?

For every eval utterance and every non-ASR task the generate stage answered on its transcript, the
speech model gets (speech, the same instruction) and its answer is scored twice:

- anchored: the WER of the answer against the transcript (both through Whisper's normalizer) is below
  ``anchor_wer_threshold``: the model wrote down what it heard instead of doing the task;
- anchored to its own transcription: the same test against the model's own ASR output for the clip (which
  evaluation decodes anyway). A model whose ASR is imperfect transcribes with its own errors: at 30% WER an
  answer that is its transcription is 30% away from the true transcript and escapes the first measure, not
  this one. These are the project's definitions: the paper defines speech anchor bias in words only.
- self-consistency: chrF (sacrebleu) of the answer against the LLM's own text answer to the same
  instruction on the same transcript: a self-powered model should behave like its LLM.

Per category the anchor rate is anchored answers over scored items (``anchor_rate_own``: over the items
whose clip has a non-empty own transcription), and self-consistency the corpus chrF. Items whose transcript is empty once normalized have nothing to anchor to: they are counted,
not scored. Items whose audio cannot be loaded are counted as rejected.
"""

from __future__ import annotations

from collections import defaultdict

from core.text import normalize
from stages.evaluate.decoding import Item
from stages.evaluate.wer import utterance_wer


def probe_items(
    asr_rows: list[dict],
    responses: list[dict],
    tasks: list[str] | None,
    max_new_tokens: int,
    fmt: str,
    tokenizer=None,
) -> tuple[list[Item], dict[str, dict]]:
    """Items to decode and, by item key, what scoring needs (transcript, the LLM's answer, ...)."""
    by_utt = {r["utt_id"]: r for r in asr_rows}
    items, meta = [], {}
    for r in sorted(responses, key=lambda r: (r["utt_id"], r["task"])):
        ex = by_utt.get(r["utt_id"])
        if ex is None or r["task"] == "asr" or (tasks is not None and r["task"] not in tasks):
            continue
        key = f"probe/{ex['split']}/{r['utt_id']}/{r['task']}"
        items.append(Item.asking(key, ex, r["instruction"], fmt, max_new_tokens, tokenizer))
        meta[key] = dict(
            utt_id=r["utt_id"],
            eval_set=ex["split"],
            category=r["task"],
            instruction=r["instruction"],
            transcript=ex["transcript"],
            llm_answer=r["answer"],
        )
    return items, meta


def score_item(meta: dict, answer: str, threshold: float, own_asr: str | None = None) -> dict | None:
    """One PROBE row, or None when the transcript has no words to anchor to. ``own_asr``: the model's own
    transcription of the clip; without one (or with no words in it) ``anchored_own`` is None."""
    import sacrebleu

    ref = normalize(meta["transcript"])
    if not ref.split():
        return None
    hyp = normalize(answer)
    wer = utterance_wer(ref, hyp)
    own = normalize(own_asr) if own_asr is not None else ""
    wer_own = utterance_wer(own, hyp) if own.split() else float("nan")
    return dict(
        **meta,
        answer=answer,
        wer_vs_transcript=wer,
        anchored=wer < threshold,
        own_asr=own_asr,
        wer_vs_own_asr=wer_own,
        anchored_own=wer_own < threshold if own.split() else None,
        chrf=sacrebleu.sentence_chrf(answer, [meta["llm_answer"]]).score,
    )


def probe_metrics(rows: list[dict], meta: dict[str, dict], failed: set[str], threshold: float) -> list[dict]:
    """PROBE_METRICS rows per (eval set, category), counting every item: scored, empty or rejected."""
    import sacrebleu

    groups: dict[tuple[str, str], dict] = defaultdict(lambda: dict(rows=[], empty=0, rejected=0))
    for key, m in meta.items():
        groups[(m["eval_set"], m["category"])]  # every category appears, even with nothing scored
        if key in failed:
            groups[(m["eval_set"], m["category"])]["rejected"] += 1
    for r in rows:
        groups[(r["eval_set"], r["category"])]["rows"].append(r)
    scored_keys = {(r["eval_set"], r["utt_id"], r["category"]) for r in rows}
    for key, m in meta.items():
        if key not in failed and (m["eval_set"], m["utt_id"], m["category"]) not in scored_keys:
            groups[(m["eval_set"], m["category"])]["empty"] += 1
    out = []
    for (eval_set, category), g in sorted(groups.items()):
        rs = g["rows"]
        n_anch = sum(r["anchored"] for r in rs)
        own = [r["anchored_own"] for r in rs if r.get("anchored_own") is not None]
        chrf = (
            sacrebleu.corpus_chrf([r["answer"] for r in rs], [[r["llm_answer"] for r in rs]]).score
            if rs
            else float("nan")
        )
        out.append(
            dict(
                eval_set=eval_set,
                category=category,
                n_items=len(rs),
                n_anchored=n_anch,
                anchor_rate=n_anch / len(rs) if rs else float("nan"),
                n_with_own_asr=len(own),
                n_anchored_own=sum(own),
                anchor_rate_own=sum(own) / len(own) if own else float("nan"),
                anchor_wer_threshold=threshold,
                self_consistency_chrf=chrf,
                empty_transcripts=g["empty"],
                rejected=g["rejected"],
            )
        )
    return out
