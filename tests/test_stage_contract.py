"""The stage contract: one registry that the CLI, the flows and the runner share, and reuse keyed on the code
each stage really runs (its package and every project module it imports), not on lists kept by hand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from conftest import REPO
from core.codehash import closure, code_hash
from core.paths import WorkPaths
from core.stage import Context, Stage
from splsm.cli import main
from stages.registry import STAGES


def test_every_stage_has_the_same_contract_a_command_and_a_flow_task():
    from flows.tasks import TASKS

    assert list(STAGES) == [
        "pretrained",
        "reference-checkpoint",
        "harvest",
        "models",
        "generate",
        "import-reference",
        "build",
        "train",
        "evaluate",
    ]
    for name, stage in STAGES.items():
        assert isinstance(stage, Stage) and stage.name == name
        assert stage.package.startswith("stages.") and (REPO / stage.package.replace(".", "/")).is_dir()
        out = CliRunner().invoke(main, [*stage.words, "--help"])
        assert out.exit_code == 0 and "--config" in out.output and "--workdir" in out.output, name
        assert ("[required]" in out.output.split("--config")[1].split("--")[0]) == stage.needs_config, name
        for field in stage.options.model_fields:
            assert field.replace("_", "-") in out.output or field.upper() in out.output, (name, field)
        assert TASKS[name].name == name
        assert TASKS[name].retries == stage.retries and ("gpu" in TASKS[name].tags) == stage.gpu


def test_a_stages_code_is_its_package_and_what_it_imports(tiny_config, tmp_path):
    build = closure("stages.build")
    files = {str(p.relative_to(REPO)) for p in build.values()}
    # its own modules, and the shared ones it runs: the normalizer (dedup), prompts, catalog, tables, schemas
    assert {"stages/build/dedup.py", "stages/build/shards.py", "core/text.py", "core/prompts.py"} <= files
    assert {"core/catalog.py", "core/tables.py", "core/atomic.py", "schemas/__init__.py"} <= files
    # not another stage's code, nor the model build never runs, nor the modules that only record a run
    assert not any(f.startswith(("stages/train", "stages/generate", "core/lsm")) for f in files)
    assert not any(f.startswith(("core/stage.py", "core/lineage")) for f in files)
    # the imports the train workers run are found through function-level imports too
    train = {str(p.relative_to(REPO)) for p in closure("stages.train").values()}
    assert {"core/lsm/model.py", "core/lsm/loader.py", "core/lsm/batch.py", "core/lsm/features.py"} <= train
    # every stage's outputs key on a hash of that code
    ctx = Context(tiny_config, WorkPaths(tmp_path))
    assert STAGES["build"].outputs(ctx) and len(code_hash("stages.build")) == 64


def _copy_project(dst: Path) -> Path:
    for top in ("core", "stages", "schemas", "splsm", "flows", "configs", "data"):
        shutil.copytree(REPO / top, dst / top, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _splsm(tree: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    r = subprocess.run(
        [sys.executable, "-m", "splsm.cli", *args], cwd=tree, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_editing_a_shared_module_build_uses_makes_build_run_again(tmp_path):
    """Build (ASR examples only) in a copy of the project; run it again: reused. Edit a module of another
    stage: still reused. Edit ``core/text.py``, whose normalizer build's dedup calls: build runs again."""
    tree = _copy_project(tmp_path / "tree")
    config = tree / "configs" / "asr.yaml"
    config.write_text(
        (tree / "configs" / "tiny.yaml").read_text().replace("build:\n", "build:\n  tasks: [asr]\n")
    )
    work = tmp_path / "work"
    marker = WorkPaths(work).marker("build")
    args = ["--config", str(config), "--workdir", str(work)]
    _splsm(tree, "harvest", *args)

    def build_run_id() -> str:
        _splsm(tree, "build", *args)
        return json.loads(marker.read_text())["run_id"]

    first = build_run_id()
    assert build_run_id() == first  # nothing changed: reused
    with open(tree / "stages" / "train" / "launcher.py", "a") as f:
        f.write("\n# an edit to another stage\n")
    assert build_run_id() == first  # not build's code: still reused
    with open(tree / "core" / "text.py", "a") as f:
        f.write("\n# an edit to a shared module build uses\n")
    second = build_run_id()
    assert second != first  # build's code changed: it ran again
    assert build_run_id() == second
