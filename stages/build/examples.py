"""Build: join transcripts and the LLM's answers into training examples, mix, deduplicate, split, shard.

Each example is ``[prefix][speech tokens][suffix][answer + eos]`` with prefix and suffix made by
``core.prompts.speech_prompt``, the function generation formats its prompts with. ASR examples
take the transcript as the answer; self-powered examples take the LLM's answer to the same
instruction about the same transcript (from ``generate``, or imported from the reference's own data
by ``import_reference``).

Token ids are not stored: the examples hold text and the training loader tokenizes (a few µs per
row, next to milliseconds of audio decoding). The same examples then serve any backbone's tokenizer,
a tokenizer change needs no rebuild, and the shards stay small.

The steps, each counted in the summary (and each dropped row in ``rejects.parquet`` with its reason):

- **dedup (exact)**: utterances with the same normalized transcript and the same audio (file bytes,
  offset, duration) are one utterance; the copy in a corpus-defined eval split wins, then the smallest id.
- **splits**: train/dev/test by a hash of the speaker (of the utterance where there is none), so a
  speaker never straddles splits and a rebuild, or adding utterances, moves nobody; corpus-defined
  eval splits (LibriSpeech dev/test) keep their names and are not mixed or near-deduplicated.
- **dedup (near)**: within each task, an LLM answer whose word 3-gram Jaccard similarity with an
  earlier kept answer reaches ``near_dup_threshold`` is dropped (MinHash LSH, then the exact Jaccard).
- **mixing**: ``mix`` gives each task's target share; per split, the largest set with those shares is
  drawn by a seeded hash of the example id (stable when data is added), and the realized mix reported.
- **shards**: ``shards/{split}-NNNNN.parquet`` of at most ``rows_per_shard`` rows in row groups of
  ``row_group_rows`` (what the loader reads at a time), rows in a seeded hash order, and
  ``shards/manifest.parquet`` (file, split, rows, row groups, bytes, sha256) recorded in lineage.
  ``examples.parquet`` holds every example in one table for the stages that read it whole.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.catalog import Catalog
from core.config import BuildConfig
from core.log import console
from core.paths import BuildPaths
from core.prompts import load_tokenizer, speech_prompt
from core.tables import read_table, read_transcripts, write_table
from core.text import as_sentence, transcript_of
from schemas import EXAMPLES, REJECTS, RESPONSES, reject_row, to_table
from stages.build.dedup import dedup_utterances, near_duplicates
from stages.build.mix import mix_split
from stages.build.seeded import unit
from stages.build.shards import write_shards


def assign_split(corpus_split: str, speaker: str | None, utt_id: str, b: BuildConfig) -> str:
    if corpus_split in b.eval_splits:
        return corpus_split
    u = unit(str(b.seed), speaker or utt_id)
    if u < b.test_fraction:
        return "test"
    if u < b.test_fraction + b.dev_fraction:
        return "dev"
    return "train"


def example_id(utt_id: str, task: str, origin: str = "") -> str:
    key = f"{utt_id}\0{task}" + (f"\0{origin}" if origin else "")
    return hashlib.sha256(key.encode()).hexdigest()[:20]


@dataclass
class BuildSummary:
    examples: int
    by_split_task: dict[str, int]
    missing_answers: int
    duplicate_utterances: int = 0
    near_duplicate_answers: int = 0
    left_out_by_mix: dict[str, int] = field(default_factory=dict)
    mix_target: dict[str, float] = field(default_factory=dict)
    mix_realized: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> task -> share
    shards: int = 0
    imported_answers: int = 0
    filtered_answers: int = 0  # flagged by the generate stage's filters (rejected_by)
    answers_too_short: int = 0  # build.answer_tokens_between
    answers_too_long: int = 0


def _answers(paths: list[Path]) -> dict[tuple[str, str], list[tuple[str, dict]]]:
    """``(utt_id, task) -> [(origin, response row)]``: generated answers first, then imported ones."""
    answers: dict[tuple[str, str], list[tuple[str, dict]]] = defaultdict(list)
    for p in paths:
        for r in read_table(p, RESPONSES).to_pylist():
            origin = "" if not r["model"].startswith("reference:") else "reference:" + r["instruction_id"]
            answers[(r["utt_id"], r["task"])].append((origin, r))
    return answers


def build(
    transcripts: Path,
    responses: Path | list[Path] | None,
    out: BuildPaths | Path,
    b: BuildConfig,
    catalog: Catalog,
    prompt_format: str = "vicuna_v1.1",
    tokenizer=None,
    sampled: Callable[[str], list[str]] | None = None,
    transcript_form: str = "readable",
    llm_tokenizer=None,
    kinds: dict[str, str] | None = None,
) -> BuildSummary:
    """Write the examples table, its shards and the rejects (``BuildPaths``, or a folder to hold them).

    ``tokenizer``: the backbone LLM's tokenizer (or its directory), which ``chat_template`` prompts need.
    ``sampled``: the LLM tasks generate asked about an utterance (``core.catalog.sample_tasks``); a task it did
    not ask is not a missing answer. None: every task of ``b.tasks``. ``transcript_form``: which form of the
    transcript is the ASR target (``core.text.TRANSCRIPT_FORMS``), the one generate gave the LLM.
    ``llm_tokenizer``: the LLM's tokenizer (or its directory), which ``b.answer_tokens_between`` counts with."""
    out = out if isinstance(out, BuildPaths) else BuildPaths(Path(out))
    tr = read_transcripts(transcripts).to_pylist()
    paths = [] if responses is None else [responses] if isinstance(responses, Path | str) else responses
    answers = _answers([Path(p) for p in paths])
    rejects: list[dict] = []
    if b.dedup_exact:
        tr, dup = dedup_utterances(tr, b.eval_splits)
        rejects += dup
    dup_utts = len(rejects)

    rows, missing, imported, filtered = [], 0, 0, 0
    for t in tr:
        split = assign_split(t["split"], t["speaker"], t["utt_id"], b)
        fed = transcript_of(t, transcript_form, kinds)  # what the LLM read and the ASR target
        asked = None if sampled is None else set(sampled(t["utt_id"]))
        for task in b.tasks:
            if (
                asked is not None
                and task != "asr"
                and task not in asked
                and (t["utt_id"], task) not in answers
            ):
                continue  # generate never asked this pair: not a missing answer
            if task == "asr":
                answer = as_sentence(fed) if b.asr_answer == "sentence" else fed
                found = [
                    ("", {"instruction": catalog.draw("asr", t["utt_id"], b.seed).text, "answer": answer})
                ]
            else:
                found = answers.get((t["utt_id"], task), [])
            if not found:
                missing += 1
                rejects.append(
                    reject_row(
                        t["corpus"],
                        str(transcripts),
                        t["utt_id"],
                        "answer",
                        "missing_answer",
                        f"no {task} answer in the responses",
                    )
                )
                continue
            for origin, r in found:
                if r.get("rejected_by"):  # the generate stage's filters flagged this answer
                    filtered += 1
                    rejects.append(
                        reject_row(
                            t["corpus"],
                            str(transcripts),
                            t["utt_id"],
                            "answer",
                            f"answer_{r['rejected_by']}",
                            f"{task} answer rejected by the generate filter {r['rejected_by']}",
                        )
                    )
                    continue
                imported += origin.startswith("reference:")
                p = speech_prompt(r["instruction"], prompt_format, tokenizer)
                rows.append(
                    dict(
                        example_id=example_id(t["utt_id"], task, origin),
                        utt_id=t["utt_id"],
                        split=split,
                        task=task,
                        instruction=r["instruction"],
                        prefix=p.prefix,
                        suffix=p.suffix,
                        answer=r["answer"],
                        transcript=fed,
                        audio_path=t["audio_path"],
                        offset_s=t["offset_s"],
                        duration_s=t["duration_s"],
                        speaker=t["speaker"],
                    )
                )

    too_short = too_long = 0
    if b.answer_tokens_between is not None:
        low, high = b.answer_tokens_between
        if llm_tokenizer is None:
            raise ValueError("build.answer_tokens_between counts answer tokens: it needs the LLM's tokenizer")
        tok = load_tokenizer(llm_tokenizer)
        corpus_of = {t["utt_id"]: t["corpus"] for t in tr}
        ids = tok([e["answer"] for e in rows], add_special_tokens=False)["input_ids"] if rows else []
        kept = []
        for e, answer_ids in zip(rows, ids, strict=True):
            n = len(answer_ids) + 1  # the answer and its eos, as the loss sees them
            if low < n < high:
                kept.append(e)
                continue
            short = n <= low
            too_short += short
            too_long += not short
            rejects.append(
                reject_row(
                    corpus_of.get(e["utt_id"], ""),
                    str(transcripts),
                    e["utt_id"],
                    "answer",
                    "answer_too_short" if short else "answer_too_long",
                    f"{e['split']}/{e['task']} answer has {n} tokens with eos; kept when {low} < tokens < {high}",
                )
            )
        rows = kept

    near = 0
    if b.near_dup_threshold is not None:
        pool = [e for e in rows if e["task"] != "asr" and e["split"] not in b.eval_splits]
        dropped = near_duplicates(pool, b.near_dup_threshold, b.minhash_perms, b.seed)
        near = len(dropped)
        for e in rows:
            if e["example_id"] in dropped:
                rejects.append(
                    reject_row(
                        "",
                        e["example_id"],
                        e["utt_id"],
                        "answer",
                        "near_duplicate_answer",
                        f"{e['task']} answer nearly repeats that of example {dropped[e['example_id']]}",
                    )
                )
        rows = [e for e in rows if e["example_id"] not in dropped]

    left_out: dict[str, int] = {}
    if b.mix is not None:
        by_split: dict[str, list[dict]] = defaultdict(list)
        for e in rows:
            by_split[e["split"]].append(e)
        rows = []
        for split, exs in sorted(by_split.items()):
            if split in b.eval_splits:
                rows += exs
                continue
            kept, left = mix_split(exs, b.mix, b.seed)
            rows += kept
            for t, n in left.items():
                left_out[f"{split}/{t}"] = n

    write_table(to_table(rows, EXAMPLES), out.examples, EXAMPLES, b.row_group_rows)
    manifest = write_shards(rows, out.shards, b)
    write_table(to_table(rejects, REJECTS), out.rejects, REJECTS)

    counts = Counter(f"{e['split']}/{e['task']}" for e in rows)
    per_split = Counter(e["split"] for e in rows)
    realized: dict[str, dict[str, float]] = defaultdict(dict)
    for key, n in counts.items():
        split, task = key.split("/", 1)
        realized[split][task] = round(n / per_split[split], 4)
    target = {}
    if b.mix is not None:
        total = sum(b.mix.values())
        target = {t: round(v / total, 4) for t, v in b.mix.items()}
    return BuildSummary(
        len(rows),
        dict(sorted(counts.items())),
        missing,
        dup_utts,
        near,
        left_out,
        target,
        dict(sorted(realized.items())),
        len(manifest),
        imported,
        filtered,
        too_short,
        too_long,
    )


