"""The reference's transcript form (``generate.transcript_form: reference``) against its own manifest: the 2,099
transcripts of ``../shared/seed-data/raw_manifest_example.jsonl``, as its code fed them to the LLM."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from conftest import REPO
from core.text import normalize, readable, reference_form
from splsm.cli import main

MANIFEST = REPO.parent / "shared" / "seed-data" / "raw_manifest_example.jsonl"


def _rows(part: str) -> list[str]:
    rows = [json.loads(x) for x in MANIFEST.read_text().splitlines() if x.strip()]
    return [r["text"] for r in rows if part in r["audio"]]


def _as_gigaspeech(text: str) -> str:
    """A manifest line back in GigaSpeech's own form (its text_tn field): upper case, punctuation as tags."""
    tags = {",": "<COMMA>", "\u3002": "<PERIOD>", "?": "<QUESTIONMARK>", "!": "<EXCLAMATIONPOINT>"}
    return " ".join(tags.get(w, w.upper()) for w in text.split())


def test_every_gigaspeech_line_of_the_references_manifest_comes_back_from_gigaspeechs_own_form():
    lines = _rows("/giga_all/")
    assert len(lines) == 1349
    raw = [_as_gigaspeech(t) for t in lines]
    assert sum("<PERIOD>" in t for t in raw) > 800 and not any(re.search(r"[a-z\u3002,]", t) for t in raw)
    assert [reference_form(_as_gigaspeech(t), "gigaspeech") for t in lines] == [
        " ".join(t.split()) for t in lines
    ]
    # and not the project's readable form, which changes almost all of them
    assert sum(readable(_as_gigaspeech(t)) != t for t in lines) > 1300


def test_common_voice_lines_are_kept_as_they_are_and_librispeech_lines_normalized():
    cv = _rows("common_voice")
    assert len(cv) == 394 and [reference_form(t, "commonvoice") for t in cv] == cv
    libri = _rows("/LibriSpeech/")
    # LibriSpeech's own lines are upper case without punctuation: the manifest holds Whisper's normalizer's form
    same = sum(reference_form(t.upper(), "librispeech") == t for t in libri)
    assert len(libri) == 356 and same >= 355
    assert reference_form("IT WAS HER HUSBAND'S FIFTEEN HUNDRED MEN", "librispeech") == normalize(
        "it was her husband's fifteen hundred men"
    )


def test_gigaspeech_garbage_tags_and_runs_of_spaces_do_not_survive():
    got = reference_form("<NOISE> HELLO  <COMMA> WORLD <PERIOD>  <SIL>", "gigaspeech")
    assert got == "hello , world \u3002" and not re.search(r"<|  ", got)


@pytest.mark.parametrize(
    "kind, text, want",
    [
        ("gigaspeech", "BUT THESE PEOPLE USED TRABUCOS <COMMA> OR BLUNDERBUSSES <COMMA>",
         "but these people used trabucos , or blunderbusses ,"),
        ("commonvoice", "My mother just called you?", "My mother just called you?"),
        ("librispeech", "IT WAS HER HUSBAND'S FIFTEEN HUNDRED MEN", "it was her husband is 1500 men"),
    ],
)  # fmt: skip
def test_paper_yaml_feeds_each_corpus_line_as_the_reference_did(kind, text, want):
    result = CliRunner().invoke(
        main,
        ["prompts", "--config", str(REPO / "configs" / "paper.yaml"), "--task", "asr", "--text", text,
         "--corpus-kind", kind, "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["answer"] == want


def test_generate_asks_about_the_reference_form_of_each_line(harvested, tiny_config):
    from core.catalog import load_catalog
    from core.paths import WorkPaths
    from core.tables import read_transcripts
    from stages.generate.driver import plan_requests

    g = tiny_config.generate.model_copy(update={"transcript_form": "reference", "tasks": ["repeat"]})
    path = WorkPaths(harvested).harvest.transcripts
    reqs = plan_requests(path, load_catalog(g.catalog), g, "m", "r", None, tiny_config.corpus_kinds)
    rows = {r["utt_id"]: r for r in read_transcripts(path).to_pylist()}
    kinds = tiny_config.corpus_kinds
    assert reqs and all(
        f": {reference_form(rows[q.utt_id]['text_raw'], kinds[rows[q.utt_id]['corpus']])} ASSISTANT:"
        in q.prompt
        for q in reqs
    )
