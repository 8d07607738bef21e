"""Evaluate: greedy decoding of the eval sets' ASR examples with a trained checkpoint, and WER.

WER is computed as the reference does it: openai-whisper's English text normalizer on both the
reference transcript and the hypothesis, then word alignment with jiwer. It is corpus-level per eval
set (all errors over all reference words), with substitutions, deletions, insertions and hits.
Utterances whose reference is empty after normalization have no defined WER: they are decoded and
kept in the predictions, but left out of the metrics and counted in ``empty_references``. An eval row
whose audio cannot be loaded is a reject (warned about, written to ``rejects.parquet`` and counted in
the report), never a silent drop.

Outputs in ``WORKDIR/evaluate``: ``predictions.parquet`` (schemas.PREDICTIONS), ``metrics.parquet``
(schemas.METRICS), ``rejects.parquet`` (schemas.REJECTS) and ``report.md``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from pathlib import Path

from schemas import EXAMPLES, METRICS, PREDICTIONS, REJECTS, read_table, to_table, write_table
from splsm.config import EvaluateConfig, ExperimentConfig
from splsm.log import console, progress
from splsm.stage import Artifact, StageResult, run_stage
from splsm.text import normalize

CODE_FILES = [
    "stages/evaluate.py",
    "stages/model.py",
    "splsm/audio.py",
    "splsm/text.py",
    "schemas/__init__.py",
]
TASK = "asr"


def word_errors(reference_norm: str, hypothesis_norm: str) -> dict:
    """Alignment counts of one utterance (normalized texts); an empty reference has only insertions."""
    import jiwer

    if not reference_norm.split():
        return dict(substitutions=0, deletions=0, insertions=len(hypothesis_norm.split()), hits=0)
    o = jiwer.process_words(reference_norm, hypothesis_norm)
    return dict(substitutions=o.substitutions, deletions=o.deletions, insertions=o.insertions, hits=o.hits)


def corpus_metrics(eval_set: str, preds: list[dict]) -> dict:
    """One METRICS row: errors summed over the set's utterances with a non-empty reference."""
    scored = [p for p in preds if p["ref_words"] > 0]
    tot = Counter()
    for p in scored:
        tot.update(p["_counts"])
    n_ref = tot["substitutions"] + tot["deletions"] + tot["hits"]
    errors = tot["substitutions"] + tot["deletions"] + tot["insertions"]
    return dict(
        eval_set=eval_set,
        task=TASK,
        n_utterances=len(scored),
        n_ref_words=n_ref,
        substitutions=tot["substitutions"],
        deletions=tot["deletions"],
        insertions=tot["insertions"],
        hits=tot["hits"],
        wer=errors / n_ref if n_ref else float("nan"),
        empty_references=len(preds) - len(scored),
    )


def evaluate(
    checkpoint: Path, examples: Path, out_dir: Path, cfg: EvaluateConfig, device: str | None = None
) -> dict:
    """Decode, score and write the outputs; returns a summary dict (WER per set, rejects)."""
    import torch

    from splsm import audio
    from stages.model import Collator, LSMForConditionalGeneration, check_checkpoint

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    check_checkpoint(checkpoint)  # a clear error naming what is missing, before any loading
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own progress bar is the one to watch
    try:
        model = LSMForConditionalGeneration.from_pretrained(str(checkpoint)).to(device).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    collate = Collator(model.tokenizer, model.feature_extractor)

    table = read_table(examples, EXAMPLES)
    rows = [r for r in table.to_pylist() if r["split"] in cfg.eval_sets and r["task"] == TASK]
    found = Counter(r["split"] for r in rows)
    for s in cfg.eval_sets:
        if not found[s]:
            console.print(f"[yellow]evaluate: warning: eval set {s!r} has no {TASK} rows in {examples}[/]")
    if not rows:
        raise ValueError(f"evaluate: {examples} has no {TASK} rows in the eval sets {cfg.eval_sets}")

    # Batches of similar duration pad less; the predictions keep the table's order.
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["split"], -rows[i]["duration_s"]))
    hyps: dict[int, str] = {}
    rejects: list[dict] = []
    t0 = time.time()
    with progress() as bar:
        task = bar.add_task("evaluate", total=len(rows), status="")
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            kept, clips = [], []
            for i in idx:
                r = rows[i]
                try:
                    clips.append(audio.load(r["audio_path"], r["offset_s"], r["duration_s"]))
                    kept.append(i)
                except audio.AudioError as e:
                    console.print(
                        f"[yellow]evaluate: warning: rejected {r['example_id']} ({r['split']}): {e}[/]"
                    )
                    rejects.append(
                        dict(
                            corpus=r["split"],
                            source=r["audio_path"],
                            utt_id=r["utt_id"],
                            field="audio",
                            reason=e.reason,
                            detail=e.detail,
                        )
                    )
            if kept:
                batch = collate([rows[i] for i in kept], clips, with_answer=False).to(device)
                out = model.generate(
                    batch.input_features,
                    batch.durations_s,
                    batch.prefix_ids,
                    batch.suffix_ids,
                    max_new_tokens=cfg.max_new_tokens,
                )
                for i, ids in zip(kept, out, strict=True):
                    hyps[i] = model.tokenizer.decode(ids, skip_special_tokens=True).strip()
            bar.update(task, advance=len(idx), status=f"{len(rejects)} rejected" if rejects else "")

    preds = []
    for i, r in enumerate(rows):
        if i not in hyps:
            continue
        ref_norm, hyp_norm = normalize(r["transcript"]), normalize(hyps[i])
        counts = word_errors(ref_norm, hyp_norm)
        preds.append(
            dict(
                example_id=r["example_id"],
                utt_id=r["utt_id"],
                eval_set=r["split"],
                task=r["task"],
                reference=r["transcript"],
                hypothesis=hyps[i],
                reference_norm=ref_norm,
                hypothesis_norm=hyp_norm,
                ref_words=len(ref_norm.split()),
                errors=counts["substitutions"] + counts["deletions"] + counts["insertions"],
                duration_s=r["duration_s"],
                _counts=counts,
            )
        )
    metrics = [corpus_metrics(s, [p for p in preds if p["eval_set"] == s]) for s in cfg.eval_sets]
    reject_counts = Counter(rj["corpus"] for rj in rejects)

    write_table(
        to_table([{k: v for k, v in p.items() if k != "_counts"} for p in preds], PREDICTIONS),
        out_dir / "predictions.parquet",
        PREDICTIONS,
    )
    write_table(to_table(metrics, METRICS), out_dir / "metrics.parquet", METRICS)
    write_table(to_table(rejects, REJECTS), out_dir / "rejects.parquet", REJECTS)
    _write_text(out_dir / "report.md", report_markdown(checkpoint, metrics, reject_counts, rejects, preds))
    print_table(metrics, reject_counts)
    return {
        "wer": {m["eval_set"]: m["wer"] for m in metrics},
        "predictions": len(preds),
        "rejects": len(rejects),
        "empty_references": sum(m["empty_references"] for m in metrics),
        "seconds": time.time() - t0,
    }


