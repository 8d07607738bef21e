"""The evaluate stage end to end on tiny models: WER against jiwer, decoding, probe, QA, report, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jiwer
import pytest
import sacrebleu
import soundfile as sf
import torch
import yaml
from click.testing import CliRunner
from helpers_lsm import DEMO, TINY_QFORMER, build_models, demo_rows, example_row, experiment, write_examples

from conftest import run_stage
from core import audio
from core.lineage.store import LineageStore
from core.lsm.batch import Collate
from core.lsm.model import LSMForConditionalGeneration
from core.paths import WorkPaths
from core.prompts import speech_prompt
from core.tables import read_table, write_table
from core.text import normalize
from schemas import METRICS, PREDICTIONS, PROBE, PROBE_METRICS, QA, QA_METRICS, REJECTS, RESPONSES, to_table
from stages.evaluate import decoding, qa
from stages.evaluate.evaluator import evaluate
from stages.evaluate.report import pct, publish_artifacts

EVAL_UTTS = ["1089-134686-0001", "1221-135766-0001", "1221-135766-0002"]
PROBE_TASKS = ("repeat", "sentiment")


def _responses(rows: list[dict]) -> list[dict]:
    """LLM answers as the generate stage stores them (the probe's inputs), for every test-clean row."""
    out = []
    for r in rows:
        if r["split"] != "test-clean" or r["task"] != "asr":
            continue
        for task, answer in (("repeat", f"Put another way: {r['transcript']}"), ("sentiment", "Neutral.")):
            out.append(
                dict(
                    utt_id=r["utt_id"],
                    task=task,
                    instruction_id=f"{task}/0",
                    instruction=f"Do the {task} task on the text",
                    prompt="",
                    answer=answer,
                    model="tiny",
                    finish_reason="stop",
                    prompt_tokens=1,
                    completion_tokens=1,
                    request_key=f"{r['utt_id']}/{task}",
                    sampling="{}",
                )
            )
    return out


def _config(**evaluate_overrides):
    cfg = experiment()
    ev = cfg.evaluate.model_copy(
        update=dict(probe_max_new_tokens=8, qa_max_new_tokens=4, **evaluate_overrides)
    )
    return cfg.model_copy(update={"evaluate": ev})


def _checkpoint(whisper_dir: Path, llm_dir: Path, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)  # the connector is random: two seeds make two different models
    LSMForConditionalGeneration.from_parts(whisper_dir, llm_dir, TINY_QFORMER).save_pretrained(out)
    return out


def _evaluate(cfg, work: Path, checkpoint: Path, examples: Path):
    """The evaluate stage on ``work``, with ``examples`` as its build stage's examples."""
    target = WorkPaths(work).build.examples
    if Path(examples).resolve() != target.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(examples, target)
    return run_stage("evaluate", cfg, work, checkpoint=checkpoint)


def _workdir(root: Path, name: str, responses: list[dict]) -> Path:
    work = root / name
    write_table(to_table(responses, RESPONSES), WorkPaths(work).generate.responses, RESPONSES)
    return work


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lsm-eval")
    whisper_dir, llm_dir = build_models(root / "models")
    # An untrained checkpoint is enough to test decoding and scoring (training has its own tests).
    ckpt = _checkpoint(whisper_dir, llm_dir, root / "checkpoint", seed=1)
    rows = demo_rows()  # 20 train rows (ASR + repeat) and the 3 test-clean ASR rows
    clip = DEMO / "test-clean" / "1089-134686-0001.wav"
    rows += [
        example_row(
            "lost-0001", DEMO / "test-clean" / "no-such-file.wav", "a clip that went missing", "test-clean"
        ),
        example_row("filler-0001", clip, "Um.", "test-clean"),  # empty once normalized
        example_row("1089-134686-0001", clip, "not asr", "test-clean", task="repeat", answer="x"),  # not ASR
    ]
    responses = _responses(rows)
    work = _workdir(root, "work", responses)
    examples = write_examples(WorkPaths(work).build.examples, rows)  # where the CLI looks for them
    cfg = _config()
    config_file = root / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude={"source"})))
    result = _evaluate(cfg, work, ckpt, examples)
    return dict(
        root=root,
        work=work,
        out=work / "evaluate",
        ckpt=ckpt,
        models=(whisper_dir, llm_dir),
        examples=examples,
        cfg=cfg,
        result=result,
        config_file=config_file,
        rows=rows,
        responses=responses,
    )


