import json
import shutil
from collections import Counter

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import DEMO, REPO, run_stage
from core.catalog import load_catalog
from core.config import BuildConfig
from core.digest import sha256_file
from core.lineage.store import LineageStore
from core.paths import WorkPaths
from core.prompts import speech_prompt, text_prompt
from core.tables import read_table, write_table
from core.text import as_sentence
from schemas import EXAMPLES, REJECTS, RESPONSES, SHARDS, TRANSCRIPTS, to_table
from splsm.cli import main
from stages.build.examples import assign_split, build
from stages.import_reference.importer import import_reference
from stages.import_reference.mapper import InstructionMapper

FIXTURE = REPO / "tests" / "fixtures" / "self_powered_sample.jsonl"


def _kept(gen_dir, tmp_path):
    """The tiny LLM's real answers with the generate filters' flags lifted: input for tests of joining and mixing."""
    table = read_table(gen_dir / "responses.parquet", RESPONSES)
    rows = [dict(r, rejected_by=None) for r in table.to_pylist()]
    return write_table(to_table(rows, RESPONSES), tmp_path / "kept-responses.parquet", RESPONSES)


def _transcripts(harvested):
    return WorkPaths(harvested).harvest.transcripts


def _shard_rows(out):
    manifest = read_table(out / "shards" / "manifest.parquet", SHARDS).to_pylist()
    rows = []
    for m in manifest:
        rows += [
            dict(r, _file=m["file"]) for r in read_table(out / "shards" / m["file"], EXAMPLES).to_pylist()
        ]
    return manifest, rows


