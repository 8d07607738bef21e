"""lhotse manifests in (corpus kind lhotse) and out (``splsm export lhotse``), checked against lhotse itself.

The manifests here are written by lhotse (its LibriSpeech recipe, ``Recording.from_file``, ``to_file``) from the
bundled real clips, and the exports are read back by lhotse (``load_manifest``, ``CutSet.from_file``, audio
loading); the expected values come from the corpus's own files and the Parquet tables read with pyarrow.
"""

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from click.testing import CliRunner

from conftest import DEMO, LIBRISPEECH, run_stage
from core import audio
from core.catalog import load_catalog
from core.config import BuildConfig, CorpusConfig, load_config
from core.export.lhotse import cuts_file
from core.paths import WorkPaths
from core.tables import PartsTable, read_table, write_table
from schemas import REJECTS, RESPONSES, TRANSCRIPTS, to_table
from splsm.cli import main
from stages.harvest.driver import harvest
from stages.import_reference.importer import import_reference

lhotse = pytest.importorskip("lhotse")
from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet  # noqa: E402

SAMPLE = Path(__file__).resolve().parent / "fixtures" / "self_powered_sample.jsonl"
LONG_UTTS = ["1988-24833-0000", "3752-4944-0000", "3752-4944-0001"]


def _ls_texts() -> dict[str, tuple[str, str]]:
    """utterance id -> (speaker, transcript), from the demo tree's own .trans.txt files."""
    out = {}
    for trans in sorted(LIBRISPEECH.rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            utt, _, text = line.partition(" ")
            out[utt] = (trans.parent.parent.name, text)
    return out


def _flac(utt: str) -> Path:
    spk, chap, _ = utt.split("-")
    return LIBRISPEECH / "dev-clean-2" / spk / chap / f"{utt}.flac"


def _rows(out: Path) -> dict[str, dict]:
    return {r["utt_id"]: r for r in read_table(out / "transcripts", TRANSCRIPTS).to_pylist()}


def _rejects(out: Path) -> list[dict]:
    return read_table(out / "rejects.parquet", REJECTS).to_pylist()


def _where(r: dict) -> tuple[str, str, str, str | None]:
    """A reject as (file name:line, field, reason, utterance id)."""
    return Path(r["source"]).name, r["field"], r["reason"], r["utt_id"]


def test_lhotse_librispeech_recipe_and_the_librispeech_harvest_agree(tmp_path):
    """lhotse's own recipe and splsm's reader, on the same tree: the same utterances, speakers, texts, lengths.
    Then splsm harvests the recipe's manifests (kind lhotse) into the very rows the LibriSpeech reader made."""
    from lhotse.recipes import prepare_librispeech

    harvest([CorpusConfig(name="ls", kind="librispeech", root=LIBRISPEECH)], tmp_path / "ls")
    ours = _rows(tmp_path / "ls")
    prepared = prepare_librispeech(LIBRISPEECH, output_dir=tmp_path / "manifests")
    assert list(prepared) == ["dev-clean-2"]
    recs, sups = prepared["dev-clean-2"]["recordings"], prepared["dev-clean-2"]["supervisions"]
    assert sorted(ours) == sorted(s.id for s in sups) == sorted(_ls_texts()) and len(ours) == 10
    for s in sups:
        row, rec = ours[s.id], recs[s.recording_id]
        assert (row["speaker"], row["text_raw"]) == (s.speaker, s.text)
        assert abs(row["duration_s"] - s.duration) <= 1e-3 and abs(row["duration_s"] - rec.duration) <= 1e-3
        assert row["audio_path"] == str(Path(rec.sources[0].source).resolve())

    files = {
        k: tmp_path / "manifests" / f"librispeech_{k}_dev-clean-2.jsonl.gz"
        for k in ("recordings", "supervisions")
    }
    s = harvest([CorpusConfig(name="ls", kind="lhotse", root=LIBRISPEECH, **files)], tmp_path / "lh")
    theirs = _rows(tmp_path / "lh")
    assert s.rejects == 0 and sorted(theirs) == sorted(ours)
    keys = ("split", "audio_path", "offset_s", "sample_rate_hz", "text_raw", "text", "text_norm", "speaker")
    for utt, row in theirs.items():
        assert {k: row[k] for k in keys} == {k: ours[utt][k] for k in keys}
        assert row["split"] == "dev-clean-2"  # from lhotse's file name, as LibriSpeech's folder gives it
        assert abs(row["duration_s"] - ours[utt]["duration_s"]) <= 1e-3


def _long_wav(path: Path) -> list[tuple[float, float]]:
    """Three real clips end to end in one 16-bit WAV (lossless), as a long recording; each clip's (start, end)."""
    clips, spans, t = [], [], 0.0
    for utt in LONG_UTTS:
        x, sr = sf.read(str(_flac(utt)), dtype="int16")
        clips.append(x)
        spans.append((t, t + len(x) / sr))
        t += len(x) / sr
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.concatenate(clips), 16000, subtype="PCM_16")
    return spans


