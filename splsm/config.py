"""Experiment configs: one YAML file per experiment, validated here before any stage runs.

Relative paths in a config are relative to the config file, so a config and its data move together.
Unknown keys are errors: a misspelt setting must not silently fall back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"

TASKS = ("asr", "repeat", "keywords", "intent", "sentiment", "continuation", "translation")
LLM_TASKS = TASKS[1:]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CorpusConfig(Strict):
    name: str
    kind: Literal["librispeech", "jsonl"]
    root: Path  # corpus root: every audio path must resolve inside it
    manifest: Path | None = None  # jsonl: the manifest file; relative audio paths are relative to root
    split: str | None = None  # override the split name (LibriSpeech: the subset folder name)

    @model_validator(mode="after")
    def _manifest_for_jsonl(self):
        if self.kind == "jsonl" and self.manifest is None:
            raise ValueError(f"corpus {self.name!r}: kind jsonl needs a manifest path")
        return self


class TinyModels(Strict):
    """Random-weight models small enough for a laptop, written by ``splsm models tiny``."""

    whisper_d_model: int = 64
    whisper_layers: int = 2
    llm_hidden: int = 128
    llm_layers: int = 2
    llm_heads: int = 4
    vocab_size: int = 1000


class ModelsConfig(Strict):
    whisper: Path | None = None  # a Hugging Face Whisper directory (e.g. whisper-large-v2)
    llm: Path | None = None  # a Hugging Face causal LM directory (e.g. vicuna-7b-v1.5)
    tiny: TinyModels | None = None  # build tiny models under WORKDIR/models instead

    @model_validator(mode="after")
    def _either(self):
        if self.tiny is None and (self.whisper is None or self.llm is None):
            raise ValueError("models: give both whisper and llm directories, or tiny: {} to build tiny ones")
        return self


class HarvestConfig(Strict):
    max_duration_s: float = 30.0
    min_duration_s: float = 0.0


class GenerateConfig(Strict):
    backend: Literal["openai", "transformers-serve"] = "transformers-serve"
    base_url: str | None = None  # an OpenAI-compatible server (vLLM); required for backend openai
    api_key_env: str = "OPENAI_API_KEY"
    served_model: str | None = None  # the model name the server knows; default: the LLM directory
    tasks: list[str] = Field(default_factory=lambda: list(LLM_TASKS))
    catalog: Path | None = None  # default: the bundled catalog
    prompt_format: Literal["vicuna_v1.1"] = "vicuna_v1.1"
    max_new_tokens: int = 225
    temperature: float = 0.0
    seed: int = 1
    concurrency: int = 8
    request_timeout_s: float = 600.0
    max_retries: int = 5
    server_start_timeout_s: float = 300.0

    @model_validator(mode="after")
    def _check(self):
        bad = [t for t in self.tasks if t not in LLM_TASKS]
        if bad:
            raise ValueError(f"generate.tasks: unknown task {bad[0]!r}; known: {', '.join(LLM_TASKS)}")
        if self.backend == "openai" and not self.base_url:
            raise ValueError("generate.base_url is required for backend openai")
        return self


class BuildConfig(Strict):
    tasks: list[str] = Field(default_factory=lambda: list(TASKS))
    eval_splits: list[str] = Field(
        default_factory=lambda: ["dev-clean", "dev-other", "test-clean", "test-other"]
    )
    dev_fraction: float = 0.0
    test_fraction: float = 0.0
    seed: int = 1


class QFormerConfig(Strict):
    window_s: float = 0.33333
    stride_s: float = 0.33333
    num_queries: int = 1
    num_layers: int = 2
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072


class TrainConfig(Strict):
    nproc_per_node: int = 2
    backend: Literal["gloo", "nccl"] = "gloo"
    max_steps: int = Field(10, ge=1)
    batch_size: int = Field(2, ge=1)  # per process
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.05
    warmup_steps: int = 100
    lr_schedule: Literal["cosine", "linear"] = "cosine"  # decay after warm-up, to 0 at max_steps
    grad_clip: float = 1.0
    bf16: bool = False
    seed: int = 1
    freeze_encoder: bool = True
    freeze_llm: bool = False
    qformer: QFormerConfig = Field(default_factory=QFormerConfig)
    timeout_s: float = 3600.0


class EvaluateConfig(Strict):
    eval_sets: list[str] = Field(default_factory=lambda: ["test-clean"])
    batch_size: int = 4
    max_new_tokens: int = 128


class ExperimentConfig(Strict):
    name: str
    seed: int = 1
    corpora: list[CorpusConfig]
    models: ModelsConfig
    harvest: HarvestConfig = Field(default_factory=HarvestConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    build: BuildConfig = Field(default_factory=BuildConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    source: Path | None = None  # the file this config came from

    @model_validator(mode="after")
    def _unique_names(self):
        names = [c.name for c in self.corpora]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"corpora: name {sorted(dup)[0]!r} appears twice")
        return self


class ConfigError(ValueError):
    pass


def load_config(path: str | Path) -> ExperimentConfig:
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config {path} does not exist")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level")
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"config {path}:\n{e}") from e
    return _resolve_paths(cfg, path.parent).model_copy(update={"source": path})


def _resolve_paths(cfg: ExperimentConfig, base: Path) -> ExperimentConfig:
    def res(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (base / p)).resolve()

    corpora = [c.model_copy(update={"root": res(c.root), "manifest": res(c.manifest)}) for c in cfg.corpora]
    models = cfg.models.model_copy(update={"whisper": res(cfg.models.whisper), "llm": res(cfg.models.llm)})
    gen = cfg.generate.model_copy(update={"catalog": res(cfg.generate.catalog)})
    return cfg.model_copy(update={"corpora": corpora, "models": models, "generate": gen})


def model_dirs(cfg: ExperimentConfig, workdir: Path) -> tuple[Path, Path]:
    """The Whisper and LLM directories a config points at (tiny ones live under WORKDIR/models)."""
    if cfg.models.tiny is not None:
        return Path(workdir).resolve() / "models" / "whisper", Path(workdir).resolve() / "models" / "llm"
    return cfg.models.whisper, cfg.models.llm
