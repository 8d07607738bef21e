"""The generate stage's parts: filters, catalog settings, the chat-template prompt format, the cache key."""

import shutil

import pytest

from core.catalog import DEFAULT_CATALOG, CatalogError, load_catalog
from core.config import GenerateConfig
from core.paths import GeneratePaths, WorkPaths
from core.prompts import speech_prompt, text_prompt
from core.tables import read_table, write_table
from schemas import RESPONSES, TRANSCRIPTS, to_table
from stages.generate.cache import Answer, AnswerCache, request_key
from stages.generate.driver import generate, plan_requests
from stages.generate.filters import FilterSettings, ends_in_punctuation, failures, script_fraction

LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.mark.parametrize(
    "text,ok",
    [
        ("It rained all day.", True),
        ("Really?", True),
        ("他说：“好。”", True),  # CJK stop inside closing quotes
        ("今天下雨了。", True),
        ("keywords: rain, day", False),
        ("and then the", False),
        ("", False),
        ("Done!   ", True),
    ],
)
def test_end_punctuation_latin_and_cjk(text, ok):
    assert ends_in_punctuation(text) is ok


def test_script_of_the_target_language():
    assert script_fraction("今天下雨了。", "zh") == 1.0
    assert script_fraction("It rained today.", "zh") == 0.0
    assert script_fraction("雨 rain", "zh") == pytest.approx(1 / 5)
    assert script_fraction("Привет", "ru") == 1.0
    known = "known: ar, de, el, en, es, fr, he, hi, ja, ko, ru, th, uk, zh"  # what a config may name
    with pytest.raises(ValueError, match=f"no script known for target language 'tlh'; {known}$"):
        script_fraction("x", "tlh")


@pytest.mark.parametrize(
    "text, fraction",
    [
        ("2024: 42 - 7!", 0.0),  # no letters at all: none in the target script
        ("ab\U00017000", 1.0),  # a Tangut ideograph, a letter unicodedata cannot name: not counted
        ("ab\u4e00", 2 / 3),
    ],
)
def test_script_fraction_counts_only_letters_whose_script_is_known(text, fraction):
    assert script_fraction(text, "en") == pytest.approx(fraction)


def test_answer_cache_reads_every_workers_cache_and_writes_only_its_own(tmp_path):
    d = tmp_path / "generate" / "caches"  # folders a first run has yet to make
    own, other, absent = (
        d / "cache-0000-of-0003.sqlite",
        d / "cache-0001-of-0003.sqlite",
        d / "cache-0002.sqlite",
    )
    k0, k1, k2 = (request_key("llm", "rev1", p, {"temperature": 0.0}) for p in ("one", "two", "three"))
    a0, a1 = Answer("One.", "stop", 5, 2), Answer("Two", "length", 6, 16)
    worker1 = AnswerCache(other)
    worker1.put(k1, "llm", "two", {"temperature": 0.0}, a1)
    worker1.close()
    cache = AnswerCache(own, [own, other, absent])  # worker 2 has not started: no file yet
    cache.put(k0, "llm", "one", {"temperature": 0.0}, a0)
    assert cache.get_many([k0, k1, k2]) == {k0: a0, k1: a1}
    assert cache.get_many([k0]) == {k0: a0}
    assert cache.get_many([k1]) == {k1: a1}
    # an answer asked again replaces the first, it is not counted twice; the other worker's file is not written
    again = Answer("One!", "stop", 5, 2)
    cache.put(k0, "llm", "one", {"temperature": 0.0}, again)
    assert (cache.count(), cache.get_many([k0])) == (1, {k0: again})
    cache.close()
    assert not absent.exists()
    worker1 = AnswerCache(other)
    assert (worker1.count(), worker1.get_many([k0, k1])) == (1, {k1: a1})
    worker1.close()


