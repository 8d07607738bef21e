"""The learning check of issue 6: does a tiny LSM learn speech? Shared by ``tests/test_learning.py`` (which CI
runs) and ``bench/learning.py`` (which prints the figures).

Spoken digit strings are synthesized with espeak-ng in varied voices, speeds and pitches (so that the model
cannot memorize one waveform per digit); a tiny LSM is trained with torchrun on 2 CPU processes; the WER is
measured on held-out strings, none of which occurs in training.

Every part is in the path the gradient takes: log-mel features, the Whisper encoder (trained here, not frozen,
so that its random weights can become useful), the windows, the Q-Former, the projection and the LLM.
"""

from __future__ import annotations

import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from helpers_lsm import example_row

from core.config import QFormerConfig, TinyModels, TrainConfig
from core.paths import WorkPaths
from core.prompts import VICUNA_V11_SYSTEM
from core.tables import read_table, write_table
from schemas import EXAMPLES, to_table

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp"]
VARIANTS = ["", "+m1", "+m3", "+f2", "+f4"]
N_TRAIN, N_TEST = 1000, 40
WER_GOAL = 0.30
CHUNK_S = 5  # every clip here lasts under 5 s
INIT_STD = 0.2
LLM_LAYERS = 2
# The reference's 0.333 s windows give about one speech token per spoken digit here (espeak speaks 2-3
# digits a second): too coarse for a 64-wide Q-Former learning from scratch, which then mostly gets the first
# digit right (held-out WER about 0.5 after 3000 steps). At 0.2 s the same run reaches about 0.1. The
# reference's windows work with a pretrained Whisper and a 768-wide Q-Former; the window is a setting.
WINDOW_S = 0.2

SETTINGS = dict(
    nproc_per_node=2,
    backend="gloo",
    max_steps=3000,
    batch_size=8,
    grad_accum=1,
    # At 2e-3 the LLM settles on the digits' prior (loss ~1.9, the speech ignored) and leaves that plateau only
    # once the cosine decay has brought the rate under ~1e-3, after 1500-2000 steps: held-out WER 0.63-0.68
    # at 3000 steps (two runs). At 7e-4 it starts to use the speech within 300-500 steps: WER 0.04 at 3000
    # steps; 0.19 with another training seed and 2000 steps.
    lr=7e-4,
    weight_decay=0.01,
    warmup_steps=30,
    lr_schedule="cosine",
    freeze_encoder=False,
    seed=1,
    checkpoint_every=0,
    loader={"num_workers": 0},
    qformer=QFormerConfig(
        hidden_size=64,
        num_heads=4,
        intermediate_size=128,
        init_std=INIT_STD,
        dropout=0.1,  # the setting these figures were measured with (the default is 0 since issue 29)
        window_s=WINDOW_S,
        stride_s=WINDOW_S,
    ).model_dump(),
)


@dataclass
class LearningResult:
    wer: float
    seconds: float
    steps: int
    final_loss: float
    pairs: list[tuple[str, str]]  # (reference, hypothesis) of every held-out utterance
    workdir: Path


def digit_strings(seed: int = 1, n_train: int = N_TRAIN) -> tuple[list[str], list[str]]:
    """Distinct strings of 3 to 5 digits; the test strings never occur in training."""
    rng = random.Random(seed)
    seen: set[str] = set()
    while len(seen) < n_train + N_TEST:
        seen.add(" ".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 5))))
    strings = sorted(seen)
    rng.shuffle(strings)
    return strings[:n_train], strings[n_train:]


def synthesize(text: str, path: Path, rng: random.Random) -> None:
    voice = rng.choice(VOICES) + rng.choice(VARIANTS)
    speed, pitch = rng.randint(130, 190), rng.randint(30, 70)
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
        check=True,
        capture_output=True,
    )


