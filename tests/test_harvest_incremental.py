"""A rerun probes only new or changed audio, gives the same table as a cold run, and records lineage."""

import os
import shutil

import pytest

from conftest import DEMO, LIBRISPEECH, copy_librispeech, run_stage
from core.config import CorpusConfig
from core.digest import sha256_file
from core.lineage.store import LineageStore
from core.paths import HarvestPaths, WorkPaths
from core.tables import PartsTable, read_table, read_transcripts, table_identity
from schemas import REJECTS, TRANSCRIPTS
from stages.harvest import driver, previous
from stages.harvest.driver import harvest

FIRST = ["1988-24833-0000", "1988-24833-0001", "2412-153948-0002", "3752-4944-0000", "3752-4944-0001"]
ADDED = ["1988-24833-0002", "3752-4944-0002"]


def _table(path):
    # a rerun's new rows follow the rows it kept: the same rows as a cold run's, in utterance-id order
    rows = read_transcripts(HarvestPaths(path).transcripts).to_pylist()
    for r in rows:
        r.pop("file_mtime_ns")  # the only column a touch changes
    return rows


def test_rerun_probes_exactly_the_added_and_changed_files(tmp_path):
    root = copy_librispeech(tmp_path / "c", FIRST)
    corpus = [CorpusConfig(name="ls", kind="librispeech", root=root)]
    # a corrupt file: its reject is kept, not probed again, while the file is unchanged
    chap = root / "dev-clean-2" / "1988" / "24833"
    (chap / "1988-24833-0009.flac").write_bytes(b"fLaC" + bytes(range(256)) * 4)
    with open(chap / "1988-24833.trans.txt", "a") as f:
        f.write("1988-24833-0009 A CORRUPT FILE\n")
    cold = harvest(corpus, tmp_path / "out")
    assert (cold.probed, cold.reused, cold.transcripts) == (6, 0, 5)

    nothing = harvest(corpus, tmp_path / "out")
    assert (nothing.probed, nothing.reused, nothing.transcripts, nothing.rejects) == (0, 6, 5, 1)

    copy_librispeech(root, ADDED)  # two new utterances
    touched = chap / "1988-24833-0000.flac"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))  # same bytes
    changed = root / "dev-clean-2" / "3752" / "4944" / "3752-4944-0001.flac"
    shutil.copy(LIBRISPEECH / "dev-clean-2" / "3752" / "4944" / "3752-4944-0000.flac", changed)  # new bytes
    inc = harvest(corpus, tmp_path / "out")
    assert inc.probed == 3  # the two added files and the changed one
    assert inc.reused == 5  # three unchanged + the touched one (hash equal) + the corrupt file's reject
    assert inc.transcripts == 7 and inc.reject_counts == {"corrupt_audio": 1}

    cold_again = harvest(corpus, tmp_path / "cold")
    assert cold_again.probed == 8
    assert _table(tmp_path / "out") == _table(tmp_path / "cold")
    rows = {r["utt_id"]: r for r in _table(tmp_path / "out")}
    assert rows["3752-4944-0001"]["duration_s"] == 53360 / 16000  # now the other clip's length (README)
    assert rows["3752-4944-0001"]["file_sha256"] == sha256_file(changed)
    (rej,) = read_table(HarvestPaths(tmp_path / "out").rejects, REJECTS).to_pylist()
    assert rej["utt_id"] == "1988-24833-0009" and rej["file_sha256"] == sha256_file(
        chap / "1988-24833-0009.flac"
    )

    # a changed bound re-checks reused rows without probing them
    short = harvest(corpus, tmp_path / "out", max_duration_s=4.0)
    assert short.probed == 0 and short.transcripts == 5
    assert short.reject_counts == {"corrupt_audio": 1, "too_long": 2}  # 7.895 s and 4.555 s (README)