def _read(setup, name, schema):
    return read_table(setup["out"] / f"{name}.parquet", schema).to_pylist()


# ----- WER -----


def test_wer_matches_jiwer_on_the_predictions(setup):
    preds = _read(setup, "predictions", PREDICTIONS)
    metrics = _read(setup, "metrics", METRICS)
    # 3 real clips + the empty-reference one; the missing clip is a reject, the non-ASR row is not evaluated.
    assert sorted(p["utt_id"] for p in preds) == sorted([*EVAL_UTTS, "filler-0001"])
    assert all(p["task"] == "asr" and p["eval_set"] == "test-clean" for p in preds)
    for p in preds:
        assert p["reference_norm"] == normalize(p["reference"])
        assert p["hypothesis_norm"] == normalize(p["hypothesis"])
        assert p["ref_words"] == len(p["reference_norm"].split())
        if p["ref_words"]:
            o = jiwer.process_words(p["reference_norm"], p["hypothesis_norm"])
            assert (p["substitutions"], p["deletions"], p["insertions"]) == (
                o.substitutions,
                o.deletions,
                o.insertions,
            )
            assert p["errors"] == o.substitutions + o.deletions + o.insertions

    scored = [p for p in preds if p["ref_words"] > 0]
    o = jiwer.process_words([p["reference_norm"] for p in scored], [p["hypothesis_norm"] for p in scored])
    (m,) = metrics
    assert (m["eval_set"], m["task"], m["n_utterances"], m["empty_references"]) == ("test-clean", "asr", 3, 1)
    assert (m["substitutions"], m["deletions"], m["insertions"], m["hits"]) == (
        o.substitutions,
        o.deletions,
        o.insertions,
        o.hits,
    )
    assert m["n_ref_words"] == sum(p["ref_words"] for p in scored) == o.substitutions + o.deletions + o.hits
    assert m["wer"] == pytest.approx(o.wer)
    assert setup["result"].summary["wer"]["test-clean"] == pytest.approx(o.wer)


def test_rtfx_is_decoded_audio_over_decoding_time(setup):
    (m,) = _read(setup, "metrics", METRICS)
    decoded = [p["utt_id"] for p in _read(setup, "predictions", PREDICTIONS)]
    clips = {r["utt_id"]: r["audio_path"] for r in setup["rows"] if r["task"] == "asr"}
    assert m["audio_s"] == pytest.approx(sum(sf.info(clips[u]).duration for u in decoded), rel=1e-3)
    assert m["decode_s"] > 0 and m["rtfx"] == pytest.approx(m["audio_s"] / m["decode_s"])
    assert m["num_beams"] == 1 and m["rejected"] == 1


# ----- decoding -----


def _greedy_alone(model, row: dict, max_new_tokens: int) -> str:
    collate = Collate.for_model(model)
    b = collate([row], [audio.load(row["audio_path"], row["offset_s"], row["duration_s"])], with_answer=False)
    (ids,) = model.generate(
        b.input_features, b.durations_s, b.prefix_ids, b.suffix_ids, max_new_tokens=max_new_tokens
    )
    return model.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_hypotheses_are_greedy_decodes_of_each_row_under_its_length_bound(setup):
    # Evaluate batches rows in duration order; each hypothesis must still belong to its own row.
    preds = {p["example_id"]: p for p in _read(setup, "predictions", PREDICTIONS)}
    model = LSMForConditionalGeneration.from_pretrained(setup["ckpt"]).eval()
    e = setup["cfg"].evaluate
    for r in setup["rows"]:
        if r["example_id"] in preds:
            bound = decoding.length_bound(r["duration_s"], e.tokens_per_s, e.length_slack, e.max_new_tokens)
            assert preds[r["example_id"]]["hypothesis"] == _greedy_alone(model, r, bound)


