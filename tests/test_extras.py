"""A package that only an extra brings, missing: the error names the extra and the setting that needs it,
before any work starts (the base install is exercised whole by tests/test_demo.py)."""

from __future__ import annotations

import sys

import pytest

from core.extras import MissingExtra


def test_an_openai_whisper_checkpoint_without_the_pseudolabel_extra_names_it(monkeypatch, tmp_path):
    from stages.harvest.pseudolabel import labeler

    ckpt = tmp_path / "tiny.pt"
    ckpt.write_bytes(b"not read: the check comes first")
    monkeypatch.setitem(sys.modules, "whisper", None)  # as if openai-whisper were not installed
    with pytest.raises(MissingExtra, match=r"harvest.whisper_checkpoint .*tiny.pt.*splsm\[pseudolabel\]"):
        labeler(ckpt)


def test_the_transformers_serve_backend_without_the_serving_extra_names_it(monkeypatch, tmp_path):
    from stages.generate.backends.transformers_serve import ServerProcess

    monkeypatch.setitem(sys.modules, "fastapi", None)
    server = ServerProcess(tmp_path / "model", tmp_path / "serve.log")
    with pytest.raises(MissingExtra, match=r"transformers-serve .*'fastapi'.*splsm\[serving\]"):
        server.start()
    assert server.child is None  # nothing was started


def test_container_mode_without_the_containers_extra_names_it(monkeypatch):
    from splsm.runner import docker_client

    monkeypatch.setitem(sys.modules, "docker", None)
    with pytest.raises(MissingExtra, match=r"containers.*splsm\[containers\]"):
        docker_client("unix:///nonexistent.sock")
