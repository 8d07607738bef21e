"""WER cross-checked by hand and against jiwer; probe and QA scoring; question files; the demo configs."""

from __future__ import annotations

import json
import math

import jiwer
import pytest
import sacrebleu

from conftest import REPO
from core.config import load_config
from core.text import normalize
from stages.evaluate import probe, qa
from stages.evaluate.decoding import length_bound
from stages.evaluate.wer import corpus_metrics, utterance_wer, word_errors


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance, the textbook dynamic programme (independent of jiwer)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


# (reference, hypothesis, normalized reference, normalized hypothesis, errors worked out by hand)
TRICKY = [
    ("I paid twenty-five dollars.", "I paid $25.", "i paid $25", "i paid $25", 0),  # numbers and currency
    ("I paid twenty-five dollars.", "i paid 26 dollars", "i paid $25", "i paid $26", 1),
    ("It's a DOG, isn't it?", "it is a dog is not it", "it is a dog is not it", "it is a dog is not it", 0),
    ("We'll go.", "we go", "we will go", "we go", 1),  # contraction expanded, one word missing
    ("Hello, THERE.", "hello there", "hello there", "hello there", 0),  # casing and punctuation
    ("Mr. Smith went home", "mister smith went home!", "mister smith went home", "mister smith went home", 0),
    (
        "the cat sat on the mat",
        "the cat sat on mat today",
        "the cat sat on the mat",
        "the cat sat on mat today",
        2,
    ),
    ("the cat sat", "", "the cat sat", "", 3),  # empty hypothesis: every word deleted
    ("Uh.", "hello", "", "hello", None),  # empty reference once normalized: no WER
]


@pytest.mark.parametrize("ref,hyp,ref_norm,hyp_norm,errors", TRICKY)
def test_wer_on_tricky_pairs_matches_hand_counts_and_jiwer(ref, hyp, ref_norm, hyp_norm, errors):
    assert (normalize(ref), normalize(hyp)) == (ref_norm, hyp_norm)
    c = word_errors(ref_norm, hyp_norm)
    if errors is None:
        assert c == dict(substitutions=0, deletions=0, insertions=1, hits=0)
        assert math.isnan(utterance_wer(ref_norm, hyp_norm))
        return
    assert c["substitutions"] + c["deletions"] + c["insertions"] == errors
    assert errors == edit_distance(ref_norm.split(), hyp_norm.split())
    o = jiwer.process_words(ref_norm, hyp_norm)
    assert (c["substitutions"], c["deletions"], c["insertions"], c["hits"]) == (
        o.substitutions,
        o.deletions,
        o.insertions,
        o.hits,
    )
    assert utterance_wer(ref_norm, hyp_norm) == pytest.approx(errors / len(ref_norm.split()))


def test_corpus_wer_is_all_errors_over_all_reference_words():
    preds = []
    for ref, hyp, *_ in TRICKY:
        r, h = normalize(ref), normalize(hyp)
        preds.append(dict(ref_words=len(r.split()), **word_errors(r, h)))
    m = corpus_metrics("tricky", preds)
    scored = [t for t in TRICKY if t[4] is not None]
    n_words = sum(len(t[2].split()) for t in scored)
    assert m["wer"] == pytest.approx(sum(t[4] for t in scored) / n_words)  # not a mean of per-utterance rates
    assert m["wer"] == pytest.approx(jiwer.wer([t[2] for t in scored], [t[3] for t in scored]))
    assert (m["n_utterances"], m["n_ref_words"], m["empty_references"]) == (len(scored), n_words, 1)


def test_corpus_metrics_sum_errors_over_all_reference_words():
    refs, hyps = ["a b c", "d e", ""], ["a x c", "d e f", "g"]
    preds = [
        dict(ref_words=len(r.split()), _counts=word_errors(r, h)) for r, h in zip(refs, hyps, strict=True)
    ]
    m = corpus_metrics("set", preds)
    assert (m["substitutions"], m["deletions"], m["insertions"], m["hits"]) == (1, 0, 1, 4)
    assert m["wer"] == pytest.approx(2 / 5) and m["n_utterances"] == 2 and m["empty_references"] == 1
    assert corpus_metrics("none", [])["wer"] != corpus_metrics("none", [])["wer"]


def test_length_bound_grows_with_duration_up_to_the_cap():
    assert length_bound(1.0, 8.0, 10, 128) == 18
    assert length_bound(2.5, 8.0, 10, 128) == 30
    assert length_bound(30.0, 8.0, 10, 128) == 128
    assert length_bound(0.0, 8.0, 0, 128) == 1


# ----- probe scoring -----

