"""Admission as a user sees it: which rows a harvest keeps, reuses or rejects, and what each reject says.

Written against the surviving mutants of ``stages.harvest.admission`` (issue 17): every assertion is on
the tables and the summary a harvest writes, or on the (field, detail) that ``bad_value`` and ``bounds``
give, which end up in the rejects table word for word.
"""

import json
import os
import shutil

import pytest

from conftest import DEMO
from core.config import CorpusConfig, ManifestColumns
from core.digest import sha256_file
from core.paths import HarvestPaths
from core.tables import read_table
from schemas import REJECTS, TRANSCRIPTS
from stages.harvest.admission import bad_value, bounds
from stages.harvest.corpora.records import Candidate
from stages.harvest.driver import harvest

CLIP = "test-clean/1089-134686-0001.wav"  # 6.625 s, 16 kHz (the fixture's README)
CLIP2 = "test-clean/1221-135766-0002.wav"


def _rows(out):
    return {r["utt_id"]: r for r in read_table(HarvestPaths(out).transcripts, TRANSCRIPTS).to_pylist()}


def _rejects(out):
    return read_table(HarvestPaths(out).rejects, REJECTS).to_pylist()


def _root(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(DEMO / "test-clean", root / "test-clean")
    return root.resolve()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cand(**kw):
    base = dict(
        utt_id="u", corpus="c", split="s", audio_path="/a.wav", text_raw="hi", speaker=None, source="m:1"
    )
    return Candidate(**(base | kw))


# ----- bad_value and bounds: the (field, detail) a reject row shows -----------------------------------------


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"utt_id": 1.5}, ("utt_id", "the utterance id is 1.5 (float), not a non-empty string")),
        ({"utt_id": ""}, ("utt_id", "the utterance id is '' (str), not a non-empty string")),
        ({"speaker": 2.5}, ("speaker", "the speaker is 2.5 (float), not a string")),
        ({"speaker": ["a"]}, ("speaker", "the speaker is ['a'] (list), not a string")),
        ({"text_raw": 3}, ("text", "the transcript is a int, not a string")),
        ({"offset_s": "soon"}, ("offset_s", "offset_s is 'soon', not a finite number of seconds")),
        ({"offset_s": True}, ("offset_s", "offset_s is True, not a finite number of seconds")),
        ({"offset_s": float("nan")}, ("offset_s", "offset_s is nan, not a finite number of seconds")),
        ({"offset_s": -0.5}, ("offset_s", "offset_s is -0.5; it must be at least 0")),
        ({"duration_s": -1.0}, ("duration_s", "duration_s is -1.0; it must be positive")),
        ({"duration_s": 0}, ("duration_s", "duration_s is 0; it must be positive")),
        ({"duration_s": "long"}, ("duration_s", "duration_s is 'long', not a finite number of seconds")),
        ({"offset_s": 0, "duration_s": None}, None),  # to the end of the file
        ({"offset_s": 0.0, "duration_s": 1.5, "speaker": "spk", "text_raw": None}, None),
    ],
)
def test_bad_value_names_the_field_and_what_is_wrong_with_it(fields, expected):
    assert bad_value(_cand(**fields)) == expected


def test_bounds_are_inclusive_and_say_which_bound_and_by_how_much():
    assert bounds(1.0, 30.0, 1.0) is None  # exactly the minimum is kept
    assert bounds(30.0, 30.0, 1.0) is None  # exactly the maximum is kept
    assert bounds(0.999, 30.0, 1.0) == ("too_short", "1.00s is shorter than the 1.0s bound")
    assert bounds(0.5, 30.0, 1.0) == ("too_short", "0.50s is shorter than the 1.0s bound")
    assert bounds(30.25, 30.0, 1.0) == ("too_long", "30.25s is longer than the 30.0s bound")


# ----- what admission rejects, and what each reject row says -------------------------------------------------


