"""Build: join transcripts and the LLM's answers into training examples in the speech-prompt layout.

Each example is ``[prefix][speech tokens][suffix][answer + eos]`` with prefix and suffix made by
``stages.prompts.speech_prompt``, the function generation formats its prompts with. ASR examples
take the transcript as the answer; self-powered examples take the LLM's answer to the same
instruction about the same transcript. Splits are assigned by a hash of the speaker (of the
utterance where there is none), so they are stable across rebuilds; corpus-defined evaluation
splits keep their names.

Token ids are not stored: the examples table holds text, and the training loader tokenizes. The
same examples then serve any backbone's tokenizer, and a tokenizer change needs no rebuild.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from schemas import EXAMPLES, RESPONSES, TRANSCRIPTS, read_table, to_table, write_table
from splsm.config import BuildConfig, ExperimentConfig
from splsm.log import console
from splsm.stage import Artifact, StageResult, run_stage
from stages.instructions import Catalog, load_catalog
from stages.prompts import speech_prompt

CODE_FILES = ["stages/build.py", "stages/prompts.py", "stages/instructions.py", "schemas/__init__.py"]


def _unit(*parts: str) -> float:
    """A number in [0, 1) from a hash: the same input always lands in the same place."""
    h = hashlib.sha256("\0".join(parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign_split(corpus_split: str, speaker: str | None, utt_id: str, b: BuildConfig) -> str:
    if corpus_split in b.eval_splits:
        return corpus_split
    u = _unit(str(b.seed), speaker or utt_id)
    if u < b.test_fraction:
        return "test"
    if u < b.test_fraction + b.dev_fraction:
        return "dev"
    return "train"


@dataclass
class BuildSummary:
    examples: int
    by_split_task: dict[str, int]
    missing_answers: int


def build(
    transcripts: Path,
    responses: Path | None,
    out_dir: Path,
    b: BuildConfig,
    catalog: Catalog,
    prompt_format: str = "vicuna_v1.1",
) -> BuildSummary:
    """Write ``out_dir/examples.parquet``: one example per (utterance, task) that has an answer."""
    tr = read_table(transcripts, TRANSCRIPTS).to_pylist()
    answers: dict[tuple[str, str], dict] = {}
    if responses is not None:
        for r in read_table(responses, RESPONSES).to_pylist():
            answers[(r["utt_id"], r["task"])] = r
    rows, missing = [], 0
    for t in tr:
        split = assign_split(t["split"], t["speaker"], t["utt_id"], b)
        for task in b.tasks:
            if task == "asr":
                ins = catalog.draw("asr", t["utt_id"], b.seed).text
                answer = t["text"]
            elif (t["utt_id"], task) in answers:
                r = answers[(t["utt_id"], task)]
                ins, answer = r["instruction"], r["answer"]
            else:
                missing += 1
                continue
            p = speech_prompt(ins, prompt_format)
            rows.append(
                dict(
                    example_id=hashlib.sha256(f"{t['utt_id']}\0{task}".encode()).hexdigest()[:20],
                    utt_id=t["utt_id"],
                    split=split,
                    task=task,
                    instruction=ins,
                    prefix=p.prefix,
                    suffix=p.suffix,
                    answer=answer,
                    transcript=t["text"],
                    audio_path=t["audio_path"],
                    offset_s=t["offset_s"],
                    duration_s=t["duration_s"],
                    speaker=t["speaker"],
                )
            )
    write_table(to_table(rows, EXAMPLES), out_dir / "examples.parquet", EXAMPLES)
    counts = Counter(f"{r['split']}/{r['task']}" for r in rows)
    return BuildSummary(len(rows), dict(sorted(counts.items())), missing)


def print_summary(s: BuildSummary) -> None:
    from rich.table import Table

    t = Table("split/task", "examples", title=f"build: {s.examples} examples")
    for k, n in s.by_split_task.items():
        t.add_row(k, str(n))
    console.print(t)
    if s.missing_answers:
        console.print(
            f"[yellow]build: {s.missing_answers} (utterance, task) pairs have no answer and were left out[/]"
        )


def run(cfg: ExperimentConfig, workdir: Path, force: bool = False) -> StageResult:
    workdir = Path(workdir)
    out = workdir / "build"
    transcripts = workdir / "harvest" / "transcripts.parquet"
    responses = workdir / "generate" / "responses.parquet"
    catalog = load_catalog(cfg.generate.catalog)
    needs_llm = any(t != "asr" for t in cfg.build.tasks)
    inputs = [Artifact("transcripts", transcripts, "table"), Artifact("catalog", catalog.path, "file")]
    if needs_llm:
        inputs.append(Artifact("responses", responses, "table"))

    def body() -> dict:
        s = build(
            transcripts, responses if needs_llm else None, out, cfg.build, catalog, cfg.generate.prompt_format
        )
        print_summary(s)
        return s.__dict__

    params = {**cfg.build.model_dump(), "prompt_format": cfg.generate.prompt_format}
    return run_stage(
        "build",
        workdir,
        params,
        inputs,
        [Artifact("examples", out / "examples.parquet", "table")],
        body,
        CODE_FILES,
        force,
    )
