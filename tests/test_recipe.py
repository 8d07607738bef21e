"""The reference recipe, string for string: ``splsm prompts`` on configs/paper.yaml against the reference's own
strings (../shared/reference/RECIPE.md, read from its code), typed out here as the golden data."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import REPO
from core.catalog import load_catalog
from core.config import load_config
from splsm.cli import main

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
# RECIPE.md section 1: five wordings per category, exactly (the continuation's second has two spaces).
REFERENCE_WORDINGS = {
    "asr": [
        "Provide the English transcription according to the speech",
        "Transcribe the spoken words into written English text",
        "Convert the spoken English into a written transcript",
        "Create a written transcription of the spoken English",
        "Write down the English speech as a text transcript",
    ],
    "repeat": [
        "Repeat the provided text, ensuring to maintain its original meaning and details",
        "Rephrase the text without altering its initial intent and key information",
        "Paraphrase the provided text while preserving all original facts and nuances",
        "Echo the content of the text, maintaining its exact purpose and details",
        "Retell the given information without changing its meaning or losing any critical data",
    ],
    "keywords": [
        "Extract the most frequently occurring words or phrases in the text, excluding common stopwords, to "
        "identify main topics",
        "Identify and list the most common words or phrases from the text, omitting typical stopwords, to "
        "highlight central themes",
        "Determine the key words or phrases frequently used in the text, removing all usual stopwords, to "
        "discern the main topics",
        "Find the recurring words or phrases in the text, ignoring common stopwords, to ascertain the primary "
        "themes",
        "Extract significant words or phrases that appear often in the text, exclude basic stopwords, to "
        "uncover the main subjects",
    ],
    "intent": [
        "Determine the primary purpose of the text and evaluate how clearly and effectively the message is "
        "conveyed",
        "Identify the main intent of the text and assess the clarity and effectiveness of its delivery",
        "Ascertain the fundamental objective of the text and critique the transparency and efficiency of its "
        "presentation",
        "Figure out the chief aim of the text and judge how lucidly and effectively the ideas are presented",
        "Assess the central purpose of the text and evaluate the directness and impact of its expression",
    ],
    "sentiment": [
        "Determine the sentiment of the text and identify which sections contribute most to sentiment",
        "Analyze the overall mood of the text and pinpoint the parts that heavily influence the sentiment",
        "Evaluate the emotional tone of the text and determine which segments primarily affect the sentiment",
        "Identify the feeling conveyed by the text and specify which portions substantially shape this "
        "sentiment",
        "Assess the sentiment expressed in the text and highlight which areas contribute most to this feeling",
    ],
    "continuation": [
        "Please write a coherent and engaging continuation of the given English text with less than 50 words",
        "Compose a logical and captivating follow-up  to the provided English text within 50 words",
        "Craft a coherent and appealing extension for the English text, ensuring it does not exceed 50 words",
        "Develop a consistent and attractive continuation of the English text, keeping it under 50 words",
        "Write a fluent and engaging continuation of the English text, limited to 50 words",
    ],
    "translation": [
        "Provide the translation from English to Chinese",
        "Translate the given English content into Chinese",
        "Render the English text into Chinese",
        "Convert the specified English text into Chinese",
        "Translate the provided English material into the Chinese language",
    ],
}
# A LibriSpeech-style line as its corpus gives it, and the Whisper-normalized form the reference's manifest holds
# (RECIPE.md section 1: "husband's" -> "husband is", "FIFTEEN HUNDRED" -> "1500", no apostrophes).
RAW = "IT WAS HER HUSBAND'S FIFTEEN HUNDRED MEN"
NORMALIZED = "it was her husband is 1500 men"


def prompts(*args: str) -> dict:
    result = CliRunner().invoke(main, ["prompts", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_the_reference_catalog_holds_every_wording_of_the_reference_and_nothing_else():
    catalog = load_catalog(load_config(REPO / "configs" / "paper.yaml").generate.catalog)
    assert {k: [i.text for i in c.instructions] for k, c in catalog.categories.items()} == REFERENCE_WORDINGS
    assert catalog.categories["asr"].answer_source == "transcript"


@pytest.mark.parametrize("task", list(REFERENCE_WORDINGS))
def test_paper_yaml_gives_the_reference_strings_exactly(task):
    for instruction in REFERENCE_WORDINGS[task]:
        got = prompts(
            "--config",
            str(REPO / "configs" / "paper.yaml"),
            "--task",
            task,
            "--text",
            RAW,
            "--instruction",
            instruction,
        )
        # src/data_process/asr_text_generation_unified_*.py: one string, the transcript as the manifest holds it
        want_generation = f"{SYSTEM} \n\nUSER: {instruction}: {NORMALIZED} \nASSISTANT:"
        assert got["generation"] == (None if task == "asr" else want_generation)
        assert got["answer"] == (NORMALIZED if task == "asr" else None)
        # src/speech_text_paired_dataset.py: prefix, the speech tokens, suffix
        assert got["speech_prefix"] == f"{SYSTEM} \n\nUSER: {instruction}\nSPEECH:"
        assert got["speech_suffix"] == "\nASSISTANT:"
        # src/evaluate_token_asr.py: one fixed prompt, its suffix misspelled as it ran
        assert got["asr_eval_prefix"] == (
            f"{SYSTEM} \n\nUSER: Provide the transcription corresponding to the speech:\nSPEECH:"
        )
        assert got["asr_eval_suffix"] == "\nASSISTENT:"
        assert got["instruction_id"] is not None  # the wording is one of the catalog's


def test_without_an_instruction_the_seeded_draw_is_the_one_generate_and_build_make():
    cfg = load_config(REPO / "configs" / "paper.yaml")
    catalog = load_catalog(cfg.generate.catalog)
    seen = set()
    for utt in ("1089-134686-0000", "1089-134686-0001", "2277-149896-0000", "jfk", "common_voice_en_1"):
        got = prompts(
            "--config",
            str(REPO / "configs" / "paper.yaml"),
            "--task",
            "sentiment",
            "--text",
            RAW,
            "--utt-id",
            utt,
        )
        want = catalog.draw("sentiment", utt, cfg.generate.seed)
        assert (got["instruction"], got["instruction_id"]) == (want.text, want.id)
        seen.add(want.id)
    assert len(seen) > 1  # the draw depends on the utterance


def test_the_projects_defaults_stay_available_under_their_own_names():
    got = prompts(
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--task",
        "repeat",
        "--text",
        RAW,
        "--instruction",
        "Say it again",
    )
    # FastChat's vicuna_v1.1 layout, single spaces; the readable (lower-cased) transcript
    readable = "it was her husband's fifteen hundred men"
    assert got["generation"] == f"{SYSTEM} USER: Say it again: {readable} ASSISTANT:"
    assert (got["speech_prefix"], got["speech_suffix"]) == (
        f"{SYSTEM} USER: Say it again SPEECH:",
        " ASSISTANT:",
    )
    assert got["transcript"] == readable and got["catalog"] == "instructions-v1"


def test_a_task_the_catalog_lacks_is_a_clear_error():
    result = CliRunner().invoke(
        main, ["prompts", "--config", str(REPO / "configs" / "paper.yaml"), "--task", "poetry", "--text", RAW]
    )
    assert result.exit_code != 0 and "poetry" in result.output and "known:" in result.output


def test_a_chat_template_config_without_its_llm_directory_says_what_to_run(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "prompts",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--task",
            "repeat",
            "--text",
            RAW,
            "--workdir",
            str(tmp_path / "empty"),
        ],
    )
    assert result.exit_code != 0
    assert "chat_template needs the LLM's tokenizer" in result.output and "models pretrained" in result.output


# src/speech_text_paired_dataset_llama.py (reference commit 5c8b390), typed out: the Llama-3 layout's strings and
# how its process_dataset tokenizes them.
LLAMA3_TEXT_FORMAT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n"
    "You are a helpful assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n"
    "{instruction}\n speech:"
)
LLAMA3_SUFFIX = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>"


def llama3_like_tokenizer():
    """A word-level tokenizer with Llama-3-Instruct's special tokens, its BOS added to every encoding and
    ``<|eot_id|>`` as eos (as Llama-3-Instruct's tokenizer does): no Llama-3 files can be downloaded here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<unk>"]
    words = "system You are a helpful assistant user speech : Transcribe the hello world . \n".split(" ")
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "removed")
    bos = vocab["<|begin_of_text|>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )


def test_the_reference_llama3_layout_tokenizes_as_the_references_dataset_did():
    import numpy as np

    from core.lsm.batch import Collate
    from core.prompts import speech_prompt

    tok = llama3_like_tokenizer()
    instruction, answer = "Transcribe the speech", "hello world ."
    prompt = speech_prompt(instruction, "reference_llama3")
    assert prompt.prefix == LLAMA3_TEXT_FORMAT.format(instruction=instruction)
    assert prompt.suffix == LLAMA3_SUFFIX

    row = {"prefix": prompt.prefix, "suffix": prompt.suffix, "answer": answer}
    batch = Collate(tok)([row], [np.zeros(16000, dtype=np.float32)], with_answer=True)
    # process_dataset: the prefix through the tokenizer as it is (so two BOS: the string's and the tokenizer's),
    # the suffix and the answer (with eos appended as text) with their BOS cut off
    want_prefix = tok(LLAMA3_TEXT_FORMAT.format(instruction=instruction)).input_ids
    assert want_prefix[:2] == [tok.bos_token_id] * 2
    assert batch.prefix_ids == [want_prefix]
    assert batch.suffix_ids == [tok(LLAMA3_SUFFIX).input_ids[1:]]
    assert batch.answer_ids == [tok(answer + tok.eos_token).input_ids[1:]]


def test_the_reference_llama3_layout_is_a_setting_and_renders_everywhere():
    import yaml

    from core.config import ExperimentConfig
    from core.prompts import asr_eval_prompt, text_prompt

    raw = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    raw["generate"]["prompt_format"] = "reference_llama3"
    assert ExperimentConfig.model_validate(raw).generate.prompt_format == "reference_llama3"
    head = LLAMA3_TEXT_FORMAT.removesuffix("\n speech:")
    assert text_prompt("Say it again", "hi there", "reference_llama3") == (
        head.format(instruction="Say it again: hi there") + LLAMA3_SUFFIX
    )
    asr = asr_eval_prompt("reference_llama3")
    assert asr.prefix == LLAMA3_TEXT_FORMAT.format(
        instruction="Provide the transcription corresponding to the speech:"
    )
    assert asr.suffix == LLAMA3_SUFFIX