def test_every_admission_reject_names_its_field_and_detail_and_duplicates_name_the_first_line(tmp_path):
    root = _root(tmp_path)
    (root / "test-clean" / "link.wav").symlink_to(root / CLIP2)  # a link inside the root: followed
    shutil.copy(root / CLIP, tmp_path / "outside.wav")
    m = _jsonl(
        tmp_path / "m.jsonl",
        [
            {"id": "a", "audio": CLIP, "text": "one"},
            {"id": "b", "audio": CLIP2, "text": "two"},
            {"id": "b", "audio": CLIP, "text": "the same id again"},
            {"id": "blank", "audio": CLIP, "text": "   "},
            {"id": "untold", "audio": CLIP},
            {"id": "out", "audio": "../outside.wav", "text": "x"},
            {"id": "abs", "audio": "/nonexistent-splsm.wav", "text": "x"},
            {"id": "gone", "audio": "test-clean/gone.wav", "text": "x"},
            {"id": "linked", "audio": "test-clean/link.wav", "text": "through a link"},
        ],
    )
    m2 = _jsonl(
        tmp_path / "m2.jsonl",
        [
            {"id": "c", "audio": CLIP, "text": "three"},
            {"id": "a", "audio": CLIP, "text": "a again"},
            {"id": "c", "audio": CLIP, "text": "c again"},
        ],
    )
    corpora = [
        CorpusConfig(name="m", kind="jsonl", root=root, manifest=m),
        CorpusConfig(name="n", kind="jsonl", root=root, manifest=m2),
    ]
    out = tmp_path / "out"
    s = harvest(corpora, out)
    rows = _rows(out)
    assert sorted(rows) == ["a", "b", "c", "linked"]
    assert rows["linked"]["audio_path"] == str(root / CLIP2)
    got = [
        (r["source"], r["utt_id"], r["field"], r["reason"], r["detail"], r["audio_path"])
        for r in _rejects(out)
    ]
    assert got == [
        (f"{m}:3", "b", "utt_id", "duplicate_utt_id", f"b already came from {m}:2", None),
        (f"{m}:4", "blank", "text", "empty_transcript", "the transcript is empty", None),
        (
            f"{m}:5",
            "untold",
            "text",
            "no_transcript",
            "the corpus has no transcript for this audio and harvest.whisper_checkpoint is not set",
            None,
        ),
        (
            f"{m}:6",
            "out",
            "audio",
            "outside_root",
            f"{root}/../outside.wav resolves to {tmp_path.resolve()}/outside.wav, outside the corpus root {root}",
            None,
        ),
        (
            f"{m}:7",
            "abs",
            "audio",
            "outside_root",
            f"/nonexistent-splsm.wav resolves to /nonexistent-splsm.wav, outside the corpus root {root}",
            None,
        ),
        (
            f"{m}:8",
            "gone",
            "audio",
            "missing_audio",
            f"{root}/test-clean/gone.wav does not exist",
            f"{root}/test-clean/gone.wav",
        ),
        (f"{m2}:2", "a", "utt_id", "duplicate_utt_id", f"a already came from {m}:1", None),
        (f"{m2}:3", "c", "utt_id", "duplicate_utt_id", f"c already came from {m2}:1", None),
    ]
    assert s.transcripts == 4 and s.rejects == 8


# ----- reruns: what is kept, what is probed again -----------------------------------------------------------


def test_segments_given_as_seconds_are_kept_on_a_rerun_and_probed_again_when_one_bound_moves(tmp_path):
    root = _root(tmp_path)
    cols = ManifestColumns(audio="audio", text="text", id="id", offset="start", duration="length")
    m = tmp_path / "m.jsonl"

    def run(first_start, second_length):
        _jsonl(
            m,
            [
                {"id": "one", "audio": CLIP, "text": "one", "start": first_start, "length": 2.0},
                {"id": "two", "audio": CLIP2, "text": "two", "start": 0.5, "length": second_length},
            ],
        )
        corpus = CorpusConfig(name="g", kind="manifest", root=root, manifest=m, columns=cols)
        return harvest([corpus], tmp_path / "out")

    assert run(0.5, 1.5).probed == 2
    again = run(0.5, 1.5)
    assert (again.probed, again.reused) == (0, 2)
    moved = run(1.0, 1.5)  # only the offset changed: the row must say so
    assert (moved.probed, moved.reused) == (1, 1)
    assert (_rows(tmp_path / "out")["one"]["offset_s"], _rows(tmp_path / "out")["one"]["duration_s"]) == (
        1.0,
        2.0,
    )
    longer = run(1.0, 2.5)  # only the duration changed
    assert (longer.probed, longer.reused) == (1, 1)
    assert (_rows(tmp_path / "out")["two"]["offset_s"], _rows(tmp_path / "out")["two"]["duration_s"]) == (
        0.5,
        2.5,
    )


