"""The OpenAI chat-completions protocol over a checkpoint: ``create_app(engine, settings)`` is a FastAPI app.

- ``POST /v1/chat/completions``: one user message whose content holds one ``input_audio`` part (base64 ``wav``,
  ``mp3``, ``flac`` or ``ogg``) and any ``text`` parts (the instruction; none: the recipe's ASR wording);
  ``stream: true`` answers as server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``;
- ``GET /v1/models``: the one model served; ``GET /health``: ``{"status": "ok"}``, without a key;
- ``GET /``: the web page (``splsm.serving.page``), a client of this API, unless ``settings.page`` is off.

Decoding is greedy: ``temperature``, ``top_p`` and ``seed`` are accepted and have no effect; ``n`` must be 1;
``max_tokens`` (or ``max_completion_tokens``) is honoured up to the server's cap. Every request the server
cannot take gets a 4xx with an OpenAI-style error body (``{"error": {"message", "type", "param", "code"}}``)
naming the field: a field it does not know, a part that would make it read a file or fetch a URL, broken
base64, audio that is empty, undecodable, of another format or too long, an unknown model, a body over the
limit (413), a wrong or missing key (401), more requests than it holds (429).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.audio import AudioError
from core.prompts import PromptError
from splsm.serving.batcher import Batcher, Busy
from splsm.serving.engine import Engine, QueryError

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
# Fields of OpenAI's request that a greedy speech model reads (model, messages, stream, stream_options, max_tokens,
# max_completion_tokens, n, modalities) or accepts without effect (temperature, top_p, seed, user).
FIELDS = (
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "modalities",
    "temperature",
    "top_p",
    "seed",
    "user",
)


@dataclass(frozen=True)
class ServeSettings:
    """What the server takes: see ``splsm serve --help``. ``api_key`` None: no key asked (loopback only)."""

    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = 20 * 2**20
    max_audio_s: float | None = None  # None: the model's window (30 s)
    max_pending: int = 64  # requests held at once (queued or decoding); more get 429
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    default_max_tokens: int = 256
    page: bool = True  # the web page at /
    lineage_store: Path | None = None  # where the page's lineage panel reads the checkpoint's history


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {
            401: "authentication_error",
            404: "invalid_request_error",
            429: "rate_limit_error",
        }.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 429 else None
        if self.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(body, status_code=self.status, headers=headers)


@dataclass(frozen=True)
class Parsed:
    instruction: str | None
    audio: str  # base64
    audio_format: str
    audio_param: str  # where it is: messages[0].content[1].input_audio.data
    max_tokens: int
    stream: bool
    include_usage: bool


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def parse_request(body: object, settings: ServeSettings) -> Parsed:
    """The parts of a chat-completions request this server reads; ApiError naming the field otherwise."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    unknown = [k for k in body if k not in FIELDS]
    if unknown:
        raise _bad(f"unsupported field {unknown[0]!r}: this server takes {', '.join(FIELDS)}", unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required: a string naming the served model (GET /v1/models)", "model")
    if model != settings.served_model_name:
        raise ApiError(
            404,
            f"the model {model!r} does not exist here; this server serves {settings.served_model_name!r}",
            "model",
            "model_not_found",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise _bad("'stream_options' takes only include_usage", "stream_options")
        include_usage = opts.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _bad("'stream_options.include_usage' must be true or false", "stream_options.include_usage")
    for name, low, high in (("temperature", 0, 2), ("top_p", 0, 1)):
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not low <= v <= high):
            raise _bad(
                f"'{name}' must be a number from {low} to {high} (decoding is greedy whatever it is)", name
            )
    for name in ("seed", "n", "max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise _bad(f"'{name}' must be an integer", name)
    if body.get("n", 1) != 1:
        raise _bad("'n' must be 1: greedy decoding has one answer", "n")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("'user' must be a string", "user")
    if body.get("modalities") not in (None, ["text"]):
        raise _bad("'modalities' can only be [\"text\"]: the model answers in text", "modalities")
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = settings.default_max_tokens
    if max_tokens < 1:
        raise _bad("'max_tokens' must be at least 1", "max_tokens")
    instruction, audio, fmt, at = _parse_messages(body.get("messages"))
    return Parsed(instruction, audio, fmt, f"{at}.input_audio.data", max_tokens, stream, include_usage)


def _parse_messages(messages: object) -> tuple[str | None, str, str, str]:
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' is required: a list with one user message", "messages")
    if len(messages) != 1:
        raise _bad(
            f"'messages' has {len(messages)} messages; the model answers one user turn about one clip: send one "
            "user message (no system message or earlier turns)",
            "messages",
        )
    m = messages[0]
    where = "messages[0]"
    if not isinstance(m, dict):
        raise _bad(f"{where} must be an object with role and content", where)
    extra = set(m) - {"role", "content", "name"}
    if extra:
        raise _bad(f"{where} has a field this server does not take: {sorted(extra)[0]!r}", where)
    if m.get("role") != "user":
        raise _bad(f"{where}.role must be 'user', not {m.get('role')!r}", f"{where}.role")
    content = m.get("content")
    if isinstance(content, str):
        raise _bad(
            f"{where}.content has no input_audio part: send a list of parts with one "
            '{"type": "input_audio", "input_audio": {"data": BASE64, "format": "wav"}}',
            f"{where}.content",
        )
    if not isinstance(content, list) or not content:
        raise _bad(f"{where}.content must be a list of text and input_audio parts", f"{where}.content")
    texts, audio = [], []
    for i, part in enumerate(content):
        at = f"{where}.content[{i}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _bad(f"{at} must be an object with a type", at)
        kind = part["type"]
        if kind == "text":
            if set(part) != {"type", "text"} or not isinstance(part["text"], str):
                raise _bad(f'{at} must be {{"type": "text", "text": STRING}}', at)
            texts.append(part["text"])
        elif kind == "input_audio":
            a = part.get("input_audio")
            if (
                set(part) != {"type", "input_audio"}
                or not isinstance(a, dict)
                or set(a) != {"data", "format"}
            ):
                raise _bad(
                    f'{at} must be {{"type": "input_audio", "input_audio": {{"data": BASE64, "format": FORMAT}}}}'
                    " and nothing else (the server reads no file and fetches no URL)",
                    at,
                )
            if not isinstance(a["data"], str):
                raise _bad(f"{at}.input_audio.data must be a base64 string", f"{at}.input_audio.data")
            if a["format"] not in AUDIO_FORMATS:
                raise _bad(
                    f"{at}.input_audio.format {a['format']!r} is not taken; one of {', '.join(AUDIO_FORMATS)}",
                    f"{at}.input_audio.format",
                )
            audio.append((at, a["data"], a["format"]))
        else:
            raise _bad(
                f"{at} has type {kind!r}; this server takes text and input_audio parts only: audio comes inline as "
                "base64, and the server reads no file and fetches no URL",
                f"{at}.type",
            )
    if not audio:
        raise _bad(
            f"{where}.content has no input_audio part: the model answers about a clip", f"{where}.content"
        )
    if len(audio) > 1:
        raise _bad(
            f"{where}.content has {len(audio)} input_audio parts; the model hears one clip per request",
            audio[1][0],
        )
    instruction = "\n".join(t.strip() for t in texts if t.strip()) or None
    at, data, fmt = audio[0]
    return instruction, data, fmt, at


def _audio_bytes(data: str, param: str) -> bytes:
    if data.startswith("data:"):
        raise _bad(f"{param} must be the base64 of the file alone, without a data: URL prefix", param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(f"{param} is not valid base64 ({e})", param) from e
    if not raw:
        raise _bad(f"{param} is empty: no audio", param)
    return raw


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (by its Content-Length, or while it streams in)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413,
            f"the request body is {int(declared)} bytes, over the limit of {limit}",
            None,
            "request_too_large",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(
                413, f"the request body is over the limit of {limit} bytes", None, "request_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    """The API over a loaded ``engine``; its batcher starts and stops with the app. ``app.state`` holds
    ``engine``, ``settings`` and ``batcher``, for pages mounted beside the API."""
    engine.load()
    batcher = Batcher(engine, settings.max_batch, settings.batch_wait_ms, settings.max_pending)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="splsm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.settings, app.state.batcher = engine, settings, batcher

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException):
        return ApiError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def _internal(_request: Request, e: Exception):
        return ApiError(500, f"internal error: {type(e).__name__}").response()

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise ApiError(
                401,
                "an API key is required: send the header Authorization: Bearer KEY",
                None,
                "invalid_api_key",
            )
        if not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "the API key is wrong", None, "invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    if settings.page:
        from splsm.serving import page

        page.add_page(
            app, authorize, page.info(engine, settings), page.card(engine, settings), page.bundled_clips()
        )

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        card = {
            "id": settings.served_model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "splsm",
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        raw = await _read_body(request, settings.max_body_bytes)

        def parse() -> Parsed:  # megabytes of base64: off the event loop, as the audio's decoding is
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise _bad(f"the request body is not JSON: {e}") from e
            except RecursionError as e:
                raise _bad("the request body is JSON nested too deep to read") from e
            return parse_request(body, settings)

        p = await run_in_threadpool(parse)

        def prepare():
            data = _audio_bytes(p.audio, p.audio_param)
            clip = engine.clip_from_bytes(data, f"{p.audio_param} ({p.audio_format})", settings.max_audio_s)
            return engine.query(clip, engine.instruction_for(p.instruction), p.max_tokens)

        try:
            query = await run_in_threadpool(prepare)
        except AudioError as e:
            raise _bad(f"{e.reason}: {e.detail}", p.audio_param) from e
        except (QueryError, PromptError) as e:
            raise _bad(str(e), "messages") from e
        try:
            job = batcher.submit(query, p.stream)
        except Busy as e:
            raise ApiError(429, str(e), None, "rate_limit_exceeded") from e
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not p.stream:
            try:
                while True:
                    kind, value = await job.events.get()
                    if kind == "done":
                        break
                    if kind == "error":
                        raise ApiError(500, value)
            finally:
                job.cancelled = True
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": settings.served_model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": value.text},
                        "logprobs": None,
                        "finish_reason": value.finish_reason,
                    }
                ],
                "usage": _usage(value),
            }

        def chunk(delta: dict, finish: str | None = None, usage=None) -> str:
            obj = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": settings.served_model_name,
                "choices": []
                if usage
                else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if usage:
                obj["usage"] = usage
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await job.events.get()
                    if kind == "text":
                        yield chunk({"content": value})
                    elif kind == "done":
                        yield chunk({}, value.finish_reason)
                        if p.include_usage:
                            yield chunk({}, usage=_usage(value))
                        break
                    else:
                        err = {"message": value, "type": "server_error", "param": None, "code": None}
                        yield f"data: {json.dumps({'error': err})}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    return app


def _usage(a) -> dict:
    return {
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.completion_tokens,
        "total_tokens": a.prompt_tokens + a.completion_tokens,
    }
