"""Where a stage runs: in this process, in a subprocess, or in its own container image.

Every mode runs the same thing, the stage's CLI (``splsm <stage> --config C --workdir W``), so a stage
behaves alike wherever it runs and its summary is read back from the marker ``run_stage`` leaves in
``WORKDIR/<stage>/_stage.json``. Flows pick the mode with one switch (``ExecutionConfig.mode``).

Container mode talks to the Docker Engine API through the ``docker`` SDK (Docker, or podman serving
the same API: ``scripts/container-engine.sh``). Host paths are mounted at the same paths inside the
container (the workdir read-write, the config's folder, corpora and model directories read-only), so
the config resolves alike on both sides and lineage records the same locations. The container's log is
streamed into the Prefect log, a non-zero exit fails the task, and the container is removed afterwards.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = "images/Dockerfile"

Mode = Literal["in-process", "subprocess", "container"]

# Variables a stage reads to record where it ran; passed to subprocesses and containers alike.
CONTEXT_ENV = (
    "SPLSM_FLOW_RUN_ID",
    "SPLSM_FLOW_NAME",
    "SPLSM_TASK_RUN_ID",
    "SPLSM_GIT_COMMIT",
    "SPLSM_IMAGE",
    "SPLSM_IMAGE_DIGEST",
    "SPLSM_LINEAGE_DB",
)


class StageFailed(RuntimeError):
    """A stage exited non-zero in a subprocess or container; the message carries the end of its log."""


class ContainerConfig(BaseModel):
    """How container mode runs a stage; flows and prefect.yaml pass it as a parameter."""

    model_config = ConfigDict(extra="forbid")

    image: str = "splsm:cpu"
    train_image: str | None = None  # the train stage's image (default: ``image``)
    docker_host: str | None = None  # default: DOCKER_HOST, else the engine's default socket
    gpus: int | list[str] | None = None  # GPU device request for GPU stages: a count, or device ids
    env: dict[str, str] = Field(default_factory=dict)  # extra environment for the container
    pass_env: list[str] = Field(default_factory=lambda: ["OPENAI_API_KEY", "HF_TOKEN"])  # copied if set
    mounts: list[str] = Field(default_factory=list)  # extra host paths mounted read-only at the same path
    user: str | None = None  # default: the image's own (non-root) user
    network: str | None = None  # e.g. the compose network, to reach a vLLM service by name
    shm_size: str = "1g"


class ExecutionConfig(BaseModel):
    """The one switch: where stages run."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = "in-process"
    container: ContainerConfig = Field(default_factory=ContainerConfig)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run
        return logging.getLogger("splsm.containers")


def stage_args(
    stage: str, config: Path, workdir: Path, force: bool = False, extra: Sequence[str] = ()
) -> list[str]:
    """The CLI arguments that run ``stage``; ``models`` is the tiny-models builder."""
    head = ["models", "tiny"] if stage == "models" else [stage]
    return [
        *head,
        "--config",
        str(config),
        "--workdir",
        str(workdir),
        *(["--force"] if force else []),
        *extra,
    ]


def context_env() -> dict[str, str]:
    """The Prefect run this call belongs to and the code it runs, for the stage's lineage row."""
    env = {k: os.environ[k] for k in CONTEXT_ENV if os.environ.get(k)}
    try:
        from prefect.runtime import flow_run, task_run

        if flow_run.id:
            env["SPLSM_FLOW_RUN_ID"] = str(flow_run.id)
            env["SPLSM_FLOW_NAME"] = str(flow_run.flow_name)
        if task_run.id:
            env["SPLSM_TASK_RUN_ID"] = str(task_run.id)
    except Exception:
        pass
    if "SPLSM_GIT_COMMIT" not in env:
        from splsm.stage import git_commit

        commit = git_commit()
        if commit:
            env["SPLSM_GIT_COMMIT"] = commit
    return env


def run_stage_cli(
    stage: str,
    config: Path,
    workdir: Path,
    force: bool = False,
    execution: ExecutionConfig | None = None,
    extra: Sequence[str] = (),
) -> None:
    """Run one stage's CLI in the chosen mode; raise StageFailed (or the stage's own error) when it fails."""
    execution = execution or ExecutionConfig()
    config, workdir = Path(config).resolve(), Path(workdir).resolve()
    args = stage_args(stage, config, workdir, force, extra)
    if execution.mode == "in-process":
        _run_in_process(args)
    elif execution.mode == "subprocess":
        _run_subprocess(args)
    else:
        run_in_container(stage, args, config, workdir, execution.container)