def test_failures_are_listed_in_order_and_only_where_they_apply():
    s = FilterSettings(max_prompt_tokens=150, min_script_fraction=0.5)
    every = ("prompt_too_long", "empty", "truncated", "no_end_punct", "wrong_script")
    assert failures("The weather", "length", 150, every, "zh", s) == [
        "prompt_too_long",
        "truncated",
        "no_end_punct",
        "wrong_script",
    ]
    assert failures("今天下雨了。", "stop", 149, every, "zh", s) == []
    assert failures("", "stop", 10, every, None, s) == ["empty", "no_end_punct"]
    assert failures("no stop", "length", 10, ("empty",), None, s) == []
    # a refused request: request_error first, whatever else an empty answer fails
    assert (
        failures("", "error: HTTP 400: too long", 0, ("request_error", *every), None, s)[0] == "request_error"
    )
    assert failures("Fine.", "stop", 10, ("request_error",), None, s) == []


def _catalog_with(tmp_path, old, new):
    text = DEFAULT_CATALOG.read_text()
    assert old in text
    p = tmp_path / "catalog.yaml"
    p.write_text(text.replace(old, new))
    return p


def test_catalog_settings_are_checked_with_file_and_category(tmp_path):
    bad = _catalog_with(tmp_path, "    max_words: 50\n", "    max_word: 50\n")
    with pytest.raises(
        CatalogError, match=r"catalog.yaml: category 'continuation': unknown setting 'max_word'"
    ):
        load_catalog(bad)
    bad = _catalog_with(tmp_path, "no_end_punct, wrong_script]", "no_end_punct, wrong_language]")
    with pytest.raises(CatalogError, match=r"category 'translation': filters must be"):
        load_catalog(bad)
    bad = _catalog_with(tmp_path, "target_language: zh", "target_language: klingon")
    with pytest.raises(CatalogError, match="target_language 'klingon'"):
        load_catalog(bad)
    bad = _catalog_with(tmp_path, "  max_new_tokens: 225 ", "  max_new_tokens: -1 ")
    with pytest.raises(CatalogError, match="defaults: max_new_tokens must be a positive integer"):
        load_catalog(bad)


def test_cache_keys_survive_a_catalog_version_that_leaves_the_prompt_unchanged(harvested, tmp_path):
    v2 = _catalog_with(tmp_path, "version: 1", "version: 2")
    v2.write_text(
        v2.read_text().replace("Translate the English text into Chinese", "Put the text into Chinese")
    )
    g = GenerateConfig(tasks=["repeat", "translation"])
    transcripts = WorkPaths(harvested).harvest.transcripts
    a = {(r.utt_id, r.task): r for r in plan_requests(transcripts, load_catalog(), g, "m", "rev")}
    b = {(r.utt_id, r.task): r for r in plan_requests(transcripts, load_catalog(v2), g, "m", "rev")}
    assert load_catalog(v2).content_hash != load_catalog().content_hash
    for pair, r in a.items():
        assert (r.key == b[pair].key) == (r.prompt == b[pair].prompt)
    changed = [p for p in a if a[p].key != b[p].key]
    assert changed and all(p[1] == "translation" for p in changed)
    # and the budget is part of the key: a category asking for fewer tokens is another request
    short = _catalog_with(
        tmp_path,
        "    answer_source: llm\n    instructions:\n      - Say the same",
        "    answer_source: llm\n    max_new_tokens: 100\n    instructions:\n      - Say the same",
    )
    c = {(r.utt_id, r.task): r for r in plan_requests(transcripts, load_catalog(short), g, "m", "rev")}
    assert all((c[p].key != a[p].key) == (p[1] == "repeat") for p in a)
    assert all(c[p].sampling["max_tokens"] == 100 for p in a if p[1] == "repeat")