def _items(rows, bounds):
    return [
        decoding.Item.of_row(f"k{i}", r, b, group="s")
        for i, (r, b) in enumerate(zip(rows, bounds, strict=True))
    ]


def test_each_row_gets_its_own_bound_inside_a_batch(setup):
    model = LSMForConditionalGeneration.from_pretrained(setup["ckpt"]).eval()
    rows = [r for r in setup["rows"] if r["utt_id"] in EVAL_UTTS and r["task"] == "asr"]
    bounds = [2, 9, 5]
    got = decoding.decode(model, _items(rows, bounds), batch_size=3)
    for i, (r, b) in enumerate(zip(rows, bounds, strict=True)):
        assert got.texts[f"k{i}"] == _greedy_alone(model, r, b)


def test_beam_search_does_not_depend_on_the_batch(setup):
    model = LSMForConditionalGeneration.from_pretrained(setup["ckpt"]).eval()
    rows = [r for r in setup["rows"] if r["utt_id"] in EVAL_UTTS and r["task"] == "asr"]
    items = _items(rows, [6, 6, 6])
    batched = decoding.decode(model, items, batch_size=3, num_beams=3)
    alone = decoding.decode(model, items, batch_size=1, num_beams=3)
    assert batched.texts == alone.texts and len(batched.texts) == 3
    assert batched.decode_s["s"] > 0 and batched.audio_s["s"] == pytest.approx(alone.audio_s["s"])


# ----- probe -----


def test_probe_rows_score_each_answer_against_transcript_and_llm_answer(setup):
    probe = _read(setup, "probe", PROBE)
    # Every (eval utterance, task) with an answer is asked, but the missing clip (rejected) and the
    # empty transcript (nothing to anchor to) are not scored.
    assert sorted((p["utt_id"], p["category"]) for p in probe) == sorted(
        (u, t) for u in EVAL_UTTS for t in PROBE_TASKS
    )
    llm = {(r["utt_id"], r["task"]): r for r in setup["responses"]}
    thr = setup["cfg"].evaluate.anchor_wer_threshold
    for p in probe:
        assert p["llm_answer"] == llm[(p["utt_id"], p["category"])]["answer"]
        ref, hyp = normalize(p["transcript"]), normalize(p["answer"])
        expected_wer = 1.0 if not hyp.split() else jiwer.wer(ref, hyp)
        assert p["wer_vs_transcript"] == pytest.approx(expected_wer)
        assert p["anchored"] == (expected_wer < thr)
        assert p["chrf"] == pytest.approx(sacrebleu.sentence_chrf(p["answer"], [p["llm_answer"]]).score)
    # the second measure: against the model's own transcription of the same clip, from the predictions table
    own = {(r["eval_set"], r["utt_id"]): r["hypothesis"] for r in _read(setup, "predictions", PREDICTIONS)
           if r["system"] == "lsm"}  # fmt: skip
    for p in probe:
        asr = normalize(own[(p["eval_set"], p["utt_id"])])
        assert p["own_asr"] == own[(p["eval_set"], p["utt_id"])]
        if asr.split():
            hyp = normalize(p["answer"])
            expected = 1.0 if not hyp.split() else jiwer.wer(asr, hyp)
            assert p["wer_vs_own_asr"] == pytest.approx(expected) and p["anchored_own"] == (expected < thr)
        else:
            assert p["anchored_own"] is None


