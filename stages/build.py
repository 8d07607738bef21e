"""Build: join transcripts and the LLM's answers into training examples, mix, deduplicate, split, shard.

Each example is ``[prefix][speech tokens][suffix][answer + eos]`` with prefix and suffix made by
``stages.prompts.speech_prompt``, the function generation formats its prompts with. ASR examples
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
import json
import math
import os
import re
import shutil
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

from schemas import (
    EXAMPLES,
    REJECTS,
    RESPONSES,
    SHARDS,
    TRANSCRIPTS,
    read_table,
    to_table,
    write_table,
)
from splsm.config import BuildConfig, ExperimentConfig
from splsm.log import console
from splsm.stage import Artifact, StageResult, run_stage, sha256_file
from splsm.text import normalize
from stages.instructions import Catalog, load_catalog
from stages.prompts import speech_prompt, text_prompt

CODE_FILES = ["stages/build.py", "stages/prompts.py", "stages/instructions.py", "schemas/__init__.py"]
REFERENCE_INSTRUCTIONS = Path(__file__).resolve().parent / "catalog" / "reference-instructions.yaml"


def _unit(*parts: str) -> float:
    """A number in [0, 1) from a hash: the same input always lands in the same place."""
    h = hashlib.sha256("\0".join(parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign_split(corpus_split: str, speaker: str | None, utt_id: str, b: BuildConfig) -> str:
    if corpus_split in b.eval_splits:
        return corpus_split
    u = _unit(str(b.seed), speaker or utt_id)
    if u < b.test_fraction:
        return "test"
    if u < b.test_fraction + b.dev_fraction:
        return "dev"
    return "train"


def example_id(utt_id: str, task: str, origin: str = "") -> str:
    key = f"{utt_id}\0{task}" + (f"\0{origin}" if origin else "")
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _reject(source: str, utt_id: str | None, fld: str, reason: str, detail: str, corpus: str = "") -> dict:
    return dict(corpus=corpus, source=source, utt_id=utt_id, field=fld, reason=reason, detail=detail)


# ----- exact duplicates -----


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
                _reject(
                    r["audio_path"],
                    r["utt_id"],
                    "utterance",
                    "duplicate_utterance",
                    f"same normalized transcript and audio as {first['utt_id']} ({first['split']})",
                    r["corpus"],
                )
            )
        else:
            kept_by_key[k] = r
            keep.append(r)
    return keep, rejects


# ----- near-duplicate answers -----


def shingles(text: str, n: int = 3) -> set[str]:
    words = normalize(text).split() or text.split()
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


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
        rows = sorted(rows, key=lambda e: _unit(str(seed), "near", e["example_id"]))
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
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


# ----- mixing -----


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
        rows = sorted(rows, key=lambda e: _unit(str(seed), "mix", e["example_id"]))
        keep += rows[:k]
        if len(rows) > k:
            left[t] = len(rows) - k
    return keep, left


# ----- shards -----


def write_shards(examples: list[dict], out: Path, b: BuildConfig) -> list[dict]:
    """Write ``out/{split}-NNNNN.parquet`` and ``out/manifest.parquet`` into a fresh folder, then swap it in."""
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    try:
        by_split: dict[str, list[dict]] = defaultdict(list)
        for e in examples:
            by_split[e["split"]].append(e)
        manifest = []
        for split, rows in sorted(by_split.items()):
            # A hash order spreads tasks, speakers and durations evenly over shards and row groups.
            rows = sorted(rows, key=lambda e: _unit(str(b.seed), "order", e["example_id"]))
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
        write_table(to_table(manifest, SHARDS), tmp / "manifest.parquet", SHARDS)
        old = out.with_name(f".{out.name}.{uuid.uuid4().hex}.old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----- the stage -----


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
    out_dir: Path,
    b: BuildConfig,
    catalog: Catalog,
    prompt_format: str = "vicuna_v1.1",
) -> BuildSummary:
    """Write ``out_dir/examples.parquet``, ``out_dir/shards/`` and ``out_dir/rejects.parquet``."""
    tr = read_table(transcripts, TRANSCRIPTS).to_pylist()
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
        for task in b.tasks:
            if task == "asr":
                found = [
                    ("", {"instruction": catalog.draw("asr", t["utt_id"], b.seed).text, "answer": t["text"]})
                ]
            else:
                found = answers.get((t["utt_id"], task), [])
            if not found:
                missing += 1
                rejects.append(
                    _reject(
                        str(transcripts),
                        t["utt_id"],
                        "answer",
                        "missing_answer",
                        f"no {task} answer in the responses",
                        t["corpus"],
                    )
                )
                continue
            for origin, r in found:
                if r.get("rejected_by"):  # the generate stage's filters flagged this answer
                    filtered += 1
                    rejects.append(
                        _reject(
                            str(transcripts),
                            t["utt_id"],
                            "answer",
                            f"answer_{r['rejected_by']}",
                            f"{task} answer rejected by the generate filter {r['rejected_by']}",
                            t["corpus"],
                        )
                    )
                    continue
                imported += origin.startswith("reference:")
                p = speech_prompt(r["instruction"], prompt_format)
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
                        transcript=t["text"],
                        audio_path=t["audio_path"],
                        offset_s=t["offset_s"],
                        duration_s=t["duration_s"],
                        speaker=t["speaker"],
                    )
                )

    near = 0
    if b.near_dup_threshold is not None:
        pool = [e for e in rows if e["task"] != "asr" and e["split"] not in b.eval_splits]
        dropped = near_duplicates(pool, b.near_dup_threshold, b.minhash_perms, b.seed)
        near = len(dropped)
        for e in rows:
            if e["example_id"] in dropped:
                rejects.append(
                    _reject(
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

    write_table(to_table(rows, EXAMPLES), out_dir / "examples.parquet", EXAMPLES, b.row_group_rows)
    manifest = write_shards(rows, out_dir / "shards", b)
    write_table(to_table(rejects, REJECTS), out_dir / "rejects.parquet", REJECTS)

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


def run(cfg: ExperimentConfig, workdir: Path, force: bool = False) -> StageResult:
    workdir = Path(workdir)
    out = workdir / "build"
    transcripts = workdir / "harvest" / "transcripts.parquet"
    responses = workdir / "generate" / "responses.parquet"
    imported = workdir / "import" / "responses.parquet"
    catalog = load_catalog(cfg.generate.catalog)
    needs_llm = any(t != "asr" for t in cfg.build.tasks)
    inputs = [Artifact("transcripts", transcripts, "table"), Artifact("catalog", catalog.path, "file")]
    answer_tables = []
    if needs_llm:
        inputs.append(Artifact("responses", responses, "table"))
        answer_tables.append(responses)
        if imported.exists():
            inputs.append(Artifact("imported_responses", imported, "table"))
            answer_tables.append(imported)

    def body() -> dict:
        s = build(transcripts, answer_tables or None, out, cfg.build, catalog, cfg.generate.prompt_format)
        print_summary(s)
        return s.__dict__

    params = {**cfg.build.model_dump(), "prompt_format": cfg.generate.prompt_format}
    return run_stage(
        "build",
        workdir,
        params,
        inputs,
        [
            Artifact("examples", out / "examples.parquet", "table"),
            Artifact("shard_manifest", out / "shards" / "manifest.parquet", "table"),
            Artifact("shards", out / "shards", "shards"),
            Artifact("rejects", out / "rejects.parquet", "table"),
        ],
        body,
        CODE_FILES,
        force,
    )


# ----- import of the reference's self-powered data -----


_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an the of to and or in on with for this that these it its is are be by as at from into your you what "
    "which text given provided english please".split()
)


def _norm_instruction(s: str) -> str:
    return " ".join(_WORD.findall(s.lower()))


def _stems(s: str) -> list[str]:
    # Five-letter prefixes are a crude stemmer that is enough to tie "paraphrase"/"paraphrasing" together.
    return [w[:5] for w in _WORD.findall(s.lower()) if w not in _STOP]


class InstructionMapper:
    """Instruction wording -> catalog category: by exact wording (our catalog, then the reference's own
    wordings in ``catalog/reference-instructions.yaml``), else by TF-IDF cosine similarity to each
    category's wordings, accepted only when clearly ahead of the runner-up."""

    def __init__(self, catalog: Catalog, aliases: Path = REFERENCE_INSTRUCTIONS, min_score=0.15, margin=0.1):
        raw = yaml.safe_load(aliases.read_text()) or {}
        wordings: dict[str, list[str]] = defaultdict(list)
        for name, cat in catalog.categories.items():
            wordings[name] += [i.text for i in cat.instructions]
        for name, texts in (raw.get("categories") or {}).items():
            if name not in catalog.categories:
                raise ValueError(f"{aliases}: category {name!r} is not in the catalog {catalog.path}")
            wordings[name] += list(texts)
        self.exact = {_norm_instruction(t): name for name, ts in wordings.items() for t in ts}
        docs = {n: Counter(w for t in ts for w in _stems(t)) for n, ts in wordings.items()}
        df = Counter(w for d in docs.values() for w in d)
        self.idf = {w: math.log(1 + len(docs) / n) for w, n in df.items()}
        self.vecs = {n: self._vec(d) for n, d in docs.items()}
        self.min_score, self.margin = min_score, margin

    def _vec(self, counts: Counter) -> dict[str, float]:
        v = {w: c * self.idf.get(w, 0.0) for w, c in counts.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    def scores(self, instruction: str) -> list[tuple[float, str]]:
        q = self._vec(Counter(_stems(instruction)))
        return sorted(
            ((sum(x * v.get(w, 0.0) for w, x in q.items()), n) for n, v in self.vecs.items()), reverse=True
        )

    def category(self, instruction: str) -> tuple[str | None, str]:
        """``(category or None, how)``: how it matched, or why it did not."""
        hit = self.exact.get(_norm_instruction(instruction))
        if hit:
            return hit, "exact"
        (s1, best), (s2, second) = self.scores(instruction)[:2]
        if s1 >= self.min_score and s1 - s2 >= self.margin:
            return best, f"similarity {s1:.2f} (next: {second} {s2:.2f})"
        return None, f"closest category {best} at {s1:.2f}, {second} at {s2:.2f}: too weak or ambiguous"


@dataclass
class ImportSummary:
    lines: int
    answers: int
    rejects: int
    reject_counts: dict[str, int]
    by_task: dict[str, int]


def import_reference(
    manifest: Path,
    root: Path,
    transcripts: Path,
    out_dir: Path,
    catalog: Catalog,
    prompt_format: str = "vicuna_v1.1",
) -> ImportSummary:
    """The reference's ``{instruction, audio, text}`` lines -> ``out_dir/responses.parquet`` + ``rejects.parquet``.

    ``audio`` is resolved against ``root`` (and must stay inside it, as in harvest). A line becomes an
    answer when its instruction maps to a category, its audio exists, and that audio is a harvested
    utterance (matched by resolved path and segment), whose transcript makes the prompt. Every other line
    is a reject naming file, line, field and reason; none is dropped silently.
    """
    mapper = InstructionMapper(catalog)
    root = Path(root).resolve()
    by_path: dict[str, list[dict]] = defaultdict(list)
    for t in read_table(transcripts, TRANSCRIPTS).to_pylist():
        by_path[t["audio_path"]].append(t)
    tag = "reference:" + hashlib.sha256(Path(manifest).read_bytes()).hexdigest()[:16]
    rows, rejects, seen = [], [], set()
    lines = Path(manifest).read_bytes().splitlines()
    for lineno, raw in enumerate(lines, start=1):
        source = f"{manifest}:{lineno}"
        if not raw.strip():
            continue

        def reject(fld: str, reason: str, detail: str, utt: str | None = None, source: str = source) -> None:
            rejects.append(_reject(source, utt, fld, reason, detail, "reference"))

        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            reject("line", "bad_json", str(e))
            continue
        if not isinstance(rec, dict):
            reject("line", "bad_json", "expected a JSON object")
            continue
        bad = next((k for k in ("instruction", "audio", "text") if not isinstance(rec.get(k), str)), None)
        if bad:
            reject(bad, f"missing_{bad}", f"field {bad!r} is missing or not a string")
            continue
        if not rec["text"].strip():
            reject("text", "empty_answer", "the answer is empty")
            continue
        task, how = mapper.category(rec["instruction"])
        if task is None:
            reject("instruction", "unknown_instruction", how)
            continue
        # The reference appends ":start:frames" to a path for a segment of a long file.
        path_s, seg = rec["audio"], None
        parts = path_s.rsplit(":", 2)
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            path_s, seg = parts[0], (int(parts[1]), int(parts[2]))
        p = Path(path_s)
        resolved = (p if p.is_absolute() else root / p).resolve()
        if not resolved.is_relative_to(root):
            reject("audio", "outside_root", f"{path_s} resolves outside the root {root}")
            continue
        if not resolved.is_file():
            reject("audio", "missing_audio", f"{resolved} does not exist")
            continue
        cands = by_path.get(str(resolved), [])
        if seg is not None:
            cands = [t for t in cands if abs(t["offset_s"] * t["sample_rate_hz"] - seg[0]) < 1]
        if len(cands) != 1:
            why = "is not among the harvested transcripts" if not cands else "matches several utterances"
            reject("audio", "not_harvested" if not cands else "ambiguous_audio", f"{resolved} {why}")
            continue
        t = cands[0]
        if (t["utt_id"], task, rec["instruction"]) in seen:
            reject("line", "duplicate_line", f"{t['utt_id']}/{task} with this instruction came earlier")
            continue
        seen.add((t["utt_id"], task, rec["instruction"]))
        prompt = text_prompt(rec["instruction"], t["text"], prompt_format)
        rows.append(
            dict(
                utt_id=t["utt_id"],
                task=task,
                instruction_id=f"{task}/ref:{hashlib.sha256(rec['instruction'].encode()).hexdigest()[:8]}",
                instruction=rec["instruction"],
                prompt=prompt,
                answer=rec["text"].strip(),
                model=tag,
                finish_reason="imported",
                prompt_tokens=0,
                completion_tokens=0,
                request_key=hashlib.sha256(
                    f"{source}\0{raw.decode('utf-8', 'replace')}".encode()
                ).hexdigest(),
                sampling=json.dumps({"source": str(manifest), "line": lineno, "matched": how}),
            )
        )
    write_table(to_table(rows, RESPONSES), out_dir / "responses.parquet", RESPONSES)
    write_table(to_table(rejects, REJECTS), out_dir / "rejects.parquet", REJECTS)
    return ImportSummary(
        len([ln for ln in lines if ln.strip()]),
        len(rows),
        len(rejects),
        dict(Counter(r["reason"] for r in rejects).most_common()),
        dict(sorted(Counter(r["task"] for r in rows).items())),
    )


def run_import(
    cfg: ExperimentConfig, workdir: Path, manifest: Path, root: Path, force: bool = False
) -> StageResult:
    workdir = Path(workdir)
    out = workdir / "import"
    transcripts = workdir / "harvest" / "transcripts.parquet"
    catalog = load_catalog(cfg.generate.catalog)

    def body() -> dict:
        s = import_reference(manifest, root, transcripts, out, catalog, cfg.generate.prompt_format)
        console.print(
            f"import-reference: {s.lines} lines -> {s.answers} answers {s.by_task}, {s.rejects} rejects "
            f"{s.reject_counts}"
        )
        return s.__dict__

    return run_stage(
        "import-reference",
        workdir,
        {"manifest": str(Path(manifest).resolve()), "root": str(Path(root).resolve())},
        [
            Artifact("reference_manifest", manifest, "file"),
            Artifact("transcripts", transcripts, "table"),
            Artifact("catalog", catalog.path, "file"),
            Artifact("reference_instructions", REFERENCE_INSTRUCTIONS, "file"),
        ],
        [
            Artifact("responses", out / "responses.parquet", "table"),
            Artifact("rejects", out / "rejects.parquet", "table"),
        ],
        body,
        CODE_FILES + ["stages/catalog/reference-instructions.yaml"],
        force,
    )