@pytest.fixture(scope="module")
def chat_llm(tiny_models_dir, tmp_path_factory):
    """The tiny Llama with a Llama-3-style chat template in its tokenizer."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("chat") / "llm"
    shutil.copytree(tiny_models_dir / "llm", d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = LLAMA3_STYLE
    tok.save_pretrained(d)
    return d


def test_chat_template_prompts_for_generation_and_training_agree(chat_llm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_llm)
    ins, tr = "Reword the text", "the cat sat on the mat"
    text = text_prompt(ins, tr, "chat_template", tok)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": f"{ins}: {tr}"}], tokenize=False, add_generation_prompt=True
    )
    # the template writes <s> and so does the tokenizer: the prompt leaves it to the tokenizer
    assert rendered == tok.bos_token + text
    assert tok(text).input_ids.count(tok.bos_token_id) == 1
    assert text_prompt(ins, tr, "chat_template", chat_llm) == text  # a directory works as well
    for fmt, t in (("vicuna_v1.1", None), ("chat_template", tok)):
        sp = speech_prompt(ins, fmt, t)
        assert sp.prefix.endswith(f"{ins} SPEECH:")
        # the speech prompt is the text prompt with ": transcript" replaced by " SPEECH: <speech>"
        assert sp.prefix.removesuffix(" SPEECH:") + f": {tr}" + sp.suffix == text_prompt(ins, tr, fmt, t)
    assert speech_prompt(ins, "chat_template", tok).suffix == (
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_chat_template_needs_a_tokenizer_that_has_one(tiny_models_dir):
    with pytest.raises(ValueError, match="needs the backbone's tokenizer"):
        text_prompt("a", "b", "chat_template")
    with pytest.raises(ValueError, match="has no chat template"):
        speech_prompt("a", "chat_template", tiny_models_dir / "llm")


def test_generate_with_the_chat_template_format(chat_llm, harvested, tmp_path):
    from transformers import AutoTokenizer

    g = GenerateConfig(
        backend="transformers", prompt_format="chat_template", tasks=["keywords"], max_new_tokens=4
    )
    s = generate(WorkPaths(harvested).harvest.transcripts, tmp_path, g, chat_llm)
    rows = read_table(GeneratePaths(tmp_path).responses, RESPONSES).to_pylist()
    tok = AutoTokenizer.from_pretrained(chat_llm)
    text = {
        u["utt_id"]: u["text"]
        for u in read_table(WorkPaths(harvested).harvest.transcripts, TRANSCRIPTS).to_pylist()
    }
    assert s.requested > 0 and len(rows) == s.requests == len(text)
    for r in rows:
        assert r["prompt"].startswith(
            "<|start_header_id|>user<|end_header_id|>\n\n" + r["instruction"] + ": "
        )
        assert r["prompt"] == text_prompt(r["instruction"], text[r["utt_id"]], "chat_template", tok)


def _left_padded(backend, prompts: list[str]):
    """(token ids per prompt, left-padded input ids, mask, width) as the backend's static batches hold them."""
    import torch

    ids = backend.tok(prompts).input_ids
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), backend.pad_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, width - len(x) :], mask[row, width - len(x) :] = torch.tensor(x), 1
    return ids, input_ids, mask, width


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
def test_in_process_greedy_loop_gives_generates_tokens(tiny_models_dir, harvested, compiled):
    """The transformers backend decodes greedy batches in its own loop over a static cache (bench/generate.py
    says why); its answers must be HF ``generate``'s, token for token, for prompts of different lengths in
    one left-padded batch, and a row must end at its first eos."""
    import torch

    from core.config import TransformersBackendConfig
    from stages.generate.backends.transformers_local import TransformersBackend

    llm = tiny_models_dir / "llm"
    table = read_table(WorkPaths(harvested).harvest.transcripts, TRANSCRIPTS)
    b = TransformersBackend(llm, TransformersBackendConfig(batching="static", compile=compiled))
    prompts = [text_prompt("Say it again.", t) for t in table.column("text").to_pylist()[:6]]
    ids, input_ids, mask, width = _left_padded(b, prompts)
    assert len({len(x) for x in ids}) > 1  # the batch really is padded

    def hf(eos: int) -> list[list[int]]:
        out = b.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=b.pad_id,
        )[:, width:].tolist()
        return [r[: r.index(eos) + 1] if eos in r else r for r in out]

    def ours() -> list[list[int]]:
        out = b._greedy(input_ids, mask, 12).tolist()
        eos = b.tok.eos_token_id
        return [r[: r.index(eos) + 1] if eos in r else r for r in out]

    with torch.inference_mode():
        assert ours() == hf(b.tok.eos_token_id)
        # a random tiny model seldom says eos: make one of its frequent tokens the eos, so rows stop early
        first = hf(b.tok.eos_token_id)
        common = max(set(first[0][2:]), key=lambda t: sum(r.count(t) for r in first))
        b.tok.eos_token = b.tok.convert_ids_to_tokens(common)
        stopped = ours()
        assert stopped == hf(common)
        assert any(len(r) < 12 for r in stopped)


