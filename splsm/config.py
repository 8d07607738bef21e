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


class ManifestColumns(Strict):
    """Which column of a generic JSONL/CSV manifest holds what (only ``audio`` is required)."""

    audio: str = "audio"  # path relative to the corpus root (or absolute, still inside it)
    text: str | None = "text"  # None or an absent value: no transcript (Whisper labels it, if configured)
    id: str | None = None  # default: the audio file's stem (plus the offset for segments)
    speaker: str | None = None
    offset: str | None = None  # segment start, seconds
    duration: str | None = None  # segment length, seconds


class CorpusConfig(Strict):
    name: str
    kind: Literal["librispeech", "commonvoice", "gigaspeech", "jsonl", "manifest", "ljspeech", "audio_folder"]
    root: Path  # corpus root: every audio path must resolve inside it
    # jsonl / manifest: the manifest file (relative audio paths are relative to root);
    # gigaspeech: its metadata file (default ROOT/GigaSpeech.json)
    manifest: Path | None = None
    split: str | None = None  # override the split name (LibriSpeech: the subset folder name)
    tsvs: list[str] = Field(default_factory=lambda: ["train", "dev", "test"])  # commonvoice: ROOT/{tsv}.tsv
    subset: Literal["XS", "S", "M", "L", "XL", "DEV", "TEST"] = "XS"  # gigaspeech
    format: Literal["jsonl", "csv", "tsv"] | None = None  # manifest: default from the file's suffix
    columns: ManifestColumns = Field(default_factory=ManifestColumns)  # manifest
    text_field: Literal["normalized", "raw"] = "normalized"  # ljspeech: numbers spelt out, or as printed
    extensions: list[str] = Field(default_factory=lambda: [".wav", ".flac", ".mp3", ".opus", ".ogg"])

    @model_validator(mode="after")
    def _manifest_for_jsonl(self):
        if self.kind in ("jsonl", "manifest") and self.manifest is None:
            raise ValueError(f"corpus {self.name!r}: kind {self.kind} needs a manifest path")
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
    max_duration_s: float = 30.0  # Whisper's window: longer audio would be cut by the encoder
    min_duration_s: float = 0.0
    # openai-whisper checkpoint file ({"dims", "model_state_dict"}) that transcribes audio without a
    # transcript; relative to the config file. None: such audio becomes a ``no_transcript`` reject.
    whisper_checkpoint: Path | None = None
    whisper_language: str | None = "en"  # None: Whisper detects it
    whisper_batch_size: int = Field(8, ge=1)
    whisper_max_tokens: int | None = Field(None, ge=1)  # None: Whisper's own limit (224)
    workers: int | None = Field(None, ge=1)  # probing processes; default: every core
    content_hash: bool = True  # hash audio bytes, so a touched but unchanged file is not probed again


