"""Each corpus reader on real clips in that corpus's own layout, through the whole harvest."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import DEMO, LIBRISPEECH
from core import audio
from core.config import CorpusConfig, ManifestColumns
from core.tables import read_table
from schemas import REJECTS, TRANSCRIPTS
from stages.harvest.driver import harvest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CV = FIXTURES / "commonvoice-rit_engl_682" / "en"
LJ = DEMO / "LJSpeech-1.1"

# From the fixtures' READMEs (not computed by us).
CV_DURATIONS = {
    "common_voice_en_17765901": 4.320,
    "common_voice_en_19175551": 6.480,
    "common_voice_en_22060973": 2.352,
    "common_voice_en_495885": 2.976,
}
LJ_DURATIONS = {"LJ001-0002": 1.900, "LJ001-0004": 5.139, "LJ001-0007": 8.390, "LJ001-0008": 1.783}


def _rows(out: Path) -> dict[str, dict]:
    return {r["utt_id"]: r for r in read_table(out / "transcripts", TRANSCRIPTS).to_pylist()}


def _rejects(out: Path) -> list[dict]:
    return read_table(out / "rejects.parquet", REJECTS).to_pylist()


def test_common_voice_unquoted_tsv_keeps_a_sentence_that_begins_with_a_quote(tmp_path):
    s = harvest([CorpusConfig(name="cv", kind="commonvoice", root=CV, tsvs=["validated"])], tmp_path)
    rows = _rows(tmp_path)
    assert s.transcripts == 12 and s.rejects == 0
    obake = rows["common_voice_en_19175551"]
    assert obake["text_raw"] == '"Obake karuta" is an obsolete variation of Iroha Karuta unique to Tokyo.'
    assert obake["text_norm"] == "obake karuta is an obsolete variation of iroha karuta unique to tokyo"
    assert rows["common_voice_en_22060973"]["text_raw"] == "one"
    for utt, dur in CV_DURATIONS.items():
        assert rows[utt]["duration_s"] == pytest.approx(dur, abs=1e-3)
    r = rows["common_voice_en_17765901"]
    assert r["split"] == "validated" and r["sample_rate_hz"] == 16000 and r["speaker"].startswith("2696eaab")
    assert r["audio_path"] == str((CV / "clips" / "common_voice_en_17765901.wav").resolve())


def test_common_voice_split_tsvs_give_splits_and_a_bad_row_is_a_reject(tmp_path):
    root = tmp_path / "en"
    shutil.copytree(CV / "clips", root / "clips")
    header, *lines = (CV / "validated.tsv").read_text().splitlines()
    (root / "train.tsv").write_text("\n".join([header, *lines[:8]]) + "\n")
    (root / "dev.tsv").write_text("\n".join([header, *lines[8:10], "only\ttwo fields"]) + "\n")
    (root / "test.tsv").write_text("\n".join([header, *lines[10:]]) + "\n")
    s = harvest([CorpusConfig(name="cv", kind="commonvoice", root=root)], tmp_path / "out")
    rows = _rows(tmp_path / "out")
    splits = [r["split"] for r in rows.values()]
    assert (splits.count("train"), splits.count("dev"), splits.count("test")) == (8, 2, 2)
    (bad,) = _rejects(tmp_path / "out")
    assert bad["reason"] == "bad_row" and bad["source"] == f"{root / 'dev.tsv'}:4"
    assert s.transcripts == 12


def test_ljspeech_metadata_uses_the_normalized_field_by_default(tmp_path):
    harvest([CorpusConfig(name="lj", kind="ljspeech", root=LJ)], tmp_path / "n")
    rows = _rows(tmp_path / "n")
    assert sorted(rows) == sorted(LJ_DURATIONS)
    for utt, dur in LJ_DURATIONS.items():
        assert rows[utt]["duration_s"] == pytest.approx(dur, abs=1e-3)
        assert rows[utt]["sample_rate_hz"] == 22050 and rows[utt]["speaker"] == "LJ"
    assert "fourteen fifty-five" in rows["LJ001-0007"]["text_raw"]
    harvest([CorpusConfig(name="lj", kind="ljspeech", root=LJ, text_field="raw")], tmp_path / "r")
    assert "1455" in _rows(tmp_path / "r")["LJ001-0007"]["text_raw"]


def test_reference_manifest_with_frame_ranges(tmp_path):
    manifest = tmp_path / "m.jsonl"
    text = "AFTER EARLY NIGHTFALL THE YELLOW LAMPS WOULD LIGHT UP HERE AND THERE THE SQUALID QUARTER OF THE BROTHELS"
    manifest.write_text(
        json.dumps({"audio": "test-clean/1089-134686-0001.wav", "text": text})
        + "\n"
        + json.dumps({"audio": "test-clean/1089-134686-0001.wav:16000:32000", "text": "AFTER EARLY"})
        + "\n"
    )
    harvest([CorpusConfig(name="ref", kind="jsonl", root=DEMO, manifest=manifest)], tmp_path / "o")
    rows = _rows(tmp_path / "o")
    assert rows["1089-134686-0001"]["duration_s"] == pytest.approx(6.625)  # the fixture's README
    seg = rows["1089-134686-0001_16000"]
    assert (seg["offset_s"], seg["duration_s"]) == (1.0, 2.0)
    assert len(audio.load(seg["audio_path"], seg["offset_s"], seg["duration_s"])) == 32000


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_generic_manifest_with_named_columns(tmp_path, fmt):
    flac = "dev-clean-2/3752/4944/3752-4944-0000.flac"
    rows = [
        {
            "key": "a",
            "file": flac,
            "sentence": "Captain Frere says, that the scenery is delightful.",
            "spk": "3752",
        },
        {"key": "b", "file": flac, "sentence": "", "spk": "3752"},
        {"key": "c", "file": flac, "sentence": "Captain Frere", "spk": "3752", "start": "0.5", "dur": "1.25"},
    ]
    cols = ["key", "file", "sentence", "spk", "start", "dur"]
    manifest = tmp_path / f"m.{fmt}"
    if fmt == "csv":
        body = [",".join(cols)] + [",".join(f'"{r.get(c, "")}"' for c in cols) for r in rows]
    else:
        body = [json.dumps(r) for r in rows]
    manifest.write_text("\n".join(body) + "\n")
    columns = ManifestColumns(
        audio="file", text="sentence", id="key", speaker="spk", offset="start", duration="dur"
    )
    corpus = CorpusConfig(name="g", kind="manifest", root=LIBRISPEECH, manifest=manifest, columns=columns)
    harvest([corpus], tmp_path / "o")
    out = _rows(tmp_path / "o")
    assert sorted(out) == ["a", "c"]
    assert out["a"]["text_raw"] == "Captain Frere says, that the scenery is delightful."
    assert out["a"]["duration_s"] == pytest.approx(53360 / 16000)  # LibriSpeech README
    assert (out["c"]["offset_s"], out["c"]["duration_s"], out["c"]["speaker"]) == (0.5, 1.25, "3752")
    (rej,) = _rejects(tmp_path / "o")
    line = 3 if fmt == "csv" else 2  # the CSV has a header line
    assert (rej["utt_id"], rej["reason"], rej["source"]) == ("b", "empty_transcript", f"{manifest}:{line}")


LS_TEXT = {  # LibriSpeech README transcripts, with GigaSpeech's punctuation tags added
    "1988-24833-0000": "THE TWO STRAY KITTENS GRADUALLY MAKE THEMSELVES AT HOME <PERIOD>",
    "3752-4944-0000": "CAPTAIN FRERE SAYS <COMMA> THAT THE SCENERY IS DELIGHTFUL <EXCLAMATIONPOINT>",
    "3752-4944-0001": "ABANDONED INDEED BY GOD AND MAN <QUESTIONMARK>",
}


def _long_opus(path: Path, utts: list[str]) -> list[tuple[float, float]]:
    """Real clips end to end in one opus file, as GigaSpeech stores a podcast; returns each one's (begin, end)."""
    clips, spans, t = [], [], 0.0
    for utt in utts:
        spk, chap, _ = utt.split("-")
        x, sr = sf.read(str(LIBRISPEECH / "dev-clean-2" / spk / chap / f"{utt}.flac"), dtype="float32")
        clips.append(x)
        spans.append((t, t + len(x) / sr))
        t += len(x) / sr
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.concatenate(clips), 16000, format="OGG", subtype="OPUS")
    return spans


