"""Spoken yes/no question answering, scored by accuracy.

A question set is a BoolQ-style JSONL file: one object a line,

    {"id": "q1", "utt_id": "1089-134686-0001", "question": "Is the speaker talking about food?", "answer": true}

where BoolQ's text passage is replaced by the speech of ``utt_id`` (an utterance of an eval set) and
``id`` is optional (default: the line number). The question is the instruction, the speech the input;
the model never sees the transcript.

A line may instead be the reference's spoken BoolQA (src/evaluate_BoolQA.py): a text passage as context, the
question spoken, true or false,

    {"id": "q2", "passage": "Persian is ...", "audio": "boolqa/q2.wav", "question": "is persian ...", "answer": true}

where ``audio`` (relative to the question file) holds the spoken question and ``question`` its text, kept for
the report only. The reference's own lines are read as they are: the audio under ``audio_path``, the answer the
string ``"true"`` or ``"false"``, no ``question`` (``src/evaluate_BoolQA.py:31-45`` reads only ``passage``,
``audio_path`` and ``answer``). The prompt is ``core.prompts.boolqa_prompt`` in the run's layout (the reference's strings in
``reference``), and these questions are scored as their own set, ``boolqa``.

Without a file, ``word_presence_questions`` makes a small set from the eval transcripts themselves,
so the reference answer is known from the transcript: for each utterance one question about a content
word it contains (yes) and one about a content word of another eval utterance that it does not
contain (no), each picked by a hash of the utterance id, so the set is the same on every run.

An answer counts as yes or no by its first word that is "yes" or "no" ("true" and "false" count as yes and no,
the reference's BoolQA answers); an answer with neither is unparsed and counted wrong (and counted separately).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from core import audio
from core.prompts import boolqa_prompt
from core.stage import StageError
from core.text import normalize
from stages.evaluate.decoding import Item

SPOKEN_SET = "boolqa"  # the eval set name of spoken-question (reference BoolQA) lines

GENERATED = "generated:word-presence-v1"
QUESTION = 'Does the speaker say the word "{word}"? Answer yes or no.'
# Function words say little about what a clip is about and are in nearly every clip.
_STOP = set(
    "about after again also been before being could does from have here into just like made make more most "
    "much must only other over said same should some such than that their them then there these they this "
    "those through very were what when where which while will with would your".split()
)
_FALLBACK = ["elephant", "volcano", "bicycle", "umbrella", "telescope", "penguin", "satellite"]


class QAFileError(StageError, ValueError):
    """A question file that cannot be used: the message names the file, the line and the field."""


def _pick(words: list[str], *salt: str) -> str:
    h = hashlib.sha256("\0".join(salt).encode()).digest()
    return words[int.from_bytes(h[:8], "big") % len(words)]


def _content_words(transcript: str) -> list[str]:
    return sorted(
        {w for w in normalize(transcript).split() if len(w) >= 4 and w.isalpha() and w not in _STOP}
    )


def word_presence_questions(asr_rows: list[dict]) -> list[dict]:
    """Two questions per eval utterance with a content word: one answered yes, one no (see module doc)."""
    out = []
    rows = sorted(asr_rows, key=lambda r: (r["split"], r["utt_id"]))
    for r in rows:
        own = _content_words(r["transcript"])
        if not own:
            continue
        said = set(normalize(r["transcript"]).split())
        others = sorted(
            {w for o in rows if o["split"] == r["split"] for w in _content_words(o["transcript"])} - said
        ) or [w for w in _FALLBACK if w not in said]
        yes, no = _pick(own, r["utt_id"], "yes"), _pick(others, r["utt_id"], "no")
        out.append(
            dict(
                id=f"{r['utt_id']}/present",
                utt_id=r["utt_id"],
                question=QUESTION.format(word=yes),
                answer=True,
            )
        )
        out.append(
            dict(
                id=f"{r['utt_id']}/absent",
                utt_id=r["utt_id"],
                question=QUESTION.format(word=no),
                answer=False,
            )
        )
    return out


def _text_field(path: Path, n: int, obj: dict, name: str) -> str:
    if not isinstance(obj.get(name), str) or not obj[name].strip():
        raise QAFileError(f"{path}:{n}: field {name!r}: expected a non-empty string, found {obj.get(name)!r}")
    return obj[name].strip()


def load_questions(path: Path) -> list[dict]:
    """Read a question file (module doc); a bad line is an error naming file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise QAFileError(f"QA file {path} does not exist")
    out, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise QAFileError(f"{path}:{n}: not a JSON object ({e})") from e
        if not isinstance(obj, dict):
            raise QAFileError(f"{path}:{n}: expected a JSON object, found {type(obj).__name__}")
        answer = obj.get("answer")
        if isinstance(answer, str) and answer.strip().lower() in ("true", "false"):
            answer = answer.strip().lower() == "true"  # the reference's: a string it appends eos to
        if not isinstance(answer, bool):
            raise QAFileError(
                f"{path}:{n}: field 'answer': expected true or false, found {obj.get('answer')!r}"
            )
        obj["answer"] = answer
        if "audio_path" in obj:  # the reference's name for the spoken question (src/evaluate_BoolQA.py:37)
            if "audio" in obj:
                raise QAFileError(f"{path}:{n}: give 'audio' or 'audio_path' (the same field), not both")
            obj["audio"] = obj.pop("audio_path")
        qid = str(obj.get("id", f"line-{n}"))
        if qid in seen:
            raise QAFileError(f"{path}:{n}: field 'id': {qid!r} appears twice")
        seen.add(qid)
        if "audio" in obj and "utt_id" in obj:
            raise QAFileError(
                f"{path}:{n}: give 'utt_id' (an eval clip is the speech) or 'audio' (a spoken question with a "
                "text 'passage'), not both"
            )
        if "audio" in obj:  # the reference's BoolQA: passage as text, question as speech
            passage, spoken = _text_field(path, n, obj, "passage"), _text_field(path, n, obj, "audio")
            question = obj.get("question") if isinstance(obj.get("question"), str) else ""
            out.append(
                dict(
                    id=qid,
                    utt_id=f"{SPOKEN_SET}:{qid}",
                    question=question.strip(),
                    answer=obj["answer"],
                    passage=passage,
                    audio=str((path.parent / spoken).resolve()),
                )
            )
            continue
        utt_id, question = _text_field(path, n, obj, "utt_id"), _text_field(path, n, obj, "question")
        out.append(dict(id=qid, utt_id=utt_id, question=question, answer=obj["answer"]))
    if not out:
        raise QAFileError(f"QA file {path} has no questions")
    return out