META = dict(
    utt_id="u1",
    eval_set="test-clean",
    category="sentiment",
    instruction="What sentiment does the text express?",
    transcript="The yellow lamps would light up here and there.",
    llm_answer="The text is neutral: it describes lamps lighting up.",
)


def test_a_transcript_for_an_answer_is_anchored_and_a_real_answer_is_not():
    near = probe.score_item(META, "the yellow lamps would light up here and there", 0.3)
    assert near["anchored"] and near["wer_vs_transcript"] == 0.0
    one_off = probe.score_item(META, "yellow lamps would light up here and there", 0.3)
    assert one_off["anchored"] and one_off["wer_vs_transcript"] == pytest.approx(
        1 / 9
    )  # 9 words, one deleted
    answer = probe.score_item(META, "The text is neutral: it describes lamps.", 0.3)
    assert not answer["anchored"] and answer["wer_vs_transcript"] > 0.3
    assert answer["chrf"] == pytest.approx(
        sacrebleu.sentence_chrf(answer["answer"], [META["llm_answer"]]).score
    )
    assert answer["chrf"] > near["chrf"]  # closer to the LLM's own answer
    assert probe.score_item(dict(META, transcript="Um."), "anything", 0.3) is None


def test_an_answer_that_is_the_models_own_imperfect_transcription_is_anchored_to_it():
    """A model at about 30% WER that transcribes instead of answering escapes the transcript measure, not the
    own-ASR one; a real answer is anchored to neither; without an own transcription the second is undefined."""
    own = "the yellow lambs would like up hear and there"  # 3 of 9 words wrong
    parrot = probe.score_item(META, own + ".", 0.3, own_asr=own)
    assert parrot["wer_vs_transcript"] == pytest.approx(3 / 9) and not parrot["anchored"]
    assert parrot["wer_vs_own_asr"] == 0.0 and parrot["anchored_own"]
    answer = probe.score_item(META, "The text is neutral: it describes lamps.", 0.3, own_asr=own)
    assert not answer["anchored"] and not answer["anchored_own"] and answer["wer_vs_own_asr"] > 0.3
    for missing in (None, "", "  "):
        row = probe.score_item(META, own, 0.3, own_asr=missing)
        assert row["anchored_own"] is None and math.isnan(row["wer_vs_own_asr"])
    rows = [parrot, answer, probe.score_item(dict(META, utt_id="u9"), own, 0.3)]
    meta = {f"k{i}": dict(META, utt_id=r["utt_id"]) for i, r in enumerate(rows)}
    (m,) = probe.probe_metrics(rows, meta, failed=set(), threshold=0.3)
    assert (m["n_items"], m["n_anchored"], m["n_with_own_asr"], m["n_anchored_own"]) == (3, 0, 2, 1)
    assert m["anchor_rate_own"] == 0.5


def test_probe_metrics_count_rejected_and_empty_items_per_category():
    meta = {
        "a": dict(META, utt_id="u1"),
        "b": dict(META, utt_id="u2"),
        "c": dict(META, utt_id="u3", transcript="Um."),
        "d": dict(META, utt_id="u4"),
    }
    rows = [
        probe.score_item(meta["a"], META["transcript"], 0.3),
        probe.score_item(meta["b"], "Neutral.", 0.3),
    ]
    (m,) = probe.probe_metrics(rows, meta, failed={"d"}, threshold=0.3)
    assert (m["n_items"], m["n_anchored"], m["anchor_rate"], m["empty_transcripts"], m["rejected"]) == (
        2,
        1,
        0.5,
        1,
        1,
    )
    ref = sacrebleu.corpus_chrf([r["answer"] for r in rows], [[r["llm_answer"] for r in rows]]).score
    assert m["self_consistency_chrf"] == pytest.approx(ref)


def test_probe_items_take_the_llm_tasks_on_eval_utterances_only():
    asr = [
        dict(
            utt_id="u1", split="test-clean", audio_path="/a.wav", offset_s=0.0, duration_s=2.0, transcript="t"
        )
    ]
    resp = [
        dict(utt_id="u1", task="sentiment", instruction="I1", answer="A1"),
        dict(utt_id="u1", task="repeat", instruction="I2", answer="A2"),
        dict(utt_id="u9", task="repeat", instruction="I3", answer="A3"),  # not an eval utterance
    ]
    items, meta = probe.probe_items(asr, resp, ["sentiment"], 16, "vicuna_v1.1")
    assert [m["category"] for m in meta.values()] == ["sentiment"] and items[0].max_new_tokens == 16
    assert "USER: I1 SPEECH:" in items[0].prefix
    items, _ = probe.probe_items(asr, resp, None, 16, "vicuna_v1.1")
    assert len(items) == 2


# ----- spoken QA -----


