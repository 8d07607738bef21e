"""Generate: the LLM answers an instruction about each transcript; its answers become training targets.

For each (utterance, task) an instruction is drawn from the catalog, the prompt is formatted by
``stages.prompts`` (the same function training uses) and sent to an OpenAI-compatible completions
endpoint: a vLLM server in production, or a ``transformers serve`` process that this stage starts
and stops itself on a laptop. Every answer goes into an on-disk cache keyed by (model, revision,
prompt, sampling parameters) the moment it arrives, so a crash or a rerun never pays for it twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from schemas import RESPONSES, TRANSCRIPTS, read_table, to_table, write_table
from splsm.config import ExperimentConfig, GenerateConfig
from splsm.log import console, progress
from splsm.stage import Artifact, StageResult, fingerprint_dir, run_stage
from stages.instructions import Catalog, load_catalog
from stages.prompts import text_prompt

CODE_FILES = ["stages/generate.py", "stages/prompts.py", "stages/instructions.py", "schemas/__init__.py"]


@dataclass(frozen=True)
class Request:
    utt_id: str
    task: str
    instruction_id: str
    instruction: str
    prompt: str
    key: str


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def sampling_params(g: GenerateConfig) -> dict:
    """What the server is asked for; part of every cache key."""
    return {"max_tokens": g.max_new_tokens, "temperature": g.temperature, "seed": g.seed}


def request_key(model: str, revision: str, prompt: str, sampling: dict) -> str:
    blob = json.dumps(
        {"model": model, "revision": revision, "prompt": prompt, "sampling": sampling}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def plan_requests(
    transcripts: Path,
    catalog: Catalog,
    tasks: list[str],
    seed: int,
    model: str,
    revision: str,
    sampling: dict,
) -> list[Request]:
    table = read_table(transcripts, TRANSCRIPTS)
    reqs = []
    for utt_id, text in zip(
        table.column("utt_id").to_pylist(), table.column("text").to_pylist(), strict=True
    ):
        for task in tasks:
            ins = catalog.draw(task, utt_id, seed)
            prompt = text_prompt(ins.text, text)
            reqs.append(
                Request(
                    utt_id, task, ins.id, ins.text, prompt, request_key(model, revision, prompt, sampling)
                )
            )
    return reqs


class AnswerCache:
    """Answers on disk by request key (SQLite: one committed row per answer, safe under a crash)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.con = sqlite3.connect(path, timeout=60)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute(
            "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, model TEXT, prompt TEXT, sampling TEXT,"
            " answer TEXT, finish_reason TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)"
        )

    def get_many(self, keys: list[str]) -> dict[str, Answer]:
        found = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = f"SELECT key, answer, finish_reason, prompt_tokens, completion_tokens FROM answers WHERE key IN ({','.join('?' * len(chunk))})"
            for k, *rest in self.con.execute(q, chunk):
                found[k] = Answer(*rest)
        return found

    def put(self, key: str, model: str, prompt: str, sampling: dict, a: Answer) -> None:
        with self.con:
            self.con.execute(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    key,
                    model,
                    prompt,
                    json.dumps(sampling, sort_keys=True),
                    a.text,
                    a.finish_reason,
                    a.prompt_tokens,
                    a.completion_tokens,
                    time.time(),
                ],
            )

    def close(self) -> None:
        self.con.close()


