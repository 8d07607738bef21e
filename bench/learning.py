"""Learning check: does a tiny LSM learn speech? Spoken digit strings synthesized with espeak-ng, a tiny LSM
trained with torchrun on 2 CPU processes, WER on held-out strings (none of them seen in training).

    .venv/bin/python bench/learning.py [--steps 1200] [--workdir DIR]

Every part is in the path the gradient takes: log-mel features, the Whisper encoder (trained here, not
frozen, so that its random weights can become useful), the windows, the Q-Former, the projection and the
LLM. The voices, speeds and pitches vary so that the model cannot memorize one waveform per digit. The issue's
goal: held-out WER at most 30% within 15 minutes on 2 cores; the last line says whether it was met.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from schemas import EXAMPLES, to_table, write_table
from splsm.config import QFormerConfig, TinyModels, TrainConfig
from stages.prompts import VICUNA_V11_SYSTEM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # example rows as the tests build them

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp"]
VARIANTS = ["", "+m1", "+m3", "+f2", "+f4"]
N_TRAIN, N_TEST = 480, 40
WER_GOAL = 0.30
BUDGET_S = 15 * 60  # what the settings below are sized for on 2 quiet cores
CHUNK_S = 5
INIT_STD = 0.2

LEARN_TRAIN = dict(
    nproc_per_node=2,
    backend="gloo",
    max_steps=1200,
    batch_size=8,
    grad_accum=1,
    lr=2e-3,
    weight_decay=0.01,
    warmup_steps=30,
    lr_schedule="cosine",
    freeze_encoder=False,
    seed=1,
    qformer=QFormerConfig(hidden_size=64, num_heads=4, intermediate_size=128, init_std=0.2).model_dump(),
)


def digit_strings(seed: int = 1) -> tuple[list[str], list[str]]:
    """Distinct strings of 3 to 5 digits; the test strings never occur in training."""
    rng = random.Random(seed)
    seen: set[str] = set()
    while len(seen) < N_TRAIN + N_TEST:
        seen.add(" ".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 5))))
    strings = sorted(seen)
    rng.shuffle(strings)
    return strings[:N_TRAIN], strings[N_TRAIN:]


def synthesize(text: str, path: Path, rng: random.Random) -> None:
    voice = rng.choice(VOICES) + rng.choice(VARIANTS)
    speed, pitch = rng.randint(130, 190), rng.randint(30, 70)
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
        check=True,
        capture_output=True,
    )


def short_chunk_whisper(
    whisper_dir: Path, chunk_s: int = CHUNK_S, init_std: float = INIT_STD, seed: int = 1
) -> Path:
    """Rewrite a tiny Whisper to take ``chunk_s`` seconds instead of 30, with weights drawn at ``init_std``.

    The clips here last under 5 s: padding them to 30 s would spend nearly all of the CPU on silence. And at
    Whisper's own init_std of 0.02 a random encoder's output is almost all positional embedding (two clips
    differ by under 2% after the LayerNorm), so nothing downstream could hear the audio; at 0.2 they differ
    by about 60%, as a pretrained encoder's would."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    cfg = WhisperConfig.from_pretrained(whisper_dir)
    cfg.max_source_positions = chunk_s * 50  # Whisper's encoder: 50 frames a second
    cfg.init_std = init_std
    torch.manual_seed(seed)
    WhisperForConditionalGeneration(cfg).save_pretrained(whisper_dir)
    WhisperFeatureExtractor(feature_size=cfg.num_mel_bins, chunk_length=chunk_s).save_pretrained(whisper_dir)
    return whisper_dir


def build_digit_set(root: Path, seed: int = 1) -> Path:
    """WAVs under ``root/audio`` and an examples table with train and test rows."""
    from helpers_lsm import example_row

    train_s, test_s = digit_strings(seed)
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


def main() -> None:
    import argparse
    import os
    import tempfile

    import jiwer
    import torch

    from schemas import read_table
    from splsm import audio
    from stages import train
    from stages.model import Collator, LSMForConditionalGeneration
    from stages.tiny_models import build_tiny_models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=LEARN_TRAIN["max_steps"])
    ap.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temp dir)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not shutil.which("espeak-ng"):
        sys.exit("espeak-ng is not installed: scripts/setup.sh installs it (apt-get)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="learning-"))
    t0 = time.monotonic()
    examples = build_digit_set(work / "digits")
    texts = DIGITS + [" ".join(DIGITS)] * 4 + [VICUNA_V11_SYSTEM, "USER: ASSISTANT: SPEECH:"]
    texts += list({r["instruction"] for r in read_table(examples, EXAMPLES).to_pylist()})
    whisper_dir, llm_dir = build_tiny_models(texts, work / "models", TinyModels(vocab_size=400))
    short_chunk_whisper(whisper_dir)

    cfg = TrainConfig.model_validate({**LEARN_TRAIN, "max_steps": args.steps})
    summary = train.train(cfg, whisper_dir, llm_dir, examples, work / "train")

    model = LSMForConditionalGeneration.from_pretrained(work / "train" / "checkpoint").eval()
    collate = Collator(model.tokenizer, model.feature_extractor)
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
    wer = jiwer.wer(refs, hyps)
    elapsed = time.monotonic() - t0
    for ref, hyp in list(zip(refs, hyps, strict=True))[:8]:
        print(f"ref: {ref!r:30} hyp: {hyp!r}")
    print(
        f"{cfg.max_steps} steps, final train loss {summary['final_loss']:.4f}, {elapsed:.0f}s in all ({work})"
    )
    ok = wer <= WER_GOAL
    print(f"goal held_out_wer: {wer:.3f} (target <= {WER_GOAL:.2f}) {'met' if ok else 'not met'}")
    print(
        f"goal minutes: {elapsed / 60:.1f} (target <= {BUDGET_S / 60:.0f}) {'met' if elapsed <= BUDGET_S else 'not met'}"
    )


if __name__ == "__main__":
    main()