def test_probe_metrics_aggregate_the_probe_rows_and_count_what_was_left_out(setup):
    probe = _read(setup, "probe", PROBE)
    metrics = {m["category"]: m for m in _read(setup, "probe_metrics", PROBE_METRICS)}
    assert set(metrics) == set(PROBE_TASKS)
    for cat, m in metrics.items():
        rows = [p for p in probe if p["category"] == cat]
        assert m["n_items"] == len(rows) == 3
        assert m["n_anchored"] == sum(p["anchored"] for p in rows)
        assert m["anchor_rate"] == pytest.approx(m["n_anchored"] / 3)
        own = [p["anchored_own"] for p in rows if p["anchored_own"] is not None]
        assert (m["n_with_own_asr"], m["n_anchored_own"]) == (len(own), sum(own))
        chrf = sacrebleu.corpus_chrf([p["answer"] for p in rows], [[p["llm_answer"] for p in rows]]).score
        assert m["self_consistency_chrf"] == pytest.approx(chrf)
        assert (m["empty_transcripts"], m["rejected"]) == (1, 1)  # filler-0001, lost-0001


def test_probe_answers_are_the_models_answers_to_speech_and_instruction(setup):
    probe = _read(setup, "probe", PROBE)
    model = LSMForConditionalGeneration.from_pretrained(setup["ckpt"]).eval()
    asr = {r["utt_id"]: r for r in setup["rows"] if r["task"] == "asr"}
    for p in probe[:2]:
        prompt = speech_prompt(p["instruction"])
        row = dict(asr[p["utt_id"]], prefix=prompt.prefix, suffix=prompt.suffix)
        assert p["answer"] == _greedy_alone(model, row, setup["cfg"].evaluate.probe_max_new_tokens)


# ----- spoken QA -----


def test_qa_is_scored_against_the_generated_question_set(setup):
    asked = [json.loads(x) for x in (setup["out"] / "qa_questions.jsonl").read_text().splitlines()]
    # Two questions per eval utterance with words (the empty-transcript one has none to ask about).
    assert sorted(q["utt_id"] for q in asked) == sorted([*EVAL_UTTS, *EVAL_UTTS, "lost-0001", "lost-0001"])
    transcripts = {
        r["utt_id"]: normalize(r["transcript"]).split() for r in setup["rows"] if r["task"] == "asr"
    }
    for q in asked:
        word = q["question"].split('"')[1]
        assert (word in transcripts[q["utt_id"]]) == q["answer"]  # the reference follows from the transcript
    rows = _read(setup, "qa", QA)
    by_id = {q["id"]: q for q in asked}
    assert sorted(r["qa_id"] for r in rows) == sorted(q["id"] for q in asked if q["utt_id"] != "lost-0001")
    for r in rows:
        assert r["reference"] == by_id[r["qa_id"]]["answer"]
        assert r["parsed"] == qa.parse_yes_no(r["answer"])
        assert r["correct"] == (r["parsed"] == ("yes" if r["reference"] else "no"))
    (m,) = _read(setup, "qa_metrics", QA_METRICS)
    assert (m["n_questions"], m["rejected"], m["source"]) == (6, 2, qa.GENERATED)
    assert m["n_correct"] == sum(r["correct"] for r in rows)
    assert m["accuracy"] == pytest.approx(m["n_correct"] / 6)
    assert m["n_unparsed"] == sum(r["parsed"] is None for r in rows)


def test_a_user_question_file_is_asked_and_unknown_utterances_are_rejects(setup, tmp_path):
    qfile = tmp_path / "boolq.jsonl"
    qfile.write_text(
        json.dumps({"id": "a", "utt_id": EVAL_UTTS[0], "question": "Is it night?", "answer": True})
        + "\n"
        + json.dumps({"utt_id": "nobody", "question": "Is it day?", "answer": False})
        + "\n"
    )
    cfg = _config(qa_file=qfile, probe=False)
    work = tmp_path / "w"
    _evaluate(cfg, work, setup["ckpt"], setup["examples"])
    out = work / "evaluate"
    (row,) = read_table(out / "qa.parquet", QA).to_pylist()
    assert (row["qa_id"], row["question"], row["reference"]) == ("a", "Is it night?", True)
    (m,) = read_table(out / "qa_metrics.parquet", QA_METRICS).to_pylist()
    assert (m["n_questions"], m["source"]) == (1, str(qfile))
    rejects = read_table(out / "rejects.parquet", REJECTS).to_pylist()
    assert ("nobody", "unknown_utt_id", "utt_id") in {(r["utt_id"], r["reason"], r["field"]) for r in rejects}
    assert read_table(out / "probe.parquet", PROBE).num_rows == 0
    assert "Not run: evaluate.probe is off" in (out / "report.md").read_text()


