"""The one place prompts are formatted, for generation (text) and for training and evaluation (speech).

Generation asks the LLM ``USER: {instruction}: {transcript} ASSISTANT:`` and training teaches the
speech model ``USER: {instruction} SPEECH: <speech tokens> ASSISTANT: {answer}``. Both come from
the same layout, so the two can never drift apart.

Four layouts (``generate.prompt_format``):

- ``vicuna_v1.1`` (the project's default): FastChat's conversation template, the system sentence and the
  turns joined by single spaces: ``{system} USER: {instruction}: {transcript} ASSISTANT:``.
- ``reference``: the self-powered paper's code, character for character (its generation scripts,
  src/speech_text_paired_dataset.py, src/evaluate_token_asr.py, src/evaluate_BoolQA.py): the same system
  sentence, then `` \n\nUSER: {instruction}: {transcript} \nASSISTANT:`` for generation,
  `` \n\nUSER: {instruction}\nSPEECH:`` + speech + ``\nASSISTANT:`` for training, and a fixed ASR evaluation
  prompt whose suffix is spelt ``\nASSISTENT:``, as the reference's is.
- ``reference_llama3``: the reference's Llama-3 layout (src/speech_text_paired_dataset_llama.py), hand-written
  rather than the tokenizer's template: ``<|begin_of_text|><|start_header_id|>system<|end_header_id|>\nYou are a
  helpful assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n{instruction}\n speech:`` + speech +
  ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>``, the answer straight after. The prefix is tokenized
  with the tokenizer's BOS as every prefix is, so it starts with two BOS tokens, as the reference's did (its
  string writes one and its tokenizer adds one). That file has no generation or evaluation prompt: generation
  asks ``{instruction}: {transcript}`` in the same turn, and ASR is evaluated with the reference's evaluation
  instruction (src/evaluate_token_asr.py's words, without its Vicuna suffix).
- ``chat_template``: the backbone tokenizer's own ``apply_chat_template`` (Llama-3-Instruct, SmolLM2 and the
  like). The user message is the same text as in Vicuna's (``{instruction}: {transcript}``, or ``{instruction}
  SPEECH:`` followed by the speech tokens), rendered by the tokenizer's template.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# FastChat's vicuna_v1.1 conversation template: system sentence, then "USER: ... ASSISTANT:".
VICUNA_V11_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
PROMPT_FORMATS = ("vicuna_v1.1", "reference", "reference_llama3", "chat_template")

# The reference's strings (RECIPE.md sections 1, 2 and 5). Its system sentence is Vicuna's; what differs is
# the layout around it: a space and a blank line before USER, newlines before SPEECH and ASSISTANT.
REFERENCE_SYSTEM = VICUNA_V11_SYSTEM + " \n\nUSER: "
REFERENCE_ASR_EVAL_INSTRUCTION = "Provide the transcription corresponding to the speech:"
REFERENCE_EVAL_SUFFIX = "\nASSISTENT:"  # misspelled in the reference's evaluation scripts, kept as it ran
REFERENCE_BOOLQA_INSTRUCTION = (
    "Answer the questions in speech based on the CONTEXT given,your answer is only true or false, "
    "you don\u2019t need to answer anything else \nCONTEXT: {passage}"
)
# src/speech_text_paired_dataset_llama.py's strings: Text_Format before the speech, the suffix after it.
REFERENCE_LLAMA3_PREFIX = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n"
    "You are a helpful assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n"
    "{instruction}\n speech:"
)
REFERENCE_LLAMA3_SUFFIX = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
# The project's own evaluation instruction for ASR where the layout has no fixed one.
ASR_EVAL_INSTRUCTION = "Transcribe the speech"

# Stands in for the speech tokens while the chat template renders; no tokenizer has it in its vocabulary.
_SPEECH_SLOT = "\u0000SPLSM_SPEECH\u0000"


@dataclass(frozen=True)
class SpeechPrompt:
    prefix: str  # text before the speech tokens
    suffix: str  # text after the speech tokens, before the answer


def _check(fmt: str) -> None:
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; known: {', '.join(PROMPT_FORMATS)}")


@lru_cache(maxsize=8)
def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def load_tokenizer(tokenizer):
    """A tokenizer object as it is, or the one in a directory (loaded once per process)."""
    if isinstance(tokenizer, str | Path):
        return _load_tokenizer(str(Path(tokenizer).resolve()))
    return tokenizer


class PromptError(ValueError):
    """A prompt format that cannot be rendered with the model at hand: a setting to change, said in one line."""


def _tokenizer(tokenizer):
    if tokenizer is None:
        raise PromptError(
            "prompt format chat_template needs the backbone's tokenizer (an object or its directory)"
        )
    tokenizer = load_tokenizer(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            f"prompt format chat_template: tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
            "template; use prompt_format vicuna_v1.1 or a tokenizer that ships one"
        )
    return tokenizer


def _render_user(message: str, tokenizer) -> str:
    tok = _tokenizer(tokenizer)
    text = tok.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )
    # Templates that write the BOS token themselves would get a second one from the tokenizer, which both
    # the server (completions endpoint) and the training loader call with special tokens on.
    bos = tok.bos_token
    if bos and text.startswith(bos) and tok("").input_ids[:1] == [tok.bos_token_id]:
        text = text[len(bos) :]
    return text


def text_prompt(instruction: str, transcript: str, fmt: str = "vicuna_v1.1", tokenizer=None) -> str:
    """The prompt the LLM answers during generation."""
    _check(fmt)
    if fmt == "chat_template":
        return _render_user(f"{instruction}: {transcript}", tokenizer)
    if fmt == "reference":
        return f"{REFERENCE_SYSTEM}{instruction}: {transcript} \nASSISTANT:"
    if fmt == "reference_llama3":
        return (
            REFERENCE_LLAMA3_PREFIX.removesuffix("\n speech:").format(
                instruction=f"{instruction}: {transcript}"
            )
            + REFERENCE_LLAMA3_SUFFIX
        )
    return f"{VICUNA_V11_SYSTEM} USER: {instruction}: {transcript} ASSISTANT:"


def speech_prompt(instruction: str, fmt: str = "vicuna_v1.1", tokenizer=None) -> SpeechPrompt:
    """The same conversation with the transcript replaced by speech tokens."""
    _check(fmt)
    if fmt == "chat_template":
        text = _render_user(f"{instruction} SPEECH:{_SPEECH_SLOT}", tokenizer)
        prefix, sep, suffix = text.partition(_SPEECH_SLOT)
        if not sep or _SPEECH_SLOT in suffix:
            raise ValueError(
                "prompt format chat_template: the template does not keep the user message verbatim"
            )
        return SpeechPrompt(prefix=prefix, suffix=suffix)
    if fmt == "reference":
        return SpeechPrompt(prefix=f"{REFERENCE_SYSTEM}{instruction}\nSPEECH:", suffix="\nASSISTANT:")
    if fmt == "reference_llama3":
        return SpeechPrompt(
            prefix=REFERENCE_LLAMA3_PREFIX.format(instruction=instruction), suffix=REFERENCE_LLAMA3_SUFFIX
        )
    return SpeechPrompt(prefix=f"{VICUNA_V11_SYSTEM} USER: {instruction} SPEECH:", suffix=" ASSISTANT:")


def asr_eval_prompt(fmt: str = "vicuna_v1.1", tokenizer=None) -> SpeechPrompt:
    """The fixed prompt ASR is evaluated with: the reference's own string (with its misspelled suffix) in its
    layout, the training layout around ``ASR_EVAL_INSTRUCTION`` in the others."""
    _check(fmt)
    if fmt == "reference":
        return SpeechPrompt(
            prefix=f"{REFERENCE_SYSTEM}{REFERENCE_ASR_EVAL_INSTRUCTION}\nSPEECH:",
            suffix=REFERENCE_EVAL_SUFFIX,
        )
    if fmt == "reference_llama3":
        return speech_prompt(REFERENCE_ASR_EVAL_INSTRUCTION, fmt)
    return speech_prompt(ASR_EVAL_INSTRUCTION, fmt, tokenizer)


def boolqa_prompt(passage: str, fmt: str = "vicuna_v1.1", tokenizer=None) -> SpeechPrompt:
    """Spoken QA the reference's way: a text passage as context, the question spoken, true or false."""
    _check(fmt)
    instruction = REFERENCE_BOOLQA_INSTRUCTION.format(passage=passage)
    if fmt == "reference":
        return SpeechPrompt(prefix=f"{REFERENCE_SYSTEM}{instruction}\nSPEECH: ", suffix=REFERENCE_EVAL_SUFFIX)
    return speech_prompt(instruction, fmt, tokenizer)
