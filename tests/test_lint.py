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
