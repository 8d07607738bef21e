import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import DEMO, LIBRISPEECH, copy_librispeech, run_stage
from core.config import CorpusConfig
from core.tables import read_table
from schemas import REJECTS, TRANSCRIPTS
from stages.harvest.driver import harvest, print_summary

# Durations and sample counts of the LibriSpeech fixture, from its own README (not computed by us).
FIXTURE_SAMPLES = {"1988-24833-0000": 53120, "2412-153948-0000": 186560, "3752-4944-0002": 51600}


def test_librispeech_layout_on_real_clips(tmp_path):
    corpus = CorpusConfig(name="ls", kind="librispeech", root=LIBRISPEECH)
    s = harvest([corpus], tmp_path)
    rows = {r["utt_id"]: r for r in read_table(tmp_path / "transcripts", TRANSCRIPTS).to_pylist()}
    assert s.transcripts == 10 and s.rejects == 0 and len(rows) == 10
    for utt, samples in FIXTURE_SAMPLES.items():
        assert rows[utt]["duration_s"] == pytest.approx(samples / 16000)
        assert rows[utt]["sample_rate_hz"] == 16000
    r = rows["1988-24833-0002"]
    assert (
        r["text_raw"]
        == "SHE DOESN'T PICK THEM UP BUT JUST HAVING THEM IN THE ROOM SURE DOESN'T GIVE HER ASTHMA"
    )
    assert (
        r["text"] == "she doesn't pick them up but just having them in the room sure doesn't give her asthma"
    )
    assert (
        r["text_norm"]
        == "she does not pick them up but just having them in the room sure does not give her asthma"
    )
    assert (r["speaker"], r["split"], r["corpus"], r["text_source"]) == (
        "1988",
        "dev-clean-2",
        "ls",
        "corpus",
    )
    assert Path(r["audio_path"]).is_file()


def test_reference_jsonl_manifest_on_real_clips(tmp_path):
    corpus = CorpusConfig(
        name="tc", kind="jsonl", root=DEMO, manifest=DEMO / "test-clean.jsonl", split="test-clean"
    )
    harvest([corpus], tmp_path)
    rows = read_table(tmp_path / "transcripts", TRANSCRIPTS).to_pylist()
    assert [r["utt_id"] for r in rows] == ["1089-134686-0001", "1221-135766-0001", "1221-135766-0002"]
    # durations from the fixture's README
    assert [round(r["duration_s"], 3) for r in rows] == [6.625, 16.715, 4.825]


def test_seed_manifest_rows_with_missing_audio_are_rejects_not_crashes(tmp_path):
    seed = Path(__file__).resolve().parents[2] / "shared" / "seed-data" / "raw_manifest_example.jsonl"
    if not seed.exists():
        pytest.skip("shared seed data not beside the checkout")
    corpus = CorpusConfig(name="ref", kind="jsonl", root=tmp_path / "root", manifest=seed)
    (tmp_path / "root").mkdir()
    s = harvest([corpus], tmp_path / "out")
    n_lines = sum(1 for line in seed.read_text().splitlines() if line.strip())
    assert s.transcripts == 0 and s.rejects == n_lines
    assert set(s.reject_counts) <= {"missing_audio", "duplicate_utt_id", "empty_transcript"}


