"""Evaluate: decode the eval sets with a trained checkpoint; WER, the speech-anchor-bias probe, spoken QA.

- ASR: every eval-set row of the examples table with task ``asr`` is decoded (greedy, or beam search
  with ``num_beams``) under a length bound from its duration, and scored as ``stages.evaluate.wer``
  says: Whisper's English normalizer on both sides, corpus-level WER per eval set with S/D/I. RTFx
  (audio seconds per decoding second) is measured per set.
- Probe (``stages.evaluate.probe``): the generate stage's (utterance, non-ASR instruction) pairs on
  the eval utterances, asked with the speech instead of the transcript: anchor rate and
  self-consistency per category. It reads ``WORKDIR/generate/responses.parquet``, which exists for an
  ASR-only build as well, so both kinds of model are probed with the same items.
- QA (``stages.evaluate.qa``): yes/no questions on the eval speech, scored by accuracy.

Bad input never yields a report on partial data without saying so: a checkpoint that is incomplete or
not a speech-text checkpoint is an error before anything loads; a row whose audio cannot be loaded is a
reject (``rejects.parquet``), counted per set in every table and flagged at the top of the report.

Outputs in ``WORKDIR/evaluate``: predictions, metrics, probe, probe_metrics, qa, qa_metrics and rejects
(Parquet, schemas in ``schemas``), qa_questions.jsonl (the question set asked), report.md, report.html,
the report's PNG plots and the clips it plays (``audio/``). ``publish_artifacts`` makes Prefect artifacts of them (the flow calls it).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from core.atomic import write_text
from core.config import EvaluateConfig
from core.digest import sha256_file
from core.log import console
from core.paths import EvaluatePaths, WorkPaths
from core.prompts import asr_eval_prompt
from core.stage import StageError
from core.tables import read_table, write_table
from core.text import normalize
from schemas import (
    EXAMPLES,
    METRICS,
    PREDICTIONS,
    PROBE,
    PROBE_METRICS,
    QA,
    QA_METRICS,
    REJECTS,
    RESPONSES,
    reject_row,
    to_table,
)
from stages.evaluate import decoding, probe, qa, reference, report
from stages.evaluate.wer import corpus_metrics, word_errors

TASK = "asr"
TABLES = {
    "predictions": PREDICTIONS,
    "metrics": METRICS,
    "probe": PROBE,
    "probe_metrics": PROBE_METRICS,
    "qa": QA,
    "qa_metrics": QA_METRICS,
    "rejects": REJECTS,
}


class EvaluateInputError(StageError, ValueError):
    """An input the stage cannot evaluate: a checkpoint of another kind, no eval rows."""


def check_lsm_checkpoint(path: str | Path) -> Path:
    """A clear error, before any loading, for a checkpoint that is missing, incomplete or of another kind."""
    from core.lsm.model import LSMConfig, check_checkpoint

    path = Path(path)
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        try:
            model_type = json.loads(cfg_file.read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError) as e:
            raise EvaluateInputError(f"checkpoint {path}: config.json is not a JSON object ({e})") from e
        if model_type != LSMConfig.model_type:
            raise EvaluateInputError(
                f"checkpoint {path}: config.json has model_type {model_type!r}, not {LSMConfig.model_type!r}: "
                "this is not a speech-text checkpoint written by the train stage (a plain LLM or Whisper "
                "directory?)"
            )
    return check_checkpoint(path)


def _load_model(checkpoint: Path, device: str):
    from transformers.utils import logging as hf_logging

    from core.lsm.model import LSMForConditionalGeneration

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own progress bar is the one to watch
    try:
        return LSMForConditionalGeneration.from_pretrained(str(checkpoint)).to(device).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _reject(part: str, eval_set: str, path: str, utt_id: str, err) -> dict:
    return reject_row(eval_set, path, utt_id, "audio", err.reason, f"{part}: {err.detail}")


def _score(rows: list[dict], dec, cfg: EvaluateConfig, rejects: list[dict], system: str, beams: int):
    """Predictions and per-set metrics of one system's transcripts of the eval rows."""
    preds = []
    for i, r in enumerate(rows):
        if f"asr/{i}" not in dec.texts:
            continue
        hyp = dec.texts[f"asr/{i}"]
        ref_norm, hyp_norm = normalize(r["transcript"]), normalize(hyp)
        c = word_errors(ref_norm, hyp_norm)
        preds.append(
            dict(
                example_id=r["example_id"],
                utt_id=r["utt_id"],
                eval_set=r["split"],
                task=r["task"],
                system=system,
                reference=r["transcript"],
                hypothesis=hyp,
                reference_norm=ref_norm,
                hypothesis_norm=hyp_norm,
                ref_words=len(ref_norm.split()),
                substitutions=c["substitutions"],
                deletions=c["deletions"],
                insertions=c["insertions"],
                hits=c["hits"],
                errors=c["substitutions"] + c["deletions"] + c["insertions"],
                duration_s=r["duration_s"],
            )
        )
    rejected = Counter(rj["corpus"] for rj in rejects)
    metrics = []
    for s in cfg.eval_sets:
        m = corpus_metrics(s, [p for p in preds if p["eval_set"] == s], TASK)
        audio_s, decode_s = dec.audio_s.get(s, 0.0), dec.decode_s.get(s, 0.0)
        m.update(
            system=system,
            rejected=rejected[s],
            audio_s=audio_s,
            decode_s=decode_s,
            rtfx=audio_s / decode_s if decode_s else float("nan"),
            num_beams=beams,
        )
        metrics.append(m)
    return preds, metrics