def _at(rec: Recording, path: str) -> Recording:
    """The recording with its file named by ``path`` (relative to the corpus root), as lhotse reads it back."""
    source = rec.sources[0].to_dict() | {"source": path}
    return Recording.from_dict(rec.to_dict() | {"sources": [source]})


def _segments(root: Path) -> tuple[Recording, list[SupervisionSegment]]:
    """A long recording (written by lhotse from the file) and one supervision per clip in it, relative path."""
    spans = _long_wav(root / "audio" / "long.wav")
    texts = _ls_texts()
    rec = _at(Recording.from_file(root / "audio" / "long.wav", recording_id="long"), "audio/long.wav")
    sups = [
        SupervisionSegment(
            id=utt,
            recording_id="long",
            start=b,
            duration=e - b,
            channel=0,
            text=texts[utt][1],
            speaker=texts[utt][0],
        )
        for utt, (b, e) in zip(LONG_UTTS, spans, strict=True)
    ]
    return rec, sups


def _check_segments(rows: dict[str, dict], root: Path) -> None:
    """Each harvested row is its clip: the audio the harvest loads from the long file is the original FLAC's."""
    texts = _ls_texts()
    assert sorted(rows) == sorted(LONG_UTTS)
    for utt in LONG_UTTS:
        row = rows[utt]
        assert (row["speaker"], row["text_raw"]) == texts[utt]
        assert row["audio_path"] == str((root / "audio" / "long.wav").resolve())
        want, _ = sf.read(str(_flac(utt)), dtype="float32")
        assert row["duration_s"] == pytest.approx(len(want) / 16000, abs=1e-6)
        got = audio.load(row["audio_path"], row["offset_s"], row["duration_s"])
        assert len(got) == len(want) and np.abs(got - want).max() < 1e-4


def test_lhotse_recordings_and_supervisions_with_offsets_become_segments(tmp_path):
    root = tmp_path / "corpus"
    rec, sups = _segments(root)
    RecordingSet.from_recordings([rec]).to_file(tmp_path / "rec.jsonl.gz")
    SupervisionSet.from_segments(sups).to_file(tmp_path / "sup_supervisions_train.jsonl")
    corpus = CorpusConfig(
        name="lh",
        kind="lhotse",
        root=root,
        recordings=tmp_path / "rec.jsonl.gz",
        supervisions=tmp_path / "sup_supervisions_train.jsonl",
    )
    s = harvest([corpus], tmp_path / "out")
    rows = _rows(tmp_path / "out")
    assert s.rejects == 0 and s.probed == 1  # one long file, probed once
    _check_segments(rows, root)
    assert {r["split"] for r in rows.values()} == {"train"}
    assert rows[LONG_UTTS[1]]["offset_s"] == pytest.approx(53120 / 16000, abs=1e-6)  # the first clip's length