def test_in_process_greedy_loop_drops_finished_rows_and_keeps_the_others_tokens(tiny_models_dir, harvested):
    """Rows that have said eos leave the batch (cache rows and all) while the others decode on: the
    decoding steps get narrower, and every row's tokens are still HF ``generate``'s."""
    import torch

    from core.config import TransformersBackendConfig
    from stages.generate.backends.transformers_local import TransformersBackend

    b = TransformersBackend(tiny_models_dir / "llm", TransformersBackendConfig(batching="static"))
    table = read_table(WorkPaths(harvested).harvest.transcripts, TRANSCRIPTS)
    texts = table.column("text").to_pylist()
    prompts = [text_prompt(ins, t) for t in texts[:4] for ins in ("Say it again.", "Continue the text.")]
    ids, input_ids, mask, width = _left_padded(b, prompts)

    def hf(eos: int) -> list[list[int]]:
        out = b.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=b.pad_id,
        )[:, width:].tolist()
        return [r[: r.index(eos) + 1] if eos in r else r for r in out]

    with torch.inference_mode():
        free = hf(b.tok.eos_token_id)
        # an eos that ends some rows early (at least a quarter of them) and not others
        candidates = {t for r in free for t in r[:8]}
        early = {t: sum(t in r[:8] for r in free) for t in candidates}
        eos = max((t for t, k in early.items() if 2 <= k < len(free)), key=lambda t: (early[t], -t))
        b.tok.eos_token = b.tok.convert_ids_to_tokens(eos)
        expected = hf(eos)
        widths = []
        forward = b.model.forward

        def counting(*a, **kw):
            if kw["input_ids"].shape[1] == 1:
                widths.append(kw["input_ids"].shape[0])
            return forward(*a, **kw)

        b.model.forward = counting
        out = b._greedy(input_ids, mask, 16).tolist()
    ours = [r[: r.index(eos) + 1] if eos in r else r for r in out]
    assert ours == expected
    assert widths[0] == len(ids) and min(widths) < len(ids)  # finished rows left the batch
    assert widths == sorted(widths, reverse=True)
    assert all(r[len(o) :] == [eos] * (len(r) - len(o)) for r, o in zip(out, ours, strict=True))


def test_penalties_lower_only_the_answers_own_tokens_and_agree_with_generate(tiny_models_dir, harvested):
    """frequency_penalty and presence_penalty with the OpenAI protocol's meaning, in the backend's greedy loop
    and in ``generate`` (its sampled path): each equal to a plain loop that recomputes every step from scratch
    and lowers a token's logit by frequency x its count in the answer so far + presence once it occurs; the
    prompt's tokens are not counted; and the penalties change the answers of a random tiny model, which
    repeats itself."""
    import collections

    import torch

    from core.config import TransformersBackendConfig
    from stages.generate.backends.transformers_local import TransformersBackend, _penalty_processor

    b = TransformersBackend(tiny_models_dir / "llm", TransformersBackendConfig(batching="static"))
    texts = read_table(WorkPaths(harvested).harvest.transcripts, TRANSCRIPTS).column("text").to_pylist()
    prompts = [text_prompt("Say it again.", t) for t in texts[:3]]
    ids, input_ids, mask, width = _left_padded(b, prompts)
    steps, freq, pres = 10, 0.7, 0.4

    def plain(row: list[int]) -> list[int]:
        seq, answer = list(row), []
        for _ in range(steps):
            logits = b.model(input_ids=torch.tensor([seq])).logits[0, -1].clone()
            for tok, n in collections.Counter(answer).items():
                logits[tok] -= freq * n + pres
            nxt = int(logits.argmax())
            answer.append(nxt)
            seq.append(nxt)
        return answer

    with torch.inference_mode():
        expected = [plain(x) for x in ids]
        unpenalized = b._greedy(input_ids, mask, steps).tolist()
        ours = b._greedy(input_ids, mask, steps, (freq, pres)).tolist()
        hf = b.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=b.pad_id,
            logits_processor=[_penalty_processor(width, freq, pres)],
        )[:, width:].tolist()
    assert b.tok.eos_token_id not in sum(expected, [])  # no row stopped: every step compared
    assert ours == expected
    assert hf == expected
    assert ours != unpenalized
    assert max(collections.Counter(r).most_common(1)[0][1] for r in unpenalized) > 1  # it did repeat itself