def test_the_references_spoken_boolqa_puts_the_passage_in_the_prompt_and_the_question_in_speech(
    setup, tmp_path
):
    import subprocess

    from core.prompts import boolqa_prompt

    assert shutil.which("espeak-ng"), (
        "espeak-ng is missing: run scripts/setup.sh (it installs it with apt-get)"
    )
    (tmp_path / "spoken").mkdir()
    lines = []
    for qid, question, answer in (("q1", "is the sky blue", True), ("q2", "is fire cold", False)):
        subprocess.run(["espeak-ng", "-w", str(tmp_path / "spoken" / f"{qid}.wav"), question], check=True)
        lines.append(
            {
                "id": qid,
                "passage": f"A passage for {qid}.",
                "audio": f"spoken/{qid}.wav",
                "question": question,
                "answer": answer,
            }
        )
    lines.append({"id": "q3", "passage": "Gone.", "audio": "spoken/gone.wav", "answer": True})
    qfile = tmp_path / "boolqa.jsonl"
    qfile.write_text("".join(json.dumps(x) + "\n" for x in lines))
    questions = qa.load_questions(qfile)

    items, meta, unreadable = qa.qa_items(questions, [], 4, "reference")
    # the reference's prompt: passage as text context, the spoken question as the speech
    for it, q in zip(items, lines[:2], strict=True):
        p = boolqa_prompt(q["passage"], "reference")
        assert (it.prefix, it.suffix, it.group) == (p.prefix, p.suffix, qa.SPOKEN_SET)
        assert it.prefix.endswith(f"CONTEXT: {q['passage']}\nSPEECH: ") and it.suffix == "\nASSISTENT:"
        assert it.audio_path == str(tmp_path / "spoken" / f"{q['id']}.wav") and it.duration_s > 0.3
    assert [(q["id"], q["reason"]) for q in unreadable] == [("q3", "missing_audio")]
    assert qa.parse_yes_no("True.") == "yes" and qa.parse_yes_no("false, it is not") == "no"

    cfg = _config(qa_file=qfile, probe=False)
    cfg = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"prompt_format": "reference"})})
    work = tmp_path / "w"
    _evaluate(cfg, work, setup["ckpt"], setup["examples"])
    out = work / "evaluate"
    rows = read_table(out / "qa.parquet", QA).to_pylist()
    assert sorted((r["qa_id"], r["eval_set"], r["reference"]) for r in rows) == [
        ("q1", "boolqa", True),
        ("q2", "boolqa", False),
    ]
    (m,) = read_table(out / "qa_metrics.parquet", QA_METRICS).to_pylist()
    assert (m["eval_set"], m["n_questions"], m["n_correct"]) == ("boolqa", 2, sum(r["correct"] for r in rows))
    rejects = read_table(out / "rejects.parquet", REJECTS).to_pylist()
    assert ("boolqa:q3", "missing_audio", "audio") in {
        (r["utt_id"], r["reason"], r["field"]) for r in rejects
    }