def test_lhotse_cutsets_round_trip_through_harvest_and_export(tmp_path):
    """A CutSet (jsonl.gz) lhotse made from the manifests, whole recordings and trimmed to supervisions, reads
    as the same segments; exporting the harvest and harvesting the export gives the same rows again."""
    root = tmp_path / "corpus"
    rec, sups = _segments(root)
    cuts = CutSet.from_manifests(
        recordings=RecordingSet.from_recordings([rec]), supervisions=SupervisionSet.from_segments(sups)
    )
    cuts.to_file(tmp_path / "whole.jsonl.gz")  # one cut over the long file, three supervisions in it
    trimmed = cuts.trim_to_supervisions(keep_overlapping=False)
    assert [c.start > 0 for c in trimmed] == [
        False,
        True,
        True,
    ]  # offsets now on the cut, not the supervision
    trimmed.to_file(tmp_path / "x_cuts_dev.jsonl.gz")
    for name in ("whole.jsonl.gz", "x_cuts_dev.jsonl.gz"):
        s = harvest(
            [CorpusConfig(name="lh", kind="lhotse", root=root, cuts=tmp_path / name)], tmp_path / name[:5]
        )
        assert s.rejects == 0
        _check_segments(_rows(tmp_path / name[:5]), root)
    assert {r["split"] for r in _rows(tmp_path / "x_cut").values()} == {"dev"}

    before = _rows(tmp_path / "whole")
    work = tmp_path / "work"
    (work / "harvest").mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "transcripts", WorkPaths(work).harvest.transcripts)
    runner = CliRunner().invoke(
        main, ["export", "lhotse", "--workdir", str(work), "--out", str(tmp_path / "exp")]
    )
    assert runner.exit_code == 0, runner.output
    assert "no examples in the work directory" in runner.output
    exported = cuts_file(tmp_path / "exp", "transcripts")
    harvest([CorpusConfig(name="lh", kind="lhotse", root=root, cuts=exported)], tmp_path / "again")
    after = _rows(tmp_path / "again")
    keys = ("audio_path", "offset_s", "duration_s", "text_raw", "speaker", "sample_rate_hz")
    assert {u: {k: r[k] for k in keys} for u, r in after.items()} == {
        u: {k: r[k] for k in keys} for u, r in before.items()
    }