def _run_in_process(args: list[str]) -> None:
    import click

    from splsm.cli import main

    saved = dict(os.environ)
    os.environ.update(context_env())
    try:
        main.main(args=args, prog_name="splsm", standalone_mode=False)
    except click.ClickException as e:
        raise StageFailed(f"splsm {' '.join(args[:2])}: {e.format_message()}") from e
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _stream(lines: Iterator[str], log, keep: int = 40) -> list[str]:
    tail: list[str] = []
    for line in lines:
        line = line.rstrip("\n")
        log.info(line)
        tail.append(line)
        del tail[:-keep]
    return tail


def _run_subprocess(args: list[str]) -> None:
    log = _logger()
    cmd = [sys.executable, "-m", "splsm.cli", *args]
    env = {**os.environ, **context_env(), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO_ROOT
    )
    assert proc.stdout is not None
    tail = _stream(proc.stdout, log)
    code = proc.wait()
    if code != 0:
        raise StageFailed(f"splsm {' '.join(args[:2])} exited with {code}:\n" + "\n".join(tail[-15:]))


# ----- container mode -----


def docker_client(docker_host: str | None = None):
    import docker

    host = docker_host or os.environ.get("DOCKER_HOST")
    return docker.DockerClient(base_url=host, timeout=600) if host else docker.from_env(timeout=600)


def config_mounts(config: Path, workdir: Path, extra: Sequence[str] = ()) -> dict[str, dict]:
    """Docker SDK volume specs: the workdir read-write, everything the config reads read-only, same paths."""
    from splsm.config import load_config
    from splsm.lineage import lineage_path

    cfg = load_config(config)
    ro: set[Path] = {config.parent}
    for c in cfg.corpora:
        ro.add(c.root)
        if c.manifest:
            ro.add(c.manifest.parent)
    for p in (cfg.models.whisper, cfg.models.llm, cfg.generate.catalog):
        if p is not None:
            ro.add(p if p.is_dir() else p.parent)
    ro.update(Path(p).resolve() for p in extra)
    rw = {workdir, lineage_path(workdir).parent}
    for p in rw:
        p.mkdir(parents=True, exist_ok=True)
    # a path inside a read-write mount needs no mount of its own, nor does one inside another read-only one
    ro = {p for p in ro if p.exists() and not any(p.is_relative_to(w) for w in rw)}
    ro = {p for p in ro if not any(p != q and p.is_relative_to(q) for q in ro)}
    rw = {p for p in rw if not any(p != q and p.is_relative_to(q) for q in rw)}
    volumes = {str(p): {"bind": str(p), "mode": "rw"} for p in rw}
    volumes.update({str(p): {"bind": str(p), "mode": "ro"} for p in ro})
    return volumes


def image_digest(client, image: str) -> str:
    """The image's content id (``sha256:...``), or its registry digest when it was pulled or pushed."""
    img = client.images.get(image)
    repo_digests = img.attrs.get("RepoDigests") or []
    return repo_digests[0] if repo_digests else img.id


GPU_STAGES = ("train", "evaluate")


def gpu_requests(stage: str, gpus: int | list[str] | None) -> list | None:
    """The Engine API device request for a GPU stage: a count (-1: all) or device ids; none for CPU stages."""
    from docker.types import DeviceRequest

    if gpus is None or stage not in GPU_STAGES:
        return None
    if isinstance(gpus, int):
        return [DeviceRequest(driver="nvidia", count=gpus, capabilities=[["gpu"]])]
    return [DeviceRequest(driver="nvidia", device_ids=[str(g) for g in gpus], capabilities=[["gpu"]])]