def test_segments_given_as_frames_are_kept_on_a_rerun_and_probed_again_when_they_change(tmp_path):
    root = _root(tmp_path)
    m = tmp_path / "m.jsonl"

    def run(count):
        _jsonl(
            m,
            [
                {"audio": f"{CLIP}:16000:{count}", "text": "after early"},
                {"audio": f"{CLIP2}:8000:24000", "text": "second"},
            ],
        )
        return harvest([CorpusConfig(name="ref", kind="jsonl", root=root, manifest=m)], tmp_path / "out")

    assert run(32000).probed == 2
    again = run(32000)
    assert (again.probed, again.reused, again.transcripts) == (0, 2, 2)
    rows = _rows(tmp_path / "out")
    assert (rows["1089-134686-0001_16000"]["offset_s"], rows["1089-134686-0001_16000"]["duration_s"]) == (
        1.0,
        2.0,
    )
    assert (rows["1221-135766-0002_8000"]["offset_s"], rows["1221-135766-0002_8000"]["duration_s"]) == (
        0.5,
        1.5,
    )
    shorter = run(24000)
    assert (shorter.probed, shorter.reused) == (1, 1)
    assert _rows(tmp_path / "out")["1089-134686-0001_16000"]["duration_s"] == 1.5


def test_a_reused_row_outside_a_new_bound_is_a_reject_that_records_its_file(tmp_path):
    root = _root(tmp_path)
    cols = ManifestColumns(audio="audio", text="text", id="id", offset="start", duration="length")
    m = _jsonl(
        tmp_path / "m.jsonl",
        [
            {"id": "long", "audio": CLIP, "text": "one", "start": 0.0, "length": 2.0},
            {"id": "short", "audio": CLIP2, "text": "two", "start": 0.0, "length": 1.0},
        ],
    )
    corpus = CorpusConfig(name="g", kind="manifest", root=root, manifest=m, columns=cols)
    harvest([corpus], tmp_path / "out")
    s = harvest([corpus], tmp_path / "out", max_duration_s=1.5)
    assert (s.probed, s.reused, s.transcripts) == (0, 2, 1)
    (rej,) = _rejects(tmp_path / "out")
    clip = root / CLIP
    assert {k: rej[k] for k in ("utt_id", "field", "reason", "detail")} == {
        "utt_id": "long",
        "field": "audio",
        "reason": "too_long",
        "detail": "2.00s is longer than the 1.5s bound",
    }
    assert (rej["audio_path"], rej["file_size"], rej["file_mtime_ns"], rej["file_sha256"]) == (
        str(clip),
        clip.stat().st_size,
        clip.stat().st_mtime_ns,
        sha256_file(clip),
    )