def print_summary(s: BuildSummary) -> None:
    from rich.table import Table

    splits = sorted(s.mix_realized)
    t = Table("task", *splits, title=f"build: {s.examples} examples in {s.shards} shards (share of split)")
    if s.mix_target:
        t.add_column("target")
    tasks = sorted({k.split("/", 1)[1] for k in s.by_split_task})
    for task in tasks:
        cells = [
            f"{s.by_split_task.get(f'{sp}/{task}', 0)} ({100 * s.mix_realized[sp].get(task, 0):.1f}%)"
            for sp in splits
        ]
        if s.mix_target:
            cells.append(f"{100 * s.mix_target.get(task, 0):.1f}%")
        t.add_row(task, *cells)
    console.print(t)
    notes = [
        (s.missing_answers, "(utterance, task) pairs have no answer"),
        (s.filtered_answers, "answers were rejected by the generate filters"),
        (s.answers_too_short, "answers were too short for build.answer_tokens_between"),
        (s.answers_too_long, "answers were too long for build.answer_tokens_between"),
        (s.duplicate_utterances, "utterances duplicate another (same normalized text and audio)"),
        (s.near_duplicate_answers, "answers nearly repeat another answer of their task"),
    ]
    for n, what in notes:
        if n:
            console.print(f"[yellow]build: {n} {what}[/] (rejects.parquet has each with its reason)")
    if s.left_out_by_mix:
        console.print(f"build: left out to meet the target mix (split/task: examples): {s.left_out_by_mix}")
    if s.imported_answers:
        console.print(f"build: {s.imported_answers} examples from imported reference answers")