def _jsonl(path: Path, lines: list[str | bytes]) -> Path:
    data = b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def test_lhotse_bad_entries_are_rejects_naming_file_line_and_field(tmp_path):
    root = tmp_path / "corpus"
    rec, sups = _segments(root)
    outside = tmp_path / "elsewhere" / "o.flac"
    outside.parent.mkdir()
    shutil.copy(_flac("2412-153948-0000"), outside)
    shutil.copy(_flac("2412-153948-0001"), root / "audio" / "lone.flac")
    lone = _at(Recording.from_file(root / "audio" / "lone.flac", recording_id="lone"), "audio/lone.flac")
    esc = _at(Recording.from_file(outside, recording_id="escape"), "../elsewhere/o.flac")  # leaves the root
    url = rec.to_dict() | {
        "id": "remote",
        "sources": [{"type": "url", "channels": [0], "source": "https://x/y.wav"}],
    }
    no_rate = {k: v for k, v in rec.to_dict().items() if k != "sampling_rate"} | {"id": "norate"}
    recordings = _jsonl(
        tmp_path / "recs.jsonl.gz",
        [
            json.dumps(rec.to_dict()),  # 1
            json.dumps(url),  # 2: unsupported source
            "{broken",  # 3
            json.dumps(no_rate),  # 4: missing field
            json.dumps(esc.to_dict()),  # 5: outside the root
            json.dumps(lone.to_dict()),  # 6: no supervision
            json.dumps(rec.to_dict()),  # 7: the same id again
        ],
    )
    good = [s.to_dict() for s in sups]
    no_text = {k: v for k, v in good[2].items() if k != "text"}
    supervisions = _jsonl(
        tmp_path / "sups.jsonl",
        [
            json.dumps(good[0]),  # 1
            json.dumps(good[1]),  # 2
            json.dumps(no_text),  # 3: no text and no Whisper
            json.dumps(good[0] | {"id": "ghost", "recording_id": "nowhere"}),  # 4: unknown recording
            json.dumps(
                good[0] | {"id": "late", "start": 9.0, "duration": 5.0}
            ),  # 5: past the recording's end
            json.dumps(good[0] | {"id": "far", "recording_id": "remote"}),  # 6: its recording is a reject
            b'{"id": "\xff"}',  # 7: not UTF-8
            json.dumps({"id": "x", "start": 0, "duration": 1}),  # 8: no recording_id
            "",  # 9: blank, skipped
            json.dumps(
                good[0] | {"id": "out", "recording_id": "escape", "start": 0.0, "duration": 1.0}
            ),  # 10
            json.dumps(good[1]),  # 11: a duplicate utterance
            "[1, 2]",  # 12: not an object
            json.dumps(good[0] | {"id": "words", "start": "soon"}),  # 13: not a number
            json.dumps(good[0] | {"id": 7}),  # 14: an id that is not a string
        ],
    )
    corpus = CorpusConfig(
        name="lh", kind="lhotse", root=root, recordings=recordings, supervisions=supervisions
    )
    s = harvest([corpus], tmp_path / "out")
    rows = _rows(tmp_path / "out")
    assert sorted(rows) == sorted(LONG_UTTS[:2])
    rejects = sorted(_where(r) for r in _rejects(tmp_path / "out"))
    assert rejects == sorted(
        [
            ("recs.jsonl.gz:2", "sources", "unsupported_source", "remote"),
            ("recs.jsonl.gz:3", "line", "bad_json", None),
            ("recs.jsonl.gz:4", "sampling_rate", "missing_field", "norate"),
            ("recs.jsonl.gz:6", "text", "no_transcript", "lone"),
            ("recs.jsonl.gz:7", "id", "duplicate_recording_id", "long"),
            ("sups.jsonl:3", "text", "no_transcript", LONG_UTTS[2]),
            ("sups.jsonl:4", "recording_id", "unknown_recording", "ghost"),
            ("sups.jsonl:5", "start", "segment_out_of_range", "late"),
            ("sups.jsonl:6", "recording_id", "bad_recording", "far"),
            ("sups.jsonl:7", "text", "non_utf8_transcript", None),
            ("sups.jsonl:8", "recording_id", "missing_field", "x"),
            ("sups.jsonl:10", "audio", "outside_root", "out"),
            ("sups.jsonl:11", "utt_id", "duplicate_utt_id", LONG_UTTS[1]),
            ("sups.jsonl:12", "line", "bad_json", None),
            ("sups.jsonl:13", "start", "bad_value", "words"),
            ("sups.jsonl:14", "id", "bad_value", None),
        ]
    )
    assert s.rejects == len(rejects) and s.transcripts == 2
    by = {r["utt_id"]: r for r in _rejects(tmp_path / "out")}
    assert "recs.jsonl.gz:1" in by["long"]["detail"]  # where the first came from
    assert "lasts" in by["late"]["detail"] and "14.000s" in by["late"]["detail"]
    assert str(outside) in by["out"]["detail"] and str(root) in by["out"]["detail"]