class GenerateConfig(Strict):
    # openai: running OpenAI-compatible servers (vLLM); transformers-serve: a `transformers serve` this stage
    # starts; transformers: the LLM in this process; vllm: vLLM's offline engine (needs the vllm package)
    backend: Literal["openai", "transformers-serve", "transformers", "vllm"] = "transformers-serve"
    base_url: str | None = None  # an OpenAI-compatible server (vLLM); required for backend openai
    base_urls: list[str] = Field(default_factory=list)  # more replicas (one vLLM per GPU), load-balanced
    api_key_env: str = "OPENAI_API_KEY"
    served_model: str | None = None  # the model name the server knows; default: the LLM directory
    tasks: list[str] = Field(default_factory=lambda: list(LLM_TASKS))
    catalog: Path | None = None  # default: the bundled catalog
    prompt_format: Literal["vicuna_v1.1", "chat_template"] = "vicuna_v1.1"
    max_new_tokens: int = Field(225, ge=1)  # cap; a catalog category may ask for fewer
    temperature: float = Field(0.0, ge=0.0)  # 0: greedy, as the reference
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 1
    # filters: the catalog says which apply to a category; these tune them or switch some off everywhere
    max_prompt_tokens: int = Field(150, ge=1)  # prompts of this many tokens or more are rejected
    min_script_fraction: float = Field(
        0.5, ge=0.0, le=1.0
    )  # translation: share of letters in the target script
    skip_filters: list[str] = Field(default_factory=list)
    # throughput and faults (not part of the reuse key: they do not change the answers)
    concurrency: int = Field(128, ge=1)  # HTTP requests in flight
    request_timeout_s: float = 600.0
    max_retries: int = Field(
        8, ge=0
    )  # on 429, 5xx and connection errors, with exponential backoff and jitter
    retry_backoff_s: float = Field(0.5, gt=0.0)
    retry_backoff_max_s: float = Field(30.0, gt=0.0)
    server_start_timeout_s: float = 300.0
    serve_continuous_batching: bool = False  # transformers-serve: pass --continuous-batching
    # auto: static (faster than continuous and equal to HF generate's greedy answers on CPU and CUDA, measured)
    transformers_batching: Literal["auto", "continuous", "static"] = "auto"
    batch_size: int = Field(
        128, ge=1
    )  # transformers backend, static batching (128: fastest on CPU, bench/generate.py)
    # transformers backend: compile the one-token decoding step (torch.compile; tens of seconds once, then
    # faster steps; pays off for long local runs, see bench/generate.py)
    transformers_compile: bool = False
    device: str = "auto"  # transformers and transformers-serve backends
    shard_size: int = Field(256, ge=1)  # answers per committed output shard
    vllm_args: dict = Field(default_factory=dict)  # extra vllm.LLM arguments (tensor_parallel_size, ...)

    @model_validator(mode="after")
    def _check(self):
        from stages.generation.filters import FILTERS

        bad = [t for t in self.tasks if t not in LLM_TASKS]
        if bad:
            raise ValueError(f"generate.tasks: unknown task {bad[0]!r}; known: {', '.join(LLM_TASKS)}")
        if self.backend == "openai" and not (self.base_url or self.base_urls):
            raise ValueError("generate.base_url (or base_urls) is required for backend openai")
        bad = [f for f in self.skip_filters if f not in FILTERS]
        if bad:
            raise ValueError(f"generate.skip_filters: unknown filter {bad[0]!r}; known: {', '.join(FILTERS)}")
        return self

    @property
    def urls(self) -> list[str]:
        return ([self.base_url] if self.base_url else []) + list(self.base_urls)


class BuildConfig(Strict):
    tasks: list[str] = Field(default_factory=lambda: list(TASKS))
    eval_splits: list[str] = Field(
        default_factory=lambda: ["dev-clean", "dev-other", "test-clean", "test-other"]
    )
    dev_fraction: float = Field(0.0, ge=0.0, le=1.0)
    test_fraction: float = Field(0.0, ge=0.0, le=1.0)
    seed: int = 1
    # Target share of each task in every train/dev/test split (normalized; tasks left out are not used).
    # None keeps every example. The largest set with exactly these shares is drawn, by a seeded hash.
    mix: dict[str, float] | None = None
    dedup_exact: bool = True  # utterances with the same normalized transcript and the same audio bytes
    # Near-duplicate LLM answers within a task (Jaccard of word 3-gram shingles, MinHash LSH), e.g. 0.9.
    # None (the default): off, because the demo's random tiny LLM repeats itself and every answer counts there.
    near_dup_threshold: float | None = Field(None, gt=0.0, le=1.0)
    minhash_perms: int = Field(128, ge=16)
    rows_per_shard: int = Field(100_000, ge=1)
    row_group_rows: int = Field(2048, ge=1, le=65536)  # streaming reads one row group at a time

    @model_validator(mode="after")
    def _check(self):
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"build.tasks: unknown task {bad[0]!r}; known: {', '.join(TASKS)}")
        if self.dev_fraction + self.test_fraction > 1.0:
            raise ValueError("build: dev_fraction + test_fraction must be at most 1")
        if self.mix is not None:
            extra = [t for t in self.mix if t not in self.tasks]
            if extra:
                raise ValueError(f"build.mix: task {extra[0]!r} is not in build.tasks")
            if any(v < 0 for v in self.mix.values()) or sum(self.mix.values()) <= 0:
                raise ValueError("build.mix: shares must be >= 0 and not all 0")
        return self


class LoaderConfig(Strict):
    """The training data loader (``stages.loader.ExampleLoader``)."""

    batch_seconds: float = Field(360.0, gt=0)  # padded audio per batch (what the encoder really sees)
    max_batch_size: int = Field(64, ge=1)
    shuffle_buffer: int = Field(2048, ge=1)  # examples held for the streaming shuffle
    bucket_batches: int = Field(16, ge=1)  # batches formed at once from duration-sorted examples
    num_workers: int = Field(4, ge=0)
    n_mels: Literal[80, 128] = 80  # Whisper up to v2: 80; v3: 128
    pad_to: Literal["30s", "longest"] = "30s"  # 30 s for HF's WhisperEncoder and the reference
    prefetch_batches: int = Field(2, ge=1)  # per worker


