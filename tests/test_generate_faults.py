"""Faults of the HTTP backend against a real `transformers serve`: a server that goes away and comes
back, and one that stays down."""

import re
import shutil
import threading
import time

import pytest

from core.config import OpenAIBackendConfig
from core.paths import GeneratePaths, WorkPaths
from core.tables import read_table, write_table
from schemas import RESPONSES, TRANSCRIPTS
from stages.generate.backends.base import Meter
from stages.generate.backends.transformers_serve import ServerProcess, free_port
from stages.generate.cache import AnswerCache
from stages.generate.driver import GenerateError, generate


def _subset(harvested, dst, n=8):
    table = read_table(WorkPaths(harvested).harvest.transcripts, TRANSCRIPTS).slice(0, n)
    return write_table(table, dst / "transcripts.parquet", TRANSCRIPTS)


@pytest.mark.slow
def test_server_killed_and_restarted_mid_run_completes_with_nothing_lost(
    generated, harvested, tiny_models_dir, tmp_path, capsys, monkeypatch
):
    served, g, _ = generated
    llm = tiny_models_dir / "llm"
    transcripts = _subset(harvested, tmp_path)
    out = tmp_path / "gen"
    server = ServerProcess(llm, tmp_path / "server.log", port=free_port(), timeout_s=300)
    server.start()
    g2 = g.model_copy(
        update={
            "backend": OpenAIBackendConfig(
                api_key_env=None,  # transformers serve needs no key
                base_urls=[server.url],
                served_model=str(llm),
                concurrency=2,
                max_retries=60,
                retry_backoff_s=0.2,
                retry_backoff_max_s=2.0,
            ),
            "tasks": ["repeat"],
        }
    )
    # A tiny model answers 8 requests faster than a test can poll for them, so the kill is not timed
    # by polling: the client stops (its event loop blocked) as it is about to send its third request,
    # the server is killed, and only then does the client go on, into a dead port.
    reached, killed = threading.Event(), threading.Event()
    sent = {"n": 0}
    real_sent = Meter.sent

    def sent_then_wait(self, n: int = 1) -> None:
        sent["n"] += 1
        if sent["n"] == 3:
            reached.set()
            killed.wait(timeout=300)
        real_sent(self, n)

    monkeypatch.setattr(Meter, "sent", sent_then_wait)
    result: dict = {}

    def work():
        try:
            result["summary"] = generate(transcripts, out, g2, llm)
        except BaseException as e:  # handed to the test thread below
            result["error"] = e

    t = threading.Thread(target=work)
    try:
        t.start()
        assert reached.wait(timeout=300), f"the client never sent a third request: {result}"
        assert AnswerCache(GeneratePaths(out).cache()).count() >= 1  # answers were done before the kill
        server.stop(kill=True)
        killed.set()
        time.sleep(1.0)
        server.start()  # the same port: the client's retries find it again
        t.join(timeout=600)
    finally:
        server.stop()
    assert "error" not in result, result.get("error")
    assert "retry" in capsys.readouterr().out  # the server really went away under the run
    s = result["summary"]
    rows = read_table(GeneratePaths(out).responses, RESPONSES).to_pylist()
    utts = read_table(transcripts, TRANSCRIPTS).column("utt_id").to_pylist()
    assert sorted(r["utt_id"] for r in rows) == sorted(utts) and {r["task"] for r in rows} == {"repeat"}
    assert s.requested + s.too_long == len(rows)
    # the same greedy answers as an undisturbed server gave
    before = {
        r["utt_id"]: r["answer"]
        for r in read_table(GeneratePaths(served).responses, RESPONSES).to_pylist()
        if r["task"] == "repeat"
    }
    assert {r["utt_id"]: r["answer"] for r in rows} == {u: before[u] for u in utts}


def test_a_server_that_stays_down_is_a_clear_error_that_says_how_to_resume(
    generated, harvested, tiny_models_dir, tmp_path
):
    served, g, _ = generated
    transcripts = _subset(harvested, tmp_path)
    out = tmp_path / "gen"
    out.mkdir()
    shutil.copy(
        GeneratePaths(served).cache(), GeneratePaths(out).cache()
    )  # the repeat answers are done already
    g2 = g.model_copy(
        update={
            "backend": OpenAIBackendConfig(
                api_key_env=None,  # transformers serve needs no key
                base_urls=[f"http://127.0.0.1:{free_port()}/v1"],  # nothing listens there
                served_model=str(tiny_models_dir / "llm"),
                max_retries=2,
                retry_backoff_s=0.05,
            ),
            "tasks": ["repeat", "keywords"],
        }
    )
    with pytest.raises(GenerateError) as err:
        generate(transcripts, out, g2, tiny_models_dir / "llm")
    msg = str(err.value)
    m = re.search(r"(\d+) of 16 answers", msg)
    assert m and 8 <= int(m.group(1)) < 16, msg
    assert "after 2 retries" in msg and "run the same command again to resume" in msg
    assert not (GeneratePaths(out).responses).exists()