@pytest.mark.parametrize(
    "answer,parsed",
    [
        ("Yes.", "yes"),
        ("no, it is not", "no"),
        ("I think the answer is NO", "no"),
        ("Nope", None),
        ("", None),
    ],
)
def test_yes_no_parsing(answer, parsed):
    assert qa.parse_yes_no(answer) == parsed


def test_word_presence_questions_have_answers_known_from_the_transcripts():
    rows = [
        dict(utt_id="a", split="s", transcript="The yellow lamps would light up the quarter."),
        dict(utt_id="b", split="s", transcript="Hester Prynne walked home through the market."),
        dict(utt_id="c", split="s", transcript="Um."),
    ]
    qs = qa.word_presence_questions(rows)
    assert [(q["utt_id"], q["answer"]) for q in qs] == [("a", True), ("a", False), ("b", True), ("b", False)]
    words = {r["utt_id"]: normalize(r["transcript"]).split() for r in rows}
    for q in qs:
        w = q["question"].split('"')[1]
        assert (w in words[q["utt_id"]]) == q["answer"] and len(w) >= 4
    assert qa.word_presence_questions(rows) == qs  # the same set on every run


def test_question_file_errors_name_file_line_and_field(tmp_path):
    p = tmp_path / "q.jsonl"
    cases = [
        (
            '{"utt_id": "u", "question": "Q?"}',
            "q.jsonl:1: field 'answer': expected true or false, found None",
        ),
        ('{"utt_id": "", "question": "Q?", "answer": true}', "q.jsonl:1: field 'utt_id'"),
        ("[1, 2]", "q.jsonl:1: expected a JSON object"),
        ("{bad", "q.jsonl:1: not a JSON object"),
        (
            '{"id": "x", "utt_id": "u", "question": "Q", "answer": true}\n'
            '{"id": "x", "utt_id": "u", "question": "Q", "answer": false}',
            "q.jsonl:2: field 'id': 'x' appears twice",
        ),
        ("", "has no questions"),
        ('{"audio": "q.wav", "question": "Q?", "answer": true}', "q.jsonl:1: field 'passage'"),
        ('{"audio": "q.wav", "utt_id": "u", "passage": "P", "answer": true}', "q.jsonl:1: give 'utt_id'"),
    ]
    for text, msg in cases:
        p.write_text(text)
        with pytest.raises(qa.QAFileError, match=msg.replace("?", r"\?").replace("[", r"\[")):
            qa.load_questions(p)
    for text, msg in [
        ('{"audio_path": "a.wav", "audio": "a.wav", "passage": "P", "answer": true}', "not both"),
        ('{"audio_path": "a.wav", "passage": "P", "answer": "maybe"}', "field 'answer'"),
    ]:
        p.write_text(text)
        with pytest.raises(qa.QAFileError, match=msg):
            qa.load_questions(p)
    # the reference's BoolQA lines as its evaluate_BoolQA.py reads them: audio_path, a string answer, no question
    p.write_text('{"passage": "P", "audio_path": "clips/a.wav", "answer": "False"}\n')
    assert qa.load_questions(p) == [
        dict(
            id="line-1", utt_id="boolqa:line-1", question="", answer=False, passage="P",
            audio=str((tmp_path / "clips" / "a.wav").resolve()),
        )
    ]  # fmt: skip
    p.write_text(
        json.dumps({"utt_id": "u", "question": "Q?", "answer": False, "passage": "ignored"}) + "\n\n"
    )
    assert qa.load_questions(p) == [dict(id="line-1", utt_id="u", question="Q?", answer=False)]
    with pytest.raises(qa.QAFileError, match="does not exist"):
        qa.load_questions(tmp_path / "none.jsonl")


# ----- configs -----


def test_the_asr_only_demo_differs_from_the_demo_only_in_its_training_tasks():
    demo, asr = (load_config(REPO / "configs" / f"{n}.yaml") for n in ("demo", "demo-asr-only"))
    assert asr.build.tasks == ["asr"] and "asr" in demo.build.tasks and len(demo.build.tasks) > 1
    skip = {"name", "build", "source"}
    assert asr.model_dump(exclude=skip) == demo.model_dump(exclude=skip)
    assert asr.build.model_dump(exclude={"tasks"}) == demo.build.model_dump(exclude={"tasks"})


def test_unknown_probe_task_is_a_config_error(tmp_path):
    from core.config import ConfigError

    p = tmp_path / "c.yaml"
    p.write_text("name: x\ncorpora: []\nmodels: {tiny: {}}\nevaluate: {probe_tasks: [poetry]}\n")
    with pytest.raises(ConfigError, match="evaluate.probe_tasks: unknown task 'poetry'"):
        load_config(p)
