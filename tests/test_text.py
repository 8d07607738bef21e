"""Whisper's English normalizer without openai-whisper: the project's ``core.text.normalize`` (transformers' copy
of the code and the whisper-normalizer package's spelling table) against openai-whisper's own normalizer, the
one the paper's WER is defined by, on real transcripts and LLM answers."""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from core.text import normalize

SEED = REPO.parent / "shared" / "seed-data"

# the forms where a normalizer can go wrong: numbers, currency, ordinals, fractions, contractions, British
# spellings, abbreviations, fillers, bracketed noise, accents
HARD = [
    "It's $5.50, Mr. Smith's 3rd car!",
    "twenty-one hundred and five",
    "colour analyse 1990s",
    "I'm gonna do it",
    "£3.2 million",
    "Dr. Who at 10:30 p.m.",
    "ummm hmm uh",
    "one point five percent",
    "[laughs] (noise) hello",
    "'cause I said so",
    "$1,000,000.00 and 1/2",
    "the 1st of May, 2nd, 3rd, 21st",
    "one and a half dollars",
    "€20 and 15 cents",
    "Mrs. O'Neil's St. John at café Zoë",
]


def _texts() -> list[str]:
    texts = list(HARD)
    for f in [REPO / "tests" / "fixtures" / "self_powered_sample.jsonl", SEED / "raw_manifest_example.jsonl"]:
        if f.exists():
            for line in f.read_text().splitlines():
                row = json.loads(line)
                texts += [v for k, v in row.items() if k in ("text", "instruction") and isinstance(v, str)]
    for trans in (REPO / "data" / "demo" / "LibriSpeech").rglob("*.trans.txt"):
        texts += [line.split(" ", 1)[1] for line in trans.read_text().splitlines() if " " in line]
    return texts


def test_normalizer_without_openai_whisper_gives_openai_whispers_output_on_real_transcripts():
    whisper_normalizers = pytest.importorskip("whisper.normalizers")  # the pseudolabel extra, in dev
    reference = whisper_normalizers.EnglishTextNormalizer()
    texts = _texts()
    assert len(texts) > 40  # the repo's own transcripts and answers at least; 2,000 more with ../shared
    differ = [(t, normalize(t), reference(t)) for t in texts if normalize(t) != reference(t)]
    assert not differ, differ[:5]


def test_normalizer_loads_neither_openai_whisper_nor_torch(tmp_path):
    """Harvest workers normalize every transcript: the normalizer must not pull in torch (seconds per process)
    or need openai-whisper installed."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['whisper'] = None\n"  # as if openai-whisper were not installed
        "from core.text import normalize\n"
        "print(normalize('Colour, 3rd'))\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "color 3rd" and out[1] == "False False"


def test_as_sentence_capitalises_and_ends_without_touching_the_words():
    from core.text import as_sentence

    assert as_sentence("or can be disinterested,") == "Or can be disinterested."
    assert as_sentence("is it? ") == "Is it?"
    assert as_sentence("Mr. Smith said: no!") == "Mr. Smith said: no!"
    assert as_sentence("well; then:") == "Well; then."
    assert as_sentence("") == ""
