"""The code a stage's outputs depend on, found from its imports: the stage's package and every project
module it imports, directly or through other project modules.

A stage's reuse key hashes this code, so editing any module a stage runs (its own, or a shared one such
as ``core.text``) makes the stage run again, while editing another stage's package does not. Imports are
read from the source (``ast``), function-level ones included, so nothing is imported to find them and no
list is kept by hand. A stage package's data files (``*.yaml``, ``*.json``, ``*.jinja``) count as its code.

Left out: the modules that only record and report a run (``BOOKKEEPING``: the stage runner, provenance,
the lineage store, the console); a change there changes no output, and counting them would make every stage of every
work directory run again after, say, a new column in the lineage store.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

from core import __version__
from core.paths import REPO_ROOT

PROJECT = ("core", "schemas", "stages", "splsm", "flows")
BOOKKEEPING = ("core.stage", "core.codehash", "core.provenance", "core.lineage", "core.log")
DATA_SUFFIXES = (".yaml", ".yml", ".json", ".jinja")


def _module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _is_project(name: str) -> bool:
    return name.split(".", 1)[0] in PROJECT


def _is_bookkeeping(name: str) -> bool:
    return any(name == b or name.startswith(b + ".") for b in BOOKKEEPING)


def _imports(name: str, file: Path, root: Path) -> set[str]:
    """Project modules that ``file`` (module ``name``) imports, with every parent package of each."""
    tree = ast.parse(file.read_bytes(), str(file))
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.add(mod)
            # ``from pkg import sub`` may name a submodule
            found.update(f"{mod}.{a.name}" for a in node.names if _module_file(f"{mod}.{a.name}", root))
    out = set()
    for mod in found:
        if not _is_project(mod):
            continue
        parts = mod.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))  # importing a.b.c runs a and a.b
    return {m for m in out if _module_file(m, root) is not None}


def package_modules(package: str, root: Path = REPO_ROOT) -> list[str]:
    """Every module in ``package`` (a package or a single module)."""
    base = root.joinpath(*package.split("."))
    if not base.is_dir():
        return [package] if _module_file(package, root) else []
    mods = []
    for f in sorted(base.rglob("*.py")):
        rel = f.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        mods.append(".".join(parts))
    return mods


def closure(package: str, root: Path = REPO_ROOT) -> dict[str, Path]:
    """Module name -> source file for the package and every project module it reaches by importing."""
    todo = list(package_modules(package, root))
    seen: dict[str, Path] = {}
    while todo:
        mod = todo.pop()
        if mod in seen or _is_bookkeeping(mod):
            continue
        file = _module_file(mod, root)
        if file is None:
            continue
        seen[mod] = file
        todo.extend(_imports(mod, file, root) - seen.keys())
    return dict(sorted(seen.items()))


def _data_files(package: str, root: Path) -> list[Path]:
    base = root.joinpath(*package.split("."))
    if not base.is_dir():
        return []
    return sorted(p for p in base.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())


@lru_cache(maxsize=64)
def _cached(package: str, root: Path, stamp: tuple) -> str:
    h = hashlib.sha256(__version__.encode())
    files = list(closure(package, root).values()) + _data_files(package, root)
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def code_hash(package: str, root: Path = REPO_ROOT) -> str:
    """A hash of the code behind ``package``'s outputs (see the module docstring)."""
    base = root.joinpath(*package.split("."))
    # the cache is keyed on every source file's mtime and size under the project: an edit invalidates it
    stamp = tuple(
        (str(p), p.stat().st_mtime_ns, p.stat().st_size)
        for top in PROJECT
        if (root / top).is_dir()
        for p in sorted((root / top).rglob("*"))
        if p.suffix == ".py" or (p.is_relative_to(base) and p.suffix in DATA_SUFFIXES)
    )
    return _cached(package, root, stamp)
