"""Every numeric setting at its edges: a value past a bound is refused when the config loads, the error naming
the key; a value at the bound loads and runs through the stage that reads it, on the tiny data, to its end or
to one of the stage's own clear errors (never a crash inside a library). Enumerated settings run at each value.

The settings are enumerated from the config models, like the reuse-key test's, so a setting added later is
covered (or this test fails asking for its bounds): nothing depends on someone remembering to add a case.
Train and evaluate, whose runs take half a minute each, run once at a corner where every one of their numeric
settings sits at its lower edge together; the cheaper stages run once per setting and edge.
"""

from __future__ import annotations

import copy
import shutil
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from conftest import REPO, run_stage
from core.config import ConfigError, ExperimentConfig, load_config
from core.stage import StageError

TINY = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
for _c in TINY["corpora"]:
    for _k in ("root", "manifest"):
        if _k in _c:
            _c[_k] = str((REPO / "configs" / _c[_k]).resolve())
# the in-process backend: the stage's edges without a server's start in every run
TINY["generate"]["backend"] = {"kind": "transformers", "batch_size": 8}
TINY["generate"]["tasks"] = ["repeat", "keywords"]

STAGE_OF = {
    "seed": "harvest",
    "models": "models",
    "harvest": "harvest",
    "generate": "generate",
    "build": "build",
    "train": "train",
    "evaluate": "evaluate",
}
# What the backend block needs to hold a setting of one kind of backend, and the settings that only the
# OpenAI-protocol client reads: those are run against the in-process backend's kind where they cannot be.
BACKEND_KIND = {"transformers-serve": {"kind": "transformers-serve"}, "openai": None, "vllm": None}


def _bounds(info) -> tuple[float | None, bool, float | None, bool]:
    """(lower, lower is strict, upper, upper is strict) of a field's constraints."""
    lo = hi = None
    lo_strict = hi_strict = False
    for m in info.metadata:
        for attr, strict, side in (
            ("ge", False, "lo"),
            ("gt", True, "lo"),
            ("le", False, "hi"),
            ("lt", True, "hi"),
        ):
            v = getattr(m, attr, None)
            if v is None:
                continue
            if side == "lo":
                lo, lo_strict = v, strict
            else:
                hi, hi_strict = v, strict
    return lo, lo_strict, hi, hi_strict


def _fields(model: type[BaseModel], prefix: tuple = (), tag: dict | None = None):
    """(path, kind tag of a backend block or None, field info, base type or Literal values) of every numeric or
    enumerated setting reachable from ``model``."""
    for name, info in model.model_fields.items():
        ann = info.annotation
        union = typing.get_origin(ann) in (typing.Union, types.UnionType)
        members = [a for a in (typing.get_args(ann) if union else (ann,)) if a is not type(None)]
        for m in members:
            inner = typing.get_args(m) if typing.get_origin(m) is typing.Annotated else ()
            for sub in [m, *inner]:
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    sub_tag = tag
                    kind = sub.model_fields.get("kind")
                    if kind is not None and name == "backend":
                        sub_tag = {"kind": kind.default}
                    yield from _fields(sub, (*prefix, name), sub_tag)
                elif typing.get_origin(sub) is typing.Union:
                    for u in typing.get_args(sub):
                        if isinstance(u, type) and issubclass(u, BaseModel):
                            yield from _fields(u, (*prefix, name), {"kind": u.model_fields["kind"].default})
        numeric = [m for m in members if m in (int, float)]
        literal = [m for m in members if typing.get_origin(m) is typing.Literal]
        if name == "kind":
            continue
        if numeric:
            yield (*prefix, name), tag, info, numeric[0]
        elif literal:
            yield (*prefix, name), tag, info, typing.get_args(literal[0])


FIELDS = [f for f in _fields(ExperimentConfig) if f[0][0] != "corpora"]
NUMERIC = [f for f in FIELDS if f[3] in (int, float)]
ENUMS = [f for f in FIELDS if isinstance(f[3], tuple)]


def _set(cfg: dict, path: tuple, value, tag: dict | None) -> dict:
    cfg = copy.deepcopy(cfg)
    node = cfg
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if tag is not None and path[-2] == "backend":
        if node.get("kind") != tag["kind"]:
            node.clear()
            node.update(tag)
    node[path[-1]] = value
    return cfg


