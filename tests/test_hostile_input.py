"""Hostile and messy input: every bad value becomes a reject row naming file, line and field, or a counted skip,
and never costs the good rows around it (README, "What bad input gets")."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import DEMO, run_stage
from core import audio
from core.config import CorpusConfig, ManifestColumns
from core.digest import fingerprint_dir
from core.tables import read_table
from schemas import REJECTS, TRANSCRIPTS
from stages.harvest.driver import harvest

CLIP = "test-clean/1089-134686-0001.wav"  # 6.625 s (the fixture's README)


def _rows(out):
    rows = read_table(out / "transcripts", TRANSCRIPTS).to_pylist()
    rejects = read_table(out / "rejects.parquet", REJECTS).to_pylist()
    return rows, rejects


def _corpus_root(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(DEMO / "test-clean", root / "test-clean")
    return root


BAD_JSONL = [  # (row, the field its reject must name); None: a good row
    ({"audio": CLIP, "text": "good one", "id": "ok-1", "start": 0.5, "length": 2.0}, None),
    ({"audio": CLIP, "text": "nan offset", "id": "nan-off", "start": math.nan, "length": 1.0}, "start"),
    ({"audio": CLIP, "text": "inf duration", "id": "inf-dur", "start": 0.0, "length": math.inf}, "length"),
    ({"audio": CLIP, "text": "negative offset", "id": "neg-off", "start": -1.0, "length": 1.0}, "start"),
    ({"audio": CLIP, "text": "negative length", "id": "neg-dur", "start": 1.0, "length": -2.0}, "length"),
    ({"audio": CLIP, "text": "zero length", "id": "zero-dur", "start": 1.0, "length": 0}, "length"),
    ({"audio": CLIP, "text": "text offset", "id": "str-off", "start": "soon", "length": 1.0}, "start"),
    ({"audio": CLIP, "text": "float id", "id": 1.5, "start": 2.0, "length": 1.0}, "utt_id"),
    ({"audio": CLIP, "text": "list id", "id": ["a"], "start": 2.5, "length": 1.0}, "utt_id"),
    ({"audio": CLIP, "text": "bool id", "id": True, "start": 3.0, "length": 1.0}, "utt_id"),
    ({"audio": CLIP, "text": "dict speaker", "id": "dict-spk", "who": {"n": 1}, "start": 3.5}, "speaker"),
    ({"audio": CLIP, "text": "float speaker", "id": "float-spk", "who": 2.5, "start": 4.0}, "speaker"),
    ({"audio": CLIP, "text": "a number as id", "id": 42, "who": 103, "start": 4.5, "length": 1.0}, None),
    ({"audio": CLIP, "text": "past the end", "id": "late", "start": 6.0, "length": 2.0}, "audio"),
    ({"audio": CLIP, "text": "too short", "id": "short", "start": 1.0, "length": 0.1}, "audio"),
]


def test_bad_values_in_a_jsonl_manifest_are_rejects_naming_line_and_field(tmp_path):
    root = _corpus_root(tmp_path)
    manifest = tmp_path / "m.jsonl"
    # json.dumps writes NaN and Infinity as Python's json reads them (and as many exporters write them)
    cols = ManifestColumns(
        audio="audio", text="text", id="id", speaker="who", offset="start", duration="length"
    )
    manifest.write_text("".join(json.dumps(r) + "\n" for r, _ in BAD_JSONL))
    corpus = CorpusConfig(name="m", kind="manifest", root=root, manifest=manifest, columns=cols)
    s = harvest([corpus], tmp_path / "out", min_duration_s=0.5, max_duration_s=30)
    rows, rejects = _rows(tmp_path / "out")

    # nothing lost, nothing twice: every line is a row or a reject
    assert len(rows) + len(rejects) == len(BAD_JSONL) == s.transcripts + s.rejects
    assert {r["utt_id"] for r in rows} == {"ok-1", "42"}
    by_line = {int(r["source"].rsplit(":", 1)[1]): r for r in rejects}
    for line, (_, field) in enumerate(BAD_JSONL, start=1):
        if field is None:
            assert line not in by_line
            continue
        rej = by_line[line]
        assert rej["source"] == f"{manifest}:{line}" and rej["field"] == field, rej
    assert by_line[14]["reason"] == "segment_out_of_range"
    assert by_line[15]["reason"] == "too_short"
    assert {by_line[i]["reason"] for i in range(2, 13)} == {"bad_value"}
    # an integer id or speaker is its decimal digits, as the manifest wrote them
    assert [(r["speaker"], r["offset_s"], r["duration_s"]) for r in rows if r["utt_id"] == "42"] == [
        ("103", 4.5, 1.0)
    ]


def test_bad_numbers_in_a_csv_manifest_are_rejects(tmp_path):
    root = _corpus_root(tmp_path)
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,transcript,begin,length\n"
        f"{CLIP},fine,0.0,1.0\n"
        f"{CLIP},nan start,nan,1.0\n"
        f"{CLIP},infinite,1.0,inf\n"
        f"{CLIP},negative,-0.5,1.0\n"
    )
    cols = ManifestColumns(audio="path", text="transcript", offset="begin", duration="length")
    corpus = CorpusConfig(name="c", kind="manifest", root=root, manifest=manifest, columns=cols)
    s = harvest([corpus], tmp_path / "out")
    rows, rejects = _rows(tmp_path / "out")
    assert [r["text_raw"] for r in rows] == ["fine"]
    assert s.listed == 4  # the summary's count: the good row and the three the reader rejected
    assert [(r["source"].rsplit(":", 1)[1], r["field"], r["reason"]) for r in rejects] == [
        ("3", "begin", "bad_value"),
        ("4", "length", "bad_value"),
        ("5", "begin", "bad_value"),
    ]


def test_reference_manifest_with_numeric_and_broken_ids(tmp_path):
    root = _corpus_root(tmp_path)
    manifest = tmp_path / "ref.jsonl"
    lines = [
        {"audio": CLIP, "text": "numeric id", "id": 7},
        {"audio": CLIP, "text": "object id", "id": {"x": 1}},
        {"audio": "test-clean/1221-135766-0002.wav", "text": "list speaker", "speaker": [1]},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    harvest([CorpusConfig(name="r", kind="jsonl", root=root, manifest=manifest)], tmp_path / "out")
    rows, rejects = _rows(tmp_path / "out")
    assert [r["utt_id"] for r in rows] == ["7"]
    assert [(r["source"], r["field"], r["reason"]) for r in rejects] == [
        (f"{manifest}:2", "utt_id", "bad_value"),
        (f"{manifest}:3", "speaker", "bad_value"),
    ]


def test_gigaspeech_nan_times_and_numeric_sids_are_rejects(tmp_path):
    root = tmp_path / "GigaSpeech"
    (root / "audio").mkdir(parents=True)
    shutil.copy(DEMO / CLIP, root / "audio" / "a.wav")
    seg = dict(speaker="N/A", text_tn="HELLO THERE <PERIOD>", subsets=["{XS}"])
    segs = [
        dict(seg, sid="S0", begin_time=0.0, end_time=1.0),
        dict(seg, sid="S1", begin_time="nan", end_time=2.0),  # JSON has no NaN: text float() reads
        dict(seg, sid=12, begin_time=2.0, end_time=3.0),
        dict(seg, sid="S3", begin_time=-1.0, end_time=0.5),
    ]
    meta = {"audios": [{"path": "audio/a.wav", "aid": "A", "subsets": ["{XS}"], "segments": segs}]}
    (root / "GigaSpeech.json").write_text(json.dumps(meta))
    harvest([CorpusConfig(name="g", kind="gigaspeech", root=root, subset="XS")], tmp_path / "out")
    rows, rejects = _rows(tmp_path / "out")
    assert [r["utt_id"] for r in rows] == ["S0"]
    got = sorted((r["source"].rsplit(".", 1)[1], r["field"], r["reason"]) for r in rejects)
    assert got == [
        ("segments[1]", "offset_s", "bad_value"),
        ("segments[2]", "sid", "missing_field"),
        ("segments[3]", "offset_s", "bad_value"),
    ]


@pytest.mark.parametrize(
    "offset_s,duration_s",
    [(math.nan, 1.0), (-1.0, 1.0), (0.0, math.inf), (0.0, -1.0), (math.inf, None)],
)
def test_audio_load_refuses_impossible_segments_with_an_audio_error(offset_s, duration_s):
    with pytest.raises(audio.AudioError) as e:
        audio.load(DEMO / CLIP, offset_s, duration_s)
    assert e.value.reason == "bad_segment" and str(DEMO / CLIP) in e.value.detail


def test_audio_load_turns_every_decoding_failure_into_an_audio_error(tmp_path):
    good = tmp_path / "good.flac"
    x, sr = sf.read(str(DEMO / CLIP), dtype="float32")
    sf.write(str(good), x, sr)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])  # a copy cut short
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(64))
    unreadable = tmp_path / "dir.wav"
    unreadable.mkdir()
    dangling = tmp_path / "dangling.wav"
    dangling.symlink_to(tmp_path / "gone.wav")
    for path in (cut, garbage, unreadable, dangling):
        try:
            y = audio.load(path)
        except audio.AudioError as e:
            assert str(path) in e.detail
        else:  # libsndfile may decode the frames before the cut: then they are the first part of the clip
            assert path == cut and 0 < len(y) < len(x) and np.allclose(y, x[: len(y)], atol=1e-4)


def test_a_dangling_link_in_a_corpus_is_a_reject_and_a_warning_not_a_crash(tmp_path, tiny_config, capsys):
    root = _corpus_root(tmp_path)
    (root / "test-clean" / "gone.wav").symlink_to(root / "test-clean" / "nowhere.wav")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"audio": CLIP, "text": "here"})
        + "\n"
        + json.dumps({"audio": "test-clean/gone.wav", "text": "x"})
    )
    corpus = CorpusConfig(name="m", kind="jsonl", root=root, manifest=manifest)
    cfg = tiny_config.model_copy(update={"corpora": [corpus]})
    res = run_stage("harvest", cfg, tmp_path / "work")  # the stage fingerprints the corpus directory
    out = capsys.readouterr().out
    assert "gone.wav (dangling link)" in " ".join(out.split())
    rows, rejects = _rows(res.outputs["transcripts"].parent)
    assert [r["text_raw"] for r in rows] == ["here"]
    assert [(r["source"], r["reason"]) for r in rejects] == [(f"{manifest}:2", "missing_audio")]
    # the link coming back is a change the reuse check sees
    before = fingerprint_dir(root)
    shutil.copy(DEMO / CLIP, root / "test-clean" / "nowhere.wav")
    assert fingerprint_dir(root) != before


def test_missing_roots_and_manifests_and_a_headless_common_voice_tsv_are_rejects(tmp_path):
    cv = tmp_path / "cv"
    (cv / "clips").mkdir(parents=True)
    (cv / "train.tsv").write_text("client_id\tfile\ttext\nabc\tx.mp3\thello\n")  # no path/sentence columns
    corpora = [
        CorpusConfig(name="gone", kind="librispeech", root=tmp_path / "nowhere"),
        CorpusConfig(name="nomanifest", kind="jsonl", root=tmp_path, manifest=tmp_path / "absent.jsonl"),
        CorpusConfig(name="cv", kind="commonvoice", root=cv, tsvs=["train"]),
    ]
    harvest(corpora, tmp_path / "out")
    _, rejects = _rows(tmp_path / "out")
    got = {(r["corpus"], r["reason"], r["field"]) for r in rejects}
    assert got == {
        ("gone", "missing_corpus_root", "root"),
        ("nomanifest", "missing_manifest", "manifest"),
        ("cv", "bad_header", "header"),
    }


def test_lhotse_recordings_it_cannot_read_as_lhotse_would_are_rejects(tmp_path):
    lhotse = pytest.importorskip("lhotse")
    root = tmp_path / "corpus"
    root.mkdir()
    x, sr = sf.read(str(DEMO / CLIP), dtype="float32")
    sf.write(str(root / "stereo.wav"), np.stack([x, x[::-1]], axis=1), sr)
    shutil.copy(DEMO / CLIP, root / "mono.wav")
    stereo = lhotse.Recording.from_file(root / "stereo.wav", recording_id="stereo")
    sped = lhotse.Recording.from_file(root / "mono.wav", recording_id="sped").perturb_speed(1.1)
    for rec in (stereo, sped):  # paths relative to the root, as the harvest reads them
        rec.sources[0].source = Path(rec.sources[0].source).name
    sups = [
        lhotse.SupervisionSegment("left", "stereo", 0.0, 1.0, channel=0, text="one side only"),
        lhotse.SupervisionSegment("fast", "sped", 0.0, 1.0, channel=0, text="heard faster"),
    ]
    recs, sup_file = tmp_path / "recs.jsonl", tmp_path / "sups.jsonl"
    recs.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in (stereo, sped)))
    sup_file.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in sups))
    corpus = CorpusConfig(name="l", kind="lhotse", root=root, recordings=recs, supervisions=sup_file)
    harvest([corpus], tmp_path / "out")
    rows, rejects = _rows(tmp_path / "out")
    assert rows == []
    reasons = {r["reason"] for r in rejects}
    assert {"single_channel", "unsupported_transform"} <= reasons, rejects
