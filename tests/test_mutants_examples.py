"""Build's examples as their users see them: ids that stay the same from one build to the next, ASR
instructions drawn per utterance and seed, speakers kept in one split, rejects that name their table, and the
console summary word for word."""

import io
from collections import defaultdict

import pytest
from rich.console import Console

import stages.build.examples as examples
from core.catalog import load_catalog
from core.config import BuildConfig
from core.paths import WorkPaths
from core.tables import read_table, write_table
from schemas import EXAMPLES, REJECTS, RESPONSES, TRANSCRIPTS, to_table
from stages.build.examples import BuildSummary, build, example_id, print_summary


def test_example_ids_are_the_same_in_every_release():
    # The mix is drawn by a hash of the example id and the shards ordered by one: an id that changed would
    # reshuffle every build. These digests were computed once.
    assert example_id("1089-134686-0001", "asr") == "2d93bde6b49768a6310f"
    assert example_id("1089-134686-0001", "asr", "") == "2d93bde6b49768a6310f"
    assert example_id("1089-134686-0001", "repeat", "reference:ins-7") == "d4003f0bc98cd120537d"


def _transcripts(harvested):
    return read_table(WorkPaths(harvested).harvest.transcripts, TRANSCRIPTS).to_pylist()


def _response(u, task, answer, model="m", instruction_id=None):
    return dict(
        utt_id=u,
        task=task,
        instruction_id=instruction_id or f"{task}/0",
        instruction="Restate the passage",
        prompt="p",
        answer=answer,
        model=model,
        finish_reason="stop",
        prompt_tokens=1,
        completion_tokens=1,
        request_key=f"{u}/{task}/{model}",
        sampling="{}",
    )


def test_examples_carry_stable_ids_drawn_instructions_and_rejects_naming_the_transcripts(harvested, tmp_path):
    tr = _transcripts(harvested)
    utts = [t["utt_id"] for t in tr]
    generated, imported, unanswered = utts[0], utts[1], utts[2:]
    resp = tmp_path / "r.parquet"
    write_table(
        to_table(
            [
                _response(generated, "repeat", "a generated answer"),
                _response(
                    imported, "repeat", "an imported answer", model="reference:sample", instruction_id="i9"
                ),
            ],
            RESPONSES,
        ),
        resp,
        RESPONSES,
    )
    transcripts = WorkPaths(harvested).harvest.transcripts
    b = BuildConfig(tasks=["asr", "repeat"], eval_splits=[])
    catalog = load_catalog()
    s = build(transcripts, resp, tmp_path / "out", b, catalog)
    ex = read_table(tmp_path / "out" / "examples.parquet", EXAMPLES).to_pylist()
    by_key = {(e["utt_id"], e["task"]): e for e in ex}
    assert len(ex) == len(utts) + 2 and s.examples == len(ex)
    # generated answers and ASR examples have no origin in their id; an imported answer names its instruction
    assert by_key[(generated, "repeat")]["example_id"] == example_id(generated, "repeat")
    assert by_key[(imported, "repeat")]["example_id"] == example_id(imported, "repeat", "reference:i9")
    assert by_key[(imported, "repeat")]["example_id"] != example_id(imported, "repeat")
    for u in utts:
        assert by_key[(u, "asr")]["example_id"] == example_id(u, "asr")
    assert s.imported_answers == 1
    # each utterance's ASR instruction is the catalog's draw for it and the seed
    asr = {u: by_key[(u, "asr")]["instruction"] for u in utts}
    assert asr == {u: catalog.draw("asr", u, b.seed).text for u in utts}
    assert len(set(asr.values())) > 1  # drawn per utterance, not one for all
    # every unanswered pair is a reject that names the transcripts table it came from
    rejects = read_table(tmp_path / "out" / "rejects.parquet", REJECTS).to_pylist()
    assert s.missing_answers == len(unanswered)
    assert sorted((r["utt_id"], r["reason"], r["source"], r["detail"]) for r in rejects) == sorted(
        (u, "missing_answer", str(transcripts), "no repeat answer in the responses") for u in unanswered
    )

    other_seed = build(
        transcripts, resp, tmp_path / "seed2", b.model_copy(update={"seed": b.seed + 1}), catalog
    )
    assert other_seed.examples == s.examples
    ex2 = read_table(tmp_path / "seed2" / "examples.parquet", EXAMPLES).to_pylist()
    asr2 = {e["utt_id"]: e["instruction"] for e in ex2 if e["task"] == "asr"}
    assert asr2 != asr  # another seed draws other instructions