def test_a_large_rerun_starts_its_workers_at_once_and_gives_the_same_table(tmp_path, monkeypatch):
    """Over a previous table of ``WARM_ROWS`` rows or more the probe workers start before the walk; the new
    files then go to them, and the table is the one a cold run makes."""
    root = copy_librispeech(tmp_path / "c", FIRST)
    corpus = [CorpusConfig(name="ls", kind="librispeech", root=root)]
    harvest(corpus, tmp_path / "out", workers=2)
    copy_librispeech(root, ADDED)
    monkeypatch.setattr(driver, "WARM_ROWS", 1)  # the demo's five rows count as a large table
    started = []
    warm = driver.Prober.warm

    def watched(self):
        warm(self)
        started.append(self.pool is not None and self.workers == 2)

    monkeypatch.setattr(driver.Prober, "warm", watched)
    inc = harvest(corpus, tmp_path / "out", workers=2)
    assert started == [True]
    assert (inc.probed, inc.transcripts) == (2, 7)
    harvest(corpus, tmp_path / "cold", workers=2)
    assert _table(tmp_path / "out") == _table(tmp_path / "cold")


def test_new_transcripts_version_points_at_the_old_one_in_lineage(tmp_path, tiny_config):
    root = copy_librispeech(tmp_path / "c", FIRST)
    cfg = tiny_config.model_copy(update={"corpora": [CorpusConfig(name="ls", kind="librispeech", root=root)]})
    work = tmp_path / "w"
    first = run_stage("harvest", cfg, work)
    v1 = table_identity(WorkPaths(work).harvest.transcripts)[0]
    assert run_stage("harvest", cfg, work).reused
    copy_librispeech(root, ADDED)
    second = run_stage("harvest", cfg, work)
    assert not second.reused and second.summary["probed"] == 2
    v2 = table_identity(WorkPaths(work).harvest.transcripts)[0]
    assert v1 != v2
    store = LineageStore(WorkPaths(work).lineage)
    io = store.query(
        "SELECT r.run_id, io.direction, io.role, d.content_hash, d.row_count FROM run_io io "
        "JOIN datasets d USING (dataset_id) JOIN runs r USING (run_id) "
        "WHERE d.location = ? ORDER BY r.started_at",
        [str((WorkPaths(work).harvest.transcripts).resolve())],
    )
    assert (first.run_id, "output", "transcripts", v1, 5) in io
    assert (second.run_id, "input", "previous_transcripts", v1, 5) in io
    assert (second.run_id, "output", "transcripts", v2, 7) in io


def test_unchanged_directories_are_taken_over_whole_but_not_under_new_settings(tmp_path):
    root = copy_librispeech(tmp_path / "c", FIRST)
    out = tmp_path / "out"
    ls = CorpusConfig(name="ls", kind="librispeech", root=root)
    harvest([ls], out)
    first = read_table(HarvestPaths(out).transcripts, TRANSCRIPTS)
    again = harvest([ls], out)
    assert (again.probed, again.reused, again.transcripts) == (0, 5, 5)
    assert read_table(HarvestPaths(out).transcripts, TRANSCRIPTS).equals(first)
    # the same files under another split name: rows must not be copied with the old split
    renamed = harvest([ls.model_copy(update={"split": "train"})], out)
    splits = set(read_table(HarvestPaths(out).transcripts, TRANSCRIPTS).column("split").to_pylist())
    assert splits == {"train"} and renamed.transcripts == 5


def test_worker_processes_give_the_same_table_as_probing_in_process(tmp_path, monkeypatch):
    ls = [CorpusConfig(name="ls", kind="librispeech", root=LIBRISPEECH)]
    inline = harvest(ls, tmp_path / "inline", workers=1)
    monkeypatch.setattr(driver, "INLINE_LIMIT", 0)  # start the pool at once
    monkeypatch.setattr(driver, "CHUNK", 3)  # several chunks in flight, emitted in order
    pooled = harvest(ls, tmp_path / "pool", workers=2)
    assert pooled.probed == inline.probed == 10
    assert _table(tmp_path / "pool") == _table(tmp_path / "inline")


