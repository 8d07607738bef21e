"""``splsm serve`` on a tiny random checkpoint, a real uvicorn server on a free port, asked with the official
``openai`` client: plain and streamed answers are greedy decoding's, requests that arrive together are decoded as
one batch with the answers they get alone, and every bad request gets a 4xx naming what is wrong."""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from click.testing import CliRunner
from helpers_serving import (
    FLAC,
    MP3,
    WAV,
    WAV2,
    Reference,
    first_wording,
    long_wav,
    make_checkpoint,
    running,
)

from core import audio
from splsm.cli import main
from splsm.serving.app import ServeSettings, create_app
from splsm.serving.engine import Engine

KEY = "test-key-123"
MODEL = "tiny-lsm"
N = 8


def b64(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


def message(data: str, fmt: str = "wav", text: str | None = None) -> list[dict]:
    parts = [{"type": "text", "text": text}] if text is not None else []
    parts.append({"type": "input_audio", "input_audio": {"data": data, "format": fmt}})
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt = make_checkpoint(root)
    engine = Engine(ckpt, "cpu", max_new_tokens=64)
    settings = ServeSettings(
        MODEL, api_key=KEY, max_body_bytes=4 * 2**20, max_batch=4, batch_wait_ms=300, max_pending=16
    )
    app = create_app(engine, settings)
    with running(app) as url:
        yield dict(
            root=root,
            ckpt=ckpt,
            engine=engine,
            app=app,
            url=url,
            ref=Reference(ckpt),
            client=openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60),
        )


def test_the_openai_client_gets_greedy_answers_plain_and_streamed(setup):
    c, ref = setup["client"], setup["ref"]
    want = ref.answer(audio.load(WAV), "Repeat what you hear", N)
    assert want
    r = c.chat.completions.create(
        model=MODEL, messages=message(b64(WAV), text="Repeat what you hear"), max_tokens=N
    )
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.model == MODEL and r.object == "chat.completion"
    ids = ref.tokens(audio.load(WAV), "Repeat what you hear", N)
    assert r.usage.completion_tokens == len(ids)
    assert r.choices[0].finish_reason == ("length" if len(ids) == N else "stop")
    stream = c.chat.completions.create(
        model=MODEL,
        messages=message(b64(WAV), text="Repeat what you hear"),
        max_tokens=N,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert "".join(pieces) == want and len(pieces) > 2  # token by token
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [r.choices[0].finish_reason]
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens and not chunks[-1].choices
    # no text part: the recipe's ASR wording; mp3 at 48 kHz
    r = c.chat.completions.create(model=MODEL, messages=message(b64(MP3), "mp3"), max_tokens=N)
    assert r.choices[0].message.content == ref.answer(audio.load(MP3), first_wording("asr"), N)


def test_the_stream_is_server_sent_events_ending_with_done(setup):
    body = {"model": MODEL, "messages": message(b64(WAV2)), "max_tokens": 3, "stream": True}
    r = httpx.post(
        setup["url"] + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: ") :])
    assert last["object"] == "chat.completion.chunk" and last["choices"][0]["finish_reason"] == "length"


def test_concurrent_requests_are_one_batch_with_the_answers_they_get_one_by_one(setup):
    c = setup["client"]
    asks = [  # different clips, rates, instructions, lengths; two of them streamed
        (WAV, "wav", None, 8, False),
        (MP3, "mp3", "Summarize the speech", 5, True),
        (WAV2, "wav", "What is the speaker's mood?", 11, False),
        (FLAC, "flac", None, 7, True),
    ]

    def one(a):
        path, fmt, text, n, stream = a
        kw = dict(model=MODEL, messages=message(b64(path), fmt, text), max_tokens=n)
        if not stream:
            return c.chat.completions.create(**kw).choices[0].message.content
        return "".join(
            ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**kw, stream=True)
        )

    batcher = setup["app"].state.batcher
    sequential = [one(a) for a in asks]
    before = len(batcher.batch_sizes)
    assert list(batcher.batch_sizes)[before - 4 :] == [1, 1, 1, 1]
    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(one, asks))
    assert together == sequential
    sizes = list(batcher.batch_sizes)[before:]
    assert sum(sizes) == len(asks) and max(sizes) > 1  # decoded together, not one after another
    ref = setup["ref"]
    for (path, _, text, n, _), got in zip(asks, together, strict=True):
        assert got == ref.answer(audio.load(path), text or first_wording("asr"), n)