def test_gigaspeech_json_segments_of_a_long_opus(tmp_path):
    root = tmp_path / "GigaSpeech"
    utts = list(LS_TEXT)
    spans = _long_opus(root / "audio" / "podcast" / "P0000" / "POD0000000001.opus", utts)
    segs = [
        {
            "sid": f"POD0000000001_S{i:07d}",
            "speaker": "N/A",
            "begin_time": round(b, 4),
            "end_time": round(e, 4),
            "text_tn": LS_TEXT[u],
            "subsets": ["{XL}", "{L}", "{M}", "{S}", "{XS}"],
        }
        for i, (u, (b, e)) in enumerate(zip(utts, spans, strict=True))
    ]
    segs[2]["subsets"] = ["{XL}", "{L}"]  # not in XS
    segs.append(  # a garbage utterance: music, no words
        {
            "sid": "POD0000000001_S0000003",
            "speaker": "N/A",
            "begin_time": 0.0,
            "end_time": 1.0,
            "text_tn": "<MUSIC>",
            "subsets": ["{XL}", "{L}", "{M}", "{S}", "{XS}"],
        }
    )
    meta = {
        "dataset": "GigaSpeech",
        "language": "EN",
        "version": "v1.0.0",
        "audios": [
            {
                "title": "a podcast",
                "url": "https://example.invalid/p1",
                "path": "audio/podcast/P0000/POD0000000001.opus",
                "aid": "POD0000000001",
                "source": "podcast",
                "speaker": "N/A",
                "duration": round(spans[-1][1], 4),
                "subsets": ["{XL}", "{L}", "{M}", "{S}", "{XS}"],
                "segments": segs,
            }
        ],
    }
    (root / "GigaSpeech.json").write_text(json.dumps(meta))
    s = harvest([CorpusConfig(name="giga", kind="gigaspeech", root=root, subset="XS")], tmp_path / "xs")
    rows = _rows(tmp_path / "xs")
    assert sorted(rows) == ["POD0000000001_S0000000", "POD0000000001_S0000001"]
    a, b = rows["POD0000000001_S0000000"], rows["POD0000000001_S0000001"]
    assert a["text"] == "the two stray kittens gradually make themselves at home."
    assert b["text"] == "captain frere says, that the scenery is delightful!"
    assert b["text_norm"] == "captain frere says that the scenery is delightful"
    assert a["text_raw"] == LS_TEXT["1988-24833-0000"] and a["speaker"] is None and a["split"] == "xs"
    assert b["offset_s"] == pytest.approx(53120 / 16000, abs=1e-4)  # the first clip's length (README)
    assert b["duration_s"] == pytest.approx(53360 / 16000, abs=1e-4)
    assert a["audio_path"] == b["audio_path"] and s.probed == 1  # one long file, probed once
    clip = audio.load(b["audio_path"], b["offset_s"], b["duration_s"])
    assert len(clip) == pytest.approx(53360, abs=2)
    (garbage,) = _rejects(tmp_path / "xs")
    assert garbage["reason"] == "garbage_utterance" and "<MUSIC>" in garbage["detail"]
    harvest([CorpusConfig(name="giga", kind="gigaspeech", root=root, subset="L")], tmp_path / "l")
    assert len(_rows(tmp_path / "l")) == 3