def test_a_touched_file_of_the_last_row_keeps_its_row_with_the_new_mtime(tmp_path):
    root = _root(tmp_path)
    m = _jsonl(tmp_path / "m.jsonl", [{"audio": CLIP, "text": "first"}, {"audio": CLIP2, "text": "last"}])
    corpus = CorpusConfig(name="ref", kind="jsonl", root=root, manifest=m)
    harvest([corpus], tmp_path / "out")
    last = root / CLIP2
    st = last.stat()
    os.utime(last, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    s = harvest([corpus], tmp_path / "out")
    assert (s.probed, s.reused, s.transcripts) == (0, 2, 2)
    rows = _rows(tmp_path / "out")
    assert rows["1221-135766-0002"]["file_mtime_ns"] == last.stat().st_mtime_ns
    assert rows["1221-135766-0002"]["text_raw"] == "last"


def _corrupt_corpus(tmp_path):
    root = _root(tmp_path)
    bad = root / "test-clean" / "bad.wav"
    bad.write_bytes(b"RIFF" + bytes(range(256)) * 4)
    m = _jsonl(
        tmp_path / "m.jsonl",
        [{"audio": CLIP, "text": "fine"}, {"audio": "test-clean/bad.wav", "text": "bad"}],
    )
    return CorpusConfig(name="ref", kind="jsonl", root=root, manifest=m), bad


def test_a_touched_corrupt_file_keeps_its_reject_with_its_new_mtime_without_a_probe(tmp_path):
    corpus, bad = _corrupt_corpus(tmp_path)
    harvest([corpus], tmp_path / "out")
    (first,) = _rejects(tmp_path / "out")
    st = bad.stat()
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    s = harvest([corpus], tmp_path / "out")
    assert (s.probed, s.reused, s.reject_counts) == (0, 2, {"corrupt_audio": 1})
    (rej,) = _rejects(tmp_path / "out")
    assert rej == first | {"file_mtime_ns": bad.stat().st_mtime_ns}
    assert (rej["field"], rej["reason"], rej["audio_path"], rej["file_size"], rej["file_sha256"]) == (
        "audio",
        "corrupt_audio",
        str(bad),
        bad.stat().st_size,
        sha256_file(bad),
    )


def test_an_unchanged_corrupt_file_keeps_its_reject_without_content_hashes(tmp_path):
    corpus, bad = _corrupt_corpus(tmp_path)
    harvest([corpus], tmp_path / "out", content_hash=False)
    (first,) = _rejects(tmp_path / "out")
    s = harvest([corpus], tmp_path / "out", content_hash=False)
    assert (s.probed, s.reused, s.reject_counts) == (0, 2, {"corrupt_audio": 1})
    (rej,) = _rejects(tmp_path / "out")
    assert rej == first
    assert (rej["field"], rej["audio_path"], rej["file_mtime_ns"], rej["file_sha256"]) == (
        "audio",
        str(bad),
        bad.stat().st_mtime_ns,
        None,
    )


# ----- with Whisper: labels are kept, and a transcript that goes away is replaced by one ---------------------


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    from dataclasses import asdict

    import torch
    import whisper
    from test_harvest_whisper import TINY

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("whisper") / "tiny.pt"
    torch.save({"dims": asdict(TINY), "model_state_dict": whisper.model.Whisper(TINY).state_dict()}, path)
    return path


def test_a_row_whose_corpus_transcript_goes_away_is_labelled_by_whisper_and_labels_are_kept(
    tmp_path, tiny_whisper
):
    root = _root(tmp_path)
    m = tmp_path / "m.jsonl"
    out = tmp_path / "out"

    def run(told_text):
        told = {"id": "told", "audio": CLIP} | ({"text": told_text} if told_text else {})
        _jsonl(m, [told, {"id": "untold", "audio": CLIP2}])
        corpus = CorpusConfig(name="ref", kind="jsonl", root=root, manifest=m)
        return harvest([corpus], out, whisper_checkpoint=tiny_whisper, whisper_max_tokens=4)

    first = run("WHAT THE CORPUS SAYS")
    assert (first.probed, first.transcribed, first.rejects) == (2, 1, 0)
    whisper_source = _rows(out)["untold"]["text_source"]
    assert whisper_source.startswith("whisper:")
    assert _rows(out)["told"]["text_source"] == "corpus"
    again = run("WHAT THE CORPUS SAYS")
    assert (again.probed, again.reused, again.transcribed) == (0, 2, 0)
    dropped = run(None)  # the corpus no longer has a transcript for "told": Whisper labels it
    assert (dropped.probed, dropped.reused, dropped.transcribed) == (1, 1, 1)
    told = _rows(out)["told"]
    assert told["text_source"] == whisper_source and told["text_raw"] != "WHAT THE CORPUS SAYS"


def test_a_source_with_a_colon_that_is_no_line_number_is_named_whole_in_a_duplicate(tmp_path):
    # an audio folder's source is the file's path: "take:2/clip.wav" is no FILE:LINE
    root = tmp_path / "folder"
    (root / "take:2").mkdir(parents=True)
    shutil.copy(DEMO / CLIP, root / "take:2" / "clip.wav")
    root = root.resolve()
    corpora = [
        CorpusConfig(name="a", kind="audio_folder", root=root),
        CorpusConfig(name="b", kind="audio_folder", root=root),
    ]
    s = harvest(corpora, tmp_path / "out")
    source = f"{root}/take:2/clip.wav"
    got = [(r["corpus"], r["source"], r["reason"], r["detail"]) for r in _rejects(tmp_path / "out")]
    assert got == [
        (
            "a",
            source,
            "no_transcript",
            "the corpus has no transcript for this audio and harvest.whisper_checkpoint is not set",
        ),
        ("b", source, "duplicate_utt_id", f"clip already came from {source}"),
    ]
    assert (s.transcripts, s.rejects) == (0, 2)
