from collections import Counter

from schemas import EXAMPLES, RESPONSES, TRANSCRIPTS, read_table
from splsm.config import BuildConfig
from stages.build import assign_split, build
from stages.instructions import load_catalog
from stages.prompts import speech_prompt, text_prompt


def test_examples_join_transcripts_and_answers_in_the_training_layout(harvested, generated, tmp_path):
    gen_dir, g, _ = generated
    transcripts = harvested / "harvest" / "transcripts.parquet"
    b = BuildConfig(tasks=["asr", *g.tasks], eval_splits=["test-clean"])
    s = build(transcripts, gen_dir / "responses.parquet", tmp_path, b, load_catalog())
    ex = read_table(tmp_path / "examples.parquet", EXAMPLES).to_pylist()
    tr = {t["utt_id"]: t for t in read_table(transcripts, TRANSCRIPTS).to_pylist()}
    resp = {
        (r["utt_id"], r["task"]): r for r in read_table(gen_dir / "responses.parquet", RESPONSES).to_pylist()
    }

    # exactly one example per (utterance, task)
    assert Counter((e["utt_id"], e["task"]) for e in ex) == Counter((u, t) for u in tr for t in b.tasks)
    assert s.examples == len(ex) and s.missing_answers == 0
    for e in ex:
        p = speech_prompt(e["instruction"])
        assert (e["prefix"], e["suffix"]) == (p.prefix, p.suffix)
        assert (
            e["audio_path"] == tr[e["utt_id"]]["audio_path"]
            and e["duration_s"] == tr[e["utt_id"]]["duration_s"]
        )
        if e["task"] == "asr":
            assert e["answer"] == tr[e["utt_id"]]["text"]
        else:
            r = resp[(e["utt_id"], e["task"])]
            assert e["answer"] == r["answer"]
            # the speech prompt is the text prompt with the transcript replaced by speech
            assert r["prompt"] == text_prompt(e["instruction"], tr[e["utt_id"]]["text"])
    splits = {e["utt_id"]: e["split"] for e in ex}
    assert {u for u, sp in splits.items() if sp == "test-clean"} == {
        u for u, t in tr.items() if t["split"] == "test-clean"
    }
    assert set(splits.values()) == {"train", "test-clean"}


def test_missing_answers_are_counted_not_silent(harvested, generated, tmp_path):
    gen_dir, g, _ = generated
    b = BuildConfig(
        tasks=["asr", "repeat", "sentiment"], eval_splits=["test-clean"]
    )  # sentiment was not generated
    s = build(
        harvested / "harvest" / "transcripts.parquet",
        gen_dir / "responses.parquet",
        tmp_path,
        b,
        load_catalog(),
    )
    n_utts = read_table(harvested / "harvest" / "transcripts.parquet", TRANSCRIPTS).num_rows
    assert s.missing_answers == n_utts and s.examples == 2 * n_utts


def test_splits_follow_the_speaker_and_are_stable():
    b = BuildConfig(eval_splits=["test-clean"], dev_fraction=0.2, test_fraction=0.2, seed=3)
    speakers = [f"spk{i}" for i in range(400)]
    first = [assign_split("train-clean-100", s, f"{s}-u1", b) for s in speakers]
    # same speaker, another utterance: same split; and the same again on a rebuild
    assert first == [assign_split("train-clean-100", s, f"{s}-u2", b) for s in speakers]
    counts = Counter(first)
    assert 40 < counts["test"] < 120 and 40 < counts["dev"] < 120
    assert assign_split("test-clean", "spk1", "u", b) == "test-clean"
    assert assign_split("x", None, "utt-a", b) == assign_split("x", None, "utt-a", b)