def _load(cfg: dict, tmp_path: Path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / f"c{len(list(tmp_path.glob('c*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return load_config(p)


def _id(f) -> str:
    return ".".join(f[0]) + (f"[{f[1]['kind']}]" if f[1] else "")


def _edge(typ, bound: float, strict: bool, side: str) -> float:
    """The value at a bound: the bound itself, or the nearest value inside a strict one."""
    if not strict:
        return typ(bound)
    if typ is int:
        return int(bound) + (1 if side == "lo" else -1)
    return bound + 1e-3 if side == "lo" else bound - 1e-3


def _beyond(typ, bound: float, strict: bool, side: str) -> float:
    if strict:
        return typ(bound)
    step = 1 if typ is int else 1e-3
    return typ(bound - step if side == "lo" else bound + step)


def test_every_numeric_setting_has_a_lower_bound():
    assert NUMERIC, "no numeric settings found: the walk over the config models is broken"
    loose = [_id(f) for f in NUMERIC if _bounds(f[2])[0] is None]
    assert loose == [], f"give these a lower bound (Field(ge=...) or gt=...): {loose}"


@pytest.mark.parametrize("field", NUMERIC, ids=_id)
def test_a_value_past_a_bound_is_refused_naming_the_key(field, tmp_path):
    path, tag, info, typ = field
    lo, lo_strict, hi, hi_strict = _bounds(info)
    for bound, strict, side in ((lo, lo_strict, "lo"), (hi, hi_strict, "hi")):
        if bound is None:
            continue
        with pytest.raises(ConfigError) as e:
            _load(_set(TINY, path, _beyond(typ, bound, strict, side), tag), tmp_path)
        msg = str(e.value)
        assert path[-1] in msg and path[0] in msg, msg


# -- runs at the edges --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_work(tmp_path_factory) -> Path:
    """A work directory where every stage has run once on the tiny config (train for 2 steps)."""
    work = tmp_path_factory.mktemp("edges") / "w"
    cfg = _set(_set(TINY, ("train", "max_steps"), 2, None), ("train", "checkpoint_every"), 0, None)
    cfg = _load(cfg, work.parent)
    for stage in ("harvest", "models", "generate", "build", "train"):
        run_stage(stage, cfg, work)
    return work


def _run_at(stage: str, cfg: dict, base: Path, tmp_path: Path) -> None:
    """Run ``stage`` on a copy of the base work directory; a clear error of the stage's own is an outcome, any
    other exception is a crash."""
    try:
        loaded = _load(cfg, tmp_path)
    except ConfigError:
        return "refused at load"  # refused at load: test_a_value_past_a_bound_is_refused_naming_the_key covers the message
    work = tmp_path / "w"
    shutil.copytree(base, work, symlinks=True)
    try:
        run_stage(stage, loaded, work, force=True)
    except StageError as e:
        return f"refused: {e}"
    return "ran"


# Edges that end a run by design (a clear error of the stage's own): each runs alone, the corner keeps its default.
APART = {"train.timeout_s": "the run is stopped at once, as asked, with a message saying so"}


# The OpenAI-protocol client's settings are the same fields in the openai and transformers-serve blocks: they run
# once, at the serve block's corner (one server start), below.
CHEAP = [
    f
    for f in FIELDS
    if (STAGE_OF[f[0][0]] not in ("train", "evaluate") and f[1] is None)
    or f[1] == {"kind": "transformers"}
    or ".".join(f[0]) in APART
]


def _default(path: tuple):
    node = TINY
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


@pytest.mark.parametrize("field", CHEAP, ids=_id)
def test_each_setting_of_harvest_models_generate_and_build_runs_at_its_edges(field, base_work, tmp_path):
    path, tag, info, typ = field
    if isinstance(typ, tuple):
        values = list(typ)
    else:
        lo, lo_strict, hi, hi_strict = _bounds(info)
        values = [
            _edge(typ, b, s, side)
            for b, s, side in ((lo, lo_strict, "lo"), (hi, hi_strict, "hi"))
            if b is not None
        ]
    for i, v in enumerate(values):
        if v == _default(path):
            continue  # the tiny config's own value: every other test runs it
        _run_at(STAGE_OF[path[0]], _set(TINY, path, v, tag), base_work, tmp_path / str(i))


def _corner(section: str, kind: str | None = None) -> tuple[dict, list[str]]:
    """The tiny config with every numeric setting of ``section`` (of its backend block of ``kind``) at its lower
    edge, where that loads."""
    cfg, moved = copy.deepcopy(TINY), []
    for path, tag, info, typ in NUMERIC:
        if path[0] != section or (kind is not None and tag != {"kind": kind}) or ".".join(path) in APART:
            continue
        lo, strict, _, _ = _bounds(info)
        v = _edge(typ, lo, strict, "lo")
        trial = _set(cfg, path, v, tag)
        try:
            ExperimentConfig.model_validate(trial)
        except Exception:
            continue  # this edge is refused at load with its key (the test above), or clashes with another
        cfg = trial
        moved.append(".".join(path))
    return cfg, moved


@pytest.mark.parametrize(
    "section, kind, least",
    [("train", None, 25), ("evaluate", None, 8), ("generate", "transformers-serve", 8)],
)
def test_train_evaluate_and_the_served_backend_run_with_every_numeric_setting_at_its_lower_edge(
    section, kind, least, base_work, tmp_path
):
    cfg, moved = _corner(section, kind)
    assert len(moved) >= least, moved  # the corner holds (nearly) all of them at once
    # these stages run to their end at the corner: a refusal there would hide which setting it was
    assert _run_at(section, cfg, base_work, tmp_path) == "ran", moved


def test_the_walk_finds_the_settings_it_must():
    ids = {_id(f) for f in FIELDS}
    for expected in (
        "build.near_dup_threshold",
        "train.qformer.window_s",
        "generate.backend.cb_cache_tokens[transformers-serve]",
        "train.lr_schedule",
        "harvest.max_duration_s",
    ):
        assert expected in ids, sorted(ids)