def test_bad_input_becomes_reject_rows_with_reasons(tmp_path, capsys):
    root = copy_librispeech(
        tmp_path / "corpus", ["1988-24833-0000", "1988-24833-0001", "3752-4944-0000", "3752-4944-0001"]
    )
    chap = root / "dev-clean-2" / "1988" / "24833"
    trans = chap / "1988-24833.trans.txt"
    # a transcript line with no audio, an empty transcript, a corrupt file, audio with no transcript line
    with open(trans, "a") as f:
        f.write("1988-24833-0009 THIS LINE HAS NO AUDIO\n")
        f.write("1988-24833-0001\n")
    shutil.copy(chap / "1988-24833-0001.flac", chap / "1988-24833-0007.flac")  # no transcript line
    trans.write_text(
        trans.read_text().replace("1988-24833-0001 ", "1988-24833-0006 ", 1)
    )  # line now without audio
    (chap / "1988-24833-0005.flac").write_bytes(b"fLaC" + bytes(range(256)) * 4)  # corrupt
    with open(trans, "a") as f:
        f.write("1988-24833-0005 A CORRUPT FILE\n")
    # a zero-length file
    spk2 = root / "dev-clean-2" / "3752" / "4944"
    (spk2 / "3752-4944-0008.flac").write_bytes(b"")
    with open(spk2 / "3752-4944.trans.txt", "ab") as f:
        f.write(b"3752-4944-0008 EMPTY FILE\n")
        f.write(b"3752-4944-0009 NOT UTF8 \xff\xfe\n")
    # a manifest with a bad JSON line, a path escaping the root, a duplicate id, a missing text field
    manifest = tmp_path / "m.jsonl"
    good = spk2 / "3752-4944-0000.flac"
    manifest.write_text(
        "\n".join(
            [
                json.dumps({"audio": str(good.relative_to(root)), "text": "CAPTAIN FRERE"}),
                "{not json",
                json.dumps({"audio": "../../../etc/passwd", "text": "escape"}),
                json.dumps({"audio": str(good.relative_to(root))}),
                json.dumps({"id": "no-text", "audio": str(good.relative_to(root))}),
                json.dumps(
                    {"id": "via-link", "audio": "dev-clean-2/link.flac", "text": "a link out of the root"}
                ),
                json.dumps({"id": "silence", "audio": "dev-clean-2/silence.wav", "text": "nothing said"}),
            ]
        )
        + "\n"
    )
    outside = tmp_path / "outside.flac"
    shutil.copy(good, outside)
    (root / "dev-clean-2" / "link.flac").symlink_to(outside)  # exists, but resolves outside the root
    sf.write(str(root / "dev-clean-2" / "silence.wav"), np.zeros(0, dtype="int16"), 16000)
    corpora = [
        CorpusConfig(name="ls", kind="librispeech", root=root),
        CorpusConfig(name="m", kind="jsonl", root=root, manifest=manifest),
    ]
    s = harvest(corpora, tmp_path / "out", max_duration_s=5.0, min_duration_s=0.0)

    rejects = read_table(tmp_path / "out" / "rejects.parquet", REJECTS).to_pylist()
    by_utt = {(r["utt_id"], r["reason"]) for r in rejects}
    assert ("1988-24833-0009", "missing_audio") in by_utt
    assert ("1988-24833-0006", "missing_audio") in by_utt
    assert ("1988-24833-0001", "empty_transcript") in by_utt
    assert ("1988-24833-0005", "corrupt_audio") in by_utt
    assert ("1988-24833-0007", "no_transcript") in by_utt
    assert ("3752-4944-0008", "empty_audio") in by_utt  # a zero-length file
    assert ("silence", "empty_audio") in by_utt  # a valid header over no samples
    assert ("via-link", "outside_root") in by_utt
    assert any(
        r["reason"] == "non_utf8_transcript" and r["source"].endswith("3752-4944.trans.txt:4")
        for r in rejects
    )
    assert any(r["reason"] == "bad_json" and r["source"] == f"{manifest}:2" for r in rejects)
    assert any(r["reason"] == "outside_root" and r["source"] == f"{manifest}:3" for r in rejects)
    (dup,) = [r for r in rejects if r["reason"] == "duplicate_utt_id" and r["source"] == f"{manifest}:4"]
    assert dup["utt_id"] == "3752-4944-0000"
    # where the first came from: its line in the chapter's transcript file, told back from the packed form
    first = next(
        n
        for n, ln in enumerate((spk2 / "3752-4944.trans.txt").read_bytes().splitlines(), start=1)
        if ln.startswith(b"3752-4944-0000 ")
    )
    assert dup["detail"].endswith(f"already came from {spk2.resolve()}/3752-4944.trans.txt:{first}"), dup[
        "detail"
    ]
    assert any(
        (r["utt_id"], r["reason"], r["source"]) == ("no-text", "no_transcript", f"{manifest}:5")
        for r in rejects
    )
    # every candidate is either a transcript or a reject: nothing lost, nothing twice
    kept = [r["utt_id"] for r in read_table(tmp_path / "out" / "transcripts", TRANSCRIPTS).to_pylist()]
    assert sorted(kept) == ["1988-24833-0000", "3752-4944-0000", "3752-4944-0001"]
    assert s.rejects == len(rejects) == sum(s.reject_counts.values())
    assert s.reject_counts == dict(Counter(r["reason"] for r in rejects))
    for r in rejects:
        assert r["detail"] and r["field"]
    # the run ends with the count by reason
    print_summary(s)
    printed = capsys.readouterr().out
    assert "rejects by reason" in printed
    for reason, n in s.reject_counts.items():
        assert any(reason in line and line.rstrip(" │|").endswith(str(n)) for line in printed.splitlines())


