"""Shared fixtures: the bundled demo data, the demo config, tiny models built once per session."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from core.paths import WorkPaths

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
LIBRISPEECH = DEMO / "LibriSpeech"

# Tests never reach a model hub; anything that tries fails loudly instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def run_stage(name: str, cfg, workdir: Path, force: bool = False, **options):
    """Run a stage of the registry as the CLI does (reuse check, lineage), on a config object."""
    from stages.registry import STAGES

    stage = STAGES[name]
    return stage.run(stage.context(cfg, workdir, options), force)


@pytest.fixture(scope="session")
def tiny_config():
    from core.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def harvested(tmp_path_factory, tiny_config) -> Path:
    """The demo corpora harvested once: WORKDIR/harvest/{transcripts,rejects}.parquet."""
    work = tmp_path_factory.mktemp("harvested")
    run_stage("harvest", tiny_config, work)
    return work


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory, harvested, tiny_config) -> Path:
    """Tiny Whisper + Llama (tokenizer trained on the demo transcripts), as saved by save_pretrained."""
    from stages.tiny_models.models import build_tiny_models, corpus_texts

    out = tmp_path_factory.mktemp("tiny")
    build_tiny_models(corpus_texts(WorkPaths(harvested).harvest.transcripts), out, tiny_config.models.tiny)
    return out


def copy_librispeech(dst: Path, utts: list[str]) -> Path:
    """A LibriSpeech-layout corpus with the given real utterances (and their real transcript lines)."""
    for utt in utts:
        spk, chap, _ = utt.split("-")
        src_dir = LIBRISPEECH / "dev-clean-2" / spk / chap
        d = dst / "dev-clean-2" / spk / chap
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(src_dir / f"{utt}.flac", d / f"{utt}.flac")
        lines = [
            ln
            for ln in (src_dir / f"{spk}-{chap}.trans.txt").read_text().splitlines()
            if ln.startswith(utt + " ")
        ]
        with open(d / f"{spk}-{chap}.trans.txt", "a") as f:
            f.write("\n".join(lines) + "\n")
    return dst


GEN_TASKS = ["repeat", "translation"]


@pytest.fixture(scope="session")
def generated(tmp_path_factory, harvested, tiny_models_dir):
    """Answers of the tiny Llama (through a transformers serve process) for two tasks: (out_dir, config, summary)."""
    from core.config import GenerateConfig
    from stages.generate.driver import generate

    out = tmp_path_factory.mktemp("gen")
    g = GenerateConfig(
        tasks=GEN_TASKS, max_new_tokens=8, backend={"kind": "transformers-serve", "concurrency": 4}
    )
    summary = generate(WorkPaths(harvested).harvest.transcripts, out, g, tiny_models_dir / "llm")
    return out, g, summary


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """The real pretrained models converted once (``splsm models pretrained``): (work, ModelsPaths)."""
    from core.paths import WorkPaths
    from stages.registry import STAGES

    work = tmp_path_factory.mktemp("pretrained")
    stage = STAGES["pretrained"]
    stage.run(stage.context(None, work))
    return work, WorkPaths(work).models


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory) -> Path:
    """A work directory through the whole DAG, every stage run as the CLI runs it (lineage recorded): the tiny
    config on the bundled clips, cut to what a checkpoint with a real history needs (the tiny LLM answers one
    category in-process, 2 training steps on one process, the probe on the 3 test-clean clips, no QA), about
    30 s on 2 cores. The page's lineage panel and the report's audio are tested on it."""
    import yaml

    from core.config import load_config

    work = tmp_path_factory.mktemp("evaluated")
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    for c in raw["corpora"]:
        for key in ("root", "manifest"):
            if key in c:
                c[key] = str((REPO / "configs" / c[key]).resolve())
    raw["generate"].update(backend={"kind": "transformers"}, max_new_tokens=8, tasks=["sentiment"])
    raw["train"].update(nproc_per_node=1, max_steps=2, checkpoint_every=2)
    raw["evaluate"].update(probe_max_new_tokens=8, qa=False)
    (work / "config.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(work / "config.yaml")
    for name in ("harvest", "models", "generate", "build", "train", "evaluate"):
        run_stage(name, cfg, work)
    return work


# ----- every harvest reject reason is produced by some test -----------------------------------------------
# Each Reject made in this process is counted by reason; when the whole suite ran (no file, -k or -m given),
# a reason in REASONS that no test produced fails the run (a reject path nobody exercises may no longer
# work), and so does a reason produced that REASONS does not list.
PRODUCED: set[str] = set()


def _record_rejects() -> None:
    from stages.harvest.corpora.records import Reject

    made = Reject.__init__

    def counted(self, *args, **kwargs):
        made(self, *args, **kwargs)
        PRODUCED.add(self.reason)

    Reject.__init__ = counted


_record_rejects()


def pytest_sessionfinish(session, exitstatus):
    from stages.harvest.corpora.records import REASONS

    opt, args = session.config.option, list(session.config.invocation_params.args)
    positional = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] != "-p")]
    narrowed = positional or opt.keyword or opt.markexpr or getattr(opt, "lf", False) or opt.maxfail
    if narrowed or exitstatus != 0:
        return
    never, unknown = sorted(set(REASONS) - PRODUCED), sorted(PRODUCED - set(REASONS))
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if never:
        tr.write_line(f"reject reasons no test produced: {', '.join(never)}", red=True)
    if unknown:
        tr.write_line(f"reject reasons missing from records.REASONS: {', '.join(unknown)}", red=True)
    if never or unknown:
        session.exitstatus = 1


# ----- a container engine (tests/test_containers.py, tests/test_compose_up.py) -----------------------


def _ping(host: str) -> bool:
    import docker

    try:
        return docker.DockerClient(base_url=host, timeout=10).ping()
    except Exception:
        return False


@pytest.fixture(scope="session")
def engine() -> str:
    """A Docker Engine API to run containers on: DOCKER_HOST if it answers, else rootful podman set up by
    scripts/container-engine.sh (which needs root and apt); the test is skipped without either."""
    host = os.environ.get("DOCKER_HOST")
    if host and _ping(host):
        return host
    if os.geteuid() != 0:
        pytest.skip("no container engine at DOCKER_HOST, and setting up rootful podman needs root")
    if not shutil.which("apt-get"):
        pytest.skip("no container engine at DOCKER_HOST, and no apt-get to install podman with")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "container-engine.sh")], capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, f"container-engine.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    host = proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
    assert _ping(host), f"no engine answers at {host}"
    return host


def local_wheels() -> list[Path]:
    """The CPU torch wheel pip finds on this machine (PIP_FIND_LINKS), so the image gets no CUDA build."""
    dirs = [d for d in os.environ.get("PIP_FIND_LINKS", "").split() if os.path.isdir(d)]
    return [Path(p) for d in dirs for p in glob.glob(os.path.join(d, "torch-*.whl"))]


def ca_bundle() -> Path | None:
    for p in (
        os.environ.get("PIP_CERT"),
        os.environ.get("SSL_CERT_FILE"),
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if p and os.path.isfile(p):
            return Path(p)
    return None
