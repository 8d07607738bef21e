"""A full disk: a real `splsm harvest` on a small tmpfs that fills up is one line of error naming the path it was
writing and the free space, no traceback; the previous version of the table stays whole, no temporary or
uncommitted part is left, and the rerun once space is freed finishes the work (the rows a lone run makes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_librispeech
from core.paths import WorkPaths
from core.tables import MANIFEST, PartsTable, read_transcripts
from schemas import TRANSCRIPTS

CHAPTER_A = ["1988-24833-0000", "1988-24833-0001", "1988-24833-0002", "1988-24833-0003"]
CHAPTER_B = ["2412-153948-0000", "2412-153948-0001", "2412-153948-0002"]


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MB tmpfs (the test needs root to mount it, as CI's machine has)."""
    d = tmp_path / "fs"
    d.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(d)], capture_output=True, text=True
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def _harvest(config: Path, work: Path) -> tuple[int, str]:
    p = subprocess.run(
        [sys.executable, "-m", "splsm.cli", "harvest", "--config", str(config), "--workdir", str(work)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=600,
    )
    return p.returncode, p.stdout + p.stderr


def _fill(fs: Path, leave: int) -> Path:
    ballast = fs / "ballast"
    with open(ballast, "wb") as f:
        try:
            f.write(b"\0" * max(0, shutil.disk_usage(fs).free - leave))
        except OSError:  # full already
            pass
    return ballast


def _rows(work: Path) -> list[dict]:
    return read_transcripts(WorkPaths(work).harvest.transcripts).to_pylist()


def _litter(work: Path) -> list[str]:
    """Temporaries anywhere, and parts the transcripts manifest does not name."""
    left = [str(p) for p in work.rglob("*") if ".tmp-" in p.name]
    tdir = WorkPaths(work).harvest.transcripts
    named = {p.file for p in PartsTable.open(tdir, TRANSCRIPTS).parts}
    return left + [str(p) for p in tdir.glob("*.parquet") if p.name not in named]


@pytest.mark.parametrize("leave", [0, 8192], ids=["nothing-left", "8-KB-left"])
def test_a_full_disk_is_one_line_the_old_table_stays_and_a_rerun_finishes(small_fs, tmp_path, leave):
    corpus = copy_librispeech(tmp_path / "corpus", CHAPTER_A)
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["corpora"] = [{"name": "ls", "kind": "librispeech", "root": str(corpus), "split": "train"}]
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    work = small_fs / "work"
    rc, out = _harvest(config, work)
    assert rc == 0, out
    before = _rows(work)
    manifest = (WorkPaths(work).harvest.transcripts / MANIFEST).read_bytes()

    copy_librispeech(corpus, CHAPTER_B)  # new clips: the next harvest writes a new version
    ballast = _fill(small_fs, leave)
    rc, out = _harvest(config, work)
    assert rc == 1 and "Traceback" not in out, out
    (line,) = [x for x in out.splitlines() if x.startswith("Error:")]
    assert f"no space left on the device writing {work}" in line and " free of " in line, line
    assert (WorkPaths(work).harvest.transcripts / MANIFEST).read_bytes() == manifest
    assert _rows(work) == before
    assert _litter(work) == []

    ballast.unlink()
    rc, out = _harvest(config, work)
    assert rc == 0, out
    rc, out = _harvest(config, tmp_path / "lone")  # a lone run of the grown corpus, off the small disk
    assert rc == 0, out
    got, want = _rows(work), _rows(tmp_path / "lone")
    assert len(got) == len(CHAPTER_A + CHAPTER_B) and got == want
    assert _litter(work) == []