def test_a_transcript_file_that_cannot_be_read_is_a_reject_naming_it_and_the_rest_is_harvested(tmp_path):
    root = copy_librispeech(tmp_path / "corpus", ["1988-24833-0000", "3752-4944-0000", "3752-4944-0001"])
    chap = root / "dev-clean-2" / "3752" / "4944"
    trans = chap / "3752-4944.trans.txt"
    trans.unlink()
    trans.symlink_to(tmp_path / "gone.txt")  # a dangling link where the chapter's transcripts were
    s = harvest([CorpusConfig(name="ls", kind="librispeech", root=root)], tmp_path / "out")

    assert s.transcripts == 1
    rejects = read_table(tmp_path / "out" / "rejects.parquet", REJECTS).to_pylist()
    unreadable = [r for r in rejects if r["reason"] == "unreadable_transcript"]
    assert len(unreadable) == 1 and unreadable[0]["source"] == f"{chap.resolve()}/3752-4944.trans.txt"
    assert unreadable[0]["field"] == "text" and "cannot read" in unreadable[0]["detail"]
    # the chapter's audio is still listed: without its lines each file is audio without a transcript
    assert sorted(r["utt_id"] for r in rejects if r["reason"] == "no_transcript") == [
        "3752-4944-0000",
        "3752-4944-0001",
    ]


def test_too_long_audio_is_rejected_with_the_bound(tmp_path):
    root = copy_librispeech(tmp_path / "c", ["2412-153948-0000", "3752-4944-0002"])  # 11.66 s and 3.2 s
    s = harvest([CorpusConfig(name="ls", kind="librispeech", root=root)], tmp_path / "o", max_duration_s=10.0)
    rejects = read_table(tmp_path / "o" / "rejects.parquet", REJECTS).to_pylist()
    assert s.transcripts == 1 and [(r["utt_id"], r["reason"]) for r in rejects] == [
        ("2412-153948-0000", "too_long")
    ]
    assert "11.66s" in rejects[0]["detail"]


def test_long_audio_cut_keeps_the_first_seconds_and_the_whole_transcript_and_a_policy_change_redoes_it(
    tmp_path,
):
    root = copy_librispeech(tmp_path / "c", ["2412-153948-0000", "3752-4944-0002"])  # 11.66 s and 3.2 s
    corpora = [CorpusConfig(name="ls", kind="librispeech", root=root)]
    cut = harvest(corpora, tmp_path / "o", max_duration_s=10.0, long_audio="cut")
    rows = {r["utt_id"]: r for r in read_table(tmp_path / "o" / "transcripts", TRANSCRIPTS).to_pylist()}
    assert (cut.transcripts, cut.rejects, cut.cut) == (2, 0, 1)
    long_, short = rows["2412-153948-0000"], rows["3752-4944-0002"]
    assert (long_["offset_s"], long_["duration_s"]) == (0.0, 10.0) and short["duration_s"] == pytest.approx(
        3.225
    )
    line = next(
        x
        for x in (root / "dev-clean-2" / "2412" / "153948" / "2412-153948.trans.txt").read_text().splitlines()
        if x.startswith("2412-153948-0000 ")
    )
    assert long_["text_raw"] == line.split(" ", 1)[1]  # the whole transcript, though the audio is cut
    again = harvest(corpora, tmp_path / "o", max_duration_s=10.0, long_audio="cut")
    assert (again.transcripts, again.reused, again.probed) == (2, 2, 0)
    # back to rejecting: the cut row is not reused as if it were short
    rejecting = harvest(corpora, tmp_path / "o", max_duration_s=10.0)
    assert rejecting.transcripts == 1 and rejecting.reject_counts == {"too_long": 1}


def test_harvest_stage_reuses_its_output_when_nothing_changed(tmp_path, tiny_config):
    first = run_stage("harvest", tiny_config, tmp_path)
    second = run_stage("harvest", tiny_config, tmp_path)
    assert not first.reused and second.reused
    assert first.summary["transcripts"] == 17 and first.summary["reject_counts"] == {"missing_audio": 2}