def _fmt_wer(wer: float) -> str:
    return "n/a" if wer != wer else f"{100 * wer:.2f}"


def report_markdown(
    checkpoint: Path,
    metrics: list[dict],
    reject_counts: Counter,
    rejects: list[dict],
    preds: list[dict],
    n_samples: int = 5,
) -> str:
    lines = [
        "# Evaluation report",
        "",
        f"Checkpoint: `{checkpoint}`",
        "",
        "WER (%) after openai-whisper's English text normalizer on both sides, corpus-level per eval set.",
        "",
        "| eval set | task | utterances | ref words | sub | del | ins | hits | WER % | empty refs | "
        "rejected (audio) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in metrics:
        lines.append(
            f"| {m['eval_set']} | {m['task']} | {m['n_utterances']} | {m['n_ref_words']} | "
            f"{m['substitutions']} | {m['deletions']} | {m['insertions']} | {m['hits']} | "
            f"{_fmt_wer(m['wer'])} | {m['empty_references']} | {reject_counts.get(m['eval_set'], 0)} |"
        )
    lines += [
        "",
        f"{len(rejects)} eval rows rejected because their audio could not be loaded"
        + (":" if rejects else "."),
    ]
    lines += [f"- `{rj['utt_id']}` ({rj['corpus']}): {rj['reason']}: {rj['detail']}" for rj in rejects]
    if preds:
        lines += [
            "",
            "## Sample predictions",
            "",
            "| utterance | reference (normalized) | hypothesis (normalized) |",
            "|---|---|---|",
        ]
        for p in preds[:n_samples]:
            ref, hyp = (p[k].replace("|", "\\|") for k in ("reference_norm", "hypothesis_norm"))
            lines.append(f"| {p['utt_id']} | {ref} | {hyp} |")
    return "\n".join(lines) + "\n"


def print_table(metrics: list[dict], reject_counts: Counter) -> None:
    from rich.table import Table

    t = Table(
        "eval set",
        "utterances",
        "ref words",
        "sub",
        "del",
        "ins",
        "WER %",
        "empty refs",
        "rejected",
        title="WER per eval set",
    )
    for m in metrics:
        t.add_row(
            m["eval_set"],
            str(m["n_utterances"]),
            str(m["n_ref_words"]),
            str(m["substitutions"]),
            str(m["deletions"]),
            str(m["insertions"]),
            _fmt_wer(m["wer"]),
            str(m["empty_references"]),
            str(reject_counts.get(m["eval_set"], 0)),
        )
    console.print(t)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run(
    cfg: ExperimentConfig, workdir: Path, checkpoint: Path, examples: Path, force: bool = False
) -> StageResult:
    from stages.model import check_checkpoint

    out = Path(workdir) / "evaluate"
    check_checkpoint(checkpoint)  # before the lineage store hashes it: name what is missing

    def body() -> dict:
        return evaluate(checkpoint, examples, out, cfg.evaluate)

    return run_stage(
        "evaluate",
        workdir,
        cfg.evaluate.model_dump(mode="json"),
        inputs=[Artifact("checkpoint", checkpoint, "checkpoint"), Artifact("examples", examples, "table")],
        outputs=[
            Artifact("predictions", out / "predictions.parquet", "table"),
            Artifact("metrics", out / "metrics.parquet", "table"),
            Artifact("rejects", out / "rejects.parquet", "table"),
            Artifact("report", out / "report.md", "file"),
        ],
        body=body,
        code_files=CODE_FILES,
        force=force,
    )