def qa_items(
    questions: list[dict], asr_rows: list[dict], max_new_tokens: int, fmt: str, tokenizer=None
) -> tuple[list[Item], dict[str, dict], list[dict]]:
    """Items to decode, scoring data by key, and the questions about utterances no eval set has (with a spoken
    question: whose audio cannot be read, with the reason)."""
    by_utt = {r["utt_id"]: r for r in asr_rows}
    items, meta, unknown = [], {}, []
    for q in questions:
        if "audio" in q:
            key = f"qa/{q['id']}"
            try:
                duration = audio.probe(q["audio"]).duration_s
            except audio.AudioError as e:
                unknown.append({**q, "reason": e.reason, "detail": e.detail})
                continue
            p = boolqa_prompt(q["passage"], fmt, tokenizer)
            items.append(
                Item(
                    key,
                    SPOKEN_SET,
                    q["audio"],
                    0.0,
                    duration,
                    p.prefix,
                    p.suffix,
                    max_new_tokens,
                    q["utt_id"],
                )
            )
            meta[key] = dict(
                qa_id=q["id"],
                utt_id=q["utt_id"],
                eval_set=SPOKEN_SET,
                question=q["question"],
                reference=q["answer"],
            )
            continue
        ex = by_utt.get(q["utt_id"])
        if ex is None:
            unknown.append(q)
            continue
        key = f"qa/{q['id']}"
        items.append(Item.asking(key, ex, q["question"], fmt, max_new_tokens, tokenizer))
        meta[key] = dict(
            qa_id=q["id"],
            utt_id=q["utt_id"],
            eval_set=ex["split"],
            question=q["question"],
            reference=q["answer"],
        )
    return items, meta, unknown


def parse_yes_no(answer: str) -> str | None:
    for w in re.findall(r"[a-z]+", answer.lower()):
        if w in ("yes", "no"):
            return w
        if w in ("true", "false"):  # the reference's BoolQA asks for true or false
            return "yes" if w == "true" else "no"
    return None


def score(meta: dict, answer: str) -> dict:
    parsed = parse_yes_no(answer)
    return dict(
        **meta, answer=answer, parsed=parsed, correct=parsed == ("yes" if meta["reference"] else "no")
    )


def qa_metrics(rows: list[dict], meta: dict[str, dict], failed: set[str], source: str) -> list[dict]:
    sets = sorted({m["eval_set"] for m in meta.values()})
    out = []
    for s in sets:
        rs = [r for r in rows if r["eval_set"] == s]
        n_ok = sum(r["correct"] for r in rs)
        out.append(
            dict(
                eval_set=s,
                source=source,
                n_questions=len(rs),
                n_correct=n_ok,
                n_unparsed=sum(r["parsed"] is None for r in rs),
                accuracy=n_ok / len(rs) if rs else float("nan"),
                rejected=sum(1 for k, m in meta.items() if m["eval_set"] == s and k in failed),
            )
        )
    return out
