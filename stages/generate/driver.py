"""Generate: the LLM answers an instruction about each transcript; its answers become training targets.

For each (utterance, task) an instruction is drawn from the catalog, the prompt is formatted by
``core.prompts`` (the same function training uses) and answered by a backend
(``stages.generate.backends``, one module each): OpenAI-compatible servers (vLLM in production, a ``transformers
serve`` this stage starts on a laptop), vLLM's offline engine, or transformers in this process.

Crash safety comes in two layers. Every answer is committed to an on-disk cache
(``stages.generate.cache``) the moment it arrives, keyed by (model, revision, prompt, sampling),
so nothing finished is ever requested again. A worker's (utterance, task) pairs are cut into shards
of ``shard_size`` in plan order; a shard is written (atomically) once all its answers are in, and
a shard file whose name, a digest of its requests, matches the plan is reused as it is. When every
shard of every worker is there, they are merged into ``responses.parquet``: exactly one row per
(utterance, task), checked, with the filters' verdict in ``rejected_by`` and their counts in
``stats.parquet``.

Scale-out: an utterance belongs to worker ``sha256(utt_id) mod N``, so N workers (``--worker i
--workers N``) split a corpus with no coordination and no overlap; whichever finishes last merges.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from core.catalog import Catalog, load_catalog, sample_tasks
from core.config import GenerateConfig, OpenAIBackendConfig, ServeBackendConfig, VLLMBackendConfig
from core.digest import fingerprint_dir
from core.lock import held, lock_path
from core.log import console, progress
from core.paths import MARKER, GeneratePaths
from core.prompts import text_prompt
from core.stage import StageError
from core.tables import read_table, read_transcripts, write_table
from core.text import transcript_of
from schemas import GENERATE_STATS, RESPONSES, to_table
from stages.generate.backends.base import BackendError, Meter, Request, ServerDied
from stages.generate.cache import Answer, AnswerCache, request_key
from stages.generate.filters import FILTERS, FilterSettings, failures, is_error

NOT_REQUESTED = "not_requested"  # finish_reason of a prompt rejected before it was sent


class GenerateError(StageError):
    """Generation cannot finish this run; the message says what is kept and how to resume."""


def sampling_params(g: GenerateConfig, budget: int | None = None) -> dict:
    """What the backend is asked for; part of every cache key and recorded in every row. A penalty appears
    only when it is on, so the answers cached before penalties existed keep their keys."""
    max_tokens = min(g.max_new_tokens, budget) if budget else g.max_new_tokens
    s = {"max_tokens": max_tokens, "temperature": g.temperature, "top_p": g.top_p, "seed": g.seed}
    if g.frequency_penalty:
        s["frequency_penalty"] = g.frequency_penalty
    if g.presence_penalty:
        s["presence_penalty"] = g.presence_penalty
    return s


def worker_of(utt_id: str, workers: int) -> int:
    return int.from_bytes(hashlib.sha256(utt_id.encode()).digest()[:8], "big") % workers


def _local_tokenizer(llm_dir: Path | None):
    if llm_dir is None or not (Path(llm_dir) / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llm_dir, trust_remote_code=False)


def plan_requests(
    transcripts: Path,
    catalog: Catalog,
    g: GenerateConfig,
    model: str,
    revision: str,
    tokenizer=None,
    kinds: dict[str, str] | None = None,
) -> list[Request]:
    """One request per (utterance, task), in transcript order then task order. ``kinds``: each corpus's kind
    (``ExperimentConfig.corpus_kinds``), which the ``reference`` transcript form reads."""
    table = read_transcripts(transcripts)
    cols = ["utt_id", "corpus", "text_raw", "text", "text_norm", "text_source"]
    reqs = []
    for row in table.select(cols).to_pylist():
        utt_id, text = row["utt_id"], transcript_of(row, g.transcript_form, kinds)
        for task in sample_tasks(utt_id, g.tasks, g.tasks_per_utterance, g.seed):
            ins = catalog.draw(task, utt_id, g.seed)
            prompt = text_prompt(ins.text, text, g.prompt_format, tokenizer)
            sampling = sampling_params(g, catalog.categories[task].max_new_tokens)
            key = request_key(model, revision, prompt, sampling)
            reqs.append(Request(utt_id, task, ins.id, ins.text, prompt, key, sampling))
    return reqs


def _applies(g: GenerateConfig, catalog: Catalog, task: str) -> tuple[str, ...]:
    return tuple(f for f in catalog.categories[task].filters if f not in g.skip_filters)


def count_prompt_tokens(reqs: list[Request], tokenizer) -> dict[str, int]:
    """Prompt lengths by request key, as the server will count them (special tokens included)."""
    prompts = list({r.key: r.prompt for r in reqs}.items())
    out = {}
    for i in range(0, len(prompts), 1024):
        chunk = prompts[i : i + 1024]
        for (k, _), ids in zip(chunk, tokenizer([p for _, p in chunk]).input_ids, strict=True):
            out[k] = len(ids)
    return out


@dataclass
class Shard:
    name: str
    reqs: list[Request]
    skipped: set[str] = field(default_factory=set)  # keys rejected by prompt length before sending


def shard_plan(
    reqs: list[Request], worker: int, workers: int, shard_size: int, skipped: set[str]
) -> list[Shard]:
    """The worker's requests cut into shards; a shard's name carries a digest of exactly what it asks."""
    mine = [r for r in reqs if worker_of(r.utt_id, workers) == worker]
    shards = []
    for k, i in enumerate(range(0, len(mine), shard_size)):
        part = mine[i : i + shard_size]
        h = hashlib.sha256()
        for r in part:
            h.update(f"{r.utt_id}\0{r.task}\0{r.instruction_id}\0{r.key}\0{r.key in skipped}\n".encode())
        shards.append(
            Shard(f"shard-{k:05d}-{h.hexdigest()[:16]}.parquet", part, {r.key for r in part} & skipped)
        )
    return shards


def _committed(path: Path, retry_errors: bool) -> bool:
    """Whether a shard file is there to reuse. One that cannot be read (cut short by a power loss) is removed
    and made again, with a warning; with ``retry_errors`` a shard holding refused requests is made again."""
    if not path.exists():
        return False
    try:
        reasons = read_table(path, RESPONSES).column("finish_reason").to_pylist()
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same case: it is not a shard
        console.print(
            f"[yellow]generate: warning: {path} cannot be read ({type(e).__name__}: {e}); made again[/]"
        )
        path.unlink(missing_ok=True)
        return False
    return not (retry_errors and any(is_error(f) for f in reasons))


def _row(r: Request, a: Answer, model: str) -> dict:
    return dict(
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
        sampling=json.dumps(r.sampling, sort_keys=True),
        rejected_by=None,  # decided at merge, so tuning a filter needs no new answers
    )


def served_model(g: GenerateConfig, llm_dir: Path | None) -> str:
    """The model name requests carry (and every cache key holds): the served name, else the LLM directory."""
    name = g.backend.served_model if isinstance(g.backend, OpenAIBackendConfig) else None
    if name:
        return name
    if llm_dir is None:
        raise GenerateError("generate: give the LLM directory or generate.backend.served_model")
    return str(llm_dir)


def api_key(b: OpenAIBackendConfig) -> str | None:
    """The key the servers require, from the variable the config names; unset or empty is an error."""
    if not b.api_key_env:
        return None
    key = os.environ.get(b.api_key_env)
    if not key:
        raise GenerateError(
            f"generate.backend.api_key_env names {b.api_key_env}, which is unset or empty: set it to the"
            " key the servers require, or give api_key_env: null for servers that need none"
        )
    return key


def model_revision(g: GenerateConfig, llm_dir: Path | None, model: str) -> str:
    """The identity of the weights that answer, part of every cache key: a local LLM directory's
    fingerprint; for servers without one here, the revision the config gives or the one they report."""
    b = g.backend
    if llm_dir is not None and Path(llm_dir).exists():
        return fingerprint_dir(llm_dir)
    if not isinstance(b, OpenAIBackendConfig):
        return ""
    if b.model_revision:
        return "given:" + b.model_revision
    from stages.generate.backends.openai_server import served_identity

    try:
        return served_identity(b.base_urls, model, api_key(b), b.request_timeout_s)
    except BackendError as e:
        raise GenerateError(f"generate: {e}") from e


def make_backend(g: GenerateConfig, llm_dir: Path | None, model: str, server_log: Path):
    """The backend and, for transformers-serve, the server process to run it against."""
    b = g.backend
    if isinstance(b, OpenAIBackendConfig):
        from stages.generate.backends.openai_server import OpenAIBackend

        return OpenAIBackend(b.base_urls, model, b, api_key=api_key(b)), None
    if llm_dir is None:
        raise GenerateError(f"generate.backend {b.kind} needs the LLM directory")
    if isinstance(b, ServeBackendConfig):
        from stages.generate.backends.openai_server import OpenAIBackend
        from stages.generate.backends.transformers_serve import ServerProcess

        server = ServerProcess(
            llm_dir,
            server_log,
            None,
            b.start_timeout_s,
            b.device,
            b.continuous_batching,
            b.cb_cache_tokens,
            b.cb_max_batch_tokens,
        )
        backend = OpenAIBackend([server.url], model, b)
        backend.watch = server.death  # the server's death ends the wait at once, not after every retry
        return backend, server
    if isinstance(b, VLLMBackendConfig):
        from stages.generate.backends.vllm_offline import VLLMBackend

        return VLLMBackend(llm_dir, b, g.seed), None
    from stages.generate.backends.transformers_local import TransformersBackend

    return TransformersBackend(llm_dir, b), None


@dataclass
class GenerateSummary:
    requests: int  # (utterance, task) pairs of this worker
    cached: int  # answered from the cache or from committed shards
    requested: int  # distinct prompts sent to the backend in this run
    too_long: int = 0  # rejected by prompt length before sending (counted with a local tokenizer)
    completion_tokens: int = 0
    seconds: float = 0.0
    worker: int = 0
    workers: int = 1
    merged: bool = False
    kept: int = 0
    rejected: dict = field(default_factory=dict)


def generate(
    transcripts: Path,
    out: GeneratePaths | Path,
    g: GenerateConfig,
    llm_dir: Path | None,
    worker: int = 0,
    workers: int = 1,
    kinds: dict[str, str] | None = None,
) -> GenerateSummary:
    """Answer this worker's (utterance, task) pairs; merge them into the responses table when every
    worker's shards are there. ``out``: the generate paths (``WorkPaths.generate``), or a folder."""
    if not 0 <= worker < workers:
        raise ValueError(f"generate: worker {worker} is not in 0..{workers - 1}")
    t0 = time.monotonic()
    out = out if isinstance(out, GeneratePaths) else GeneratePaths(Path(out))
    catalog = load_catalog(g.catalog)
    model = served_model(g, llm_dir)
    # The answers' identity in the cache: the served name, or a local directory's name with its content's
    # fingerprint, not its path: the same LLM linked into another work directory keeps its cached answers.
    model_id = Path(llm_dir).name if llm_dir is not None and model == str(llm_dir) else model
    revision = model_revision(g, llm_dir, model)
    tok = _local_tokenizer(llm_dir)
    reqs = plan_requests(transcripts, catalog, g, model_id, revision, tok, kinds)
    skipped: set[str] = set()
    n_tokens: dict[str, int] = {}
    if tok is not None:  # without a local tokenizer the server's count decides, after the answer
        limited = [r for r in reqs if "prompt_too_long" in _applies(g, catalog, r.task)]
        n_tokens = count_prompt_tokens(limited, tok)
        skipped = {k for k, n in n_tokens.items() if n >= g.max_prompt_tokens}

    shards = shard_plan(reqs, worker, workers, g.shard_size, skipped)
    pdir = out.parts(worker, workers)
    pdir.mkdir(parents=True, exist_ok=True)
    pending = [s for s in shards if not _committed(pdir / s.name, g.retry_errors)]
    mine = sum(len(s.reqs) for s in shards)
    cache = AnswerCache(out.cache(worker, workers), out.caches())
    try:
        answers = cache.get_many([r.key for s in pending for r in s.reqs if r.key not in skipped])
        if g.retry_errors:  # refused requests are asked again; everything answered stays as it is
            answers = {k: a for k, a in answers.items() if not is_error(a.finish_reason)}
        for k in skipped:
            answers[k] = Answer("", NOT_REQUESTED, n_tokens[k], 0)
        remaining: dict[str, int] = {}
        waiting: dict[str, list[Shard]] = {}
        todo: dict[str, Request] = {}  # one request per distinct prompt
        for s in pending:
            missing = [r for r in s.reqs if r.key not in answers]
            remaining[s.name] = len(missing)
            for r in missing:
                todo.setdefault(r.key, r)
                waiting.setdefault(r.key, []).append(s)

        def commit(s: Shard) -> None:
            write_table(
                to_table([_row(r, answers[r.key], model) for r in s.reqs], RESPONSES),
                pdir / s.name,
                RESPONSES,
            )

        def sink(r: Request, a: Answer) -> None:
            cache.put(r.key, model, r.prompt, r.sampling, a)
            answers[r.key] = a
            for s in waiting.pop(r.key, []):
                remaining[s.name] -= 1
                if remaining[s.name] == 0:
                    commit(s)

        for s in pending:
            if remaining[s.name] == 0:
                commit(s)
        console.print(
            f"generate: worker {worker}/{workers}: {mine} (utterance, task) pairs in {len(shards)} shards, "
            f"{len(shards) - len(pending)} shards committed before, {len(skipped)} prompts too long, "
            f"{len(todo)} prompts to request from {model} ({g.backend.kind})"
        )
        meter = Meter()
        if todo:
            groups: dict[str, list[Request]] = {}
            for r in todo.values():  # keep shard order, so early shards complete (and commit) first
                groups.setdefault(waiting[r.key][0].name, []).append(r)
            backend, server = make_backend(g, llm_dir, model, out.server_log)
            restarts = getattr(g.backend, "restarts", 0) if server is not None else 0
            try:
                with progress() as bar:
                    meter = Meter(bar, bar.add_task("generate", total=len(todo), status=""))
                    for restart in range(restarts + 1):
                        if server is not None:
                            server.start()
                            backend.urls = [server.url]  # a restart may have had to take another port
                        try:
                            # what is still unanswered (all of it, the first time): a restarted server goes on
                            left = [[r for r in grp if r.key not in answers] for grp in groups.values()]
                            backend.run([grp for grp in left if grp], sink, meter)
                            break
                        except ServerDied as e:
                            if restart == restarts:
                                raise
                            server.stop()
                            console.print(
                                f"[yellow]generate: {e}\nstarting it again (restart {restart + 1} of {restarts});"
                                " the answers it gave are kept[/]"
                            )
            except BackendError as e:
                done = sum(len(s.reqs) - remaining.get(s.name, 0) for s in shards)
                raise GenerateError(
                    f"generate: {e}.\n{done} of {mine} answers of worker {worker}/{workers} are done and kept in "
                    f"{cache.path}; run the same command again to resume: finished answers are not requested twice"
                ) from e
            finally:
                if server is not None:
                    server.stop()
        left = [s.name for s in shards if not (pdir / s.name).exists()]
        if left:
            raise GenerateError(
                f"generate: {len(left)} shards have unanswered requests (first: {pdir / left[0]})"
            )
    finally:
        cache.close()
    for stale in pdir.glob("shard-*.parquet"):  # shards of an older plan (transcripts or catalog changed)
        if stale.name not in {s.name for s in shards}:
            stale.unlink()

    too_long = sum(len(s.skipped) for s in shards)
    summary = GenerateSummary(
        mine, mine - len(todo) - too_long, len(todo), too_long, meter.tokens, worker=worker, workers=workers
    )
    plans = [shard_plan(reqs, w, workers, g.shard_size, skipped) for w in range(workers)]
    if all(_committed(out.parts(w, workers) / s.name, False) for w, p in enumerate(plans) for s in p):
        # two workers that finish together would both merge: the stage's own lock makes it one at a time
        # (one worker alone already holds it, as the stage's run)
        with (
            held(lock_path(out.dir / MARKER), "generate merge", say=console.print)
            if workers > 1
            else nullcontext()
        ):
            kept, rejected = merge(reqs, plans, out, g, catalog, workers)
        summary.merged, summary.kept, summary.rejected = True, kept, rejected
    else:
        console.print(
            f"generate: worker {worker}/{workers} done; waiting for the other workers' shards to merge"
        )
    summary.seconds = time.monotonic() - t0
    return summary