def test_links_to_the_root_are_followed_and_links_inside_are_not(tmp_path):
    """The corpus root may be a link (a dataset on another volume); the walk starts at its real path, so a
    rerun through the same link reuses everything, and the rows name real paths. A link to a directory
    inside the tree is not followed: it could lead outside the declared root."""
    real = copy_librispeech(tmp_path / "data", FIRST)
    link = tmp_path / "corpus-link"
    link.symlink_to(real)
    outside = copy_librispeech(tmp_path / "elsewhere", ADDED)
    (real / "dev-clean-2" / "9999").symlink_to(outside / "dev-clean-2" / "1988")  # not followed
    corpus = [CorpusConfig(name="ls", kind="librispeech", root=link)]
    cold = harvest(corpus, tmp_path / "out")
    assert (cold.probed, cold.transcripts, cold.rejects) == (5, 5, 0)
    rows = read_table(HarvestPaths(tmp_path / "out").transcripts, TRANSCRIPTS).to_pylist()
    assert {r["utt_id"] for r in rows} == set(FIRST)
    assert all(r["audio_path"].startswith(str(real.resolve()) + os.sep) for r in rows)
    again = harvest(corpus, tmp_path / "out")
    assert (again.probed, again.reused, again.transcripts) == (0, 5, 5)


def test_a_pool_that_breaks_simulated_leaves_the_rest_in_process_with_one_warning(
    tmp_path, monkeypatch, capsys
):
    """Worker processes that cannot start (simulated: a pool whose every submit fails as a broken one does)
    cost one warning; every later chunk is probed in this process, and the table is the same."""
    from concurrent.futures.process import BrokenProcessPool

    class BrokenPool:
        def __init__(self, *a, **kw):
            pass

        def submit(self, *a, **kw):
            raise BrokenProcessPool("a worker died on start")

        def shutdown(self, *a, **kw):
            pass

    ls = [CorpusConfig(name="ls", kind="librispeech", root=LIBRISPEECH)]
    inline = harvest(ls, tmp_path / "inline", workers=1)
    monkeypatch.setattr(driver, "ProcessPoolExecutor", BrokenPool)
    monkeypatch.setattr(driver, "INLINE_LIMIT", 0)
    monkeypatch.setattr(driver, "CHUNK", 3)  # several chunks after the first failure
    capsys.readouterr()
    broken = harvest(ls, tmp_path / "broken", workers=2)
    assert broken.probed == inline.probed == 10
    assert _table(tmp_path / "broken") == _table(tmp_path / "inline")
    assert capsys.readouterr().out.count("worker processes failed") == 1