def test_an_unset_api_key_variable_is_an_error_before_any_request(
    harvested, generated, tmp_path, monkeypatch
):
    """The configured key variable unset: the run stops naming it, before a request leaves (no silent 'EMPTY')."""
    import socket

    _, g, _ = generated
    monkeypatch.delenv("SPLSM_TEST_KEY", raising=False)
    with socket.socket() as listener:  # the "server": it only counts whether anyone connects
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        backend = OpenAIBackendConfig(base_urls=[url], served_model="m", api_key_env="SPLSM_TEST_KEY")
        with pytest.raises(GenerateError, match="api_key_env names SPLSM_TEST_KEY, which is unset or empty"):
            generate(
                _subset(harvested, tmp_path),
                tmp_path / "gen",
                g.model_copy(update={"backend": backend}),
                None,
            )
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing connected


@pytest.mark.slow
def test_a_port_taken_between_choosing_and_binding_is_not_mistaken_for_our_server(
    tiny_models_dir, tmp_path, monkeypatch, capsys
):
    """Another process takes the chosen port first and answers /health itself: the server is not believed
    ready on it (the listening socket is not our process's); ours fails to bind and starts on another port."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from stages.generate.backends import transformers_serve

    class Impostor(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = json.dumps({"status": "ok"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    impostor = ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    taken = impostor.server_address[1]
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    ports = iter([taken])
    real = transformers_serve.free_port
    monkeypatch.setattr(transformers_serve, "free_port", lambda: next(ports, None) or real())
    try:
        with ServerProcess(tiny_models_dir / "llm", tmp_path / "server.log", timeout_s=300) as url:
            assert f":{taken}/" not in url
            import urllib.request

            with urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/health", timeout=10) as r:
                assert r.status == 200
        out = capsys.readouterr().out
        assert f"port {taken} is answered by another process" in " ".join(out.split())
        # a port given explicitly is not changed behind the caller's back: taken is an error
        with pytest.raises(transformers_serve.PortTaken, match=f"port {taken} was taken"):
            ServerProcess(tiny_models_dir / "llm", tmp_path / "s2.log", port=taken, timeout_s=300).start()
    finally:
        impostor.shutdown()
        impostor.server_close()


def _kill_the_stages_server_mid_run(generated, harvested, tiny_models_dir, tmp_path, monkeypatch, restarts):
    """Run generate with a `transformers serve` it starts itself (kind transformers-serve, retries that would go
    on for minutes), and SIGKILL that server as the client is about to send its third request (the way the
    kernel's OOM killer ends it). Returns (summary or error, output dir, transcripts)."""
    from core.config import ServeBackendConfig
    from stages.generate.backends.transformers_serve import ServerProcess as SP

    served, g, _ = generated
    transcripts = _subset(harvested, tmp_path)
    out = tmp_path / "gen"
    backend = ServeBackendConfig(
        concurrency=1, max_retries=60, retry_backoff_s=5.0, retry_backoff_max_s=30.0, restarts=restarts
    )
    g2 = g.model_copy(update={"backend": backend, "tasks": ["repeat"]})
    started: list[SP] = []
    real_start = SP.start

    def start(self):
        started.append(self)
        return real_start(self)

    monkeypatch.setattr(SP, "start", start)
    sent = {"n": 0}
    real_sent = Meter.sent

    def sent_then_kill(self, n: int = 1) -> None:
        sent["n"] += 1
        if sent["n"] == 3:  # the server goes away with answers done and requests left
            started[-1].stop(kill=True)
        real_sent(self, n)

    monkeypatch.setattr(Meter, "sent", sent_then_kill)
    result: dict = {}

    def work():
        try:
            result["summary"] = generate(transcripts, out, g2, tiny_models_dir / "llm")
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=240)  # without the watch, 60 retries 5-30 s apart: the run would still be knocking
    assert not t.is_alive(), "the run kept knocking on a dead server"
    return result, out, transcripts, started


@pytest.mark.slow
def test_a_server_the_stage_started_that_dies_ends_the_run_at_once_with_its_exit_code_and_log(
    generated, harvested, tiny_models_dir, tmp_path, monkeypatch
):
    result, out, _, started = _kill_the_stages_server_mid_run(
        generated, harvested, tiny_models_dir, tmp_path, monkeypatch, restarts=0
    )
    err = result.get("error")
    assert isinstance(err, GenerateError), result
    msg = str(err)
    assert "died with exit code -9 (killed by SIGKILL: the kernel's OOM killer" in msg, msg
    assert f"the end of {GeneratePaths(out).server_log}" in msg
    assert "run the same command again to resume" in msg
    assert len(started) == 1 and AnswerCache(GeneratePaths(out).cache()).count() >= 1


@pytest.mark.slow
def test_a_server_the_stage_started_that_dies_is_started_again_and_the_run_finishes_with_the_same_answers(
    generated, harvested, tiny_models_dir, tmp_path, monkeypatch, capsys
):
    result, out, transcripts, started = _kill_the_stages_server_mid_run(
        generated, harvested, tiny_models_dir, tmp_path, monkeypatch, restarts=1
    )
    assert "error" not in result, result.get("error")
    assert len(started) == 2 and "starting it again (restart 1 of 1)" in capsys.readouterr().out
    rows = read_table(GeneratePaths(out).responses, RESPONSES).to_pylist()
    utts = read_table(transcripts, TRANSCRIPTS).column("utt_id").to_pylist()
    served, _, _ = generated
    before = {
        r["utt_id"]: r["answer"]
        for r in read_table(GeneratePaths(served).responses, RESPONSES).to_pylist()
        if r["task"] == "repeat"
    }
    assert {r["utt_id"]: r["answer"] for r in rows} == {u: before[u] for u in utts}