def short_chunk_whisper(whisper_dir: Path, chunk_s: int = CHUNK_S, init_std: float = INIT_STD, seed: int = 1):
    """Rewrite a tiny Whisper to take ``chunk_s`` seconds instead of 30, with weights drawn at ``init_std``.

    Padding clips of under 5 s to 30 s would spend nearly all of the CPU on silence. And at Whisper's own
    init_std of 0.02 a random encoder's output is almost all positional embedding (two clips differ by under 2%
    after the LayerNorm), so nothing downstream could hear the audio; at 0.2 they differ by about 60%, as a
    pretrained encoder's would."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    cfg = WhisperConfig.from_pretrained(whisper_dir)
    cfg.max_source_positions = chunk_s * 50  # Whisper's encoder: 50 frames a second
    cfg.init_std = init_std
    torch.manual_seed(seed)
    WhisperForConditionalGeneration(cfg).save_pretrained(whisper_dir)
    WhisperFeatureExtractor(feature_size=cfg.num_mel_bins, chunk_length=chunk_s).save_pretrained(whisper_dir)
    return whisper_dir


def build_digit_set(root: Path, seed: int = 1, n_train: int = N_TRAIN) -> Path:
    """WAVs under ``root/audio`` and an examples table with train and test rows."""
    train_s, test_s = digit_strings(seed, n_train)
    rng = random.Random(seed + 1)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, strings in (("train", train_s), ("test", test_s)):
        for i, text in enumerate(strings):
            utt = f"{split}{i:04d}-digits"
            wav = root / "audio" / f"{utt}.wav"
            synthesize(text, wav, rng)
            row = example_row(utt, wav, text, split, "asr", answer=text)
            assert row["duration_s"] < CHUNK_S, (wav, row["duration_s"])
            rows.append(row)
    return write_table(to_table(rows, EXAMPLES), root / "examples.parquet", EXAMPLES)


def held_out_wer(checkpoint: Path, examples: Path) -> tuple[float, list[tuple[str, str]]]:
    """Greedy transcripts of the test rows by the trained checkpoint, scored with jiwer."""
    import jiwer
    import torch

    from core import audio
    from core.lsm.batch import Collate
    from core.lsm.model import LSMForConditionalGeneration

    model = LSMForConditionalGeneration.from_pretrained(checkpoint).eval()
    collate = Collate.for_model(model)
    test_rows = [r for r in read_table(examples, EXAMPLES).to_pylist() if r["split"] == "test"]
    refs, hyps = [], []
    for i in range(0, len(test_rows), 10):
        rows = test_rows[i : i + 10]
        clips = [audio.load(r["audio_path"], r["offset_s"], r["duration_s"]) for r in rows]
        batch = collate(rows, clips, with_answer=False)
        with torch.no_grad():
            out = model.generate(
                batch.input_features, batch.durations_s, batch.prefix_ids, batch.suffix_ids, max_new_tokens=12
            )
        hyps += [model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out]
        refs += [r["answer"] for r in rows]
    return jiwer.wer(refs, hyps), list(zip(refs, hyps, strict=True))


def run_check(
    work: Path,
    steps: int = SETTINGS["max_steps"],
    n_train: int = N_TRAIN,
    llm_layers: int = LLM_LAYERS,
    overrides: dict | None = None,
) -> LearningResult:
    """Synthesize, build tiny models, train with torchrun on 2 processes, score the held-out strings."""
    from stages.tiny_models.models import build_tiny_models
    from stages.train import launcher as train

    t0 = time.monotonic()
    examples = build_digit_set(work / "digits", n_train=n_train)
    texts = DIGITS + [" ".join(DIGITS)] * 4 + [VICUNA_V11_SYSTEM, "USER: ASSISTANT: SPEECH:"]
    texts += list({r["instruction"] for r in read_table(examples, EXAMPLES).to_pylist()})
    whisper_dir, llm_dir = build_tiny_models(
        texts, work / "models", TinyModels(vocab_size=400, llm_layers=llm_layers)
    )
    short_chunk_whisper(whisper_dir)
    cfg = TrainConfig.model_validate({**SETTINGS, "max_steps": steps, **(overrides or {})})
    summary = train.train(cfg, whisper_dir, llm_dir, examples, work / "train")
    wer, pairs = held_out_wer(WorkPaths(work).train.checkpoint, examples)
    return LearningResult(wer, time.monotonic() - t0, cfg.max_steps, summary["final_loss"], pairs, work)