def run_in_container(stage: str, args: list[str], config: Path, workdir: Path, spec: ContainerConfig) -> None:
    """Run ``splsm ARGS`` in the stage's image; its log goes to the Prefect log, a failure raises StageFailed."""
    from docker.errors import APIError

    log = _logger()
    client = docker_client(spec.docker_host)
    image = spec.train_image if stage == "train" and spec.train_image else spec.image
    env = {k: os.environ[k] for k in spec.pass_env if os.environ.get(k)}
    env.update(context_env())
    env.update(spec.env)
    env["SPLSM_IMAGE"] = image
    env["SPLSM_IMAGE_DIGEST"] = image_digest(client, image)
    device_requests = gpu_requests(stage, spec.gpus)
    log.info(f"{stage}: running `splsm {' '.join(args)}` in {image} ({env['SPLSM_IMAGE_DIGEST'][:19]})")
    # Created, then started inside the try: a container the engine cannot start (an unknown user, a
    # missing runtime) exists already, and must be removed like any other.
    container = client.containers.create(
        image,
        command=args,
        volumes=config_mounts(config, workdir, spec.mounts),
        environment=env,
        device_requests=device_requests,
        user=spec.user,
        network=spec.network,
        shm_size=spec.shm_size,
        working_dir=str(workdir),
        labels={"splsm.stage": stage, "splsm.flow_run_id": env.get("SPLSM_FLOW_RUN_ID", "")},
    )
    try:
        try:
            container.start()
        except APIError as e:
            raise StageFailed(f"{stage}: the engine could not start {image}: {e.explanation or e}") from e
        lines = (
            chunk.decode(errors="replace")
            for chunk in _split_lines(container.logs(stream=True, follow=True, stdout=True, stderr=True))
        )
        tail = _stream(lines, log)
        code = container.wait()["StatusCode"]
    finally:
        try:
            container.remove(force=True)
        except Exception as e:  # the run's outcome matters more than a cleanup hiccup
            log.warning(f"could not remove container {container.id[:12]}: {e}")
    if code != 0:
        raise StageFailed(f"{stage} in {image} exited with {code}:\n" + "\n".join(tail[-15:]))


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    buf = b""
    for chunk in chunks:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        yield from lines
    if buf:
        yield buf


# ----- building images -----


def build_context(dst, wheels: Sequence[Path] = (), ca_bundle: Path | None = None) -> None:
    """Write the build context tar to the file object ``dst``: the repository as .dockerignore leaves it,
    plus optional wheels and a CA bundle under images/local/ (bind-mounted by the Dockerfile's RUNs)."""
    from docker.utils.build import tar

    patterns = [
        ln.strip()
        for ln in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    with tar(str(REPO_ROOT), exclude=patterns, dockerfile=(DOCKERFILE, None)) as base:
        dst.write(base.read())
    dst.seek(0)
    with tarfile.open(fileobj=dst, mode="a") as t:
        for w in wheels:
            t.add(str(w), arcname=f"images/local/{Path(w).name}")
        if ca_bundle is not None:
            t.add(str(ca_bundle), arcname="images/local/ca.pem")
    dst.seek(0)


def build_image(
    tag: str,
    target: str = "cpu",
    buildargs: dict[str, str] | None = None,
    wheels: Sequence[Path] = (),
    ca_bundle: Path | None = None,
    docker_host: str | None = None,
) -> str:
    """Build a target of images/Dockerfile through the Engine API; returns the image id. The log goes to
    the Prefect (or module) log; a failed step raises RuntimeError with it."""
    log = _logger()
    client = docker_client(docker_host)
    args = dict(buildargs or {})
    args.setdefault("SPLSM_IMAGE", tag)
    from splsm.stage import git_commit

    args.setdefault("GIT_COMMIT", git_commit() or "")
    tail: list[str] = []
    with tempfile.TemporaryFile() as ctx:
        build_context(ctx, wheels, ca_bundle)
        for chunk in client.api.build(
            fileobj=ctx,
            custom_context=True,
            dockerfile=DOCKERFILE,
            target=target,
            tag=tag,
            buildargs=args,
            rm=True,
            decode=True,
        ):
            if "stream" in chunk:
                for line in chunk["stream"].splitlines():
                    if line.strip():
                        log.info(line)
                        tail = [*tail[-30:], line]
            if "error" in chunk:
                raise RuntimeError(f"building {tag} ({target}) failed: {chunk['error']}\n" + "\n".join(tail))
    return client.images.get(tag).id