def test_penalties_enter_the_cache_key_only_when_on_and_a_server_that_cannot_honour_them_is_refused():
    from stages.generate.driver import sampling_params

    off = sampling_params(GenerateConfig())
    assert set(off) == {"max_tokens", "temperature", "top_p", "seed"}  # answers cached before keep their keys
    on = sampling_params(GenerateConfig(frequency_penalty=0.5, backend="transformers"))
    assert on["frequency_penalty"] == 0.5 and "presence_penalty" not in on
    assert request_key("m", "r", "p", on) != request_key("m", "r", "p", off)
    with pytest.raises(ValueError, match="transformers-serve backend cannot honour"):
        GenerateConfig(presence_penalty=0.5, backend="transformers-serve")


def test_one_task_per_utterance_is_drawn_with_the_seed_and_build_expects_only_that_answer(
    harvested, tmp_path
):
    """The reference's sampling: each utterance gets one LLM task (its per-category manifests), here drawn by a
    hash of the seed, so a rerun or another worker draws the same, and build counts no other pair missing."""
    from collections import Counter

    from core.catalog import sample_tasks
    from core.config import LLM_TASKS, BuildConfig
    from stages.build.examples import build

    transcripts = WorkPaths(harvested).harvest.transcripts
    utts = read_table(transcripts, TRANSCRIPTS).column("utt_id").to_pylist()
    g = GenerateConfig(tasks=list(LLM_TASKS), tasks_per_utterance=1, seed=3)
    reqs = plan_requests(transcripts, load_catalog(), g, "m", "rev")
    per_utt = Counter(r.utt_id for r in reqs)
    assert sorted(per_utt) == sorted(utts) and set(per_utt.values()) == {1}
    assert [(r.utt_id, r.task) for r in reqs] == [
        (r.utt_id, r.task) for r in plan_requests(transcripts, load_catalog(), g, "m", "rev")
    ]
    other_seed = plan_requests(transcripts, load_catalog(), g.model_copy(update={"seed": 4}), "m", "rev")
    assert {(r.utt_id, r.task) for r in reqs} != {(r.utt_id, r.task) for r in other_seed}
    # over many ids the draw covers every task about equally
    counts = Counter(sample_tasks(f"u{i}", list(LLM_TASKS), 1, 1)[0] for i in range(6000))
    assert set(counts) == set(LLM_TASKS) and min(counts.values()) > 850
    assert sample_tasks("u1", list(LLM_TASKS), 2, 1) == [
        t for t in LLM_TASKS if t in sample_tasks("u1", list(LLM_TASKS), 2, 1)
    ]
    assert sample_tasks("u1", ["repeat", "intent"], None, 1) == ["repeat", "intent"]

    rows = [
        dict(
            utt_id=r.utt_id,
            task=r.task,
            instruction_id=r.instruction_id,
            instruction=r.instruction,
            prompt=r.prompt,
            answer="An answer.",
            model="m",
            finish_reason="stop",
            prompt_tokens=1,
            completion_tokens=1,
            request_key=r.key,
            sampling="{}",
            rejected_by=None,
        )
        for r in reqs
    ]
    resp = tmp_path / "responses.parquet"
    write_table(to_table(rows, RESPONSES), resp, RESPONSES)
    b = BuildConfig(eval_splits=["test-clean"])
    s = build(
        transcripts,
        resp,
        tmp_path / "out",
        b,
        load_catalog(),
        sampled=lambda u: sample_tasks(u, list(LLM_TASKS), 1, 3),
    )
    assert s.missing_answers == 0 and s.examples == 2 * len(utts)  # its ASR example and its one task's
    unsampled = build(transcripts, resp, tmp_path / "all", b, load_catalog())
    assert unsampled.missing_answers == 5 * len(utts)  # without the draw, every other pair is missing