def merge(
    reqs: list[Request],
    plans: list[list[Shard]],
    out: GeneratePaths,
    g: GenerateConfig,
    catalog: Catalog,
    workers: int,
) -> tuple[int, dict]:
    """All workers' shards into the responses table (plan order) and the stats table; checks that every
    (utterance, task) has exactly one answer."""
    rows: dict[tuple[str, str], dict] = {}
    for w, plan in enumerate(plans):
        for s in plan:
            path = out.parts(w, workers) / s.name
            for row in read_table(path, RESPONSES).to_pylist():
                pair = (row["utt_id"], row["task"])
                if pair in rows:
                    raise GenerateError(f"generate: {pair[0]}/{pair[1]} answered twice ({path})")
                rows[pair] = row
    expected = [(r.utt_id, r.task) for r in reqs]
    if len(rows) != len(expected) or any(p not in rows for p in expected):
        lost = next((p for p in expected if p not in rows), None)
        raise GenerateError(f"generate: merged shards do not match the plan (first missing: {lost})")

    settings = FilterSettings(g.max_prompt_tokens, g.min_script_fraction)
    applied, failed, first = Counter(), Counter(), Counter()
    rows_out = []
    for pair in expected:
        row = rows[pair]
        task = row["task"]
        applies = _applies(g, catalog, task)
        if row["finish_reason"] == NOT_REQUESTED:
            applies = ("prompt_too_long",)
        elif is_error(row["finish_reason"]):
            applies = ("request_error",)
        bad = failures(
            row["answer"],
            row["finish_reason"],
            row["prompt_tokens"],
            applies,
            catalog.categories[task].target_language,
            settings,
        )
        for f in applies:
            applied[task, f] += 1
        for f in bad:
            failed[task, f] += 1
        row["rejected_by"] = bad[0] if bad else None
        if bad:
            first[task, bad[0]] += 1
        rows_out.append(row)
    write_table(to_table(rows_out, RESPONSES), out.responses, RESPONSES)
    stats = [
        dict(task=t, filter=f, applied=applied[t, f], failed=failed[t, f], rejected=first[t, f])
        for t in g.tasks
        for f in FILTERS
        if applied[t, f]
    ]
    write_table(to_table(stats, GENERATE_STATS), out.stats, GENERATE_STATS)
    print_stats(stats, g.tasks, Counter(r["task"] for r in rows_out))
    kept = sum(r["rejected_by"] is None for r in rows_out)
    return kept, {f: sum(first[t, f] for t in g.tasks) for f in FILTERS if any(first[t, f] for t in g.tasks)}


def print_stats(stats: list[dict], tasks: list[str], totals: Counter) -> None:
    from rich.table import Table

    t = Table(
        "task", "answers", "kept", *FILTERS, title="generate: answers rejected by each filter (first failed)"
    )
    for task in tasks:
        rej = {s["filter"]: s["rejected"] for s in stats if s["task"] == task}
        t.add_row(
            task,
            str(totals[task]),
            str(totals[task] - sum(rej.values())),
            *(str(rej.get(f, "-")) for f in FILTERS),
        )
    console.print(t)
