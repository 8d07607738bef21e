"""``splsm serve``: the API key rule, the settings' bounds, and uvicorn over ``create_app``.

A key is required: the environment variable named by ``--api-key-env`` holds it, and clients send it as
``Authorization: Bearer KEY``. Without one the server listens only on a loopback address, and only when told
(``--no-api-key``). Both are decided before the weights load.
"""

from __future__ import annotations

import ipaddress
import os

from splsm.serving.app import ServeSettings, create_app
from splsm.serving.engine import Engine


class ServeError(Exception):
    """A setting the server cannot start with, in one line."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def api_key(api_key_env: str | None, no_api_key: bool, host: str) -> str | None:
    """The key clients must send, or None where none is asked (``no_api_key`` on a loopback host)."""
    if api_key_env and no_api_key:
        raise ServeError("give --api-key-env NAME or --no-api-key, not both")
    if no_api_key:
        if not is_loopback(host):
            raise ServeError(
                f"--no-api-key is only for a loopback host (127.0.0.1, ::1, localhost), not {host!r}: anyone who "
                "reaches the port could use the model; give --api-key-env NAME"
            )
        return None
    if not api_key_env:
        raise ServeError(
            "splsm serve needs an API key: --api-key-env NAME names the environment variable that holds it "
            "(clients send Authorization: Bearer KEY); or --no-api-key to listen on loopback without one"
        )
    key = os.environ.get(api_key_env, "").strip()
    if not key:
        raise ServeError(f"the environment variable {api_key_env} (--api-key-env) is unset or empty")
    return key


def check_settings(settings: ServeSettings, engine: Engine) -> None:
    if settings.max_audio_s is not None and not 0 < settings.max_audio_s <= engine.max_audio_s:
        raise ServeError(
            f"--max-audio-s {settings.max_audio_s:g}: the model hears at most {engine.max_audio_s:g} s "
            "(Whisper's window); give a value above 0 up to that"
        )
    if settings.default_max_tokens > engine.max_new_tokens:
        raise ServeError(
            f"--default-max-tokens {settings.default_max_tokens} is over --max-tokens {engine.max_new_tokens}"
        )


def serve(engine: Engine, settings: ServeSettings, host: str, port: int, say=print) -> None:
    """Load the weights and serve until stopped (Ctrl-C)."""
    import uvicorn

    check_settings(settings, engine)
    app = create_app(engine, settings)
    key = "the API key from --api-key-env" if settings.api_key else "no API key (loopback only)"
    url_host = f"[{host}]" if ":" in host else host
    say(
        f"serve: {engine.checkpoint} as model {settings.served_model_name!r} on http://{url_host}:{port}/v1 "
        f"({key}; batches of up to {app.state.batcher.max_batch}, greedy, on {engine.device})"
        + (f"; the web page at http://{url_host}:{port}/" if settings.page else "")
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