def evaluate(
    checkpoint: Path,
    examples: Path,
    out: EvaluatePaths | Path,
    cfg: EvaluateConfig,
    responses: Path | None = None,
    qa_file: Path | None = None,
    baseline: Path | None = None,
    prompt_format: str = "vicuna_v1.1",
    device: str | None = None,
    whisper_dir: Path | None = None,
    encoder_cache: Path | None = None,
) -> dict:
    """Decode, score and write the outputs (``EvaluatePaths``, or a folder to hold them); returns a summary
    (WER, anchor rate, QA accuracy, rejects). ``baseline``: another work directory whose probe to compare;
    ``whisper_dir``: the Whisper the encoder came from, whose own WER on the same clips is the reference row;
    ``encoder_cache``: where the checkpoint's encoder outputs are kept (``core.lsm.encoder_cache``), or None."""
    import torch

    checkpoint = Path(checkpoint)
    out = out if isinstance(out, EvaluatePaths) else EvaluatePaths(Path(out))
    check_lsm_checkpoint(checkpoint)
    base_rows = None
    if baseline is not None:
        base_rows = read_table(WorkPaths(baseline).evaluate.table("probe_metrics"), PROBE_METRICS).to_pylist()
    questions, qa_source = None, qa.GENERATED
    if cfg.qa and qa_file is not None:
        questions, qa_source = qa.load_questions(qa_file), str(qa_file)  # a bad file fails before decoding

    table = read_table(examples, EXAMPLES)
    rows = [r for r in table.to_pylist() if r["split"] in cfg.eval_sets and r["task"] == TASK]
    found = Counter(r["split"] for r in rows)
    missing_sets = [s for s in cfg.eval_sets if not found[s]]
    for s in missing_sets:
        console.print(f"[yellow]evaluate: warning: eval set {s!r} has no {TASK} rows in {examples}[/]")
    if not rows:
        raise EvaluateInputError(f"evaluate: {examples} has no {TASK} rows in the eval sets {cfg.eval_sets}")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _load_model(checkpoint, device)
    if encoder_cache is not None:  # every clip's encoder output once, whatever is asked about it
        from core.lsm.encoder_cache import for_model

        model.use_encoder_cache(for_model(model, encoder_cache))
    t0 = time.time()

    # ----- ASR and WER -----
    # "example": each row's own prompt (the ASR instruction drawn for it, as in training); "fixed": one prompt
    # for every clip, the reference's own string in its layout.
    fixed = asr_eval_prompt(prompt_format, model.tokenizer) if cfg.asr_prompt == "fixed" else None
    asr_items = [
        decoding.Item.of_row(
            f"asr/{i}",
            r,
            decoding.asr_length(r["duration_s"], cfg),
            prompt=fixed,
        )
        for i, r in enumerate(rows)
    ]
    dec = decoding.decode(
        model, asr_items, cfg.batch_size, cfg.num_beams, "evaluate asr", cfg.asr_min_new_tokens, cfg.order
    )
    rejects = [
        _reject("asr", r["split"], r["audio_path"], r["utt_id"], dec.failed[f"asr/{i}"])
        for i, r in enumerate(rows)
        if f"asr/{i}" in dec.failed
    ]
    preds, metrics = _score(rows, dec, cfg, rejects, "lsm", cfg.num_beams)
    # The reference row: the Whisper the encoder came from, transcribing the same clips on its own.
    reference_note = ""
    if not cfg.whisper_reference:
        reference_note = "evaluate.whisper_reference is off"
    elif whisper_dir is None:
        reference_note = "no Whisper directory given"
    else:
        try:
            ref = reference.decode(whisper_dir, asr_items, cfg.batch_size, device)
        except reference.NoReference as e:
            reference_note = str(e)
        else:
            ref_preds, ref_metrics = _score(rows, ref, cfg, [], "whisper", 1)
            preds += ref_preds
            metrics += ref_metrics

    # ----- probe and QA: one decoding pass over both -----
    p_items, p_meta, probe_note = [], {}, ""
    if not cfg.probe:
        probe_note = "evaluate.probe is off"
    elif responses is None or not Path(responses).exists():
        probe_note = "no responses table from the generate stage"
    else:
        resp = read_table(responses, RESPONSES).to_pylist()
        p_items, p_meta = probe.probe_items(
            rows, resp, cfg.probe_tasks, cfg.probe_max_new_tokens, prompt_format, model.tokenizer
        )
        if not p_items:
            probe_note = f"{responses} has no non-ASR answers on the eval utterances"
    q_items, q_meta, unknown, qa_note = [], {}, [], ""
    if not cfg.qa:
        qa_note = "evaluate.qa is off"
    else:
        questions = questions if questions is not None else qa.word_presence_questions(rows)
        q_items, q_meta, unknown = qa.qa_items(
            questions, rows, cfg.qa_max_new_tokens, prompt_format, model.tokenizer
        )
        if not q_items:
            qa_note = "no question is about an eval utterance"
    # The question set as asked, so that a generated set can be read, kept and supplied again.
    write_text(out.qa_questions, "".join(json.dumps(q) + "\n" for q in questions or []))
    rejects += [
        dict(
            corpus="qa",
            source=qa_source,
            utt_id=q["utt_id"],
            field="audio" if "reason" in q else "utt_id",
            reason=q.get("reason", "unknown_utt_id"),
            detail=f"qa: question {q['id']!r}: {q['detail']}"
            if "reason" in q
            else f"qa: question {q['id']!r} is about an utterance in none of the eval sets {cfg.eval_sets}",
        )
        for q in unknown
    ]
    extra = decoding.decode(
        model, p_items + q_items, cfg.batch_size, cfg.num_beams, "evaluate probe+qa", order=cfg.order
    )
    for it in p_items + q_items:
        if it.key in extra.failed:
            part = (
                "probe " + p_meta[it.key]["category"] if it.key in p_meta else f"qa {q_meta[it.key]['qa_id']}"
            )
            rejects.append(_reject(part, it.group, it.audio_path, it.utt_id, extra.failed[it.key]))
    # the model's own transcription of each clip, which the probe's second anchor measure compares against
    own_asr = {(p["eval_set"], p["utt_id"]): p["hypothesis"] for p in preds if p["system"] == "lsm"}
    probe_rows = [
        r
        for k, m in p_meta.items()
        if k in extra.texts
        and (
            r := probe.score_item(
                m, extra.texts[k], cfg.anchor_wer_threshold, own_asr.get((m["eval_set"], m["utt_id"]))
            )
        )
        is not None
    ]
    probe_m = probe.probe_metrics(probe_rows, p_meta, set(extra.failed), cfg.anchor_wer_threshold)
    qa_rows = [qa.score(m, extra.texts[k]) for k, m in q_meta.items() if k in extra.texts]
    qa_m = qa.qa_metrics(qa_rows, q_meta, set(extra.failed), qa_source)

    # ----- outputs -----
    tables = dict(
        predictions=preds,
        metrics=metrics,
        probe=probe_rows,
        probe_metrics=probe_m,
        qa=qa_rows,
        qa_metrics=qa_m,
        rejects=rejects,
    )
    for name, schema in TABLES.items():
        keep = schema.schema.names
        write_table(
            to_table([{k: r[k] for k in keep if k in r} for r in tables[name]], schema),
            out.table(name),
            schema,
        )
    lsm = [p for p in preds if p["system"] == "lsm"]
    worst = report.worst_utterances(lsm, cfg.worst_n)
    report.write_plots(out, metrics, probe_m, base_rows, worst)
    # the clips the report plays: the worst utterances' and those of the answers it shows per category
    answers = report.answer_examples(lsm, probe_rows)
    links = report.write_clips(
        out.audio,
        [(p["eval_set"], p["utt_id"]) for p in worst]
        + [(r["eval_set"], r["utt_id"]) for shown in answers.values() for r in shown],
        {(r["split"], r["utt_id"]): (r["audio_path"], r["offset_s"], r["duration_s"]) for r in rows},
    )
    settings = (
        ("greedy" if cfg.num_beams == 1 else f"beam search, {cfg.num_beams} beams")
        + f", batch {cfg.batch_size} ({'each set in its table order' if cfg.order == 'dataset' else 'longest first'}), "
        + (
            f"ASR answers at most {cfg.max_new_tokens} tokens"
            if cfg.asr_length == "cap"
            else f"ASR answers at most min({cfg.max_new_tokens}, {cfg.tokens_per_s:g}/s x duration + "
            f"{cfg.length_slack}) tokens"
        )
        + (f" and at least {cfg.asr_min_new_tokens}" if cfg.asr_min_new_tokens else "")
        + f", on {device}"
    )
    md = report.report_markdown(
        dict(
            checkpoint=checkpoint,
            examples=examples,
            examples_hash="sha256:" + sha256_file(Path(examples)),
            settings=settings,
            metrics=metrics,
            preds=lsm,
            reference_note=reference_note,
            probe=probe_m,
            probe_note=probe_note,
            qa=qa_m,
            qa_note=qa_note,
            rejects=rejects,
            missing_sets=missing_sets,
            baseline=base_rows,
            baseline_name=Path(baseline).name if baseline is not None else "",
            worst=worst,
            answers=answers,
            audio_links=links,
        )
    )
    write_text(out.report, md)
    write_text(out.report_html, report.report_html(md, audio_links=set(links.values())))
    print_table(metrics, probe_m, qa_m)
    by = {sys_: [m for m in metrics if m["system"] == sys_] for sys_ in ("lsm", "whisper")}
    return {
        "wer": {m["eval_set"]: m["wer"] for m in by["lsm"]},
        "whisper_wer": {m["eval_set"]: m["wer"] for m in by["whisper"]},
        "rtfx": {m["eval_set"]: m["rtfx"] for m in by["lsm"]},
        "anchor_rate": {f"{r['eval_set']}/{r['category']}": r["anchor_rate"] for r in probe_m},
        "anchor_rate_own": {f"{r['eval_set']}/{r['category']}": r["anchor_rate_own"] for r in probe_m},
        "qa_accuracy": {r["eval_set"]: r["accuracy"] for r in qa_m},
        "predictions": len(lsm),
        "rejects": len(rejects),
        "empty_references": sum(m["empty_references"] for m in by["lsm"]),
        "partial": bool(rejects or missing_sets),
        "seconds": time.time() - t0,
    }


