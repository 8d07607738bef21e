"""``splsm lineage diff``: two versions of a table after a regeneration that added clips, and the rows between them."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import copy_librispeech, run_stage
from core.config import CorpusConfig
from core.digest import fingerprint_dir
from core.lineage.diff import DiffError, diff_versions, row_diff
from core.lineage.store import LineageStore
from core.paths import WorkPaths
from core.stage import Artifact
from core.stage import run_stage as run_plain_stage
from core.tables import table_identity
from splsm.cli import main

FIRST = ["1988-24833-0000", "1988-24833-0001", "2412-153948-0002", "3752-4944-0000", "3752-4944-0001"]
ADDED = ["1988-24833-0002", "3752-4944-0002"]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory, tiny_config):
    """A corpus harvested, two clips added to it, harvested again; a copy of the first table kept aside
    (a harvest rerun replaces its table's manifest)."""
    tmp = tmp_path_factory.mktemp("regen")
    root = copy_librispeech(tmp / "corpus", FIRST)
    cfg = tiny_config.model_copy(update={"corpora": [CorpusConfig(name="ls", kind="librispeech", root=root)]})
    work = tmp / "work"
    table = WorkPaths(work).harvest.transcripts
    corpus_v1 = fingerprint_dir(root.resolve())
    run_stage("harvest", cfg, work)
    kept = tmp / "kept" / "transcripts-v1"
    kept.parent.mkdir()
    shutil.copytree(table, kept)
    copy_librispeech(root, ADDED)
    corpus_v2 = fingerprint_dir(root.resolve())
    second = run_stage("harvest", cfg, work)
    assert not second.reused
    return dict(work=work, root=root, table=table, kept=kept, corpus=(corpus_v1, corpus_v2), second=second)


def test_lineage_diff_of_a_regeneration_that_added_clips(regenerated):
    r = regenerated
    store = LineageStore(WorkPaths(r["work"]).lineage)
    d = diff_versions(store, r["table"])
    v1, v2 = table_identity(r["kept"])[0], table_identity(r["table"])[0]
    assert [v.content_hash for v in d.versions] == [v1, v2]
    assert (d.before.number, d.after.number) == (1, 2)
    assert (d.before.row_count, d.after.row_count) == (len(FIRST), len(FIRST) + len(ADDED))
    assert d.after.writer.run_id == r["second"].run_id
    assert d.param_changes == []  # the same config: only the corpus changed
    changes = {c.role: c for c in d.input_changes}
    corpus = changes["corpus:ls"]
    assert (corpus.status, corpus.location, corpus.before, corpus.after) == (
        "changed",
        str(r["root"].resolve()),
        *r["corpus"],
    )
    # the rerun read its own previous table, version 1; the first run had none
    prev = changes["previous_transcripts"]
    assert (prev.status, prev.before, prev.after, prev.after_rows) == ("added", None, v1, len(FIRST))
    assert set(changes) == {"corpus:ls", "previous_transcripts"}
    # the first version's rows are gone from disk: metadata only, saying so
    assert (
        d.rows is None and "no longer on disk" in d.rows_unavailable and "--from-data" in d.rows_unavailable
    )

    kept = diff_versions(store, r["table"], before_data=r["kept"])
    rows = kept.rows
    assert rows.key == ("utt_id",)
    assert (rows.before_rows, rows.after_rows) == (len(FIRST), len(FIRST) + len(ADDED))
    assert (rows.added, rows.removed, rows.changed, rows.unchanged) == (len(ADDED), 0, 0, len(FIRST))
    assert [s["utt_id"] for s in rows.samples["added"]] == sorted(ADDED)
    assert rows.changed_columns == {} and rows.columns_added == rows.columns_removed == ()


def test_lineage_diff_cli_prints_inputs_and_rows(regenerated):
    r = regenerated
    base = ["lineage", "diff", str(r["table"]), "--workdir", str(r["work"])]
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 0, res.output
    assert "corpus:ls" in res.output and "previous_transcripts" in res.output
    assert "rows not compared" in res.output
    res = CliRunner().invoke(main, [*base, "--from-data", str(r["kept"])])
    assert res.exit_code == 0, res.output
    assert "2 added" in res.output and "0 removed" in res.output and "0 changed" in res.output
    assert all(u in res.output for u in ADDED)
    res = CliRunner().invoke(main, [*base, "--from-data", str(r["kept"]), "--json"])
    out = json.loads(res.output)
    assert out["rows"]["added"] == len(ADDED) and out["before"]["number"] == 1


def test_lineage_diff_errors_name_the_path_and_the_versions(regenerated, tmp_path):
    r = regenerated
    base = ["lineage", "diff", "--workdir", str(r["work"])]
    res = CliRunner().invoke(main, [*base, str(tmp_path / "never.parquet")])
    assert res.exit_code == 1 and "no versions recorded at" in res.output
    res = CliRunner().invoke(main, [*base, str(r["table"]), "--from", "9"])
    assert res.exit_code == 1 and "has versions 1 to 2" in res.output
    res = CliRunner().invoke(main, [*base, str(r["table"]), "--from", "zzzz"])
    assert res.exit_code == 1 and "no version of" in res.output
    res = CliRunner().invoke(main, [*base, str(r["table"]), "--to", "1"])
    assert res.exit_code == 1 and "nothing before it" in res.output
    # the current table given as version 1's data: its hash says it is not
    res = CliRunner().invoke(main, [*base, str(r["table"]), "--from-data", str(r["table"])])
    assert res.exit_code == 1 and "is not version 1" in res.output


def _write(path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_lineage_diff_rows_changed_by_key_and_as_whole_rows(tmp_path):
    a = _write(
        tmp_path / "a.parquet",
        [{"utt_id": "u1", "text": "one"}, {"utt_id": "u2", "text": "two"}, {"utt_id": "u3", "text": "three"}],
    )
    # the new version in two parts, as a directory of Parquet files
    b = tmp_path / "b"
    _write(b / "part-0.parquet", [{"utt_id": "u1", "text": "one"}, {"utt_id": "u2", "text": "TWO"}])
    _write(b / "part-1.parquet", [{"utt_id": "u4", "text": "four"}])
    d = row_diff(a, b, ("utt_id",))
    assert (d.added, d.removed, d.changed, d.unchanged) == (1, 1, 1, 1)
    assert d.samples == {
        "added": [{"utt_id": "u4"}],
        "removed": [{"utt_id": "u3"}],
        "changed": [{"utt_id": "u2"}],
    }
    assert d.changed_columns == {"text": 1}
    whole = row_diff(a, b, None)
    assert (whole.added, whole.removed, whole.changed) == (2, 2, None)
    assert {s["utt_id"] for s in whole.samples["removed"]} == {"u2", "u3"}
    dup = _write(tmp_path / "dup.parquet", [{"utt_id": "u1", "text": "x"}, {"utt_id": "u1", "text": "y"}])
    with pytest.raises(
        DiffError, match=r"dup.parquet: key \(utt_id\) is not unique: \{'utt_id': 'u1'\} is on 2"
    ):
        row_diff(a, dup, ("utt_id",))
    with pytest.raises(DiffError, match="has no key column id"):
        row_diff(a, b, ("id",))


def test_lineage_diff_of_a_checkpoint_compares_runs_only(tmp_path):
    src, ckpt = tmp_path / "in.txt", tmp_path / "ckpt"

    def make(extra: str):
        def body():
            ckpt.mkdir(exist_ok=True)
            (ckpt / "weights.bin").write_text(src.read_text() + extra)

        return run_plain_stage(
            "train",
            tmp_path,
            {"lr": extra},
            [Artifact("examples", src, "file")],
            [Artifact("checkpoint", ckpt, "checkpoint")],
            body,
            "schemas",
        )

    src.write_text("v1")
    make("0.1")
    src.write_text("v2")
    make("0.2")
    d = diff_versions(LineageStore(tmp_path / "lineage.duckdb"), ckpt)
    assert [(c.name, c.before, c.after) for c in d.param_changes] == [("lr", "0.1", "0.2")]
    ((inp,),) = [d.input_changes]
    assert (inp.role, inp.status) == ("examples", "changed")
    assert d.rows is None and "not a table" in d.rows_unavailable
