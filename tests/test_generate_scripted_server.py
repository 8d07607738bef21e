"""What a served model's server says, against the generate stage: a refused request, the model's identity.

A request the server refuses (HTTP 400, as vLLM answers a prompt longer than its context) is one error row,
not the end of the run; a rerun does not ask again unless ``generate.retry_errors`` says so.

vLLM cannot run on these machines and `transformers serve` answers an over-long prompt with a 500 of its own,
so the server here is a scripted stand-in speaking the OpenAI completions protocol over real HTTP: it refuses
the prompts of one utterance with vLLM's 400 body and answers the rest."""

import json
import re

import pytest
from helpers_http import JsonHandler, serve, stop

from core.config import GenerateConfig, OpenAIBackendConfig
from core.paths import GeneratePaths, WorkPaths
from core.tables import read_table, write_table
from schemas import GENERATE_STATS, RESPONSES, TRANSCRIPTS
from stages.generate.driver import generate

VLLM_400 = (
    "This model's maximum context length is 2048 tokens. However, you requested 2400 tokens "
    "(2176 in the messages, 224 in the completion). Please reduce the length of the messages or completion."
)


class ScriptedServer:
    """/v1/completions: 400 with vLLM's error body for a prompt holding ``refuse``, 403 for one holding
    ``forbid``, else a short answer."""

    def __init__(self, root: str | None = "/models/llm-v1"):
        self.refuse: str | None = None
        self.forbid: str | None = None  # a prompt holding it gets a 403: a setup error, the run stops
        self.prompts: list[str] = []
        self.bodies: list[dict] = []  # every completions request as it arrived
        self.answered: list[str] = []
        self.root = root  # what /v1/models reports the name serves (vLLM: the path it loaded)
        outer = self

        class Handler(JsonHandler):
            def do_GET(self):
                entry = {"id": "scripted", "object": "model", "created": 0, "owned_by": "vllm"}
                if outer.root:
                    entry |= {"root": outer.root, "parent": None, "max_model_len": 2048}
                self._send(200, {"object": "list", "data": [entry]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.prompts.append(body["prompt"])
                outer.bodies.append(body)
                if outer.refuse and outer.refuse in body["prompt"]:
                    err = {"object": "error", "message": VLLM_400, "type": "BadRequestError", "code": 400}
                    self._send(400, {"error": err} | err)
                    return
                if outer.forbid and outer.forbid in body["prompt"]:
                    self._send(403, {"error": {"message": "this key may not use the model", "code": 403}})
                    return
                outer.answered.append(body["prompt"])
                choice = {"index": 0, "text": " A fine answer.", "finish_reason": "stop", "logprobs": None}
                usage = {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}
                resp = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"]}
                self._send(200, resp | {"choices": [choice], "usage": usage})

        self.httpd = serve(Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        stop(self.httpd)


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


def test_scripted_server_400_is_an_error_row_and_is_not_asked_again_unless_told(harvested, tmp_path, server):
    table = read_table(WorkPaths(harvested).harvest.transcripts, TRANSCRIPTS).slice(0, 5)
    transcripts = write_table(table, tmp_path / "transcripts.parquet", TRANSCRIPTS)
    victim = table.column("utt_id")[2].as_py()
    server.refuse = table.column("text")[2].as_py()
    g = GenerateConfig(
        tasks=["repeat", "keywords"],
        backend=OpenAIBackendConfig(
            base_urls=[server.url], served_model="scripted", api_key_env=None, max_retries=2, concurrency=2
        ),
    )
    out = GeneratePaths(tmp_path / "gen")
    s = generate(transcripts, out, g, None)
    rows = read_table(out.responses, RESPONSES).to_pylist()
    assert s.merged and len(rows) == 10 and len({(r["utt_id"], r["task"]) for r in rows}) == 10
    bad = [r for r in rows if r["utt_id"] == victim]
    assert len(bad) == 2
    for r in bad:
        assert r["rejected_by"] == "request_error" and r["answer"] == ""
        assert r["finish_reason"].startswith("error: HTTP 400: This model's maximum context length is 2048")
    assert all(
        r["rejected_by"] is None and r["answer"] == "A fine answer." for r in rows if r["utt_id"] != victim
    )
    stats = read_table(out.stats, GENERATE_STATS).to_pylist()
    assert {(x["task"], x["rejected"]) for x in stats if x["filter"] == "request_error"} == {
        ("repeat", 1),
        ("keywords", 1),
    }
    asked = len(server.prompts)
    assert asked == 10

    # a rerun (the same command, nothing changed) asks nothing: the refusals are cached like answers
    generate(transcripts, out, g, None)
    assert len(server.prompts) == asked
    # told to retry, it asks exactly the refused prompts again; the server now answers them
    server.refuse = None
    g2 = g.model_copy(update={"retry_errors": True})
    generate(transcripts, out, g2, None)
    again = server.prompts[asked:]
    assert sorted(again) == sorted(r["prompt"] for r in bad)
    rows = read_table(out.responses, RESPONSES).to_pylist()
    assert len(rows) == 10 and all(r["rejected_by"] is None for r in rows)


def test_a_run_stopped_by_the_server_names_the_cache_that_keeps_its_answers(harvested, tmp_path, server):
    from stages.generate.driver import GenerateError

    table = read_table(WorkPaths(harvested).harvest.transcripts, TRANSCRIPTS).slice(0, 4)
    transcripts = write_table(table, tmp_path / "transcripts.parquet", TRANSCRIPTS)
    server.forbid = table.column("text")[3].as_py()
    out = GeneratePaths(tmp_path / "gen")
    with pytest.raises(GenerateError) as err:
        generate(transcripts, out, _served(server), None)
    assert f"are done and kept in {out.cache()}; run the same command again to resume" in str(err.value)
    answered = list(server.answered)
    server.forbid = None
    generate(transcripts, out, _served(server), None)
    assert sorted(server.answered[len(answered) :]) == sorted(set(server.prompts) - set(answered))


def test_penalties_reach_the_server_as_the_protocols_own_fields_only_when_on(harvested, tmp_path, server):
    table = read_table(WorkPaths(harvested).harvest.transcripts, TRANSCRIPTS).slice(0, 2)
    transcripts = write_table(table, tmp_path / "transcripts.parquet", TRANSCRIPTS)
    generate(transcripts, GeneratePaths(tmp_path / "plain"), _served(server), None)
    assert server.bodies and not any(
        {"frequency_penalty", "presence_penalty"} & set(b) for b in server.bodies
    )
    server.bodies.clear()
    g = _served(server).model_copy(update={"frequency_penalty": 0.8, "presence_penalty": 0.3})
    generate(transcripts, GeneratePaths(tmp_path / "penalized"), g, None)
    assert server.bodies
    assert all((b["frequency_penalty"], b["presence_penalty"]) == (0.8, 0.3) for b in server.bodies)


def test_request_error_cannot_be_skipped():
    with pytest.raises(ValueError, match="request_error cannot be skipped"):
        GenerateConfig(skip_filters=["request_error"])


def test_scripted_server_run_with_a_shard_cut_to_zero_bytes_makes_it_again_from_the_cache(
    harvested, tmp_path, server, capsys
):
    table = read_table(WorkPaths(harvested).harvest.transcripts, TRANSCRIPTS).slice(0, 6)
    transcripts = write_table(table, tmp_path / "transcripts.parquet", TRANSCRIPTS)
    g = GenerateConfig(
        tasks=["repeat"],
        shard_size=2,
        backend=OpenAIBackendConfig(base_urls=[server.url], served_model="scripted", api_key_env=None),
    )
    out = GeneratePaths(tmp_path / "gen")
    generate(transcripts, out, g, None)
    first = read_table(out.responses, RESPONSES)
    asked = len(server.prompts)
    shard = sorted(out.parts(0, 1).glob("shard-*.parquet"))[1]
    shard.write_bytes(b"")  # a power loss after the rename, before the data reached the disk
    out.responses.unlink()
    capsys.readouterr()
    generate(transcripts, out, g, None)
    assert "cannot be read" in capsys.readouterr().out
    assert len(server.prompts) == asked  # the answers came from the cache
    assert read_table(out.responses, RESPONSES).equals(first)


def _served(server, **kw):
    return GenerateConfig(
        tasks=["repeat"],
        backend=OpenAIBackendConfig(base_urls=[server.url], served_model="scripted", api_key_env=None, **kw),
    )


def _two(harvested, tmp_path):
    table = read_table(WorkPaths(harvested).harvest.transcripts, TRANSCRIPTS).slice(0, 2)
    return write_table(table, tmp_path / "transcripts.parquet", TRANSCRIPTS)


def test_scripted_server_with_other_weights_behind_the_same_name_is_asked_again(harvested, tmp_path, server):
    transcripts, out = _two(harvested, tmp_path), GeneratePaths(tmp_path / "gen")
    generate(transcripts, out, _served(server), None)
    assert len(server.prompts) == 2
    generate(transcripts, out, _served(server), None)
    assert len(server.prompts) == 2  # same model: every answer from the cache
    server.root = "/models/llm-v2"  # the operator restarted vLLM on new weights under the old name
    generate(transcripts, out, _served(server), None)
    assert len(server.prompts) == 4
    # a revision the user gives stands for the weights instead of what the server reports
    generate(transcripts, out, _served(server, model_revision="sha256:abc"), None)
    generate(transcripts, out, _served(server, model_revision="sha256:abc"), None)
    assert len(server.prompts) == 6


def test_scripted_server_that_reports_nothing_but_the_name_needs_a_given_revision(harvested, tmp_path):
    from stages.generate.driver import GenerateError

    bare, other = ScriptedServer(root=None), ScriptedServer(root="/models/other")
    try:
        transcripts, out = _two(harvested, tmp_path), GeneratePaths(tmp_path / "gen")
        with pytest.raises(
            GenerateError, match="reports nothing about 'scripted' beyond its name.*model_revision"
        ):
            generate(transcripts, out, _served(bare), None)
        assert bare.prompts == []
        generate(transcripts, out, _served(bare, model_revision="v7"), None)
        assert len(bare.prompts) == 2
        # two replicas serving different weights under one name would mix two models in one table
        two = GenerateConfig(
            tasks=["repeat"],
            backend=OpenAIBackendConfig(
                base_urls=[ScriptedServer().url, other.url], served_model="scripted", api_key_env=None
            ),
        )
        with pytest.raises(GenerateError, match="serve different models under 'scripted'"):
            generate(transcripts, GeneratePaths(tmp_path / "gen2"), two, None)
    finally:
        bare.close()
        other.close()


def test_scripted_server_beside_a_dead_replica_answers_all_after_one_failed_try(
    harvested, tmp_path, server, capsys
):
    """Two replicas, one dead (nothing listens on its port): it is tried once, fails, and is set aside; the
    failed request goes to the live one at once and so does every later one, none waits out a backoff. Before,
    the dead replica (idle, so the least loaded) drew about every other request, each then waiting."""

    from stages.generate.backends.transformers_serve import free_port

    dead = f"http://127.0.0.1:{free_port()}/v1"
    table = read_table(WorkPaths(harvested).harvest.transcripts, TRANSCRIPTS).slice(0, 6)
    transcripts = write_table(table, tmp_path / "transcripts.parquet", TRANSCRIPTS)
    backoff = 10.0  # a retry that waits, waits at least half of this
    g = GenerateConfig(
        tasks=["repeat", "keywords"],
        backend=OpenAIBackendConfig(
            base_urls=[dead, server.url],
            served_model="scripted",
            model_revision="v1",  # the dead replica cannot be asked what it serves
            api_key_env=None,
            concurrency=1,
            max_retries=2,
            retry_backoff_s=backoff,
            retry_backoff_max_s=60.0,
        ),
    )
    out = GeneratePaths(tmp_path / "gen")
    capsys.readouterr()
    generate(transcripts, out, g, None)
    log = " ".join(capsys.readouterr().out.split())
    rows = read_table(out.responses, RESPONSES).to_pylist()
    assert len(rows) == 12 and all(r["answer"] == "A fine answer." for r in rows)
    assert len(server.prompts) == 12  # each request answered once, all by the live replica
    assert log.count(f"{dead}: APIConnectionError") == 1, log
    # the failed request went to the live replica at once; none waited out a backoff (that is "retry N/M in Xs")
    assert f"{dead}: APIConnectionError; retry 1/2 on another server now" in log, log
    assert not re.search(r"retry \d+/\d+ in \d", log), log
