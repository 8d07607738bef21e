"""The transcripts table as Parquet parts behind a manifest: a rerun writes only its new rows, keeps every
unchanged part byte for byte, rewrites only a part that lost rows, merges runs of small parts, and a run that
dies before its commit leaves the previous version whole (its parts swept by the next run)."""

import json

import pytest

from conftest import copy_librispeech
from core.config import CorpusConfig
from core.digest import sha256_file
from core.paths import HarvestPaths
from core.tables import MANIFEST, PartsTable, read_table, read_transcripts
from schemas import TRANSCRIPTS, SchemaError
from stages.harvest import driver
from stages.harvest.driver import harvest

CHAPTER_A = ["1988-24833-0000", "1988-24833-0001", "1988-24833-0002", "1988-24833-0003"]
CHAPTER_B = ["2412-153948-0000", "2412-153948-0001", "2412-153948-0002"]
CHAPTER_C = ["3752-4944-0000", "3752-4944-0001", "3752-4944-0002"]


@pytest.fixture
def small_parts(monkeypatch):
    """Parts of two rows, so that a handful of real clips spans several parts."""
    monkeypatch.setattr(driver, "PART_ROWS", 2)
    monkeypatch.setattr(driver, "SMALL_PART", 2)  # a one-row part is small
    monkeypatch.setattr(driver, "MERGE_RUN", 3)


def _manifest(out):
    return json.loads((HarvestPaths(out).transcripts / MANIFEST).read_text())


def _rows(out):
    rows = read_transcripts(HarvestPaths(out).transcripts).to_pylist()
    for r in rows:
        r.pop("file_mtime_ns")
    return rows


def _corpus(root):
    return [CorpusConfig(name="ls", kind="librispeech", root=root)]


def test_a_rerun_keeps_every_part_as_it_is_and_adds_parts_for_its_new_rows_only(tmp_path, small_parts):
    root = copy_librispeech(tmp_path / "c", CHAPTER_A + CHAPTER_B)
    corpus, out = _corpus(root), tmp_path / "out"
    cold = harvest(corpus, out)
    before = _manifest(out)
    assert cold.transcripts == 7 and [p["rows"] for p in before["parts"]] == [2, 2, 2, 1]
    for p in before["parts"]:  # the manifest says what each part holds
        assert sha256_file(HarvestPaths(out).transcripts / p["file"]) == p["sha256"]

    copy_librispeech(root, CHAPTER_C)  # a new chapter
    inc = harvest(corpus, out)
    after = _manifest(out)
    assert (inc.probed, inc.reused, inc.transcripts) == (3, 7, 10)
    assert after["parts"][: len(before["parts"])] == before["parts"]  # untouched, byte for byte
    new = after["parts"][len(before["parts"]) :]
    assert sum(p["rows"] for p in new) == 3 and after["rows"] == 10
    # nothing but the manifest's parts is left in the directory
    assert sorted(f.name for f in HarvestPaths(out).transcripts.glob("*.parquet")) == sorted(
        p["file"] for p in after["parts"]
    )
    assert abs(inc.hours * 3600 - sum(r["duration_s"] for r in _rows(out))) < 1e-6

    harvest(corpus, tmp_path / "cold")
    assert _rows(out) == _rows(tmp_path / "cold")  # the same rows as one cold run

    # the chapters a rerun reused whole are taken over whole again, and so is the one it added
    again = harvest(corpus, out)
    assert (again.probed, again.reused, again.transcripts) == (0, 10, 10)
    assert _manifest(out)["parts"] == after["parts"]


def test_a_deleted_file_rewrites_only_the_part_that_held_its_row(tmp_path, small_parts):
    root = copy_librispeech(tmp_path / "c", CHAPTER_A + CHAPTER_B)
    corpus, out = _corpus(root), tmp_path / "out"
    harvest(corpus, out)
    before = _manifest(out)["parts"]
    held = {
        r["utt_id"]: i // 2
        for i, r in enumerate(read_table(HarvestPaths(out).transcripts, TRANSCRIPTS).to_pylist())
    }
    gone = "2412-153948-0001"
    chap = root / "dev-clean-2" / "2412" / "153948"
    (chap / f"{gone}.flac").unlink()
    trans = chap / "2412-153948.trans.txt"
    trans.write_text("".join(ln for ln in trans.read_text().splitlines(True) if not ln.startswith(gone)))

    inc = harvest(corpus, out)
    after = _manifest(out)["parts"]
    assert (inc.probed, inc.transcripts, inc.rejects) == (0, 6, 0)
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b]
    assert changed == [held[gone]]  # only its part was written again
    assert after[held[gone]]["rows"] == before[held[gone]]["rows"] - 1
    assert gone not in {r["utt_id"] for r in _rows(out)}
    harvest(corpus, tmp_path / "cold")
    assert _rows(out) == _rows(tmp_path / "cold")


