"""The built examples as a Hugging Face dataset: they load with ``datasets.load_dataset("parquet", ...)`` as the
build stage wrote them, and ``splsm export hf`` writes a dataset directory that ``load_dataset(DIR)`` reads as
one split per build split, its clips embedded, with a card that tells how it was made."""

from __future__ import annotations

import io
import re
from collections import Counter

import duckdb
import pytest
import soundfile as sf
from click.testing import CliRunner

from conftest import GEN_TASKS, run_stage
from core.config import BuildConfig
from core.export.hf import ExportError, export_hf, hf_split
from core.lineage.store import LineageStore
from core.paths import WorkPaths
from core.tables import read_table, write_table
from schemas import EXAMPLES, RESPONSES, to_table

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_config, generated):
    """A work directory with harvest and build run for real (lineage recorded), on the tiny LLM's answers."""
    gen_dir, _, _ = generated
    work = tmp_path_factory.mktemp("export-hf")
    run_stage("harvest", tiny_config, work)
    rows = [
        dict(r, rejected_by=None) for r in read_table(gen_dir / "responses.parquet", RESPONSES).to_pylist()
    ]
    (work / "generate").mkdir()
    write_table(to_table(rows, RESPONSES), WorkPaths(work).generate.responses, RESPONSES)
    cfg = tiny_config.model_copy(
        update={
            "build": BuildConfig(
                tasks=["asr", *GEN_TASKS], eval_splits=["test-clean"], near_dup_threshold=None
            )
        }
    )
    run_stage("build", cfg, work)
    return work


def _counts(examples) -> Counter:
    return Counter(
        {
            (t, s): n
            for t, s, n in duckdb.sql(
                f"SELECT task, split, count(*) FROM read_parquet('{examples}') GROUP BY task, split"
            ).fetchall()
        }
    )


def test_datasets_loads_the_examples_parquet_as_built(built):
    examples = WorkPaths(built).build.examples
    ds = datasets.load_dataset("parquet", data_files=str(examples), split="train")
    want = read_table(examples, EXAMPLES)
    assert ds.num_rows == want.num_rows > 0
    assert ds.column_names == want.column_names
    assert ds["example_id"] == want.column("example_id").to_pylist()


def test_export_hf_datasets_loads_one_split_per_build_split_with_the_clips(built, tmp_path):
    paths = WorkPaths(built)
    out = tmp_path / "ds"
    result = CliRunner().invoke(
        __import__("splsm.cli", fromlist=["main"]).main,
        ["export", "hf", "--workdir", str(built), "--out", str(out), "--embed-audio"],
    )
    assert result.exit_code == 0, result.output
    counts = _counts(paths.build.examples)
    ds = datasets.load_dataset(str(out))
    assert set(ds) == {hf_split(s) for _, s in counts} == {"train", "test_clean"}
    src = {r["example_id"]: r for r in read_table(paths.build.examples, EXAMPLES).to_pylist()}
    for split, part in ds.items():
        assert part.num_rows == sum(n for (_, s), n in counts.items() if hf_split(s) == split)
        assert isinstance(part.features["audio"], datasets.Audio)
        raw = part.cast_column("audio", datasets.Audio(decode=False))
        for row in raw.select(range(min(4, raw.num_rows))):
            ex = src[row["example_id"]]
            assert (hf_split(ex["split"]), ex["answer"], ex["instruction"]) == (
                split,
                row["answer"],
                row["instruction"],
            )
            samples, sr = sf.read(io.BytesIO(row["audio"]["bytes"]))
            assert sr == 16_000 and abs(len(samples) / sr - ex["duration_s"]) < 0.002
    assert sorted(i for part in ds.values() for i in part["example_id"]) == sorted(src)


def test_export_hf_datasets_card_has_the_counts_the_recipe_and_the_lineage(built, tmp_path):
    paths = WorkPaths(built)
    export_hf(built, tmp_path / "ds", name="tiny self-powered")
    card = (tmp_path / "ds" / "README.md").read_text()
    assert card.startswith("---\nconfigs:\n") and "# tiny self-powered" in card
    for (task, split), n in _counts(paths.build.examples).items():
        header = re.search(r"^\| task \| (.*) \|$", card, re.M).group(1).split(" | ")
        row = re.search(rf"^\| {task} \| (.*) \|$", card, re.M).group(1).split(" | ")
        assert int(row[header.index(split)]) == n, (task, split)
    store = LineageStore(paths.lineage)
    (build_run,) = store.query("SELECT run_id FROM runs WHERE stage = 'build'")[0]
    assert f"Run `{build_run}`" in card
    corpora = {r[0] for r in store.query("SELECT location FROM datasets WHERE kind = 'corpus'")}
    assert corpora and all(f"`{c}`" in card for c in corpora)  # the chain goes back to the corpora


def test_export_hf_datasets_refuses_what_it_cannot_do(built, tmp_path):
    with pytest.raises(ExportError, match=r"examples.parquet does not exist: run `splsm build`"):
        export_hf(tmp_path / "empty-work", tmp_path / "out")
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="is not an earlier export"):
        export_hf(built, mine)
    assert (mine / "keep.txt").read_text() == "mine"  # OUT is replaced whole, so a foreign one is refused
