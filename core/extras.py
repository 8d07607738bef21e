"""Optional dependencies: what only some stages or backends need lives in an extra of the package
(pyproject.toml), and a missing one is named, with the command that installs it, before any work starts."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


class MissingExtra(ImportError):
    pass


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import ``module``, or say which extra of splsm brings it and what asked for it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(
            f"{needed_for} needs the Python package {module!r}, which is not installed: "
            f"pip install 'splsm[{extra}]' (or pip install -e '.[{extra}]' in a checkout)"
        ) from e


def check(modules: tuple[str, ...], extra: str, needed_for: str) -> None:
    """Like ``require`` for modules another process will import (a server started as a subprocess)."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            raise MissingExtra(
                f"{needed_for} needs the Python package {m!r}, which is not installed: "
                f"pip install 'splsm[{extra}]' (or pip install -e '.[{extra}]' in a checkout)"
            )