def test_a_fixed_asr_prompt_is_the_one_every_clip_is_decoded_with(setup, tmp_path):
    from core.prompts import asr_eval_prompt
    from stages.evaluate.decoding import Item, decode, length_bound

    cfg = _config(asr_prompt="fixed", probe=False, qa=False)
    cfg = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"prompt_format": "reference"})})
    work = tmp_path / "w"
    _evaluate(cfg, work, setup["ckpt"], setup["examples"])
    preds = {
        p["utt_id"]: p for p in read_table(work / "evaluate" / "predictions.parquet", PREDICTIONS).to_pylist()
    }
    # decode the same rows ourselves around the reference's fixed prompt: the same hypotheses
    model = LSMForConditionalGeneration.from_pretrained(setup["ckpt"]).eval()
    fixed = asr_eval_prompt("reference")
    assert fixed.suffix == "\nASSISTENT:"
    e = cfg.evaluate
    rows = [
        r for r in setup["rows"] if r["task"] == "asr" and r["split"] == "test-clean" and r["utt_id"] in preds
    ]
    items = [
        Item.of_row(
            r["utt_id"],
            r,
            length_bound(r["duration_s"], e.tokens_per_s, e.length_slack, e.max_new_tokens),
            prompt=fixed,
        )
        for r in rows
    ]
    got = decode(model, items, e.batch_size)
    assert rows and all(
        got.texts[r["utt_id"]].strip() == preds[r["utt_id"]]["hypothesis"].strip() for r in rows
    )
    # and the prompt matters to this model: each row's own prompt gives other hypotheses
    own = decode(
        model, [Item.of_row(it.key, r, it.max_new_tokens) for it, r in zip(items, rows, strict=True)], 4
    )
    assert any(own.texts[r["utt_id"]] != got.texts[r["utt_id"]] for r in rows)


# ----- report, lineage, reuse -----


