"""Shared by the model, train and evaluate tests: tiny models and an examples table over the bundled clips."""

from __future__ import annotations

from pathlib import Path

from core.catalog import load_catalog
from core.config import ExperimentConfig, QFormerConfig, TinyModels
from core.paths import REPO_ROOT
from core.prompts import VICUNA_V11_SYSTEM, speech_prompt
from core.tables import write_table
from core.text import readable
from schemas import EXAMPLES, to_table
from stages.tiny_models.models import build_tiny_models

DEMO = REPO_ROOT / "data" / "demo"
# The demo config's connector sizes: small enough for 2 CPU cores.
TINY_QFORMER = QFormerConfig(hidden_size=64, num_heads=4, intermediate_size=128)


def librispeech_utts() -> list[tuple[str, Path, str]]:
    """(utt_id, flac, transcript) of the bundled LibriSpeech dev-clean-2 clips."""
    out = []
    for trans in sorted((DEMO / "LibriSpeech").rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            utt_id, _, text = line.strip().partition(" ")
            out.append((utt_id, trans.parent / f"{utt_id}.flac", text))
    return out


def test_clean_utts() -> list[tuple[str, Path, str]]:
    import json

    out = []
    for line in (DEMO / "test-clean.jsonl").read_text().splitlines():
        obj = json.loads(line)
        path = DEMO / obj["audio"]
        out.append((path.stem, path, obj["text"]))
    return out


def demo_texts() -> list[str]:
    """What the tiny tokenizer learns from: transcripts, instructions and the prompt pieces."""
    catalog = load_catalog()
    texts = [t for _, _, t in librispeech_utts() + test_clean_utts()]
    texts += [readable(t) for t in texts]
    texts += [i.text for cat in catalog.categories.values() for i in cat.instructions]
    texts += [VICUNA_V11_SYSTEM, "USER: ASSISTANT: SPEECH:"]
    return texts


def build_models(out_dir: Path) -> tuple[Path, Path]:
    return build_tiny_models(demo_texts(), Path(out_dir), TinyModels(), seed=1)


def example_row(
    utt_id: str,
    path: Path,
    transcript: str,
    split: str,
    task: str = "asr",
    answer: str | None = None,
    duration_s: float | None = None,
) -> dict:
    import soundfile as sf

    instruction = load_catalog().draw(task, utt_id, 1).text
    prompt = speech_prompt(instruction)
    if duration_s is None:
        duration_s = sf.info(str(path)).duration if path.exists() else 3.0
    return dict(
        example_id=f"{utt_id}/{task}",
        utt_id=utt_id,
        split=split,
        task=task,
        instruction=instruction,
        prefix=prompt.prefix,
        suffix=prompt.suffix,
        answer=answer if answer is not None else readable(transcript),
        transcript=readable(transcript),
        audio_path=str(path),
        offset_s=0.0,
        duration_s=float(duration_s),
        speaker=utt_id.split("-")[0],
    )


def demo_rows() -> list[dict]:
    """Train rows (ASR and a self-powered 'repeat' task) on LibriSpeech, test-clean ASR rows for evaluation."""
    rows = []
    for utt_id, path, text in librispeech_utts():
        rows.append(example_row(utt_id, path, text, "train", "asr"))
        rows.append(
            example_row(utt_id, path, text, "train", "repeat", answer=f"In other words: {readable(text)}.")
        )
    for utt_id, path, text in test_clean_utts():
        rows.append(example_row(utt_id, path, text, "test-clean", "asr"))
    return rows


def write_examples(path: Path, rows: list[dict] | None = None) -> Path:
    return write_table(to_table(rows if rows is not None else demo_rows(), EXAMPLES), path, EXAMPLES)


def experiment(**train_overrides) -> ExperimentConfig:
    """A config like configs/tiny.yaml's train and evaluate sections (the corpora are not used here)."""
    train = dict(
        nproc_per_node=2,
        backend="gloo",
        max_steps=3,
        batch_size=2,
        lr=5e-4,
        warmup_steps=1,
        qformer=TINY_QFORMER.model_dump(),
        loader={"num_workers": 0},  # 2 cores: the ranks themselves use them
    )
    train.update(train_overrides)
    return ExperimentConfig.model_validate(
        dict(
            name="lsm-test",
            corpora=[],
            models={"tiny": {}},
            train=train,
            # the tiny random Whisper cannot transcribe on its own: no reference row (tests/test_real_models.py has one)
            evaluate={
                "eval_sets": ["test-clean"],
                "batch_size": 3,
                "max_new_tokens": 12,
                "whisper_reference": False,
            },
        )
    )