def test_a_rerun_reads_the_previous_table_by_row_groups_and_finds_rows_by_id_through_hash_collisions(
    tmp_path, monkeypatch
):
    """The previous table is read a row group at a time with few groups held, and rows of a manifest are
    found by an index of id hashes. Here groups hold 2 rows, one is cached, and the hash is weak enough that
    most ids collide: a rerun must still reuse exactly the unchanged rows, find moved lines, and give the
    table a cold run gives."""
    import json

    import pyarrow.parquet as pq

    monkeypatch.setattr(driver, "ROW_GROUP", 2)
    monkeypatch.setattr(previous.Previous, "CACHED_GROUPS", 1)
    monkeypatch.setattr(previous, "_id_hash", lambda s: len(s) % 3)
    root = copy_librispeech(tmp_path / "c", FIRST + ADDED)
    flacs = sorted(root.rglob("*.flac"))
    texts = {
        ln.split(" ", 1)[0]: ln.split(" ", 1)[1]
        for t in root.rglob("*.trans.txt")
        for ln in t.read_text().splitlines()
    }
    (tmp_path / "m").mkdir()
    for f in flacs:  # the manifest's own copies: a probe count per corpus
        shutil.copy(f, tmp_path / "m" / f.name)
    lines = [{"id": f"m{i}-{f.stem}", "audio": f.name, "text": texts[f.stem]} for i, f in enumerate(flacs)]
    manifest = tmp_path / "m" / "train.jsonl"

    def write(rows) -> None:
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    corpora = [
        CorpusConfig(name="ls", kind="librispeech", root=root),  # units spanning row groups
        CorpusConfig(name="m", kind="jsonl", root=tmp_path / "m", manifest=manifest),  # rows found by id
    ]
    write(lines[:5])
    cold = harvest(corpora, tmp_path / "out")
    assert (cold.probed, cold.transcripts) == (12, 12)
    parts = PartsTable.open(HarvestPaths(tmp_path / "out").transcripts, TRANSCRIPTS).files()
    assert sum(pq.ParquetFile(f).metadata.num_row_groups for f in parts) >= 6

    moved = [lines[3], lines[0], lines[1], lines[2], lines[4]]  # the fourth line now comes first
    moved[2] = {**moved[2], "text": "A NEW TRANSCRIPT"}  # changed: made again, its file probed
    write([*moved, lines[5], lines[6]])  # two new lines
    inc = harvest(corpora, tmp_path / "out")
    assert inc.probed == 3
    assert inc.reused == 7 + 4  # the LibriSpeech rows and the four unchanged manifest lines
    assert inc.transcripts == 14

    cold_again = harvest(corpora, tmp_path / "cold")
    assert cold_again.probed == 14
    assert _table(tmp_path / "out") == _table(tmp_path / "cold")
    rows = {r["utt_id"]: r for r in _table(tmp_path / "out")}
    assert rows[moved[2]["id"]]["text_raw"] == "A NEW TRANSCRIPT"


def test_a_damaged_previous_table_is_harvested_again_with_a_warning(tmp_path, capsys):
    root = copy_librispeech(tmp_path / "c", FIRST)
    corpus = [CorpusConfig(name="ls", kind="librispeech", root=root)]
    harvest(corpus, tmp_path / "out")
    table = HarvestPaths(tmp_path / "out").transcripts
    (part,) = table.glob("*.parquet")
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # cut off, footer and all
    again = harvest(corpus, tmp_path / "out")
    assert (again.probed, again.reused, again.transcripts) == (5, 0, 5)
    assert "previous tables not reusable" in capsys.readouterr().out
    assert len(read_table(table, TRANSCRIPTS)) == 5


def _rejects(out):
    return read_table(HarvestPaths(out).rejects, REJECTS).to_pylist()


@pytest.mark.parametrize("first", ["chapter", "manifest"])
def test_a_duplicate_of_an_id_in_an_unchanged_chapter_says_where_the_first_came_from(tmp_path, first):
    """A chapter taken over whole still claims its ids: a later duplicate is rejected naming the chapter; an
    earlier one makes the chapter go row by row, so its own row is the duplicate."""
    root = copy_librispeech(tmp_path / "c", FIRST)
    out = tmp_path / "out"
    ls = CorpusConfig(name="ls", kind="librispeech", root=root)
    harvest([ls], out)
    m = tmp_path / "dup.jsonl"
    m.write_text(
        '{"audio": "dev-clean-2/1988/24833/1988-24833-0000.flac", "text": "THE TWO STRAY KITTENS"}\n'
    )
    dup = CorpusConfig(name="dup", kind="jsonl", root=root, manifest=m)
    chapter = os.path.realpath(root / "dev-clean-2" / "1988" / "24833")
    s = harvest([ls, dup] if first == "chapter" else [dup, ls], out)
    rows = {
        r["utt_id"]: r["corpus"] for r in read_table(HarvestPaths(out).transcripts, TRANSCRIPTS).to_pylist()
    }
    (rej,) = _rejects(out)
    got = (rej["corpus"], rej["source"], rej["utt_id"], rej["reason"], rej["detail"])
    if first == "chapter":
        assert got == (
            "dup",
            f"{m}:1",
            "1988-24833-0000",
            "duplicate_utt_id",
            f"1988-24833-0000 already came from {chapter} (unchanged since the previous run)",
        )
        assert (s.probed, s.reused, s.listed) == (0, 5, 6)
        assert rows == dict.fromkeys(FIRST, "ls")
    else:
        assert got == (
            "ls",
            f"{chapter}/1988-24833.trans.txt:1",
            "1988-24833-0000",
            "duplicate_utt_id",
            f"1988-24833-0000 already came from {m}:1",
        )
        assert (s.probed, s.reused, s.listed) == (1, 4, 6)
        assert rows == dict.fromkeys(FIRST, "ls") | {"1988-24833-0000": "dup"}


