"""The reference's answer filters, plus the ones its loop needed but did not name.

The catalog (``core.catalog``) names the filters and the scripts a category may ask for; this module
implements them.

Each filter is a name and a test; an answer failing any filter that applies to its category is kept
in ``responses.parquet`` with ``rejected_by`` set to the first failing filter (in ``FILTERS`` order),
and every failure is counted in the stats table, so nothing is dropped without a reason.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from core.catalog import FILTERS, SCRIPTS


@dataclass(frozen=True)
class FilterSettings:
    max_prompt_tokens: int = 150
    min_script_fraction: float = 0.5


def ends_in_punctuation(text: str) -> bool:
    """True when the last visible character is punctuation (Unicode category P*: Latin and CJK stops alike,
    and the closing quotes or brackets that may follow them)."""
    t = text.rstrip()
    return bool(t) and unicodedata.category(t[-1]).startswith("P")


def script_of(ch: str) -> str | None:
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    return name.split(" ", 1)[0] if name else None


def script_fraction(text: str, language: str) -> float:
    """Share of the letters of ``text`` written in the script(s) of ``language``."""
    if language not in SCRIPTS:
        raise ValueError(
            f"no script known for target language {language!r}; known: {', '.join(sorted(SCRIPTS))}"
        )
    want = SCRIPTS[language]
    letters = [s for s in map(script_of, text) if s]
    return sum(s in want for s in letters) / len(letters) if letters else 0.0


ERROR = "error"  # finish_reason of a refused request: "error: HTTP 400: <the server's message>"


def is_error(finish_reason: str) -> bool:
    return finish_reason == ERROR or finish_reason.startswith(ERROR + ":")


def failures(
    answer: str,
    finish_reason: str,
    prompt_tokens: int,
    applies: tuple[str, ...],
    target_language: str | None,
    s: FilterSettings,
) -> list[str]:
    """Every filter in ``applies`` that the answer fails, in ``FILTERS`` order."""
    out = []
    for name in FILTERS:
        if name not in applies:
            continue
        if name == "request_error":
            bad = is_error(finish_reason)
        elif name == "prompt_too_long":
            bad = prompt_tokens >= s.max_prompt_tokens
        elif name == "empty":
            bad = not answer.strip()
        elif name == "truncated":
            bad = finish_reason == "length"
        elif name == "no_end_punct":
            bad = not ends_in_punctuation(answer)
        else:  # wrong_script
            bad = (
                target_language is not None
                and script_fraction(answer, target_language) < s.min_script_fraction
            )
        if bad:
            out.append(name)
    return out
