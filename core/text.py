"""Transcript text forms: the corpus's raw text, a readable form for the LLM, Whisper's normalized form."""

from __future__ import annotations

import importlib.util
import re
import sys
from functools import lru_cache
from pathlib import Path

# GigaSpeech-style spacing before punctuation (" ," and the ideographic full stop used as a period).
_SPACED_PUNCT = re.compile(r"\s+([,.;:!?])")

# GigaSpeech writes punctuation as tags in its text_tn field.
GIGASPEECH_PUNCTUATION = {
    "<COMMA>": ",",
    "<PERIOD>": ".",
    "<QUESTIONMARK>": "?",
    "<EXCLAMATIONPOINT>": "!",
}
# GigaSpeech dev/test label non-speech stretches with these instead of words; its authors say to drop them.
GIGASPEECH_GARBAGE = ("<SIL>", "<MUSIC>", "<NOISE>", "<OTHER>")
_GIGA_TAG = re.compile("|".join(re.escape(t) for t in GIGASPEECH_PUNCTUATION))


@lru_cache(maxsize=1)
def _normalizer():
    """OpenAI Whisper's English normalizer without openai-whisper (whose install pulls triton, about 1 GB):
    transformers carries the same code (``models/whisper/english_normalizer.py``; ``tests/test_text.py`` checks
    it gives openai-whisper's output on thousands of real transcripts), and the British-to-American spelling
    table it needs is the same ``english.json`` that the whisper-normalizer package ships as data.

    The module file is loaded alone: importing it through ``transformers.models`` runs that package's
    ``__init__``, which takes seconds per process, and harvest workers only need this pure-Python file."""
    import json
    from importlib.resources import files

    name = "_splsm_whisper_english_normalizer"
    if name not in sys.modules:
        spec = importlib.util.find_spec("transformers")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("Whisper's normalizer comes from transformers, which is not installed")
        path = str(Path(spec.submodule_search_locations[0]) / "models" / "whisper" / "english_normalizer.py")
        sub = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(sub)
        sys.modules[name] = mod
        sub.loader.exec_module(mod)
    spelling = json.loads(files("whisper_normalizer").joinpath("normalizers", "english.json").read_text())
    return sys.modules[name].EnglishTextNormalizer(spelling)


def normalize(text: str) -> str:
    """openai-whisper's English normalizer: the form WER is computed on, for references and hypotheses alike."""
    return _normalizer()(text)


def gigaspeech_tags_to_punctuation(text: str) -> str:
    """``HELLO <COMMA> WORLD <PERIOD>`` -> ``HELLO , WORLD .`` (spacing is repaired by ``readable``)."""
    return _GIGA_TAG.sub(lambda m: GIGASPEECH_PUNCTUATION[m.group(0)], text)


def garbage_tags(text: str) -> list[str]:
    return [t for t in GIGASPEECH_GARBAGE if t in text]


# What the LLM reads and what the ASR target is, by ``generate.transcript_form``: the transcripts table's column,
# or None where the form is made from the corpus's own line (``reference_form``).
TRANSCRIPT_FORMS = {
    "readable": "text",  # the project's default: casing and spacing repaired (``readable``)
    "whisper_normalized": "text_norm",  # Whisper's normalizer on every corpus
    "reference": None,  # the reference's manifest, corpus by corpus (``reference_form``)
}
# The reference's manifest writes GigaSpeech's tags so: its sample (raw_manifest_example.jsonl) has "," "。" "?"; no
# "!" occurs there, and the tag keeps GigaSpeech's own character.
REFERENCE_GIGASPEECH_PUNCTUATION = {
    "<COMMA>": ",",
    "<PERIOD>": "\u3002",
    "<QUESTIONMARK>": "?",
    "<EXCLAMATIONPOINT>": "!",
}


def transcript_column(form: str) -> str:
    """The transcripts-table column that holds the transcript in ``form`` (not ``reference``: ``transcript_of``)."""
    if form not in TRANSCRIPT_FORMS:
        raise ValueError(f"unknown transcript form {form!r}; known: {', '.join(TRANSCRIPT_FORMS)}")
    if TRANSCRIPT_FORMS[form] is None:
        raise ValueError(
            f"transcript form {form!r} is made per corpus (core.text.transcript_of), not a column"
        )
    return TRANSCRIPT_FORMS[form]


def reference_form(text_raw: str, kind: str | None) -> str:
    """The transcript as the reference's manifest holds it, by corpus kind (issue 31's audit of its 2,099 rows):

    - ``librispeech``: Whisper-normalized (``it was her husband is 1500 men``), 355 of its 356 rows;
    - ``gigaspeech``: GigaSpeech's line lower-cased, its tags as spaced punctuation (``but these people used
      trabucos , or blunderbusses ,``; ``<PERIOD>`` as the ideographic full stop), garbage tags dropped;
    - ``commonvoice`` and every other kind (a Whisper label too): the line as it is, its casing and punctuation
      kept (``In twenty-twenty-seven I will old enough to drive.``); only runs of spaces become one.
    """
    if kind == "librispeech":
        return normalize(readable(text_raw.strip()))
    t = text_raw
    if kind == "gigaspeech":
        for tag in GIGASPEECH_GARBAGE:
            t = t.replace(tag, " ")
        t = _GIGA_TAG.sub(lambda m: REFERENCE_GIGASPEECH_PUNCTUATION[m.group(0)], t).lower()
    return " ".join(t.split())


def transcript_of(row, form: str, kinds=None) -> str:
    """A transcripts-table row's transcript in ``form``; ``kinds`` maps its ``corpus`` (the config's corpus name)
    to the corpus's kind, which the ``reference`` form depends on."""
    if form != "reference":
        return row[transcript_column(form)]
    kind = (kinds or {}).get(row["corpus"]) if row.get("text_source", "corpus") == "corpus" else None
    return reference_form(row["text_raw"], kind)


def transcript_forms(text_raw: str) -> tuple[str, str]:
    """(readable, whisper-normalized) forms of a transcript as a corpus gives it: the transcripts table's
    ``text`` and ``text_norm``."""
    text = readable(text_raw.strip())
    return text, normalize(text)


def fed_transcript(text_raw: str, form: str, kind: str = "librispeech") -> str:
    """The transcript as the recipe feeds it to the LLM and as the ASR target, in ``form``, for a line of a corpus
    of ``kind`` (which only the ``reference`` form reads)."""
    text, norm = transcript_forms(text_raw)
    row = {"text": text, "text_norm": norm, "text_raw": text_raw, "corpus": "c"}
    return transcript_of(row, form, {"c": kind})


def as_sentence(text: str) -> str:
    """``text`` as an instruction-tuned LLM writes a sentence: a capital first letter, and a full stop where it
    ends without ``.``, ``?`` or ``!`` (a trailing comma, colon or semicolon gives way to it). Words, inner
    punctuation and casing stay; Whisper's normalizer, which every WER here goes through, undoes the change."""
    text = text.strip()
    if not text:
        return text
    text = text[:1].upper() + text[1:]
    return text if text[-1] in ".?!" else text.rstrip(",;: ") + "."


def readable(text: str) -> str:
    """The transcript as the LLM should read it: all-caps corpora lower-cased, spacing repaired."""
    t = " ".join(gigaspeech_tags_to_punctuation(text).replace("\u3002", ".").split())
    if t.isupper():
        t = t.lower()
    return _SPACED_PUNCT.sub(r"\1", t)