@pytest.mark.parametrize(
    "bound, rejected",
    [
        # 1988-24833 is 3.320 s and 7.895 s, 2412-153948-0002 3.720 s, 3752-4944 3.335 s and 4.415 s (README)
        ({"max_duration_s": 5.0}, [("1988-24833-0001", "too_long")]),
        ({"min_duration_s": 3.4}, [("1988-24833-0000", "too_short"), ("3752-4944-0000", "too_short")]),
    ],
)
def test_a_changed_bound_rechecks_every_row_of_an_unchanged_chapter_without_probing(
    tmp_path, bound, rejected
):
    root = copy_librispeech(tmp_path / "c", FIRST)
    out = tmp_path / "out"
    ls = CorpusConfig(name="ls", kind="librispeech", root=root)
    harvest([ls], out)
    s = harvest([ls], out, **bound)
    assert sorted((r["utt_id"], r["reason"]) for r in _rejects(out)) == rejected
    assert (s.probed, s.transcripts, s.listed) == (0, 5 - len(rejected), 5)


@pytest.mark.parametrize("content_hash", [True, False])
def test_touched_files_are_probed_again_only_when_there_is_no_hash_to_compare(tmp_path, content_hash):
    """Two files touched (new mtime, same bytes) in two chapters: with hashes both rows are kept (each file
    hashed, not the first one's hash reused); without, a new mtime is all a rerun can see."""
    root = copy_librispeech(tmp_path / "c", FIRST)
    out = tmp_path / "out"
    ls = CorpusConfig(name="ls", kind="librispeech", root=root)
    harvest([ls], out, content_hash=content_hash)
    touched = [
        root / "dev-clean-2" / "1988" / "24833" / "1988-24833-0000.flac",
        root / "dev-clean-2" / "3752" / "4944" / "3752-4944-0001.flac",
    ]
    for f in touched:
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    s = harvest([ls], out, content_hash=content_hash)
    assert (s.probed, s.reused, s.transcripts) == ((0, 5, 5) if content_hash else (2, 3, 5))
    mtimes = {
        r["utt_id"]: r["file_mtime_ns"]
        for r in read_table(HarvestPaths(out).transcripts, TRANSCRIPTS).to_pylist()
    }
    assert [mtimes[f.stem] for f in touched] == [f.stat().st_mtime_ns for f in touched]


def test_a_file_rewritten_with_other_bytes_of_the_same_size_is_probed_again(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(DEMO / "test-clean", root / "test-clean")
    clip = root / "test-clean" / "1089-134686-0001.wav"
    m = tmp_path / "m.jsonl"
    m.write_text('{"audio": "test-clean/1089-134686-0001.wav", "text": "AFTER EARLY NIGHTFALL"}\n')
    corpus = CorpusConfig(name="ref", kind="jsonl", root=root, manifest=m)
    out = tmp_path / "out"
    harvest([corpus], out)
    data = bytearray(clip.read_bytes())
    data[-2000:] = bytes(b ^ 0x55 for b in data[-2000:])  # other samples, same length: still a WAV
    clip.write_bytes(bytes(data))
    s = harvest([corpus], out)
    (row,) = read_table(HarvestPaths(out).transcripts, TRANSCRIPTS).to_pylist()
    assert (s.probed, s.reused) == (1, 0)
    assert (row["file_sha256"], row["file_size"]) == (sha256_file(clip), len(data))