def test_report_says_the_data_is_partial_and_has_tables_and_plots(setup):
    out = setup["out"]
    md = (out / "report.md").read_text()
    assert "**Partial data**: 5 eval rows or questions were rejected" in md  # 1 ASR, 2 probe, 2 QA
    (m,) = _read(setup, "metrics", METRICS)
    assert f"| test-clean | lsm | asr | 3 | {m['n_ref_words']} | {m['substitutions']} |" in md
    for cat in PROBE_TASKS:
        assert f"| test-clean | {cat} | 3 |" in md
    html = (out / "report.html").read_text()
    # WER, probe, QA, worst utterances; and "What the model answered": asr and each probe category
    assert html.count("<table>") == 4 + 1 + len(PROBE_TASKS) and "lost-0001" in html
    for name in ("wer_per_set.png", "anchor_rate.png", "worst_utterances.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({name})" in md
    assert setup["result"].summary["partial"] is True


def test_missing_audio_is_a_counted_reject_in_every_part(setup):
    rejects = _read(setup, "rejects", REJECTS)
    assert {(r["utt_id"], r["reason"]) for r in rejects} == {("lost-0001", "missing_audio")}
    parts = sorted(r["detail"].split(":")[0] for r in rejects)
    assert parts == ["asr", "probe repeat", "probe sentiment", "qa lost-0001/absent", "qa lost-0001/present"]
    assert setup["result"].summary["rejects"] == 5


def test_metrics_are_linked_to_the_checkpoint_and_eval_data_in_lineage(setup):
    up = LineageStore(setup["work"] / "lineage.duckdb").upstream(
        str((setup["out"] / "metrics.parquet").resolve())
    )
    roles = {e["role"]: e["location"] for e in up}
    assert roles["checkpoint"] == str(setup["ckpt"].resolve())
    assert roles["examples"] == str(setup["examples"].resolve())
    assert roles["responses"].endswith("generate/responses.parquet")


def test_rerun_is_reused(setup):
    again = _evaluate(setup["cfg"], setup["work"], setup["ckpt"], setup["examples"])
    assert again.reused and again.run_id == setup["result"].run_id
    assert {"predictions", "metrics", "probe", "probe_metrics", "qa", "qa_metrics", "report_html"} <= set(
        again.outputs
    )


# ----- bad input -----


def test_missing_incomplete_or_wrong_kind_checkpoint_is_a_clear_error(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _evaluate(setup["cfg"], tmp_path, tmp_path / "no-checkpoint", setup["examples"])
    partial = tmp_path / "partial"
    shutil.copytree(setup["ckpt"], partial)
    (partial / "tokenizer.json").unlink()
    (partial / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing weights .*tokenizer \(tokenizer.json"):
        _evaluate(setup["cfg"], tmp_path, partial, setup["examples"])
    _, llm_dir = setup["models"]
    with pytest.raises(ValueError, match="model_type 'llama'.*not a speech-text checkpoint"):
        _evaluate(setup["cfg"], tmp_path, llm_dir, setup["examples"])
    broken = tmp_path / "broken"
    shutil.copytree(setup["ckpt"], broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not a JSON object"):
        _evaluate(setup["cfg"], tmp_path, broken, setup["examples"])
    assert not (WorkPaths(tmp_path).evaluate.table("metrics")).exists()


def test_a_bad_question_file_fails_before_decoding_naming_line_and_field(setup, tmp_path):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(
        '{"utt_id": "u", "question": "Is it?", "answer": true}\n{"utt_id": "u", "question": "Q", "answer": "maybe"}\n'
    )
    with pytest.raises(
        qa.QAFileError, match=r"q.jsonl:2: field 'answer': expected true or false, found 'maybe'"
    ):
        evaluate(setup["ckpt"], setup["examples"], tmp_path / "out", setup["cfg"].evaluate, qa_file=qfile)
    assert not (tmp_path / "out").exists()


def test_no_eval_rows_is_an_error(setup, tmp_path):
    only_train = write_examples(tmp_path / "ex.parquet", [r for r in demo_rows() if r["split"] == "train"])
    with pytest.raises(ValueError, match="no asr rows in the eval sets"):
        evaluate(setup["ckpt"], only_train, tmp_path / "out", setup["cfg"].evaluate)
    assert not Path(tmp_path / "out" / "metrics.parquet").exists()


def test_cli_evaluate_reports_a_wrong_checkpoint_cleanly(setup, tmp_path):
    from splsm.cli import main

    WorkPaths(tmp_path).build.dir.mkdir()
    shutil.copy(setup["examples"], WorkPaths(tmp_path).build.examples)
    cfg = setup["config_file"]  # the tests' tiny models; no Whisper reference row
    out = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--config",
            str(cfg),
            "--workdir",
            str(tmp_path),
            "--checkpoint",
            str(setup["models"][1]),
        ],
    )
    assert (
        out.exit_code != 0 and "not a speech-text checkpoint" in out.output and "Traceback" not in out.output
    )


# ----- comparing two models -----


@pytest.fixture(scope="module")
def second(setup):
    """A second model (another random connector) evaluated on the same data: the B of a comparison."""
    ckpt = _checkpoint(*setup["models"], setup["root"] / "checkpoint-b", seed=2)
    work = _workdir(setup["root"], "work-b", setup["responses"])
    _evaluate(setup["cfg"], work, ckpt, setup["examples"])
    return work


def test_compare_reports_both_models_probe_figures_side_by_side(setup, second, tmp_path):
    from splsm.cli import main

    a, b = setup["work"], second
    out = CliRunner().invoke(main, ["compare", str(a), str(b), "--out", str(tmp_path / "cmp")])
    assert out.exit_code == 0, out.output
    pa_ = {
        m["category"]: m
        for m in read_table(WorkPaths(a).evaluate.table("probe_metrics"), PROBE_METRICS).to_pylist()
    }
    pb = {
        m["category"]: m
        for m in read_table(WorkPaths(b).evaluate.table("probe_metrics"), PROBE_METRICS).to_pylist()
    }
    for cat in PROBE_TASKS:
        ra, rb = pa_[cat]["anchor_rate"], pb[cat]["anchor_rate"]
        oa, ob = pa_[cat]["anchor_rate_own"], pb[cat]["anchor_rate_own"]
        ca, cb = pa_[cat]["self_consistency_chrf"], pb[cat]["self_consistency_chrf"]
        line = (
            f"| test-clean | {cat} | 3/3 | {100 * ra:.1f} | {100 * rb:.1f} | {100 * (rb - ra):.1f} | "
            f"{pct(oa)} | {pct(ob)} | {ca:.1f} | {cb:.1f} | {cb - ca:.1f} |"
        )
        assert line in out.output
    (wa,) = read_table(WorkPaths(a).evaluate.table("metrics"), METRICS).to_pylist()
    (wb,) = read_table(WorkPaths(b).evaluate.table("metrics"), METRICS).to_pylist()
    assert f"| test-clean | asr | {100 * wa['wer']:.1f} | {100 * wb['wer']:.1f} |" in out.output
    assert "The probes differ" not in out.output
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("# Evaluation comparison")
    assert (tmp_path / "cmp" / "anchor_rate.png").read_bytes()[:4] == b"\x89PNG"
    # The two models really are different models: their answers differ somewhere.
    answers = [
        sorted(
            (p["utt_id"], p["category"], p["answer"])
            for p in read_table(WorkPaths(w).evaluate.table("probe"), PROBE).to_pylist()
        )
        for w in (a, b)
    ]
    assert answers[0] != answers[1]


def test_compare_without_an_evaluation_is_a_clear_error(setup, tmp_path):
    from splsm.cli import main

    out = CliRunner().invoke(main, ["compare", str(setup["work"]), str(tmp_path)])
    assert out.exit_code != 0 and "no evaluation found" in out.output and "splsm evaluate" in out.output


def test_report_plots_the_probe_against_a_baseline(setup, second, tmp_path):
    cfg = _config(baseline=second, qa=False)
    work = tmp_path / "w"
    shutil.copytree(setup["work"] / "generate", work / "generate")
    _evaluate(cfg, work, setup["ckpt"], setup["examples"])
    md = (WorkPaths(work).evaluate.report).read_text()
    base = {
        m["category"]: m
        for m in read_table(WorkPaths(second).evaluate.table("probe_metrics"), PROBE_METRICS).to_pylist()
    }
    assert f"anchor rate % ({second.name})" in md
    for cat, m in base.items():
        (line,) = [x for x in md.splitlines() if x.startswith(f"| test-clean | {cat} |")]
        assert line.endswith(f"| {100 * m['anchor_rate']:.1f} | {m['self_consistency_chrf']:.1f} |")


@pytest.mark.slow
def test_the_flows_evaluate_task_publishes_the_report_as_prefect_artifacts(setup):
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.tasks import TASKS
    from splsm.runner import ExecutionConfig

    @flow
    def evaluate_flow() -> dict:
        return TASKS["evaluate"](
            str(setup["config_file"]),
            str(setup["work"]),
            False,
            ExecutionConfig(),
            {"checkpoint": str(setup["ckpt"])},
        )

    async def artifacts():
        async with get_client() as client:
            return {a.key: a for a in await client.read_artifacts()}

    with prefect_test_harness(server_startup_timeout=120):
        summary = evaluate_flow()
        got = asyncio.run(artifacts())
    assert {
        "evaluation-report",
        "evaluation-metrics",
        "evaluation-probe-metrics",
        "evaluation-qa-metrics",
    } <= set(got)
    assert got["evaluation-report"].data == (setup["out"] / "report.md").read_text()
    (m,) = _read(setup, "metrics", METRICS)
    assert summary["wer"]["test-clean"] == pytest.approx(m["wer"])
    for key, name, schema in (
        ("evaluation-metrics", "metrics", METRICS),
        ("evaluation-probe-metrics", "probe_metrics", PROBE_METRICS),
        ("evaluation-qa-metrics", "qa_metrics", QA_METRICS),
    ):
        data = got[key].data
        assert (json.loads(data) if isinstance(data, str) else data) == _read(setup, name, schema)


def test_publishing_outside_a_flow_does_nothing(setup):
    assert publish_artifacts(WorkPaths(setup["work"]).evaluate) is False