def test_examples_join_transcripts_and_answers_in_the_training_layout(harvested, generated, tmp_path):
    gen_dir, g, _ = generated
    transcripts = _transcripts(harvested)
    b = BuildConfig(
        tasks=["asr", *g.tasks], eval_splits=["test-clean"], near_dup_threshold=None, rows_per_shard=10
    )
    s = build(transcripts, gen_dir / "responses.parquet", tmp_path, b, load_catalog())
    ex = read_table(tmp_path / "examples.parquet", EXAMPLES).to_pylist()
    tr = {t["utt_id"]: t for t in read_table(transcripts, TRANSCRIPTS).to_pylist()}
    resp = {
        (r["utt_id"], r["task"]): r for r in read_table(gen_dir / "responses.parquet", RESPONSES).to_pylist()
    }

    # exactly one example per (utterance, task), but for answers the generate filters flagged: each a reject
    flagged = {k for k, r in resp.items() if r["rejected_by"]}
    want = Counter((u, t) for u in tr for t in b.tasks if (u, t) not in flagged)
    assert Counter((e["utt_id"], e["task"]) for e in ex) == want
    assert s.examples == len(ex) and s.missing_answers == 0 and s.filtered_answers == len(flagged)
    rejects = read_table(tmp_path / "rejects.parquet", REJECTS).to_pylist()
    assert sorted((r["utt_id"], r["reason"]) for r in rejects) == sorted(
        (u, f"answer_{resp[(u, t)]['rejected_by']}") for u, t in flagged
    )
    for e in ex:
        p = speech_prompt(e["instruction"])
        assert (e["prefix"], e["suffix"]) == (p.prefix, p.suffix)
        assert (
            e["audio_path"] == tr[e["utt_id"]]["audio_path"]
            and e["duration_s"] == tr[e["utt_id"]]["duration_s"]
        )
        if e["task"] == "asr":
            assert e["answer"] == as_sentence(tr[e["utt_id"]]["text"])  # build.asr_answer: sentence
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

    # the shards hold the same examples, each once, in shards of one split; the manifest tells the truth
    manifest, rows = _shard_rows(tmp_path)
    assert sorted(r["example_id"] for r in rows) == sorted(e["example_id"] for e in ex)
    assert all(r["_file"].startswith(r["split"] + "-") for r in rows)
    for m in manifest:
        f = tmp_path / "shards" / m["file"]
        md = pq.ParquetFile(f).metadata
        assert m["sha256"] == sha256_file(f) and m["rows"] == md.num_rows <= 10
        assert m["row_groups"] == md.num_row_groups
    per_split = Counter(e["split"] for e in ex)
    assert (
        s.shards == len(manifest) == sum(-(-n // 10) for n in per_split.values())
    )  # at most 10 rows a shard


def test_missing_answers_are_counted_not_silent(harvested, generated, tmp_path):
    gen_dir, g, _ = generated
    b = BuildConfig(
        tasks=["asr", "repeat", "sentiment"], eval_splits=["test-clean"], near_dup_threshold=None
    )  # sentiment was not generated
    s = build(_transcripts(harvested), _kept(gen_dir, tmp_path), tmp_path, b, load_catalog())
    tr = read_table(_transcripts(harvested), TRANSCRIPTS).to_pylist()
    assert s.missing_answers == len(tr) and s.examples == 2 * len(tr)
    rejects = read_table(tmp_path / "rejects.parquet", REJECTS).to_pylist()
    assert Counter(r["reason"] for r in rejects) == {"missing_answer": len(tr)}
    assert {r["utt_id"] for r in rejects} == {t["utt_id"] for t in tr}
    assert all("sentiment" in r["detail"] and r["field"] == "answer" for r in rejects)


def test_the_answer_length_rule_rejects_by_token_count_with_eos_and_names_each(
    harvested, generated, tiny_models_dir, tmp_path
):
    from transformers import AutoTokenizer

    gen_dir, g, _ = generated
    tok = AutoTokenizer.from_pretrained(tiny_models_dir / "llm")
    everything = BuildConfig(tasks=["asr", *g.tasks], eval_splits=["test-clean"])
    build(_transcripts(harvested), _kept(gen_dir, tmp_path), tmp_path / "all", everything, load_catalog())
    ex = read_table(tmp_path / "all" / "examples.parquet", EXAMPLES).to_pylist()
    n = {e["example_id"]: len(tok(e["answer"], add_special_tokens=False)["input_ids"]) + 1 for e in ex}
    # bounds that cut on both sides of this data: the shortest and the longest answers go
    low, high = sorted(n.values())[len(n) // 4], sorted(n.values())[-len(n) // 4]
    b = everything.model_copy(update={"answer_tokens_between": (low, high)})
    s = build(
        _transcripts(harvested),
        _kept(gen_dir, tmp_path),
        tmp_path / "cut",
        b,
        load_catalog(),
        llm_tokenizer=tiny_models_dir / "llm",
    )
    kept = read_table(tmp_path / "cut" / "examples.parquet", EXAMPLES).to_pylist()
    assert {e["example_id"] for e in kept} == {k for k, v in n.items() if low < v < high}
    assert {e["split"] for e in kept} >= {
        "test-clean",
        "train",
    }  # the rule covers eval sets too, as the reference's
    rejects = read_table(tmp_path / "cut" / "rejects.parquet", REJECTS).to_pylist()
    short = [r for r in rejects if r["reason"] == "answer_too_short"]
    long_ = [r for r in rejects if r["reason"] == "answer_too_long"]
    assert len(short) == s.answers_too_short == sum(v <= low for v in n.values()) > 0
    assert len(long_) == s.answers_too_long == sum(v >= high for v in n.values()) > 0
    assert all(r["corpus"] and f"< tokens < {high}" in r["detail"] for r in short + long_)
    with pytest.raises(ValueError, match="tokenizer"):
        build(_transcripts(harvested), _kept(gen_dir, tmp_path), tmp_path / "no-tok", b, load_catalog())


def test_whisper_normalized_transcripts_are_the_asr_target(harvested, tmp_path):
    b = BuildConfig(tasks=["asr"], eval_splits=["test-clean"], asr_answer="transcript")
    build(_transcripts(harvested), None, tmp_path, b, load_catalog(), transcript_form="whisper_normalized")
    tr = {t["utt_id"]: t for t in read_table(_transcripts(harvested), TRANSCRIPTS).to_pylist()}
    ex = read_table(tmp_path / "examples.parquet", EXAMPLES).to_pylist()
    assert ex and all(e["answer"] == e["transcript"] == tr[e["utt_id"]]["text_norm"] for e in ex)
    assert any(tr[e["utt_id"]]["text_norm"] != tr[e["utt_id"]]["text"] for e in ex)  # the forms differ here


def test_reference_transcripts_are_each_corpus_line_in_the_references_own_form(
    harvested, tmp_path, tiny_config
):
    """transcript_form reference: the ASR target and what the LLM reads are core.text.reference_form of the corpus's
    own line, by the corpus's kind (the config's corpora), not the readable or normalized columns."""
    from core.text import reference_form

    b = BuildConfig(tasks=["asr"], eval_splits=["test-clean"], asr_answer="transcript")
    kinds = tiny_config.corpus_kinds
    build(
        _transcripts(harvested), None, tmp_path, b, load_catalog(), transcript_form="reference", kinds=kinds
    )
    tr = {t["utt_id"]: t for t in read_table(_transcripts(harvested), TRANSCRIPTS).to_pylist()}
    ex = read_table(tmp_path / "examples.parquet", EXAMPLES).to_pylist()
    want = {
        e["utt_id"]: reference_form(tr[e["utt_id"]]["text_raw"], kinds[tr[e["utt_id"]]["corpus"]]) for e in ex
    }
    assert ex and all(e["answer"] == e["transcript"] == want[e["utt_id"]] for e in ex)
    by_kind = {kinds[tr[e["utt_id"]]["corpus"]] for e in ex}
    assert {"librispeech", "jsonl"} <= by_kind  # a normalized corpus and one kept as it is
    assert any(want[u] == tr[u]["text_norm"] != tr[u]["text"] for u in want)
    assert any(want[u] != tr[u]["text_norm"] for u in want)


def test_sentence_asr_answers_are_the_transcript_capitalised_and_ended(harvested, tmp_path):
    """build.asr_answer: sentence: the ASR target as SmolLM2 writes a sentence; the words, and so the normalized
    form every WER reads, are the transcript's."""
    from core.text import normalize

    b = BuildConfig(tasks=["asr"], eval_splits=["test-clean"], asr_answer="sentence")
    build(_transcripts(harvested), None, tmp_path, b, load_catalog())
    tr = {t["utt_id"]: t for t in read_table(_transcripts(harvested), TRANSCRIPTS).to_pylist()}
    ex = read_table(tmp_path / "examples.parquet", EXAMPLES).to_pylist()
    assert ex and all(e["transcript"] == tr[e["utt_id"]]["text"] for e in ex)
    for e in ex:
        assert e["answer"][0].isupper() and e["answer"][-1] in ".?!", e["answer"]
        assert e["answer"][1:-1] in e["transcript"], (e["answer"], e["transcript"])
        assert normalize(e["answer"]) == normalize(e["transcript"])
    assert any(e["answer"] != e["transcript"] for e in ex)


def test_splits_follow_the_speaker_and_are_stable():
    b = BuildConfig(eval_splits=["test-clean"], dev_fraction=0.2, test_fraction=0.2, seed=3)
    speakers = [f"spk{i}" for i in range(400)]
    first = [assign_split("train-clean-100", s, f"{s}-u1", b) for s in speakers]
    # same speaker, another utterance: same split; and the same again on a rebuild
    assert first == [assign_split("train-clean-100", s, f"{s}-u2", b) for s in speakers]
    counts = Counter(first)
    assert 40 < counts["test"] < 120 and 40 < counts["dev"] < 120
    assert assign_split("test-clean", "spk1", "u", b) == "test-clean"
    # no speaker: the utterance is its own unit, so utterances spread over the splits as speakers do
    alone = Counter(assign_split("x", None, f"utt-{i}", b) for i in range(400))
    assert 40 < alone["test"] < 120 and 40 < alone["dev"] < 120 and alone["train"] > 160


def test_splits_survive_an_incremental_addition(harvested, tmp_path):
    rows = read_table(_transcripts(harvested), TRANSCRIPTS).to_pylist()
    b = BuildConfig(tasks=["asr"], eval_splits=["test-clean"], dev_fraction=0.3, test_fraction=0.3, seed=5)
    few = tmp_path / "few.parquet"
    write_table(to_table(rows[:9], TRANSCRIPTS), few, TRANSCRIPTS)
    build(few, None, tmp_path / "a", b, load_catalog())
    build(_transcripts(harvested), None, tmp_path / "b", b, load_catalog())
    before = {
        e["utt_id"]: e["split"] for e in read_table(tmp_path / "a" / "examples.parquet", EXAMPLES).to_pylist()
    }
    after = {
        e["utt_id"]: e["split"] for e in read_table(tmp_path / "b" / "examples.parquet", EXAMPLES).to_pylist()
    }
    assert len(after) == len(rows) and all(after[u] == sp for u, sp in before.items())
    assert {"train", "dev", "test"} <= set(after.values())


def test_exact_duplicates_keep_the_eval_copy_and_are_counted(harvested, tmp_path):
    rows = read_table(_transcripts(harvested), TRANSCRIPTS).to_pylist()
    test_row = next(r for r in rows if r["split"] == "test-clean")
    train_row = next(r for r in rows if r["split"] == "train")
    copy = tmp_path / "copy.wav"
    shutil.copy(test_row["audio_path"], copy)  # the same bytes under another name, in the training data
    dup = dict(test_row, utt_id="zz-copy", split="train", audio_path=str(copy), corpus="other")
    other_text = dict(train_row, utt_id="zz-other-text", text_norm=train_row["text_norm"] + " again")
    transcripts = tmp_path / "t.parquet"
    write_table(to_table([*rows, dup, other_text], TRANSCRIPTS), transcripts, TRANSCRIPTS)
    s = build(
        transcripts,
        None,
        tmp_path / "out",
        BuildConfig(tasks=["asr"], eval_splits=["test-clean"]),
        load_catalog(),
    )
    ex = {e["utt_id"]: e for e in read_table(tmp_path / "out" / "examples.parquet", EXAMPLES).to_pylist()}
    assert "zz-copy" not in ex and ex[test_row["utt_id"]]["split"] == "test-clean"
    assert "zz-other-text" in ex  # same audio, other transcript: not a duplicate
    assert s.duplicate_utterances == 1 and s.examples == len(rows) + 1
    (rej,) = read_table(tmp_path / "out" / "rejects.parquet", REJECTS).to_pylist()
    assert rej["reason"] == "duplicate_utterance" and rej["utt_id"] == "zz-copy"
    assert test_row["utt_id"] in rej["detail"]


def _responses(pairs: list[tuple[str, str, str]]) -> list[dict]:
    return [
        dict(
            utt_id=u,
            task=task,
            instruction_id=f"{task}/0",
            instruction="Restate the passage",
            prompt="p",
            answer=a,
            model="m",
            finish_reason="stop",
            prompt_tokens=1,
            completion_tokens=1,
            request_key=f"{u}/{task}",
            sampling="{}",
        )
        for u, task, a in pairs
    ]


def test_near_duplicate_answers_are_dropped_and_counted(harvested, tmp_path):
    tr = [t for t in read_table(_transcripts(harvested), TRANSCRIPTS).to_pylist() if t["split"] == "train"]
    long = " ".join(t["text"] for t in tr[:3])  # a long real answer
    answers = [(t["utt_id"], "repeat", f"{t['text']} said {t['utt_id']}") for t in tr]
    answers[0] = (tr[0]["utt_id"], "repeat", long + " indeed")
    answers[1] = (tr[1]["utt_id"], "repeat", long + " truly")  # one word apart from the first
    answers[2] = (tr[2]["utt_id"], "repeat", " ".join(reversed(long.split())))  # same words, other order
    resp = tmp_path / "r.parquet"
    write_table(to_table(_responses(answers), RESPONSES), resp, RESPONSES)
    b = BuildConfig(tasks=["asr", "repeat"], eval_splits=["test-clean"], near_dup_threshold=0.9)
    s = build(_transcripts(harvested), resp, tmp_path / "out", b, load_catalog())
    ex = read_table(tmp_path / "out" / "examples.parquet", EXAMPLES).to_pylist()
    kept = {e["utt_id"] for e in ex if e["task"] == "repeat"}
    assert s.near_duplicate_answers == 1 and len(kept & {tr[0]["utt_id"], tr[1]["utt_id"]}) == 1
    assert tr[2]["utt_id"] in kept and len(kept) == len(tr) - 1
    rejects = [r for r in read_table(tmp_path / "out" / "rejects.parquet", REJECTS).to_pylist()]
    assert [r["reason"] for r in rejects if r["reason"] != "missing_answer"] == ["near_duplicate_answer"]
    assert sum(e["task"] == "asr" for e in ex) == len(read_table(_transcripts(harvested), TRANSCRIPTS))


def test_mixing_meets_the_target_shares_deterministically(harvested, generated, tmp_path):
    gen_dir, g, _ = generated
    base = dict(tasks=["asr", *g.tasks], eval_splits=["test-clean"], near_dup_threshold=None, seed=7)
    kept = _kept(gen_dir, tmp_path)
    full = build(
        _transcripts(harvested),
        kept,
        tmp_path / "all",
        BuildConfig(**base),
        load_catalog(),
    )
    mix = {"asr": 2.0, "repeat": 1.0, "translation": 1.0}
    runs = [
        build(
            _transcripts(harvested),
            kept,
            tmp_path / d,
            BuildConfig(**base, mix=mix),
            load_catalog(),
        )
        for d in ("m1", "m2")
    ]
    avail = {t: full.by_split_task[f"train/{t}"] for t in mix}
    n = min(avail[t] / (v / 4) for t, v in mix.items())
    s = runs[0]
    for t, v in mix.items():
        assert s.by_split_task[f"train/{t}"] == int(n * v / 4)
        assert s.mix_realized["train"][t] == pytest.approx(v / 4, abs=0.02)
    assert s.mix_target == {"asr": 0.5, "repeat": 0.25, "translation": 0.25}
    assert sum(s.left_out_by_mix.values()) == sum(avail.values()) - sum(int(n * v / 4) for v in mix.values())
    # eval splits are kept as they are
    assert all(s.by_split_task[f"test-clean/{t}"] == full.by_split_task[f"test-clean/{t}"] for t in mix)
    ids = [
        sorted(e["example_id"] for e in read_table(tmp_path / d / "examples.parquet", EXAMPLES).to_pylist())
        for d in ("m1", "m2")
    ]
    assert ids[0] == ids[1]


# ----- import of the reference's data -----

# What each instruction of the reference's sample asks for, read by a person.
SAMPLE_TASKS = {
    "Please write a coherent": "continuation",
    "Rephrase the text": "repeat",
    "Determine the sentiment": "sentiment",
    "Craft a coherent": "continuation",
    "Analyze the overall mood": "sentiment",
    "Determine the primary purpose": "intent",
    "Identify the main intent": "intent",
    "Identify and list": "keywords",
    "Extract the most frequently": "keywords",
    "Echo the content": "repeat",
    "Ascertain the fundamental": "intent",
    "Compose a logical": "continuation",
    "Develop a consistent": "continuation",
    "Evaluate the emotional": "sentiment",
    "Assess the sentiment": "sentiment",
    "Identify the feeling": "sentiment",
    "Extract significant words": "keywords",
    "Paraphrase the provided": "repeat",
}


def _label(instruction: str) -> str:
    (task,) = [t for k, t in SAMPLE_TASKS.items() if instruction.startswith(k)]
    return task


def test_reference_instructions_map_to_their_categories():
    m = InstructionMapper(load_catalog())
    lines = [json.loads(ln) for ln in FIXTURE.read_text().splitlines()]
    assert [m.category(r["instruction"])[0] for r in lines] == [_label(r["instruction"]) for r in lines]
    # unseen wordings go by similarity; nonsense is not forced into a category
    assert m.category("Please translate this passage into Chinese")[0] == "translation"
    assert m.category("Continue the story in under 50 words")[0] == "continuation"
    assert m.category("Blorp the zibble")[0] is None


def test_importing_the_reference_sample_counts_every_missing_clip(harvested, tmp_path):
    s = import_reference(
        FIXTURE, tmp_path / "corpora", _transcripts(harvested), tmp_path / "imp", load_catalog()
    )
    assert (s.lines, s.answers, s.rejects) == (25, 0, 25) and s.reject_counts == {"missing_audio": 25}
    rejects = read_table(tmp_path / "imp" / "rejects.parquet", REJECTS).to_pylist()
    assert [r["source"] for r in rejects] == [f"{FIXTURE}:{i}" for i in range(1, 26)]
    assert all(r["field"] == "audio" and "LibriSpeech" in r["detail"] for r in rejects)
    assert read_table(tmp_path / "imp" / "responses.parquet", RESPONSES).num_rows == 0


def test_imported_answers_become_examples_and_bad_lines_rejects(harvested, tiny_config, tmp_path):
    tr = read_table(_transcripts(harvested), TRANSCRIPTS).to_pylist()
    libri = [t for t in tr if "/LibriSpeech/" in t["audio_path"]][:3]
    sample = [json.loads(ln) for ln in FIXTURE.read_text().splitlines()]
    lines = [
        json.dumps(
            {
                "instruction": r["instruction"],
                "audio": t["audio_path"].split(str(DEMO) + "/")[1],
                "text": r["text"],
            }
        )
        for r, t in zip(sample[:3], libri, strict=True)
    ]
    lines += [
        json.dumps({"instruction": "Blorp the zibble", "audio": "LibriSpeech/x.flac", "text": "t"}),
        json.dumps({"instruction": sample[0]["instruction"], "audio": "../../etc/passwd", "text": "t"}),
        json.dumps({"instruction": sample[0]["instruction"], "audio": "test-clean/1089-134686-0001.wav"}),
        "{not json",
    ]
    manifest = tmp_path / "ref.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    work = tmp_path / "work"
    (work / "harvest").mkdir(parents=True)
    shutil.copytree(_transcripts(harvested), WorkPaths(work).harvest.transcripts)
    out = CliRunner().invoke(
        main,
        [
            "import-reference",
            str(manifest),
            "--root",
            str(DEMO),
            "--config",
            str(tiny_config.source),
            "--workdir",
            str(work),
        ],
    )
    assert out.exit_code == 0, out.output
    resp = read_table(WorkPaths(work).imported.responses, RESPONSES).to_pylist()
    assert [(r["utt_id"], r["task"], r["answer"]) for r in resp] == [
        (t["utt_id"], _label(r["instruction"]), r["text"].strip())
        for r, t in zip(sample[:3], libri, strict=True)
    ]
    assert all(
        r["prompt"] == text_prompt(r["instruction"], t["text"]) for r, t in zip(resp, libri, strict=True)
    )
    rejects = read_table(WorkPaths(work).imported.rejects, REJECTS).to_pylist()
    assert [(r["source"].rsplit(":", 1)[1], r["reason"]) for r in rejects] == [
        ("4", "unknown_instruction"),
        ("5", "outside_root"),
        ("6", "missing_text"),
        ("7", "bad_json"),
    ]

    # build takes the imported answers as examples of their task, with the reference's own instruction
    cfg = tiny_config.model_copy(
        update={
            "build": BuildConfig(
                tasks=["asr", "continuation", "repeat", "sentiment"], eval_splits=["test-clean"]
            )
        }
    )
    (work / "generate").mkdir()
    write_table(to_table([], RESPONSES), WorkPaths(work).generate.responses, RESPONSES)
    res = run_stage("build", cfg, work)
    ex = read_table(WorkPaths(work).build.examples, EXAMPLES).to_pylist()
    imported = [e for e in ex if e["task"] != "asr"]
    assert res.summary["imported_answers"] == 3
    assert sorted((e["utt_id"], e["instruction"]) for e in imported) == sorted(
        (t["utt_id"], r["instruction"]) for r, t in zip(sample[:3], libri, strict=True)
    )
    assert all(e["prefix"] == speech_prompt(e["instruction"]).prefix for e in imported)

    # the run, its inputs and the shard manifest are in lineage; a rerun reuses the outputs
    store = LineageStore(WorkPaths(work).lineage)
    roles = dict(
        store.query(
            "SELECT io.role, d.row_count FROM run_io io JOIN datasets d USING (dataset_id) WHERE io.run_id = ?",
            [res.run_id],
        )
    )
    manifest_rows = read_table(WorkPaths(work).build.shards / "manifest.parquet", SHARDS).num_rows
    assert roles["shard_manifest"] == manifest_rows and "imported_responses" in roles and "shards" in roles
    assert run_stage("build", cfg, work).reused


def test_build_config_rejects_a_mix_it_cannot_meet():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="build.mix: task 'sentiment' is not in build.tasks"):
        BuildConfig(tasks=["asr", "repeat"], mix={"asr": 1, "sentiment": 1})
    with pytest.raises(ValidationError, match="unknown task 'summary'"):
        BuildConfig(tasks=["asr", "summary"])
    with pytest.raises(ValidationError, match="not all 0"):
        BuildConfig(tasks=["asr"], mix={"asr": 0})
