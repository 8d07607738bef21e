"""Transcript text forms: the corpus's raw text, a readable form for the LLM, Whisper's normalized form."""

from __future__ import annotations

import re
from functools import lru_cache

# GigaSpeech-style spacing before punctuation (" ," and the ideographic full stop used as a period).
_SPACED_PUNCT = re.compile(r"\s+([,.;:!?])")


@lru_cache(maxsize=1)
def _normalizer():
    from whisper.normalizers import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    """openai-whisper's English normalizer: the form WER is computed on, for references and hypotheses alike."""
    return _normalizer()(text)


def readable(text: str) -> str:
    """The transcript as the LLM should read it: all-caps corpora lower-cased, spacing repaired."""
    t = " ".join(text.replace("\u3002", ".").split())
    if t.isupper():
        t = t.lower()
    return _SPACED_PUNCT.sub(r"\1", t)