def test_runs_of_small_parts_that_reruns_leave_are_merged(tmp_path, small_parts):
    root = copy_librispeech(tmp_path / "c", CHAPTER_A)
    corpus, out = _corpus(root), tmp_path / "out"
    harvest(corpus, out)
    counts = []
    for utt in CHAPTER_B + CHAPTER_C[:1]:  # four reruns, one new file each: four one-row parts
        copy_librispeech(root, [utt])
        harvest(corpus, out)
        counts.append([p["rows"] for p in _manifest(out)["parts"]])
    # once three small parts follow each other they are written again as parts of full size, rows in order
    assert counts == [[2, 2, 1], [2, 2, 1, 1], [2, 2, 2, 1], [2, 2, 2, 1, 1]]
    harvest(corpus, tmp_path / "cold")
    assert _rows(out) == _rows(tmp_path / "cold")
    assert harvest(corpus, out).probed == 0


def test_a_run_that_dies_before_its_commit_leaves_the_previous_version_and_the_next_run_sweeps_its_parts(
    tmp_path, small_parts, monkeypatch
):
    root = copy_librispeech(tmp_path / "c", CHAPTER_A)
    corpus, out = _corpus(root), tmp_path / "out"
    harvest(corpus, out)
    committed = _manifest(out)
    rows_before = _rows(out)
    copy_librispeech(root, CHAPTER_B)

    def die(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(driver, "finish_table", die)  # the new rows' parts are on disk, not committed
    with pytest.raises(OSError, match="disk full"):
        harvest(corpus, out)
    tdir = HarvestPaths(out).transcripts
    on_disk = {f.name for f in tdir.glob("*.parquet")}
    assert on_disk == {p["file"] for p in committed["parts"]}  # a run that fails removes its own parts
    # a run killed outright cleans nothing up: its parts stay on disk
    monkeypatch.setattr(driver.PartWriter, "abort", lambda self: None)
    with pytest.raises(OSError, match="disk full"):
        harvest(corpus, out)
    monkeypatch.undo()
    on_disk = {f.name for f in tdir.glob("*.parquet")}
    assert on_disk > {p["file"] for p in committed["parts"]}  # the dead run's parts are there ...
    assert _manifest(out) == committed and _rows(out) == rows_before  # ... and no part of the table

    inc = harvest(corpus, out)
    # the committed version's reuse state still holds: only the new chapter is probed
    assert (inc.transcripts, inc.probed, inc.reused) == (7, 3, 4)
    assert {f.name for f in tdir.glob("*.parquet")} == {p["file"] for p in _manifest(out)["parts"]}


def test_a_part_that_does_not_match_its_manifest_is_an_error_naming_it_and_a_rerun_probes_everything(
    tmp_path,
):
    root = copy_librispeech(tmp_path / "c", CHAPTER_A)
    corpus, out = _corpus(root), tmp_path / "out"
    harvest(corpus, out)
    tdir = HarvestPaths(out).transcripts
    (part,) = _manifest(out)["parts"]
    with open(tdir / part["file"], "ab") as f:
        f.write(b"\0")  # a torn or foreign write
    with pytest.raises(SchemaError, match=part["file"]):
        read_table(tdir, TRANSCRIPTS)
    inc = harvest(corpus, out)
    assert (inc.probed, inc.transcripts) == (4, 4)
    assert len(PartsTable.open(tdir, TRANSCRIPTS).read()) == 4

    (tdir / MANIFEST).write_text("{not json")
    with pytest.raises(SchemaError, match="not a readable manifest"):
        read_table(tdir, TRANSCRIPTS)
    assert harvest(corpus, out).probed == 4
