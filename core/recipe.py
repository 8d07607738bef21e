"""What a config's recipe gives the models for one transcript, string for string (``splsm prompts``).

The same functions the stages call make every string here: ``core.text.fed_transcript`` (the transcript as the
LLM reads it and as the ASR target), ``core.catalog`` (the instruction drawn for an utterance), and
``core.prompts`` (generation, training and evaluation layouts). Nothing is re-implemented for display.
"""

from __future__ import annotations

from core.catalog import load_catalog
from core.config import ExperimentConfig
from core.prompts import asr_eval_prompt, speech_prompt, text_prompt
from core.text import fed_transcript


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
