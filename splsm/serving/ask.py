"""``splsm ask CHECKPOINT AUDIO...``: one answer per clip, a single clip's streamed token by token.

Every input is checked before the weights load: the checkpoint, its recipe, the task, and each clip (read whole,
any format and rate ``core.audio`` takes, resampled to 16 kHz; longer than the model's window is an error).
Clips are decoded in batches of ``batch_size`` in the order given.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import TextIO

from core.audio import AudioError
from core.paths import REPO_ROOT
from core.prompts import PromptError
from core.recipe import Recipe, RecipeError
from splsm.serving.engine import Engine, QueryError


class AskError(Exception):
    """What went wrong, in one line naming the file or setting."""


def ask(
    checkpoint: Path,
    clips: list[Path],
    instruction: str | None = None,
    task: str | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    as_json: bool = False,
    recipe: Recipe | None = None,
    device: str | None = None,
    out: TextIO | None = None,
    note=None,
) -> list[str]:
    """Answer each clip; print the answers to ``out`` (default stdout; a single clip's as it decodes, unless
    ``as_json``) and return them. ``note(line)`` hears what the user should know (a checkpoint without a recipe).
    Raises AskError."""
    out = out or sys.stdout
    if instruction is not None and task is not None:
        raise AskError("give --instruction or --task, not both")
    try:
        engine = Engine(checkpoint, device, recipe, max_new_tokens, load=False)
        question = engine.instruction_for(instruction, task)
    except (FileNotFoundError, ValueError) as e:  # EvaluateInputError, RecipeError, QueryError: ValueErrors
        raise AskError(str(e)) from e
    loaded = []
    for path in clips:
        try:
            loaded.append(engine.clip_from_file(path))
        except AudioError as e:
            hint = (
                f" (the model hears at most {engine.max_audio_s:g} s, Whisper's window: cut the clip)"
                if e.reason == "too_long"
                else ""
            )
            raise AskError(f"{e.reason}: {e.detail}{hint}") from e
    if engine.recipe_note and note is not None:
        note(engine.recipe_note)
    engine.load()
    try:
        queries = [engine.query(c, question, max_new_tokens) for c in loaded]
    except (QueryError, PromptError, RecipeError) as e:
        raise AskError(str(e)) from e
    stream = len(clips) == 1 and not as_json
    size = batch_size if engine.batchable else 1
    answers: list[str] = []
    for start in range(0, len(queries), size):
        part = queries[start : start + size]
        on_text = (lambda _i, piece: (out.write(piece), out.flush())) if stream else None
        got = engine.answer(part, on_text=on_text)
        for j, a in enumerate(got):
            path = clips[start + j]
            answers.append(a.text)
            if as_json:
                row = {"audio": str(path), "instruction": question, "answer": a.text}
                out.write(json.dumps({**row, "finish_reason": a.finish_reason}, ensure_ascii=False) + "\n")
            elif stream:
                out.write("\n")
            else:
                out.write(f"==> {path} <==\n{a.text}\n\n")
        out.flush()
    return answers


DEMO_CLIP = (
    REPO_ROOT / "data" / "demo" / "test-clean" / "1089-134686-0001.wav"
)  # held out of the demo's training


def commands_to_try(checkpoint: Path, program: str | None = None) -> list[str]:
    """The ``splsm ask`` and ``splsm serve`` command lines for ``checkpoint`` (``splsm demo`` prints them), with
    paths as the user can type them from where they are. ``program``: how splsm was invoked (default: argv[0]
    when it is splsm, else ``splsm``)."""
    if program is None:
        argv0 = Path(sys.argv[0])
        program = _shown(argv0) if argv0.name == "splsm" else "splsm"
    ckpt, clip = shlex.quote(_shown(checkpoint)), shlex.quote(_shown(DEMO_CLIP))
    return [
        f"{program} ask {ckpt} {clip}",
        f"{program} ask {ckpt} {clip} --task sentiment",
        f"{program} serve {ckpt} --no-api-key",
    ]


def _shown(path: Path) -> str:
    """``path`` relative to the working directory where it lies under it, else absolute."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
