"""Text files as users write them: every manifest and transcript format read the same whether its file starts
with a UTF-8 byte-order mark and ends its lines in CRLF (Windows editors, spreadsheet exports) or not; and a
clip path that is no file says what it is instead."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from conftest import DEMO, LIBRISPEECH, copy_librispeech
from core.config import CorpusConfig, ManifestColumns
from core.tables import read_table
from schemas import REJECTS, TRANSCRIPTS
from stages.harvest.corpora.records import BOM
from stages.harvest.driver import harvest

CV = Path(__file__).resolve().parent / "fixtures" / "commonvoice-rit_engl_682" / "en"
LJ = DEMO / "LJSpeech-1.1"
CLIP = "test-clean/1089-134686-0001.wav"  # 6.625 s


def _windows(path: Path) -> None:
    """Rewrite a text file (gzip or plain) as a Windows tool writes it: a BOM first, CRLF line ends."""
    gz = path.name.endswith(".gz")
    data = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    data = BOM + data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    path.write_bytes(gzip.compress(data) if gz else data)


def _demo_rows() -> list[dict]:
    return [json.loads(line) for line in (DEMO / "manifest.jsonl").read_text().splitlines() if line.strip()]


def _librispeech(d: Path):
    root = copy_librispeech(d / "LibriSpeech", ["1988-24833-0000", "1988-24833-0001", "2412-153948-0000"])
    return CorpusConfig(name="c", kind="librispeech", root=root), list(root.rglob("*.trans.txt"))


def _commonvoice(d: Path):
    shutil.copytree(CV, d / "en")
    return CorpusConfig(name="c", kind="commonvoice", root=d / "en", tsvs=["validated"]), [
        d / "en/validated.tsv"
    ]


def _ljspeech(d: Path):
    shutil.copytree(LJ, d / "lj")
    return CorpusConfig(name="c", kind="ljspeech", root=d / "lj"), [d / "lj/metadata.csv"]


def _reference_jsonl(d: Path):
    m = d / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in _demo_rows()))
    return CorpusConfig(name="c", kind="jsonl", root=DEMO, manifest=m), [m]


def _generic(fmt: str):
    def make(d: Path):
        m = d / f"m.{fmt}"
        rows = [(r["audio"], r["text"], f"u{i}") for i, r in enumerate(_demo_rows())]
        if fmt == "jsonl":
            m.write_text("".join(json.dumps({"path": a, "words": t, "key": k}) + "\n" for a, t, k in rows))
        else:
            sep = "\t" if fmt == "tsv" else ","
            quote = (lambda t: t) if fmt == "tsv" else (lambda t: '"' + t.replace('"', '""') + '"')
            m.write_text(
                "".join(f"{a}{sep}{quote(t)}{sep}{k}\n" for a, t, k in [("path", "words", "key"), *rows])
            )
        cols = ManifestColumns(audio="path", text="words", id="key")
        return CorpusConfig(name="c", kind="manifest", root=DEMO, manifest=m, columns=cols), [m]

    return make


def _gigaspeech(d: Path):
    root = d / "GigaSpeech"
    (root / "audio").mkdir(parents=True)
    shutil.copy(DEMO / CLIP, root / "audio" / "POD1.wav")
    segs = [
        {"sid": f"POD1_S{i}", "begin_time": b, "end_time": b + 2.0, "text_tn": t, "subsets": ["{XS}"]}
        for i, (b, t) in enumerate([(0.0, "FIRST WORDS <COMMA> HERE"), (2.5, "SECOND WORDS <PERIOD>")])
    ]
    meta = {"audios": [{"path": "audio/POD1.wav", "aid": "POD1", "subsets": ["{XS}"], "segments": segs}]}
    (root / "GigaSpeech.json").write_text(json.dumps(meta, indent=1))  # indented: many lines to end in CRLF
    return CorpusConfig(name="c", kind="gigaspeech", root=root, subset="XS"), [root / "GigaSpeech.json"]


def _lhotse(d: Path):
    from lhotse.recipes import prepare_librispeech

    prepare_librispeech(LIBRISPEECH, output_dir=d / "manifests")
    files = {
        k: d / "manifests" / f"librispeech_{k}_dev-clean-2.jsonl.gz" for k in ("recordings", "supervisions")
    }
    return CorpusConfig(name="c", kind="lhotse", root=LIBRISPEECH, **files), list(files.values())


READERS = {
    "librispeech": _librispeech,
    "commonvoice": _commonvoice,
    "ljspeech": _ljspeech,
    "jsonl": _reference_jsonl,
    "manifest-jsonl": _generic("jsonl"),
    "manifest-csv": _generic("csv"),
    "manifest-tsv": _generic("tsv"),
    "gigaspeech": _gigaspeech,
    "lhotse": _lhotse,
}


def _harvested(corpus: CorpusConfig, out: Path, base: Path) -> tuple[list, list]:
    harvest([corpus], out)

    def norm(r: dict) -> dict:
        return {k: v.replace(str(base), "BASE") if isinstance(v, str) else v for k, v in r.items()}

    rows = sorted((norm(r) for r in read_table(out / "transcripts", TRANSCRIPTS).to_pylist()), key=str)
    rejects = sorted((norm(r) for r in read_table(out / "rejects.parquet", REJECTS).to_pylist()), key=str)
    for r in rows:
        r.pop("file_mtime_ns")  # the copies are new files
    return rows, rejects


@pytest.mark.parametrize("reader", list(READERS))
def test_a_bom_and_crlf_line_ends_change_nothing_a_reader_reads(reader, tmp_path):
    plain, windows = tmp_path / "plain", tmp_path / "windows"
    plain.mkdir()
    windows.mkdir()
    corpus, _ = READERS[reader](plain)
    corpus_w, files = READERS[reader](windows)
    for f in files:
        _windows(f)
        assert f.read_bytes().startswith(BOM) if not f.name.endswith(".gz") else True
    want = _harvested(corpus, plain / "out", plain)
    got = _harvested(corpus_w, windows / "out", windows)
    assert want[0], f"{reader}: the plain corpus gave no rows"
    assert got == want


def test_a_clip_path_that_is_no_file_says_what_it_is(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(DEMO / "test-clean", root / "test-clean")
    (root / "test-clean" / "folder.wav").mkdir()
    (root / "test-clean" / "gone.wav").symlink_to(root / "test-clean" / "nowhere.wav")
    m = tmp_path / "m.jsonl"
    names = ["folder.wav", "gone.wav", "absent.wav", CLIP.split("/")[1]]
    m.write_text("".join(json.dumps({"audio": f"test-clean/{n}", "text": "words"}) + "\n" for n in names))
    harvest([CorpusConfig(name="c", kind="jsonl", root=root, manifest=m)], tmp_path / "out")
    rejects = {r["source"]: r for r in read_table(tmp_path / "out" / "rejects.parquet", REJECTS).to_pylist()}
    assert [rejects[f"{m}:{i}"]["reason"] for i in (1, 2, 3)] == ["missing_audio"] * 3
    assert rejects[f"{m}:1"]["detail"].endswith("folder.wav is a directory")
    assert "gone.wav is a dangling link (to " in rejects[f"{m}:2"]["detail"]
    assert rejects[f"{m}:3"]["detail"].endswith("absent.wav does not exist")
    assert f"{m}:4" not in rejects
    # a manifest path that is a directory says so too
    harvest([CorpusConfig(name="c", kind="jsonl", root=root, manifest=root)], tmp_path / "out2")
    (r,) = read_table(tmp_path / "out2" / "rejects.parquet", REJECTS).to_pylist()
    assert r["reason"] == "missing_manifest" and r["detail"].endswith(f"{root} is a directory")
