"""Every setting that can change a stage's output changes its reuse key, and the answer cache key where it
applies; the settings that cannot are listed here, each with why, and shown not to.

The settings are enumerated from the config models themselves, so a setting added later is covered (or
this test fails asking for it to be listed): nothing depends on someone remembering to add a case.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from conftest import REPO
from core.config import ExperimentConfig, TrainConfig, ValidationConfig, load_config
from stages.registry import STAGES

_PAPER = load_config(REPO / "configs" / "paper.yaml")
# paper.yaml's LLM lives on the vLLM host, not here: a given revision stands for it (no server to ask)
BASE = _PAPER.model_copy(
    update={
        "generate": _PAPER.generate.model_copy(
            update={"backend": _PAPER.generate.backend.model_copy(update={"model_revision": "sha256:test"})}
        )
    }
)

# Settings outside a stage's own section that its outputs depend on.
CROSS = {
    "build": [
        ("generate", "prompt_format"),
        ("generate", "transcript_form"),
        ("generate", "tasks"),
        ("generate", "tasks_per_utterance"),
        ("generate", "seed"),
    ],
    "evaluate": [("generate", "prompt_format")],
    # the checkpoint's recipe.json (core.recipe.Recipe): the layout and the catalog's wordings
    "train": [("generate", "prompt_format"), ("generate", "catalog")],
}

# Settings of a stage's section that do not change its outputs: how fast or how often, not what.
EXEMPT = {
    "generate": {
        "shard_size": "how many answers a committed file holds; the merged table is the same",
        "backend.concurrency": "requests in flight",
        "backend.request_timeout_s": "how long to wait",
        "backend.max_retries": "how often to try again",
        "backend.retry_backoff_s": "how long to wait between tries",
        "backend.retry_backoff_max_s": "how long to wait between tries",
        "backend.base_urls": "where the replicas are; which model they serve is keyed (served_model, revision)",
        "backend.api_key_env": "which variable holds the key",
    },
    "train": {
        **{
            name: "how long or how often, not what is trained"
            for name in TrainConfig.RESUME_EXEMPT
            if name != "validation"
        },
        **{
            f"validation.{name}": "what is measured while training, not what is trained"
            for name in ValidationConfig.model_fields
        },
        # tests/test_train_multinode.py: nodes that met there train as one node of as many processes does
        "rdzv_endpoint": "where the nodes meet, not what they train",
        "rdzv_id": "the name the nodes meet under, not what they train",
    },
    "harvest": {"workers": "probe processes; rows are written in reader order whatever their number"},
    # tests/test_model_fast_paths.py: the cached frames give the loss and gradients of computed ones
    "evaluate": {"encoder_cache": "whether the encoder's outputs are read from a cache or computed again"},
}


# Where no value of the setting alone is valid, the changes that make one (path: {path: value}).
OVERRIDES = {
    "generate.backend.kind": {"generate.backend": {"kind": "transformers"}},
    "generate.catalog": {"generate.catalog": str(REPO / "core" / "catalogs" / "instructions-v1.yaml")},
    "generate.skip_filters": {"generate.skip_filters": ["no_end_punct"]},
    "build.mix": {"build.mix": {"asr": 1.0, "repeat": 1.0}},
    "build.answer_tokens_between": {"build.answer_tokens_between": [6, 2048]},
    "train.mlflow_uri": {"train.loggers": ["mlflow"], "train.mlflow_uri": "sqlite:////tmp/other-mlflow.db"},
    "evaluate.probe_tasks": {"evaluate.probe_tasks": ["repeat"]},
    "train.nnodes": {"train.nnodes": 2, "train.rdzv_endpoint": "node0:29400"},
    "train.validation.every": {"train.validation.every": 5, "train.validation.splits": ["train"]},
}
# Settings valid only beside another: both sides of the comparison carry the first changes, then the setting
# alone changes to the second value (path: ({path: value}, value)).
BESIDE = {
    "train.rdzv_endpoint": ({"train.nnodes": 2, "train.rdzv_endpoint": "node0:29400"}, "node1:29500"),
    "train.qformer.ctc_mix": ({"train.qformer.ctc_shrink": True}, True),
}


def _fields(model: BaseModel, prefix: str = "") -> list[str]:
    out = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out += _fields(value, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def _literals(annotation) -> list:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [v for a in typing.get_args(annotation) for v in _literals(a)]


def _candidates(value, annotation) -> list:
    """Other values to try for a setting, most plausible first."""
    out = [v for v in _literals(annotation) if v != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        out += [value + 1, value - 1, value * 2]
    elif isinstance(value, float):
        out += [value * 1.5 + 0.01, value / 2, 0.5, 1.0]
    elif isinstance(value, str):
        out += [value + "-x"]
    elif isinstance(value, Path):
        out += [value.parent / (value.name + "-other")]
    elif isinstance(value, list):
        out += [value[:-1], value[1:], list(reversed(value)), value + value[:1]]
    elif isinstance(value, dict):
        out += [{}]
    elif value is None:
        out += [1, 2, 0.5, True, "x", [5, 100], {"r": 4}, ["tensorboard"], BASE.source]
    return out


def _set(cfg: ExperimentConfig, path: str, value, more: dict | None = None) -> ExperimentConfig | None:
    """``cfg`` with the setting at ``path`` (``train.qformer.num_queries``) changed, validated; None if invalid."""
    dumped = cfg.model_dump(exclude_unset=True)
    for where, v in ({path: value} | (more or {})).items():
        node = dumped
        *parents, last = where.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    if path == "train.epochs" and value is not None:
        dumped["train"].pop("max_steps", None)
    if path == "train.max_steps":
        dumped["train"].pop("epochs", None)
    try:
        return ExperimentConfig.model_validate(dumped)
    except (ValidationError, ValueError):
        return None


def _changed(path: str) -> ExperimentConfig:
    if path in OVERRIDES:
        (first, value), *rest = OVERRIDES[path].items()
        cfg = _set(BASE, first, value, dict(rest))
        assert cfg is not None, f"OVERRIDES[{path!r}] is not a valid config"
        return cfg
    section, *rest = path.split(".")
    model = getattr(BASE, section)
    for p in rest[:-1]:
        model = getattr(model, p)
    name = rest[-1]
    value, annotation = getattr(model, name), type(model).model_fields[name].annotation
    for candidate in _candidates(value, annotation):
        cfg = _set(BASE, path, candidate)
        if cfg is not None and cfg.model_dump() != BASE.model_dump():
            return cfg
    pytest.fail(f"no other valid value found for {path} (value {value!r}): add a candidate in _candidates")


def _params(stage: str, cfg: ExperimentConfig, tmp_path: Path) -> dict:
    s = STAGES[stage]
    return s.params(s.context(cfg, tmp_path))


CASES = [
    (stage, path)
    for stage in ("harvest", "generate", "build", "train", "evaluate")
    for path in _fields(getattr(BASE, stage), f"{stage}.")
] + [(stage, f"{sec}.{name}") for stage, pairs in CROSS.items() for sec, name in pairs]


@pytest.mark.parametrize("stage, path", CASES, ids=[f"{s}:{p}" for s, p in CASES])
def test_a_setting_changes_the_reuse_key_unless_it_is_listed_as_not_changing_the_output(
    stage, path, tmp_path
):
    exempt = EXEMPT.get(stage, {}).get(path.split(".", 1)[1]) if path.startswith(stage + ".") else None
    base, changed = BASE, None
    if path in BESIDE:
        (first, value), *rest = BESIDE[path][0].items()
        base = _set(BASE, first, value, dict(rest))
        changed = _set(base, path, BESIDE[path][1])
        assert base is not None and changed is not None, f"BESIDE[{path!r}] is not a valid config"
    before, after = _params(stage, base, tmp_path), _params(stage, changed or _changed(path), tmp_path)
    if exempt:
        assert before == after, (
            f"{path} is listed as not changing {stage}'s output ({exempt}), yet it is keyed"
        )
    else:
        assert before != after, (
            f"{stage}'s reuse key ignores {path}: a changed {path} would reuse old outputs"
        )


def test_the_exempt_lists_name_real_settings():
    for stage, names in EXEMPT.items():
        known = set(_fields(getattr(BASE, stage)))
        assert set(names) <= known, f"{stage}: {sorted(set(names) - known)} are not settings"


# ----- the answer cache key ---------------------------------------------------------------------------

ANSWER_SETTINGS = [
    "generate.prompt_format",
    "generate.transcript_form",
    "generate.catalog",
    "generate.max_new_tokens",
    "generate.temperature",
    "generate.top_p",
    "generate.seed",
]


@pytest.mark.parametrize("path", ANSWER_SETTINGS)
def test_a_setting_that_shapes_a_request_changes_its_answer_cache_key(path, harvested, tmp_path):
    from core.catalog import load_catalog
    from core.paths import WorkPaths
    from stages.generate.driver import plan_requests

    transcripts = WorkPaths(harvested).harvest.transcripts
    # a cap above every category's own budget changes no request: lower it
    changed = _set(BASE, path, 100) if path == "generate.max_new_tokens" else _changed(path)

    def keys(cfg):
        g = cfg.generate
        return [r.key for r in plan_requests(transcripts, load_catalog(g.catalog), g, "m", "r")]

    before, after = keys(BASE), keys(changed)
    # the seed draws each utterance's task and instruction anew: most requests change, a few may not
    assert len(set(before) & set(after)) < len(before) / 2, f"{path} does not reach the answer cache key"


@pytest.mark.parametrize("what", ["model", "revision"])
def test_the_served_model_and_its_revision_are_in_the_answer_cache_key(what, harvested):
    from core.catalog import load_catalog
    from core.paths import WorkPaths
    from stages.generate.driver import plan_requests

    g = BASE.generate
    transcripts = WorkPaths(harvested).harvest.transcripts
    cat = load_catalog(g.catalog)
    a = plan_requests(transcripts, cat, g, "m", "r")
    b = plan_requests(
        transcripts, cat, g, "m2" if what == "model" else "m", "r2" if what == "revision" else "r"
    )
    assert all(x.key != y.key for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("setting", ["max_new_tokens", "temperature", "top_p", "seed"])
def test_each_sampling_setting_reaches_the_request_and_its_cache_key(setting):
    """At temperature 0 the seed changes no prompt, yet it changes the answers of any sampling run: it must be in
    what is sent and in the key, not only in the instruction draw."""
    from stages.generate.cache import request_key
    from stages.generate.driver import sampling_params

    g = BASE.generate
    other = g.model_copy(
        update={setting: {"max_new_tokens": 17, "temperature": 0.7, "top_p": 0.9, "seed": 99}[setting]}
    )
    a, b = sampling_params(g), sampling_params(other)
    assert a != b, f"generate.{setting} is not sent with the request"
    assert request_key("m", "r", "the same prompt", a) != request_key("m", "r", "the same prompt", b)
