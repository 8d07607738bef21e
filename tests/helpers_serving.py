"""Shared by the ask, serve and page tests: a tiny random checkpoint, clips, the answer greedy decoding gives,
and a running server."""

from __future__ import annotations

import json
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import uvicorn
from helpers_lsm import DEMO, TINY_QFORMER, build_models

from core.catalog import load_catalog
from core.lsm.batch import Collate
from core.lsm.model import LSMForConditionalGeneration
from core.prompts import speech_prompt

FIXTURES = Path(__file__).resolve().parent / "fixtures"
WAV = DEMO / "test-clean" / "1089-134686-0001.wav"  # 16 kHz mono, 6.6 s
WAV2 = DEMO / "test-clean" / "1221-135766-0002.wav"  # 16 kHz mono, 4.8 s
FLAC = FIXTURES / "jfk-openai_whisper" / "jfk.flac"  # 44.1 kHz stereo, 11 s
MP3 = FIXTURES / "commonvoice-lhotse_mp3" / "clips" / "common_voice_en_651325.mp3"  # 48 kHz mono, 2.4 s


@contextmanager
def running(app):
    """The app under a real uvicorn server on a free loopback port, in a thread: its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def first_wording(task: str) -> str:
    """The first wording of a category of the bundled default catalog (instructions-v1)."""
    return load_catalog().categories[task].instructions[0].text


def make_checkpoint(root: Path, **qformer) -> Path:
    """A tiny random checkpoint, as save_pretrained writes it (no recipe.json: that is the train stage's)."""
    whisper, llm = build_models(root / "models")
    torch.manual_seed(1)
    out = root / "checkpoint"
    q = TINY_QFORMER.model_copy(update=qformer)
    LSMForConditionalGeneration.from_parts(whisper, llm, q).save_pretrained(out)
    return out


def with_recipe(checkpoint: Path, dest: Path, prompt_format: str) -> Path:
    """A copy of ``checkpoint`` whose recipe.json says it was trained in ``prompt_format`` on the default
    catalog (the file the train stage writes, spelled out by hand)."""
    shutil.copytree(checkpoint, dest)
    catalog = load_catalog()
    (dest / "recipe.json").write_text(
        json.dumps(
            {
                "prompt_format": prompt_format,
                "catalog": {"name": catalog.path.stem, "content_hash": catalog.content_hash},
                "instructions": {n: [i.text for i in c.instructions] for n, c in catalog.categories.items()},
            }
        )
    )
    return dest


def long_wav(path: Path, seconds: float, rate: int = 8000) -> Path:
    rng = np.random.default_rng(0)
    sf.write(str(path), (0.05 * rng.standard_normal(int(seconds * rate))).astype("float32"), rate)
    return path


class Reference:
    """Answers computed without the serving code: the model's own Collate and greedy generate, one clip at a
    time, with the prompt laid out by core.prompts."""

    def __init__(self, checkpoint: Path):
        self.model = LSMForConditionalGeneration.from_pretrained(checkpoint).eval()

    def tokens(self, clip: np.ndarray, instruction: str, n: int, fmt: str = "vicuna_v1.1") -> list[int]:
        p = speech_prompt(instruction, fmt, self.model.tokenizer)
        rows = [{"prefix": p.prefix, "suffix": p.suffix}]
        b = Collate.for_model(self.model)(rows, [clip], with_answer=False)
        return self.model.generate(b.input_features, b.durations_s, b.prefix_ids, b.suffix_ids, n)[0]

    def answer(self, clip: np.ndarray, instruction: str, n: int, fmt: str = "vicuna_v1.1") -> str:
        ids = self.tokens(clip, instruction, n, fmt)
        return self.model.tokenizer.decode(ids, skip_special_tokens=True).strip()
