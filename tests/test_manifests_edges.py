"""The manifest readers row by row: what each odd line of a reference, JSONL, CSV or TSV manifest becomes.

The readers are called directly (no audio is opened): every expected candidate and reject below is written
out by hand from the manifest lines it comes from.
"""

import json
import shutil
from pathlib import Path

import pytest

from core.config import CorpusConfig, ManifestColumns
from stages.harvest.corpora.manifests import read_generic, read_reference
from stages.harvest.corpora.records import Candidate, Reject

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CV = FIXTURES / "commonvoice-rit_engl_682" / "en"
# The first line of the reference's own manifest (GitHub ytf-philp/Self-powered-LSM, commit 5c8b390,
# src/data_process/raw_data_example/data.jsonl), byte for byte
REFERENCE_LINE = (
    '{"audio": "self-powered/data/LibriSpeech/train-other-500/8444/283136/8444-283136-0011.flac", '
    '"text": "or can be disinterested that the most generous friendship however sincere is a modification '
    'of self love and that even unknown to ourselves"}'
)


def _write(path: Path, lines: list[bytes | str]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


@pytest.mark.parametrize(
    "audio, path, frames, utt_id",
    [
        ("test-clean/1089-134686-0001.wav", "test-clean/1089-134686-0001.wav", None, "1089-134686-0001"),
        (
            "test-clean/1089-134686-0001.wav:16000:32000",
            "test-clean/1089-134686-0001.wav",
            (16000, 32000),
            "1089-134686-0001_16000",
        ),
        # a colon in a folder name: only the last two fields are the frame range
        ("takes:2024-01-05/a.wav:0:16000", "takes:2024-01-05/a.wav", (0, 16000), "a_0"),
        ("takes:2024-01-05/a.wav", "takes:2024-01-05/a.wav", None, "a"),
        # not two whole numbers after the path: the whole value is the path
        ("a.wav:x:16000", "a.wav:x:16000", None, "a"),
        ("a.wav:16000:x", "a.wav:16000:x", None, "a"),
        ("a.wav:16000", "a.wav:16000", None, "a"),
        ("a.wav:-5:16000", "a.wav:-5:16000", None, "a"),
    ],
)
def test_reference_audio_field_is_a_path_with_an_optional_start_and_frame_count(
    tmp_path, audio, path, frames, utt_id
):
    manifest = _write(tmp_path / "dev.jsonl", [json.dumps({"audio": audio, "text": "HELLO"})])
    corpus = CorpusConfig(name="ref", kind="jsonl", root=tmp_path / "root", manifest=manifest)
    assert list(read_reference(corpus)) == [
        Candidate(
            utt_id, "ref", "dev", f"{tmp_path}/root/{path}", "HELLO", None, f"{manifest}:1", frames=frames
        )
    ]


def test_every_bad_line_of_a_reference_manifest_is_one_reject_and_the_lines_after_it_are_read(tmp_path):
    m = _write(
        tmp_path / "train.jsonl",
        [
            REFERENCE_LINE,
            "",  # blank: skipped
            b'{"audio": "x3.wav", "text": "caf\xe9"}',  # Latin-1, not UTF-8
            '{"audio": ',
            '["x5.wav", "a list, not an object"]',
            '{"text": "no audio key"}',
            '{"audio": "", "text": "empty audio"}',
            '{"audio": 7, "text": "audio is a number"}',
            '{"audio": "x9.wav", "text": 5, "speaker": "s9"}',
            '{"audio": "x10.wav", "speaker": 103}',  # no text: Whisper's to label
        ],
    )
    root = tmp_path / "root"
    corpus = CorpusConfig(name="ref", kind="jsonl", root=root, manifest=m)
    ls = "self-powered/data/LibriSpeech/train-other-500/8444/283136/8444-283136-0011.flac"
    text = (
        "or can be disinterested that the most generous friendship however sincere is a modification "
        "of self love and that even unknown to ourselves"
    )
    no_audio = "no 'audio' string in the row"
    assert list(read_reference(corpus)) == [
        Candidate("8444-283136-0011", "ref", "train", f"{root}/{ls}", text, None, f"{m}:1"),
        Reject(
            "ref",
            f"{m}:3",
            None,
            "text",
            "non_utf8_transcript",
            "'utf-8' codec can't decode byte 0xe9 in position 32: invalid continuation byte",
        ),
        # json reads the line with its newline, so the value it expected is on its "line 2"
        Reject("ref", f"{m}:4", None, "line", "bad_json", "Expecting value: line 2 column 1 (char 11)"),
        Reject("ref", f"{m}:5", None, "line", "bad_json", "the line is not a JSON object"),
        Reject("ref", f"{m}:6", None, "audio", "missing_field", no_audio),
        Reject("ref", f"{m}:7", None, "audio", "missing_field", no_audio),
        Reject("ref", f"{m}:8", None, "audio", "missing_field", no_audio),
        Reject("ref", f"{m}:9", "x9", "text", "bad_value", "'text' is a int"),
        Candidate("x10", "ref", "train", f"{root}/x10.wav", None, "103", f"{m}:10"),
    ]


@pytest.mark.parametrize("reader, kind", [(read_reference, "jsonl"), (read_generic, "manifest")])
def test_a_missing_manifest_is_one_reject_naming_it(tmp_path, reader, kind):
    gone = tmp_path / "gone.jsonl"
    corpus = CorpusConfig(name="c1", kind=kind, root=tmp_path, manifest=gone)
    assert list(reader(corpus)) == [
        Reject("c1", str(gone), None, "manifest", "missing_manifest", f"manifest {gone} does not exist")
    ]


def test_a_common_voice_tsv_read_as_a_generic_manifest_keeps_its_quotes_and_its_empty_last_column(tmp_path):
    """Common Voice's validated.tsv is unquoted TSV whose last column (segment) is empty on every row."""
    manifest = tmp_path / "validated.tsv"
    shutil.copy(CV / "validated.tsv", manifest)
    cols = ManifestColumns(audio="path", text="sentence", speaker="client_id")
    corpus = CorpusConfig(name="cv", kind="manifest", root=CV / "clips", manifest=manifest, columns=cols)
    items = list(read_generic(corpus))
    assert [type(i) for i in items] == [Candidate] * 12  # 13 lines, the first the header
    obake, god = items[4], items[1]
    assert (obake.utt_id, obake.text_raw, obake.source) == (
        "common_voice_en_19175551",
        '"Obake karuta" is an obsolete variation of Iroha Karuta unique to Tokyo.',
        f"{manifest}:6",
    )
    assert (god.utt_id, god.split, god.audio_path, god.text_raw, god.offset_s, god.duration_s) == (
        "common_voice_en_17765901",
        "validated",
        f"{CV / 'clips'}/common_voice_en_17765901.wav",
        "God bless my soul!",
        0.0,
        None,
    )
    assert god.speaker.startswith("2696eaab") and len(god.speaker) == 128


def test_odd_lines_of_a_csv_manifest(tmp_path):
    m = _write(
        tmp_path / "dev.csv",
        [
            "path,transcript",
            "",  # blank: skipped
            b"u3.wav,caf\xe9",  # Latin-1, not UTF-8
            "u4.wav,one,two",
            "u5.wav,stray\rreturn",  # a carriage return inside a field, outside quotes
            'u6.wav,"unterminated',  # a quote never closed: a cell cannot span lines
            "u7.wav,MALCOLM X",
            "u8.wav,trailing space ",
            b"u9.wav,windows\r",  # a CRLF line
            "u10.wav,",
        ],
    )
    root = tmp_path / "root"
    cols = ManifestColumns(audio="path", text="transcript")
    corpus = CorpusConfig(name="c", kind="manifest", root=root, manifest=m, columns=cols)

    def ok(n: int, text: str) -> Candidate:
        return Candidate(f"u{n}", "c", "dev", f"{root}/u{n}.wav", text, None, f"{m}:{n}")

    assert list(read_generic(corpus)) == [
        Reject(
            "c",
            f"{m}:3",
            None,
            "text",
            "non_utf8_transcript",
            "'utf-8' codec can't decode byte 0xe9 in position 10: invalid continuation byte",
        ),
        Reject("c", f"{m}:4", None, "line", "bad_row", "3 fields, the header has 2"),
        Reject(
            "c",
            f"{m}:5",
            None,
            "line",
            "bad_row",
            "new-line character seen in unquoted field - do you need to open the file in universal-newline mode?",
        ),
        ok(6, "unterminated"),
        ok(7, "MALCOLM X"),
        ok(8, "trailing space "),
        ok(9, "windows"),
        ok(10, ""),  # an empty transcript: admission rejects it, with the utterance named
    ]


def test_generic_manifest_columns_and_the_ids_made_when_a_row_has_none(tmp_path):
    rows = [
        {"file": "a/u1.flac", "sentence": "all columns", "key": "k1", "spk": "s1", "start": 1.5, "dur": 2},
        {"file": "a/u2.flac", "sentence": "no id, a start", "start": 1.5},
        {"file": "a/u3.flac", "sentence": "no id, start 0", "start": 0},
        {"file": "a/u4.flac", "sentence": "an empty id", "key": ""},
        {"file": "a/u5.flac", "key": "k5"},
        {"file": "a/u6.flac", "sentence": 5, "key": "k6"},
        {"file": "a/u7.flac", "sentence": ["x"], "key": 1.5},
        {"file": "", "sentence": "empty audio"},
        {"file": 3, "sentence": "numeric audio"},
        {"file": "a/u10.flac", "spk": ""},
        {"file": "a/u11.flac", "start": "soon"},
        {"file": "a/u12.flac", "dur": 0},
        {"file": "/abs/u13.flac", "spk": 103, "start": 0.25, "dur": 1.0},
    ]
    m = _write(tmp_path / "train.jsonl", [json.dumps(r) for r in rows])
    root = tmp_path / "root"
    cols = ManifestColumns(
        audio="file", text="sentence", id="key", speaker="spk", offset="start", duration="dur"
    )
    corpus = CorpusConfig(name="g", kind="manifest", root=root, manifest=m, columns=cols)

    def cand(utt, n, text, speaker=None, offset=0.0, duration=None, path=None):
        path = path or f"{root}/a/u{n}.flac"
        return Candidate(
            utt, "g", "train", path, text, speaker, f"{m}:{n}", offset_s=offset, duration_s=duration
        )

    assert list(read_generic(corpus)) == [
        cand("k1", 1, "all columns", "s1", 1.5, 2.0),
        cand("u2_1500", 2, "no id, a start", offset=1.5),  # the start in milliseconds
        cand("u3", 3, "no id, start 0"),
        cand("u4", 4, "an empty id"),
        cand("k5", 5, None),  # no transcript: Whisper's to label
        Reject("g", f"{m}:6", "k6", "sentence", "bad_value", "a int"),
        Reject("g", f"{m}:7", None, "sentence", "bad_value", "a list"),  # 1.5 is no id to name it by
        Reject("g", f"{m}:8", None, "file", "missing_field", "no 'file' in the row"),
        Reject("g", f"{m}:9", None, "file", "missing_field", "no 'file' in the row"),
        cand("u10", 10, None),  # an empty speaker is no speaker
        Reject("g", f"{m}:11", None, "start", "bad_value", "'start' is 'soon', not a number of seconds"),
        Reject("g", f"{m}:12", None, "dur", "bad_value", "'dur' is 0 seconds"),
        cand("u13_250", 13, None, "103", 0.25, 1.0, path="/abs/u13.flac"),
    ]