def _giga_meta(n_audios: int, segs_per_audio: int) -> dict:
    return {
        "dataset": "GigaSpeech",
        "audios": [
            {
                "path": f"audio/podcast/P0000/POD{a:010d}.opus",
                "aid": f"POD{a:010d}",
                "speaker": "N/A",
                "subsets": ["{XL}", "{L}", "{M}", "{S}", "{XS}"],
                "segments": [
                    {
                        "sid": f"POD{a:010d}_S{s:07d}",
                        "begin_time": s * 5.0,
                        "end_time": s * 5.0 + 4.5,
                        "text_tn": "AS I WAS SAYING <COMMA> THE METADATA OF A WHOLE CORPUS IS LONG <PERIOD>",
                        "subsets": ["{XL}", "{L}", "{M}", "{S}", "{XS}"],
                    }
                    for s in range(segs_per_audio)
                ],
            }
            for a in range(n_audios)
        ],
    }


def test_gigaspeech_json_cut_short_keeps_what_came_before_and_says_where(tmp_path):
    from stages.harvest.corpora import gigaspeech

    meta = tmp_path / "GigaSpeech.json"
    text = json.dumps(_giga_meta(3, 2))
    meta.write_text(text[: text.index('"POD0000000002_S0000001"') + 10])  # breaks off in the last audio
    items = list(gigaspeech.read(CorpusConfig(name="g", kind="gigaspeech", root=tmp_path, subset="XS")))
    good = [i for i in items if not hasattr(i, "reason")]
    assert [c.utt_id for c in good] == [f"POD{a:010d}_S{s:07d}" for a in range(2) for s in range(2)]
    (bad,) = [i for i in items if hasattr(i, "reason")]
    assert bad.reason == "bad_json" and bad.source == str(meta) and "after audios[1]" in bad.detail

    meta.write_text('{"dataset": "GigaSpeech"}')  # valid JSON, but nothing to harvest: said, not silent
    (empty,) = gigaspeech.read(CorpusConfig(name="g", kind="gigaspeech", root=tmp_path, subset="XS"))
    assert empty.reason == "missing_field" and empty.field == "audios"


