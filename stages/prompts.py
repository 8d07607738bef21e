"""The one place prompts are formatted, for generation (text) and for training (speech).

Generation asks the LLM ``USER: {instruction}: {transcript} ASSISTANT:`` and training teaches the
speech model ``USER: {instruction} SPEECH: <speech tokens> ASSISTANT: {answer}``. Both come from
the same template, so the two can never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

# FastChat's vicuna_v1.1 conversation template: system sentence, then "USER: ... ASSISTANT:".
VICUNA_V11_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
PROMPT_FORMATS = ("vicuna_v1.1",)


@dataclass(frozen=True)
class SpeechPrompt:
    prefix: str  # text before the speech tokens
    suffix: str  # text after the speech tokens, before the answer


def _check(fmt: str) -> None:
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; known: {', '.join(PROMPT_FORMATS)}")


def text_prompt(instruction: str, transcript: str, fmt: str = "vicuna_v1.1") -> str:
    """The prompt the LLM answers during generation."""
    _check(fmt)
    return f"{VICUNA_V11_SYSTEM} USER: {instruction}: {transcript} ASSISTANT:"


def speech_prompt(instruction: str, fmt: str = "vicuna_v1.1") -> SpeechPrompt:
    """The same conversation with the transcript replaced by speech tokens."""
    _check(fmt)
    return SpeechPrompt(prefix=f"{VICUNA_V11_SYSTEM} USER: {instruction} SPEECH:", suffix=" ASSISTANT:")
