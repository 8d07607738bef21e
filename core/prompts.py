"""The one place prompts are formatted, for generation (text) and for training (speech).

Generation asks the LLM ``USER: {instruction}: {transcript} ASSISTANT:`` and training teaches the
speech model ``USER: {instruction} SPEECH: <speech tokens> ASSISTANT: {answer}``. Both come from
the same template, so the two can never drift apart.

Two formats: FastChat's ``vicuna_v1.1`` (the reference's, the default) and ``chat_template``, the
backbone tokenizer's own ``apply_chat_template`` (Llama-3-Instruct and the like). For the latter the
user message is the same text as in Vicuna's (``{instruction}: {transcript}``, or ``{instruction}
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
PROMPT_FORMATS = ("vicuna_v1.1", "chat_template")

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


def _tokenizer(tokenizer):
    if tokenizer is None:
        raise ValueError(
            "prompt format chat_template needs the backbone's tokenizer (an object or its directory)"
        )
    if isinstance(tokenizer, str | Path):
        tokenizer = _load_tokenizer(str(Path(tokenizer).resolve()))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
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
    return SpeechPrompt(prefix=f"{VICUNA_V11_SYSTEM} USER: {instruction} SPEECH:", suffix=" ASSISTANT:")