class QFormerConfig(Strict):
    window_s: float = 0.33333
    stride_s: float = 0.33333
    num_queries: int = 1
    num_layers: int = 2
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    # Weight init of a fresh Q-Former (BERT's 0.02, as the reference's BERT-initialized one). From scratch, 0.02
    # leaves its outputs nearly the same for every window (the learned query outweighs what it cross-attends
    # to), which a tiny model takes long to learn its way out of; the learning check uses 0.2.
    init_std: float = Field(0.02, gt=0)


class LoraSettings(Strict):
    """LoRA on the LLM through peft (the reference's config carries rank 4, alpha 32, dropout 0.1)."""

    r: int = Field(4, ge=1)
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class TrainConfig(Strict):
    nproc_per_node: int = 2
    backend: Literal["gloo", "nccl"] = "gloo"
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp shards the LLM's decoder layers (FSDP2 fully_shard)
    max_steps: int = Field(10, ge=1)
    batch_size: int = Field(2, ge=1)  # per process
    grad_accum: int = Field(1, ge=1)
    lr: float = 2e-5
    weight_decay: float = 0.05
    warmup_steps: int = 100
    lr_schedule: Literal["cosine", "linear"] = "cosine"  # decay after warm-up, to 0 at max_steps
    grad_clip: float = 1.0
    bf16: bool = False
    seed: int = 1
    # What trains: each part of the model by its own flag; ``lora`` trains the LLM through adapters only.
    freeze_encoder: bool = True
    freeze_qformer: bool = False  # the Q-Former, its queries and the LayerNorm before it
    freeze_proj: bool = False
    freeze_llm: bool = False
    lora: LoraSettings | None = None
    qformer: QFormerConfig = Field(default_factory=QFormerConfig)
    # How the build stage's shards are streamed (ExampleLoader): padded audio per batch, worker processes per
    # rank, shuffle buffer. The rows per batch are capped by batch_size; mel bins and chunk follow the Whisper.
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    checkpoint_every: int = Field(0, ge=0)  # optimizer steps between resumable checkpoints; 0: none
    keep_checkpoints: int = Field(2, ge=1)
    resume: bool = True  # continue from the latest resumable checkpoint of the same settings
    tensorboard: bool = True
    stop_grace_s: float = 120.0  # on SIGTERM, how long the workers get to write their checkpoint
    timeout_s: float = 3600.0

    @model_validator(mode="after")
    def _lora_or_frozen(self):
        if self.lora is not None and self.freeze_llm:
            raise ValueError(
                "train: lora trains the LLM through adapters; it cannot go with freeze_llm: true"
            )
        return self


class EvaluateConfig(Strict):
    eval_sets: list[str] = Field(default_factory=lambda: ["test-clean"])
    batch_size: int = Field(4, ge=1)
    num_beams: int = Field(1, ge=1)  # 1: greedy
    max_new_tokens: int = Field(128, ge=1)  # hard cap for every answer
    # ASR length bound from the audio: at most tokens_per_s * duration + length_slack tokens (and the cap).
    # Speech runs at 2-4 words/s; a model that loops would otherwise decode to the cap on every row.
    tokens_per_s: float = Field(8.0, gt=0)
    length_slack: int = Field(10, ge=0)
    # Speech-anchor-bias probe: the model's answers to the generate stage's (utterance, instruction) pairs.
    probe: bool = True
    probe_tasks: list[str] | None = None  # default: every non-ASR task the responses table has
    probe_max_new_tokens: int = Field(64, ge=1)
    anchor_wer_threshold: float = Field(0.3, gt=0)  # an answer this close to the transcript is a transcript
    # Spoken yes/no QA: a BoolQ-style JSONL file ({"utt_id", "question", "answer": true/false} a line), or
    # None for the word-presence questions generated from the eval transcripts.
    qa: bool = True
    qa_file: Path | None = None  # relative to the config file
    qa_max_new_tokens: int = Field(8, ge=1)
    baseline: Path | None = None  # a baseline's workdir (e.g. the ASR-only model) to plot the probe against
    worst_n: int = Field(10, ge=1)  # worst utterances listed and plotted in the report

    @model_validator(mode="after")
    def _check(self):
        bad = [t for t in self.probe_tasks or [] if t not in LLM_TASKS]
        if bad:
            raise ValueError(f"evaluate.probe_tasks: unknown task {bad[0]!r}; known: {', '.join(LLM_TASKS)}")
        return self


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
