"""ruff is the project's linter and formatter; CI fails on either."""

import subprocess
import sys
from pathlib import Path

from conftest import REPO

RUFF = Path(sys.executable).with_name("ruff")


def test_ruff_check_is_clean():
    r = subprocess.run(
        [str(RUFF), "check", "--output-format", "concise", "."], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_is_clean():
    r = subprocess.run([str(RUFF), "format", "--check", "."], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_layers_import_downward_only():
    """import-linter's contracts (pyproject.toml): cli > flows > runner > stages > core > schemas, and no stage
    imports another."""
    r = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "0 broken" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_every_stage_package_is_in_the_independence_contract():
    """A stage package left out of the contract could import another stage unnoticed (stages.reference_checkpoint
    was, for a while)."""
    import tomllib

    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    listed = {m for c in contracts if c["type"] == "independence" for m in c["modules"]}
    packages = {f"stages.{p.parent.name}" for p in (REPO / "stages").glob("*/__init__.py")}
    assert packages <= listed, f"missing from the independence contract: {sorted(packages - listed)}"