async def _request_all(
    todo: list[Request], base_url: str, model: str, g: GenerateConfig, cache: AnswerCache, sampling: dict
) -> int:
    """Send every request with at most ``g.concurrency`` in flight; the client retries 429/5xx/connection
    errors with exponential backoff. Each answer is cached as soon as it arrives."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        base_url=base_url,
        api_key=os.environ.get(g.api_key_env, "EMPTY"),
        timeout=g.request_timeout_s,
        max_retries=g.max_retries,
    )
    gate = asyncio.Semaphore(g.concurrency)
    state = {"in_flight": 0, "tokens": 0, "t0": time.monotonic()}

    with progress() as bar:
        task = bar.add_task("generate", total=len(todo), status="")

        async def one(r: Request) -> None:
            async with gate:
                state["in_flight"] += 1
                try:
                    resp = await client.completions.create(
                        model=model,
                        prompt=r.prompt,
                        max_tokens=g.max_new_tokens,
                        temperature=g.temperature,
                        seed=g.seed,
                    )
                finally:
                    state["in_flight"] -= 1
            choice = resp.choices[0]
            usage = resp.usage
            a = Answer(
                choice.text.strip(),
                choice.finish_reason or "",
                usage.prompt_tokens if usage else 0,
                usage.completion_tokens if usage else 0,
            )
            cache.put(r.key, model, r.prompt, sampling, a)
            state["tokens"] += a.completion_tokens
            rate = state["tokens"] / max(time.monotonic() - state["t0"], 1e-6)
            bar.update(task, advance=1, status=f"{rate:.0f} tok/s, {state['in_flight']} in flight")

        try:
            await asyncio.gather(*(one(r) for r in todo))
        finally:
            await client.close()
    return state["tokens"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def transformers_server(model_dir: Path, log_path: Path, timeout_s: float = 300.0, device: str = "auto"):
    """Start ``transformers serve`` on a free loopback port for the duration of the block; yields its base URL."""
    port = _free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    exe = Path(sys.executable).with_name("transformers")
    cmd = [
        str(exe) if exe.exists() else "transformers",
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        device,
        "--log-level",
        "warning",
    ]
    console.print(f"starting transformers serve for {model_dir} on port {port} (log: {log_path})")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"transformers serve exited with code {proc.returncode} before it was ready:\n{tail}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"transformers serve was not ready after {timeout_s}s (log: {log_path})")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@dataclass
class GenerateSummary:
    requests: int
    cached: int
    requested: int
    completion_tokens: int
    seconds: float


def generate(transcripts: Path, out_dir: Path, g: GenerateConfig, llm_dir: Path | None) -> GenerateSummary:
    """Answer every (utterance, task) and write ``out_dir/responses.parquet`` (one row per pair)."""
    t0 = time.monotonic()
    catalog = load_catalog(g.catalog)
    model = g.served_model or str(llm_dir)
    revision = fingerprint_dir(llm_dir) if llm_dir else ""
    sampling = sampling_params(g)
    reqs = plan_requests(transcripts, catalog, g.tasks, g.seed, model, revision, sampling)
    cache = AnswerCache(out_dir / "cache.sqlite")
    try:
        done = cache.get_many([r.key for r in reqs])
        todo = list({r.key: r for r in reqs if r.key not in done}.values())  # one request per distinct prompt
        console.print(
            f"generate: {len(reqs)} (utterance, task) pairs, {len(reqs) - len(todo)} answered from the "
            f"cache, {len(todo)} to request from {model}"
        )
        tokens = 0
        if todo:
            if g.backend == "openai":
                tokens = asyncio.run(_request_all(todo, g.base_url, model, g, cache, sampling))
            else:
                with transformers_server(llm_dir, out_dir / "server.log", g.server_start_timeout_s) as url:
                    tokens = asyncio.run(_request_all(todo, url, model, g, cache, sampling))
        answers = cache.get_many([r.key for r in reqs])
    finally:
        cache.close()
    missing = [r for r in reqs if r.key not in answers]
    if missing:
        raise RuntimeError(
            f"generate: {len(missing)} requests have no answer (first: {missing[0].utt_id}/{missing[0].task})"
        )
    rows = []
    for r in reqs:
        a = answers[r.key]
        rows.append(
            dict(
                utt_id=r.utt_id,
                task=r.task,
                instruction_id=r.instruction_id,
                instruction=r.instruction,
                prompt=r.prompt,
                answer=a.text,
                model=model,
                finish_reason=a.finish_reason,
                prompt_tokens=a.prompt_tokens,
                completion_tokens=a.completion_tokens,
                request_key=r.key,
                sampling=json.dumps(sampling, sort_keys=True),
            )
        )
    write_table(to_table(rows, RESPONSES), out_dir / "responses.parquet", RESPONSES)
    return GenerateSummary(len(reqs), len(reqs) - len(todo), len(todo), tokens, time.monotonic() - t0)


def run(cfg: ExperimentConfig, workdir: Path, llm_dir: Path | None, force: bool = False) -> StageResult:
    workdir = Path(workdir)
    out = workdir / "generate"
    transcripts = workdir / "harvest" / "transcripts.parquet"
    g = cfg.generate
    catalog = load_catalog(g.catalog)
    inputs = [Artifact("transcripts", transcripts, "table"), Artifact("catalog", catalog.path, "file")]
    if llm_dir is not None:
        inputs.append(Artifact("llm", llm_dir, "model"))

    def body() -> dict:
        s = generate(transcripts, out, g, llm_dir)
        console.print(
            f"generate: {s.requests} answers ({s.requested} requested, {s.cached} cached, "
            f"{s.completion_tokens} new tokens) in {s.seconds:.1f}s"
        )
        return s.__dict__

    params = g.model_dump(mode="json", exclude={"request_timeout_s", "server_start_timeout_s", "concurrency"})
    return run_stage(
        "generate",
        workdir,
        params,
        inputs,
        [Artifact("responses", out / "responses.parquet", "table")],
        body,
        CODE_FILES,
        force,
    )