def test_the_api_key_is_required_and_checked(setup):
    url, body = setup["url"], {"model": MODEL, "messages": message(b64(WAV2)), "max_tokens": 1}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},
        {"Authorization": "Basic x"},
    ):
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
        assert httpx.get(url + "/v1/models", headers=headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in setup["client"].models.list()] == [MODEL]
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # no key: a load balancer's probe


def _bad_requests(tmp_path):
    wav, too_long = b64(WAV2), b64(long_wav(tmp_path / "long.wav", 31.0))

    def with_audio(data, fmt="wav"):
        return {"model": MODEL, "messages": message(data, fmt)}

    def with_parts(*parts):
        return {"model": MODEL, "messages": [{"role": "user", "content": list(parts)}]}

    audio_part = {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}
    p = "messages[0].content[0].input_audio.data"
    return [  # (name, body (bytes: sent as they are), status, words the message holds, param)
        ("not JSON", b"{not json", 400, ["not JSON"], None),
        ("a JSON list", b"[1, 2]", 400, ["JSON object"], None),
        ("JSON nested too deep", b"[" * 100_000 + b"]" * 100_000, 400, ["too deep"], None),
        ("no model", {"messages": message(wav)}, 400, ["'model' is required"], "model"),
        ("unknown model", {**with_audio(wav), "model": "gpt-4o"}, 404, ["'gpt-4o'", MODEL], "model"),
        ("messages not a list", {"model": MODEL, "messages": "hi"}, 400, ["'messages'"], "messages"),
        ("string content", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 400,
         ["no input_audio part"], "messages[0].content"),
        ("no audio part", with_parts({"type": "text", "text": "hi"}), 400, ["no input_audio part"],
         "messages[0].content"),
        ("two clips", with_parts(audio_part, audio_part), 400, ["one clip"], "messages[0].content[1]"),
        ("broken base64", with_audio("@@not base64@@"), 400, ["not valid base64"], p),
        ("a data URL", with_audio("data:audio/wav;base64," + wav), 400, ["data: URL"], p),
        ("empty audio", with_audio(""), 400, ["empty"], p),
        ("undecodable audio", with_audio(base64.b64encode(b"RIFF not really a wave file").decode()), 400,
         ["corrupt_audio", p], p),
        ("a format it does not take", with_audio(wav, "aac"), 400, ["'aac'", "wav, mp3"],
         "messages[0].content[0].input_audio.format"),
        ("too long", with_audio(too_long), 400, ["too_long", "31.0 s", "30 s"], p),
        ("an audio URL", with_parts({"type": "audio_url", "audio_url": {"url": "file:///etc/passwd"}}), 400,
         ["'audio_url'", "reads no file"], "messages[0].content[0].type"),
        ("an image URL", with_parts({"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}), 400,
         ["'image_url'", "fetches no URL"], "messages[0].content[0].type"),
        ("a path beside the audio", with_parts({"type": "input_audio", "input_audio": {
            "data": wav, "format": "wav", "path": "/etc/passwd"}}), 400, ["nothing else"], "messages[0].content[0]"),
        ("a url field on the part", with_parts({**audio_part, "url": "http://x"}), 400, ["nothing else"],
         "messages[0].content[0]"),
        ("a system message", {"model": MODEL, "messages": [{"role": "system", "content": "be nice"},
                                                          *message(wav)]}, 400, ["one user"], "messages"),
        ("an assistant turn", {"model": MODEL, "messages": [{"role": "assistant", "content": [audio_part]}]}, 400,
         ["must be 'user'"], "messages[0].role"),
        ("an unknown field", {**with_audio(wav), "tools": []}, 400, ["'tools'"], "tools"),
        ("n of 2", {**with_audio(wav), "n": 2}, 400, ["'n' must be 1"], "n"),
        ("max_tokens 0", {**with_audio(wav), "max_tokens": 0}, 400, ["at least 1"], "max_tokens"),
        ("max_tokens a string", {**with_audio(wav), "max_tokens": "10"}, 400, ["integer"], "max_tokens"),
        ("stream a string", {**with_audio(wav), "stream": "yes"}, 400, ["true or false"], "stream"),
        ("temperature 5", {**with_audio(wav), "temperature": 5}, 400, ["0 to 2"], "temperature"),
        ("audio output asked", {**with_audio(wav), "modalities": ["text", "audio"]}, 400, ["text"], "modalities"),
        ("a body over the limit", b'{"model": "' + b"x" * (5 * 2**20) + b'"}', 413, ["over the limit"], None),
    ]  # fmt: skip


def test_every_bad_request_gets_a_4xx_with_an_openai_error_naming_it(setup, tmp_path):
    url, auth = setup["url"], {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with httpx.Client(timeout=30) as h:
        for name, body, status, words, param in _bad_requests(tmp_path):
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = h.post(url + "/v1/chat/completions", content=content, headers=auth)
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert all(w in err["message"] for w in words), (name, err)
            assert err["param"] == param and err["type"] == "invalid_request_error", (name, err)
        for method, path, status in (("GET", "/v1/chat/completions", 405), ("GET", "/nowhere", 404)):
            r = h.request(method, url + path, headers=auth)
            assert r.status_code == status and "message" in r.json()["error"]
    # the openai client sees the same as its own exceptions; the server still answers afterwards
    c = setup["client"]
    with pytest.raises(openai.BadRequestError, match="not valid base64"):
        c.chat.completions.create(model=MODEL, messages=message("@@@"))
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=message(b64(WAV2)))
    assert c.chat.completions.create(model=MODEL, messages=message(b64(WAV2)), max_tokens=2).choices


def test_max_tokens_is_capped_and_temperature_changes_nothing(setup):
    c, engine = setup["client"], setup["engine"]
    r = c.chat.completions.create(model=MODEL, messages=message(b64(WAV2)), max_completion_tokens=1)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "length"
    r = c.chat.completions.create(
        model=MODEL, messages=message(b64(WAV2)), max_tokens=10_000, temperature=1.3
    )
    greedy = setup["ref"].answer(audio.load(WAV2), first_wording("asr"), engine.max_new_tokens)
    assert r.choices[0].message.content == greedy
    assert r.usage.completion_tokens <= engine.max_new_tokens


def test_requests_past_the_limit_get_429_not_a_queue_without_bound(setup):
    busy = create_app(setup["engine"], ServeSettings(MODEL, max_pending=1, batch_wait_ms=1500))
    with running(busy) as url:
        body = {"model": MODEL, "messages": message(b64(WAV2)), "max_tokens": 2}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=60)
            time.sleep(0.5)  # the first waits 1.5 s in the queue for company
            second = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert first.result().status_code == 200
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert second.json()["error"]["code"] == "rate_limit_exceeded"
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_per_batch_windows_are_decoded_one_request_at_a_time(tmp_path):
    # the reference's windows depend on the batch's longest clip: batching would change a request's answer
    engine = Engine(make_checkpoint(tmp_path, window_mode="per_batch"), "cpu")
    assert create_app(engine, ServeSettings(MODEL, max_batch=8)).state.batcher.max_batch == 1


def test_the_command_refuses_to_serve_without_a_key_off_loopback(setup, monkeypatch):
    monkeypatch.delenv("SPLSM_TEST_NO_SUCH_KEY", raising=False)
    monkeypatch.setenv("SPLSM_TEST_EMPTY_KEY", "")
    ckpt = str(setup["ckpt"])
    cases = [
        ([ckpt], "needs an API key"),
        ([ckpt, "--no-api-key", "--host", "0.0.0.0"], "only for a loopback host"),
        ([ckpt, "--api-key-env", "SPLSM_TEST_NO_SUCH_KEY"], "SPLSM_TEST_NO_SUCH_KEY"),
        ([ckpt, "--api-key-env", "SPLSM_TEST_EMPTY_KEY"], "unset or empty"),
        ([ckpt, "--api-key-env", "X", "--no-api-key"], "not both"),
        ([str(setup["root"] / "nothing"), "--no-api-key"], "does not exist"),
    ]
    for args, words in cases:
        r = CliRunner().invoke(main, ["serve", *args])
        assert r.exit_code == 1 and words in r.stderr and "Traceback" not in r.output, (args, r.output)