def test_gigaspeech_json_is_streamed_in_bounded_memory(tmp_path):
    """The whole corpus's GigaSpeech.json runs to gigabytes: reading it must not hold it in memory."""
    import tracemalloc

    from stages.harvest.corpora import gigaspeech

    meta = tmp_path / "GigaSpeech.json"
    with open(meta, "w") as f:
        json.dump(_giga_meta(5000, 10), f)
    size = meta.stat().st_size
    assert size > 10 * 2**20
    cfg = CorpusConfig(name="g", kind="gigaspeech", root=tmp_path, subset="XS")
    # Once untraced first: process-wide caches (pathlib interns each path part, and the interned-string
    # table grows in steps whose size depends on what earlier tests did) are not the reader's memory.
    sum(1 for _ in gigaspeech.read(cfg))
    tracemalloc.start()
    try:
        n = sum(1 for _ in gigaspeech.read(cfg))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 50_000
    # parsed whole, the Python objects alone would take several times the file; streamed, a few MiB at most
    assert peak < size / 10, f"peak {peak / 2**20:.1f} MiB reading a {size / 2**20:.1f} MiB file"


def test_gigaspeech_segment_that_is_not_an_object_is_a_reject(tmp_path):
    from stages.harvest.corpora import gigaspeech

    meta = _giga_meta(1, 2)
    meta["audios"][0]["segments"].insert(1, "POD0000000000_S0000009")  # a bare string, not a segment
    (tmp_path / "GigaSpeech.json").write_text(json.dumps(meta))
    items = list(gigaspeech.read(CorpusConfig(name="g", kind="gigaspeech", root=tmp_path, subset="XS")))
    assert [i.utt_id for i in items if not hasattr(i, "reason")] == [
        "POD0000000000_S0000000",
        "POD0000000000_S0000001",
    ]
    (bad,) = [i for i in items if hasattr(i, "reason")]
    assert bad.reason == "bad_row" and bad.source.endswith("audios[0].segments[1]")


def test_reader_ids_follow_pathlibs_stem_rule():
    """Readers take ids from file names with os.path (per row of million-row manifests), as Path.stem would."""
    from stages.harvest.corpora.records import stem

    for p in [
        "a/b.flac",
        "b",
        ".hidden",
        "a.tar.gz",
        "x/y/",
        "clips/u1.mp3",
        "a/b.",
        "..",
        "a/..b",
        "...",
        "c/.b.c",
    ]:
        assert stem(p) == Path(p).stem, p