def test_lhotse_cut_kinds_the_harvest_cannot_read_and_a_cut_short_gzip_are_rejects(tmp_path):
    root = tmp_path / "corpus"
    rec, sups = _segments(root)
    cuts = CutSet.from_manifests(
        recordings=RecordingSet.from_recordings([rec]), supervisions=SupervisionSet.from_segments(sups)
    ).trim_to_supervisions(keep_overlapping=False)
    a, b, c = list(cuts)
    mixed = a.mix(b, offset_other_by=0.5)  # a MixedCut: two recordings overlaid, no one file holds it
    padded = a.pad(duration=a.duration + 2.0).tracks[1].cut  # a PaddingCut: silence, no audio file
    off_end = c.to_dict() | {"id": "off", "start": 10.0}  # past the recording's end
    no_start = b.to_dict()  # a supervision in a cut whose start is not a number
    no_start["supervisions"] = [no_start["supervisions"][0] | {"start": "0"}]
    lines = [
        json.dumps(a.to_dict()),
        json.dumps(mixed.to_dict()),
        json.dumps(padded.to_dict()),
        json.dumps(off_end),
    ]
    lines += [json.dumps(b.to_dict()), json.dumps(no_start)]
    whole = _jsonl(tmp_path / "cuts.jsonl.gz", lines)
    # a gzip file of two members (as `cat a.gz b.gz` makes), the second broken off: lines 1-4 whole, 5 cut short
    cut_short = tmp_path / "short.jsonl.gz"
    head, tail = ("".join(ln + "\n" for ln in part).encode() for part in (lines[:4], lines[4:5]))
    cut_short.write_bytes(gzip.compress(head) + gzip.compress(tail)[:-10])

    harvest([CorpusConfig(name="lh", kind="lhotse", root=root, cuts=whole)], tmp_path / "whole")
    assert sorted(_rows(tmp_path / "whole")) == sorted(LONG_UTTS[:2])
    assert sorted(_where(r) for r in _rejects(tmp_path / "whole")) == [
        ("cuts.jsonl.gz:2", "type", "unsupported_cut", mixed.id),
        ("cuts.jsonl.gz:3", "type", "unsupported_cut", padded.id),
        ("cuts.jsonl.gz:4", "supervisions[0].start", "segment_out_of_range", LONG_UTTS[2]),
        ("cuts.jsonl.gz:6", "supervisions[0].start", "bad_value", LONG_UTTS[1]),
    ]
    harvest([CorpusConfig(name="lh", kind="lhotse", root=root, cuts=cut_short)], tmp_path / "short")
    assert sorted(_rows(tmp_path / "short")) == [LONG_UTTS[0]]  # the lines before the break are kept
    last = _rejects(tmp_path / "short")[-1]
    assert (last["source"], last["field"], last["reason"]) == (str(cut_short), "manifest", "bad_manifest")
    assert last["detail"].startswith("after line 4")


def test_lhotse_config_needs_its_manifests_and_names_the_key(tmp_path):
    def load(corpus: str):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"name: x\ncorpora: [{corpus}]\nmodels: {{tiny: {{}}}}\n")
        return load_config(cfg)

    with pytest.raises(ValueError, match="kind lhotse needs supervisions"):
        load("{name: a, kind: lhotse, root: d, recordings: r.jsonl.gz}")
    with pytest.raises(ValueError, match="kind lhotse needs recordings"):
        load("{name: a, kind: lhotse, root: d, supervisions: s.jsonl.gz}")
    with pytest.raises(ValueError, match="not both"):
        load("{name: a, kind: lhotse, root: d, cuts: c.jsonl.gz, recordings: r.jsonl.gz}")
    with pytest.raises(ValueError, match="cuts is a key of kind lhotse, not librispeech"):
        load("{name: a, kind: librispeech, root: d, cuts: c.jsonl.gz}")
    cfg = load("{name: a, kind: lhotse, root: d, cuts: m/c.jsonl.gz}")
    assert cfg.corpora[0].cuts == tmp_path / "m" / "c.jsonl.gz"  # relative to the config, like every path


@pytest.fixture(scope="module")
def built(harvested, tiny_config, tmp_path_factory):
    """A real small work dir: the demo transcripts, three of the reference's own answers imported onto them,
    and the examples build makes from both (no LLM needed)."""
    work = tmp_path_factory.mktemp("built")
    paths = WorkPaths(work)
    (work / "harvest").mkdir()
    shutil.copytree(WorkPaths(harvested).harvest.transcripts, paths.harvest.transcripts)
    tr = [
        t
        for t in read_table(paths.harvest.transcripts, TRANSCRIPTS).to_pylist()
        if "/LibriSpeech/" in t["audio_path"]
    ]
    sample = [json.loads(ln) for ln in SAMPLE.read_text().splitlines()[:3]]
    manifest = work / "ref.jsonl"
    manifest.write_text(
        "".join(
            json.dumps(
                {
                    "instruction": r["instruction"],
                    "audio": t["audio_path"].split(f"{DEMO}/")[1],
                    "text": r["text"],
                }
            )
            + "\n"
            for r, t in zip(sample, tr[:3], strict=True)
        )
    )
    import_reference(manifest, DEMO, paths.harvest.transcripts, paths.imported, load_catalog())
    (work / "generate").mkdir()
    write_table(to_table([], RESPONSES), paths.generate.responses, RESPONSES)
    build = BuildConfig(tasks=["asr", "continuation", "repeat", "sentiment"], eval_splits=["test-clean"])
    run_stage("build", tiny_config.model_copy(update={"build": build}), work)
    return work


