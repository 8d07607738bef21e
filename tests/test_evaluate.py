"""The evaluate stage: decoding, WER against jiwer, rejects, empty references, report, reuse, bad checkpoints."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import jiwer
import pytest
from helpers_lsm import DEMO, TINY_QFORMER, build_models, demo_rows, example_row, experiment, write_examples

from schemas import METRICS, PREDICTIONS, REJECTS, read_table
from splsm import audio
from splsm.text import normalize
from stages import evaluate
from stages.model import Collator, LSMForConditionalGeneration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("lsm-eval")
    whisper_dir, llm_dir = build_models(work / "models")
    # An untrained checkpoint is enough to test decoding and scoring (training has its own tests).
    ckpt = work / "checkpoint"
    LSMForConditionalGeneration.from_parts(whisper_dir, llm_dir, TINY_QFORMER).save_pretrained(ckpt)
    rows = demo_rows()  # 20 train rows (ASR + repeat) and the 3 test-clean ASR rows
    clip = DEMO / "test-clean" / "1089-134686-0001.wav"
    rows += [
        example_row(
            "lost-0001", DEMO / "test-clean" / "no-such-file.wav", "a clip that went missing", "test-clean"
        ),
        example_row("filler-0001", clip, "Um.", "test-clean"),  # empty once normalized
        example_row("1089-134686-0001", clip, "not asr", "test-clean", task="repeat", answer="x"),  # not ASR
    ]
    examples = write_examples(work / "examples.parquet", rows)
    cfg = experiment()
    result = evaluate.run(cfg, work, ckpt, examples)
    return dict(work=work, ckpt=ckpt, examples=examples, cfg=cfg, result=result, rows=rows)


def test_wer_matches_jiwer_on_the_predictions(setup):
    out = setup["work"] / "evaluate"
    preds = read_table(out / "predictions.parquet", PREDICTIONS).to_pylist()
    metrics = read_table(out / "metrics.parquet", METRICS).to_pylist()
    # 3 real clips + the empty-reference one; the missing clip is a reject, the non-ASR row is not evaluated.
    assert sorted(p["utt_id"] for p in preds) == sorted(
        ["1089-134686-0001", "1221-135766-0001", "1221-135766-0002", "filler-0001"]
    )
    assert all(p["task"] == "asr" and p["eval_set"] == "test-clean" for p in preds)
    for p in preds:
        assert p["reference_norm"] == normalize(p["reference"])
        assert p["hypothesis_norm"] == normalize(p["hypothesis"])
        assert p["ref_words"] == len(p["reference_norm"].split())
        if p["ref_words"]:
            o = jiwer.process_words(p["reference_norm"], p["hypothesis_norm"])
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


def test_hypotheses_are_greedy_decodes_of_each_row(setup):
    # Evaluate batches rows in duration order; each hypothesis must still belong to its own row.
    preds = {
        p["example_id"]: p
        for p in read_table(setup["work"] / "evaluate" / "predictions.parquet", PREDICTIONS).to_pylist()
    }
    model = LSMForConditionalGeneration.from_pretrained(setup["ckpt"]).eval()
    collate = Collator(model.tokenizer, model.feature_extractor)
    for r in setup["rows"]:
        if r["example_id"] not in preds:
            continue
        b = collate([r], [audio.load(r["audio_path"], r["offset_s"], r["duration_s"])], with_answer=False)
        (ids,) = model.generate(
            b.input_features,
            b.durations_s,
            b.prefix_ids,
            b.suffix_ids,
            max_new_tokens=setup["cfg"].evaluate.max_new_tokens,
        )
        assert (
            preds[r["example_id"]]["hypothesis"]
            == model.tokenizer.decode(ids, skip_special_tokens=True).strip()
        )


def test_missing_audio_is_a_counted_reject(setup):
    out = setup["work"] / "evaluate"
    rejects = read_table(out / "rejects.parquet", REJECTS).to_pylist()
    assert [(r["utt_id"], r["reason"]) for r in rejects] == [("lost-0001", "missing_audio")]
    assert setup["result"].summary["rejects"] == 1
    report = (out / "report.md").read_text()
    assert "| test-clean | asr | 3 |" in report
    assert "1 eval rows rejected because their audio could not be loaded" in report and "lost-0001" in report


def test_rerun_is_reused(setup):
    again = evaluate.run(setup["cfg"], setup["work"], setup["ckpt"], setup["examples"])
    assert again.reused and again.run_id == setup["result"].run_id
    assert set(again.outputs) == {"predictions", "metrics", "rejects", "report"}


def test_missing_or_incomplete_checkpoint_is_a_clear_error(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.run(setup["cfg"], tmp_path, tmp_path / "no-checkpoint", setup["examples"])
    partial = tmp_path / "partial"
    shutil.copytree(setup["ckpt"], partial)
    (partial / "tokenizer.json").unlink()
    (partial / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing weights .*tokenizer \(tokenizer.json"):
        evaluate.run(setup["cfg"], tmp_path, partial, setup["examples"])


def test_corpus_metrics_sum_errors_over_all_reference_words():
    refs, hyps = ["a b c", "d e", ""], ["a x c", "d e f", "g"]
    preds = [
        dict(ref_words=len(r.split()), _counts=evaluate.word_errors(r, h))
        for r, h in zip(refs, hyps, strict=True)
    ]
    m = evaluate.corpus_metrics("set", preds)
    assert (m["substitutions"], m["deletions"], m["insertions"], m["hits"]) == (1, 0, 1, 4)
    assert m["wer"] == pytest.approx(2 / 5) and m["n_utterances"] == 2 and m["empty_references"] == 1
    assert math.isnan(evaluate.corpus_metrics("none", [])["wer"])


def test_no_eval_rows_is_an_error(setup, tmp_path):
    only_train = write_examples(tmp_path / "ex.parquet", [r for r in demo_rows() if r["split"] == "train"])
    with pytest.raises(ValueError, match="no asr rows in the eval sets"):
        evaluate.evaluate(setup["ckpt"], only_train, tmp_path / "out", setup["cfg"].evaluate)
    assert not Path(tmp_path / "out" / "metrics.parquet").exists()