def test_a_speaker_is_never_split_across_train_dev_and_test(harvested, tmp_path):
    b = BuildConfig(tasks=["asr"], eval_splits=[], test_fraction=0.4, dev_fraction=0.3)
    build(WorkPaths(harvested).harvest.transcripts, None, tmp_path / "out", b, load_catalog())
    ex = read_table(tmp_path / "out" / "examples.parquet", EXAMPLES).to_pylist()
    splits = defaultdict(set)
    for e in ex:
        splits[e["speaker"] or e["utt_id"]].add(e["split"])
    assert all(len(v) == 1 for v in splits.values()), dict(splits)
    multi = [k for k in splits if sum((e["speaker"] or e["utt_id"]) == k for e in ex) >= 3]
    assert len(multi) >= 3  # enough speakers with several utterances for the check to mean something


# ----- the console summary --------------------------------------------------------------------------------


@pytest.fixture
def printed(monkeypatch):
    console = Console(file=io.StringIO(), width=200, color_system=None)
    monkeypatch.setattr(examples, "console", console)
    return lambda: console.file.getvalue()


def test_the_summary_prints_counts_shares_and_targets_per_split_and_every_note(printed):
    print_summary(
        BuildSummary(
            examples=7,
            by_split_task={"dev/asr": 2, "train/asr": 3, "train/repeat": 2},
            missing_answers=3,
            duplicate_utterances=4,
            near_duplicate_answers=5,
            left_out_by_mix={"train/repeat": 1},
            mix_target={"asr": 0.6},
            mix_realized={"dev": {"asr": 1.0}, "train": {"asr": 0.6, "repeat": 0.4}},
            shards=2,
            imported_answers=6,
            filtered_answers=7,
            answers_too_short=8,
            answers_too_long=9,
        )
    )
    out = printed()
    lines = out.splitlines()
    table_at = next(i for i, ln in enumerate(lines) if ln.startswith("┏"))
    assert " ".join(" ".join(lines[:table_at]).split()) == "build: 7 examples in 2 shards (share of split)"
    assert lines[table_at:] == [
        "┏━━━━━━━━┳━━━━━━━━━━━━┳━━━━━━━━━━━┳━━━━━━━━┓",
        "┃ task   ┃ dev        ┃ train     ┃ target ┃",
        "┡━━━━━━━━╇━━━━━━━━━━━━╇━━━━━━━━━━━╇━━━━━━━━┩",
        "│ asr    │ 2 (100.0%) │ 3 (60.0%) │ 60.0%  │",
        "│ repeat │ 0 (0.0%)   │ 2 (40.0%) │ 0.0%   │",
        "└────────┴────────────┴───────────┴────────┘",
        "build: 3 (utterance, task) pairs have no answer (rejects.parquet has each with its reason)",
        "build: 7 answers were rejected by the generate filters (rejects.parquet has each with its reason)",
        "build: 8 answers were too short for build.answer_tokens_between (rejects.parquet has each with its reason)",
        "build: 9 answers were too long for build.answer_tokens_between (rejects.parquet has each with its reason)",
        "build: 4 utterances duplicate another (same normalized text and audio) (rejects.parquet has each with its"
        " reason)",
        "build: 5 answers nearly repeat another answer of their task (rejects.parquet has each with its reason)",
        "build: left out to meet the target mix (split/task: examples): {'train/repeat': 1}",
        "build: 6 examples from imported reference answers",
    ]


def test_the_summary_without_a_mix_or_notes_is_the_table_alone(printed):
    print_summary(
        BuildSummary(
            examples=5,
            by_split_task={"train/asr": 4, "train/repeat": 1},
            missing_answers=0,
            mix_realized={"train": {"asr": 0.8, "repeat": 0.2}},
            shards=1,
        )
    )
    lines = printed().splitlines()
    table_at = next(i for i, ln in enumerate(lines) if ln.startswith("┏"))
    assert " ".join(" ".join(lines[:table_at]).split()) == "build: 5 examples in 1 shards (share of split)"
    assert lines[table_at:] == [
        "┏━━━━━━━━┳━━━━━━━━━━━┓",
        "┃ task   ┃ train     ┃",
        "┡━━━━━━━━╇━━━━━━━━━━━┩",
        "│ asr    │ 4 (80.0%) │",
        "│ repeat │ 1 (20.0%) │",
        "└────────┴───────────┘",
    ]
