"""The web page ``splsm serve`` shows at ``/``: a client of the server's own chat-completions API.

The page (``static/``: one HTML file, its script and its style, no framework, nothing fetched from elsewhere)
records from the microphone, takes an uploaded file or one of the bundled clips, sends it with an instruction to
``POST /v1/chat/completions`` with ``stream: true`` and shows the answer as it streams; beside it, the
checkpoint's lineage (``core.lineage.card``). Routes:

- ``GET /`` and ``GET /static/{name}``: the page's three files, public (they hold no data and no key);
- ``GET /web/info``: the served model, the recipe's categories and first wordings, the bundled clips, limits;
- ``GET /web/clips/{clip_id}``: a bundled clip's bytes, by id from a fixed allow-list (no path is ever taken
  from a request);
- ``GET /web/lineage``: the lineage card, read once when the server starts.

The three ``/web/`` routes ask the same API key as ``/v1``: on a keyed server the page asks the user for the key
and keeps it in the page's memory only (never in the page's files, a cookie or storage).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response

from core import audio
from core.lineage.card import checkpoint_card
from core.paths import LINEAGE_ENV, REPO_ROOT, lineage_path
from splsm.serving.app import ApiError, ServeSettings
from splsm.serving.engine import Engine

STATIC = Path(__file__).resolve().parent / "static"
# name -> media type: the only files /static/ serves
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
# The page talks to this server only; it runs its own script and style, plays blobs it made, embeds nothing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; media-src 'self' blob:; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
DEMO = REPO_ROOT / "data" / "demo"
MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "ogg": "audio/ogg"}


@dataclass(frozen=True)
class Clip:
    """A bundled clip the page offers: ``id`` is all a request names; ``path`` is fixed here."""

    id: str
    label: str
    path: Path
    transcript: str | None = None

    @property
    def format(self) -> str:
        return self.path.suffix.lstrip(".").lower()


def _test_clean_transcripts() -> dict[str, str]:
    try:
        lines = (DEMO / "test-clean.jsonl").read_text().splitlines()
        return {(r := json.loads(x))["audio"]: r["text"] for x in lines if x.strip()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def bundled_clips() -> list[Clip]:
    """The demo's clips the page offers (those present in this checkout): the three LibriSpeech test-clean
    utterances the demo configs evaluate on, and the two that come without a transcript."""
    texts = _test_clean_transcripts()
    clips = [
        Clip(
            f"test-clean-{utt}",
            f"LibriSpeech test-clean {utt} (the demo's eval set)",
            DEMO / "test-clean" / f"{utt}.wav",
            texts.get(f"test-clean/{utt}.wav"),
        )
        for utt in ("1089-134686-0001", "1221-135766-0001", "1221-135766-0002")
    ]
    clips += [
        Clip(
            "jfk",
            "John F. Kennedy, inaugural address (no transcript bundled)",
            DEMO / "unlabelled" / "jfk.flac",
        ),
        Clip(
            "common-voice-651325",
            "Common Voice en 651325 (no transcript bundled)",
            DEMO / "unlabelled" / "common_voice_en_651325.mp3",
        ),
    ]
    return [c for c in clips if c.path.is_file()]


def lineage_store_for(checkpoint: Path, workdir: Path | None = None) -> Path | None:
    """The lineage store that recorded ``checkpoint``: ``workdir``'s; else ``SPLSM_LINEAGE_DB``; else, for a
    checkpoint where the train stage writes it (``WORKDIR/train/checkpoint`` or ``best``), that WORKDIR's."""
    if workdir is not None:
        return lineage_path(workdir)
    if os.environ.get(LINEAGE_ENV):
        return Path(os.environ[LINEAGE_ENV])
    ckpt = Path(checkpoint).resolve()
    if ckpt.parent.name == "train":
        return lineage_path(ckpt.parent.parent)
    return None


def info(engine: Engine, settings: ServeSettings) -> dict:
    """What the page needs to know about the server: the model name, whether a key is asked, the recipe's
    categories with their first wording, and the limits."""
    r = engine.recipe
    return {
        "model": settings.served_model_name,
        "key_required": settings.api_key is not None,
        "tasks": [{"name": name, "instruction": wordings[0]} for name, wordings in r.instructions.items()],
        "default_instruction": engine.default_instruction,
        "recipe": {"prompt_format": r.prompt_format, "catalog": r.catalog, "source": r.source},
        "recipe_note": engine.recipe_note or None,
        "max_audio_s": min(settings.max_audio_s or engine.max_audio_s, engine.max_audio_s),
        "default_max_tokens": settings.default_max_tokens,
        "max_tokens": engine.max_new_tokens,
    }


def card(engine: Engine, settings: ServeSettings) -> dict:
    """The checkpoint's lineage card, read once; a store that cannot be read is a note on the card."""
    try:
        return checkpoint_card(engine.checkpoint, settings.lineage_store)
    except Exception as e:  # a locked, corrupt or foreign store: the page still serves, and says so
        return {
            "checkpoint": {"path": str(engine.checkpoint)},
            "store": None if settings.lineage_store is None else str(settings.lineage_store),
            "notes": [f"the lineage store could not be read: {type(e).__name__}: {e}"],
        }


def add_page(
    app: FastAPI, authorize: Callable[[Request], None], about: dict, card: dict, clips: list[Clip]
) -> None:
    """Add the page's routes to ``app``; ``authorize`` is the API's key check, ``about`` what ``/web/info``
    answers besides the clips (``info``), ``card`` the lineage card (``card``)."""
    by_id, listed = {}, []
    for c in clips:
        try:
            seconds = round(audio.probe(c.path).duration_s, 2)
        except audio.AudioError:  # an unreadable file is not offered
            continue
        by_id[c.id] = c
        listed.append(
            {"id": c.id, "label": c.label, "format": c.format, "seconds": seconds, "transcript": c.transcript}
        )
    body = {**about, "clips": listed}

    def static(name: str) -> Response:
        return Response((STATIC / name).read_bytes(), media_type=STATIC_FILES[name], headers=HEADERS)

    @app.get("/", include_in_schema=False)
    async def index():
        return static("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        if name not in STATIC_FILES:
            raise ApiError(404, f"no page file {name!r}", "name")
        return static(name)

    @app.get("/web/info")
    async def web_info(request: Request):
        authorize(request)
        return body

    @app.get("/web/lineage")
    async def web_lineage(request: Request):
        authorize(request)
        return card

    @app.get("/web/clips/{clip_id}")
    async def web_clip(clip_id: str, request: Request):
        authorize(request)
        clip = by_id.get(clip_id)
        if clip is None:
            raise ApiError(
                404, f"no bundled clip {clip_id!r}; the clips are {', '.join(by_id) or 'none'}", "clip_id"
            )
        return Response(
            clip.path.read_bytes(), media_type=MEDIA_TYPES.get(clip.format, "application/octet-stream")
        )