def test_lhotse_export_of_a_built_work_dir_loads_back_in_lhotse(built, tmp_path):
    out = tmp_path / "cuts"
    runner = CliRunner().invoke(main, ["export", "lhotse", "--workdir", str(built), "--out", str(out)])
    assert runner.exit_code == 0, runner.output
    paths = WorkPaths(built)
    examples = {r["example_id"]: r for r in pq.read_table(paths.build.examples).to_pylist()}
    transcripts = {r["utt_id"]: r for r in pq.read_table(paths.harvest.transcripts).to_pylist()}
    assert sum(e["task"] != "asr" for e in examples.values()) == 3  # the imported answers are there

    ex_cuts = lhotse.load_manifest(cuts_file(out, "examples"))
    assert isinstance(ex_cuts, CutSet) and len(ex_cuts) == len(examples)
    for cut in ex_cuts:
        e = examples[cut.id]
        (sup,) = cut.supervisions
        want = {
            k: e[k]
            for k in ("example_id", "utt_id", "split", "task", "instruction", "answer", "prefix", "suffix")
        }
        assert sup.custom == want and sup.text == e["transcript"] and sup.speaker == e["speaker"]
        assert (cut.start, cut.duration) == (e["offset_s"], e["duration_s"])
        assert cut.recording.sources[0].source == e["audio_path"]
    imported = [c for c in ex_cuts if c.supervisions[0].custom["task"] != "asr"]
    assert all(c.supervisions[0].custom["answer"] != c.supervisions[0].text for c in imported)

    tr_cuts = CutSet.from_file(cuts_file(out, "transcripts"))
    assert len(tr_cuts) == len(transcripts) == PartsTable.open(paths.harvest.transcripts, TRANSCRIPTS).rows
    for cut in tr_cuts:
        t = transcripts[cut.id]
        (sup,) = cut.supervisions
        assert (
            sup.text == t["text_raw"]
            and sup.custom["text"] == t["text"]
            and sup.custom["split"] == t["split"]
        )
        assert cut.recording.sampling_rate == t["sample_rate_hz"]
    # lhotse loads the same audio the harvest's loader does (the demo's clips: 16 kHz and 22.05 kHz, mono)
    for cut in tr_cuts:
        t = transcripts[cut.id]
        x = cut.resample(16000).load_audio()[0]
        y = audio.load(t["audio_path"], t["offset_s"], t["duration_s"])
        assert abs(len(x) - len(y)) <= 2
        n = min(len(x), len(y))
        if t["sample_rate_hz"] == 16000:
            assert np.abs(x[:n] - y[:n]).max() < 1e-4


def test_lhotse_export_errors_name_the_missing_outputs_and_the_row(harvested, tmp_path):
    runner = CliRunner().invoke(
        main, ["export", "lhotse", "--workdir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    )
    assert runner.exit_code != 0
    assert (
        "harvest/transcripts" in runner.output
        and "examples.parquet" in runner.output
        and "splsm harvest" in runner.output
    )

    work = tmp_path / "w"
    rows = read_table(WorkPaths(harvested).harvest.transcripts, TRANSCRIPTS).to_pylist()
    rows[3]["audio_path"] = str(tmp_path / "gone.flac")
    (work / "harvest").mkdir(parents=True)
    write_table(to_table(rows, TRANSCRIPTS), WorkPaths(work).harvest.transcripts, TRANSCRIPTS)
    runner = CliRunner().invoke(
        main, ["export", "lhotse", "--workdir", str(work), "--out", str(tmp_path / "o")]
    )
    assert runner.exit_code != 0
    assert f"row 3 ({rows[3]['utt_id']}" in runner.output and "gone.flac" in runner.output
    assert not cuts_file(tmp_path / "o", "transcripts").exists()  # nothing half-written