def print_table(metrics: list[dict], probe_m: list[dict], qa_m: list[dict]) -> None:
    from rich.table import Table

    t = Table(
        "eval set",
        "system",
        "utterances",
        "ref words",
        "sub",
        "del",
        "ins",
        "WER %",
        "empty refs",
        "rejected",
        "RTFx",
        title="WER per eval set",
    )
    for m in metrics:
        t.add_row(
            m["eval_set"],
            m["system"],
            str(m["n_utterances"]),
            str(m["n_ref_words"]),
            str(m["substitutions"]),
            str(m["deletions"]),
            str(m["insertions"]),
            report.pct(m["wer"]),
            str(m["empty_references"]),
            str(m["rejected"]),
            report.num(m["rtfx"], 2),
        )
    console.print(t)
    if probe_m:
        t = Table(
            "eval set",
            "category",
            "items",
            "anchor rate %",
            "anchor rate % (own ASR)",
            "chrF",
            title="Speech-anchor-bias probe",
        )
        for r in probe_m:
            t.add_row(
                r["eval_set"],
                r["category"],
                str(r["n_items"]),
                report.pct(r["anchor_rate"]),
                report.pct(r["anchor_rate_own"]),
                report.num(r["self_consistency_chrf"]),
            )
        console.print(t)
    for r in qa_m:
        console.print(
            f"spoken QA ({r['eval_set']}): {report.pct(r['accuracy'])}% of {r['n_questions']} questions"
        )
