"""What a config's recipe gives the models for one transcript, string for string (``splsm prompts``), and what a
checkpoint keeps of it (``recipe.json``) so that it can be asked later (``splsm ask``, ``splsm serve``).

The same functions the stages call make every string here: ``core.text.fed_transcript`` (the transcript as the
LLM reads it and as the ASR target), ``core.catalog`` (the instruction drawn for an utterance), and
``core.prompts`` (generation, training and evaluation layouts). Nothing is re-implemented for display.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.catalog import load_catalog
from core.config import ExperimentConfig, GenerateConfig
from core.prompts import PROMPT_FORMATS, SpeechPrompt, asr_eval_prompt, speech_prompt, text_prompt
from core.text import fed_transcript

# The file in a checkpoint directory that says how its prompts were laid out (the train stage writes it).
RECIPE_FILE = "recipe.json"


def recipe_prompts(
    cfg: ExperimentConfig,
    task: str,
    text: str,
    instruction: str | None = None,
    utt_id: str = "example",
    tokenizer=None,
    corpus_kind: str = "librispeech",
) -> dict:
    """For transcript ``text`` (as harvested) and ``task``: the LLM's generation prompt (None for ASR, whose
    answer is the transcript), the training example's text around the speech tokens, and the ASR evaluation
    prompt. Without ``instruction``, the catalog's draw for ``utt_id`` with the config's seed, as generate and
    build make it. ``tokenizer``: the LLM's, which ``chat_template`` needs."""
    g, e = cfg.generate, cfg.evaluate
    catalog = load_catalog(g.catalog)
    if task not in catalog.categories:
        raise ValueError(
            f"task {task!r} is not a category of catalog {catalog.path}; known: {', '.join(catalog.categories)}"
        )
    category = catalog.categories[task]
    if instruction is None:
        drawn = catalog.draw(task, utt_id, g.seed)
        instruction, instruction_id = drawn.text, drawn.id
    else:
        instruction_id = next((i.id for i in category.instructions if i.text == instruction), None)
    transcript = fed_transcript(text, g.transcript_form, corpus_kind)
    is_asr = category.answer_source == "transcript"
    speech = speech_prompt(instruction, g.prompt_format, tokenizer)
    if e.asr_prompt == "fixed":
        asr_eval = asr_eval_prompt(g.prompt_format, tokenizer)
    else:  # each eval row's own prompt: the ASR instruction drawn for that utterance
        asr_eval = speech_prompt(catalog.draw("asr", utt_id, g.seed).text, g.prompt_format, tokenizer)
    return {
        "task": task,
        "instruction": instruction,
        "instruction_id": instruction_id,
        "catalog": catalog.path.stem,
        "prompt_format": g.prompt_format,
        "transcript_form": g.transcript_form,
        "transcript": transcript,
        "generation": None if is_asr else text_prompt(instruction, transcript, g.prompt_format, tokenizer),
        "speech_prefix": speech.prefix,
        "speech_suffix": speech.suffix,
        "answer": transcript if is_asr else None,
        "asr_eval_prefix": asr_eval.prefix,
        "asr_eval_suffix": asr_eval.suffix,
    }


class RecipeError(ValueError):
    """A recipe file that cannot be read, or a task or instruction it cannot give: said in one line."""


@dataclass(frozen=True)
class Recipe:
    """The part of a recipe a trained checkpoint needs to be asked as it was taught: the prompt layout and the
    catalog's wordings per category (``splsm ask``, ``splsm serve``). ``source`` says where it was read."""

    prompt_format: str
    catalog: str  # the catalog's name (its file's stem)
    catalog_hash: str
    instructions: dict[str, list[str]]  # category -> its wordings, in the catalog's order
    source: str = ""

    @classmethod
    def of_config(cls, cfg: ExperimentConfig, source: str = "") -> Recipe:
        return cls._of(cfg.generate, source or f"config {cfg.name}")

    @classmethod
    def default(cls) -> Recipe:
        """The project's defaults: the vicuna_v1.1 layout and the bundled instructions-v1 catalog."""
        return cls._of(GenerateConfig(), "the project's defaults")

    @classmethod
    def _of(cls, g: GenerateConfig, source: str) -> Recipe:
        catalog = load_catalog(g.catalog)
        return cls(
            g.prompt_format,
            catalog.path.stem,
            catalog.content_hash,
            {name: [i.text for i in c.instructions] for name, c in catalog.categories.items()},
            source,
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "prompt_format": self.prompt_format,
                "catalog": {"name": self.catalog, "content_hash": self.catalog_hash},
                "instructions": self.instructions,
            },
            indent=2,
            ensure_ascii=False,
        )

    @classmethod
    def read(cls, checkpoint: str | Path) -> Recipe | None:
        """A checkpoint's ``recipe.json``; None where it has none (written before it, or by ``splsm model init``)."""
        path = Path(checkpoint) / RECIPE_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RecipeError(f"{path} cannot be read as a recipe: {type(e).__name__}: {e}") from e
        raw = raw if isinstance(raw, dict) else {}
        fmt, cat, ins = raw.get("prompt_format"), raw.get("catalog"), raw.get("instructions")
        ok = (
            fmt in PROMPT_FORMATS
            and isinstance(cat, dict)
            and isinstance(cat.get("name"), str)
            and isinstance(ins, dict)
            and all(isinstance(v, list) and v and all(isinstance(t, str) for t in v) for v in ins.values())
        )
        if not ok:
            raise RecipeError(
                f"{path} is not a recipe: it needs prompt_format (one of {', '.join(PROMPT_FORMATS)}), "
                "catalog.name and instructions (category -> non-empty list of wordings)"
            )
        return cls(fmt, cat["name"], str(cat.get("content_hash", "")), ins, str(path))

    def instruction(self, task: str = "asr") -> str:
        """The instruction ``task`` is asked with: the first wording of its category (the default, ``asr``, is
        the one the model was taught to transcribe with)."""
        if task not in self.instructions:
            raise RecipeError(
                f"task {task!r} is not a category of the recipe's catalog {self.catalog} ({self.source}); "
                f"known: {', '.join(self.instructions)}"
            )
        return self.instructions[task][0]

    def prompt(self, instruction: str, tokenizer=None) -> SpeechPrompt:
        """The text around the speech tokens for ``instruction``, in the layout the model was trained on."""
        return speech_prompt(instruction, self.prompt_format, tokenizer)
