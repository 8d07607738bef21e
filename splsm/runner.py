"""Where a stage runs: in this process, in a subprocess, or in its own container image.

Every mode runs the same stage from the registry (``stages.registry``) with the same config, work
directory and options; the flows pick the mode with one switch (``ExecutionConfig.mode``):

- ``in-process``: ``Stage.run`` in this process;
- ``subprocess``: the stage's CLI (``python -m splsm.cli <stage> --config C --workdir W ...``) as a child
  process (``core.proc``), its output streamed into the Prefect log;
- ``container``: the same CLI in the stage's image through the Docker Engine API (Docker, or podman
  serving the same API: ``scripts/container-engine.sh``). Host paths are mounted at the same paths inside
  the container (the work directory read-write; the config's folder and everything the config and the
  options name read-only), so the config resolves alike on both sides and lineage records the same
  locations. The log is streamed, a non-zero exit fails the task, the container is removed afterwards.

Container mode is reachable by whoever may start a flow run, and the engine's socket is root on its host,
so what a container may be is the deployment's to say, never a flow parameter's (``ContainerPolicy``):
the images it may run (``SPLSM_ALLOWED_IMAGES``), the root every work directory must lie under
(``SPLSM_WORKDIR_ROOT``), its network, user, extra mounts, passed-through variables and the engine
(``SPLSM_CONTAINER_NETWORK``, ``SPLSM_CONTAINER_USER``, ``SPLSM_CONTAINER_MOUNTS``,
``SPLSM_CONTAINER_PASS_ENV``, ``DOCKER_HOST``). A parameter naming one of those is refused with the setting
to use instead. Every container runs with all capabilities dropped, ``no-new-privileges``, a read-only root
filesystem with a tmpfs for scratch, and pids and memory limits.

Whatever the mode, the stage's summary is read back from the marker its run leaves (``read_summary``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.config import load_config, paths_read
from core.extras import require
from core.paths import REPO_ROOT, WorkPaths
from core.proc import Child, stream_lines
from core.provenance import context_env
from core.stage import Stage, StageError, read_marker
from stages.registry import stage as get_stage

Mode = Literal["in-process", "subprocess", "container"]


class StageFailed(RuntimeError):
    """A stage failed in a subprocess or container; the message carries the end of its log."""


class PolicyError(StageError):
    """A flow asked for a container the deployment's settings do not allow; the message names the setting."""


# Fields a flow parameter may not set: each belongs to the deployment, under this environment variable.
DEPLOYMENT_ONLY = {
    "docker_host": "DOCKER_HOST",
    "network": "SPLSM_CONTAINER_NETWORK",
    "user": "SPLSM_CONTAINER_USER",
    "mounts": "SPLSM_CONTAINER_MOUNTS",
    "pass_env": "SPLSM_CONTAINER_PASS_ENV",
}


class ContainerConfig(BaseModel):
    """How container mode runs a stage; flows and prefect.yaml pass it as a parameter. What reaches the host
    (engine, network, user, mounts, secrets) is not here: it is the deployment's ``ContainerPolicy``."""

    model_config = ConfigDict(extra="forbid")

    image: str = "splsm:cpu"  # must be one of SPLSM_ALLOWED_IMAGES
    train_image: str | None = (
        None  # the image of stages that need the train image (train); default: ``image``
    )
    gpus: int | list[str] | None = None  # GPU device request for GPU stages: a count, or device ids
    env: dict[str, str] = Field(default_factory=dict)  # extra environment for the container
    shm_size: str = "1g"
    memory: str = "16g"  # the container's memory limit (a GPU stage's host memory, a 7B model's shards)
    pids: int = Field(4096, ge=64)  # the most processes and threads it may hold (torchrun, loader workers)

    @model_validator(mode="before")
    @classmethod
    def _no_host_settings(cls, data):
        if isinstance(data, dict):
            for key, var in DEPLOYMENT_ONLY.items():
                if data.get(key) not in (None, [], ""):
                    raise ValueError(
                        f"container.{key} cannot come from flow parameters: the deployment sets it ({var} in the"
                        " worker's environment), so that starting a flow run does not choose what reaches the host"
                    )
        return data


def _split(value: str | None, sep: str = ",") -> tuple[str, ...]:
    return tuple(x.strip() for x in (value or "").split(sep) if x.strip())


def _volume(spec: str) -> tuple[str, str, str]:
    """``NAME:/mount/point[:ro|rw]`` of SPLSM_CONTAINER_VOLUMES."""
    parts = spec.split(":")
    mode = parts.pop() if len(parts) == 3 else "rw"
    if len(parts) != 2 or not parts[0] or not parts[1].startswith("/") or mode not in ("rw", "ro"):
        raise PolicyError(f"SPLSM_CONTAINER_VOLUMES: {spec!r} is not NAME:/absolute/mount/point[:ro|rw]")
    return parts[0], parts[1], mode


@dataclass(frozen=True)
class ContainerPolicy:
    """The deployment's word on containers, read from the worker's environment (``from_env``)."""

    images: tuple[str, ...] = ("splsm:cpu", "splsm:train")
    workdir_roots: tuple[Path, ...] = (REPO_ROOT / "work",)
    network: str | None = None  # e.g. the compose network, to reach a vLLM service by name
    user: str | None = None  # default: the image's own (non-root) user
    mounts: tuple[str, ...] = ()  # extra host paths mounted read-only at the same path
    # Where the worker itself runs in a container (compose): its paths are not the host's. A path under a
    # volume's mount point is reached by mounting that named volume there; a path under an image path is
    # the stage image's own (the worker runs the same image) and is not mounted at all.
    volumes: tuple[tuple[str, str, str], ...] = ()  # (volume name, mount point, "rw" | "ro")
    image_paths: tuple[Path, ...] = ()
    pass_env: tuple[str, ...] = ("HF_TOKEN",)  # copied if set (and generate's key variable)
    docker_host: str | None = None  # default: the engine's default socket

    @classmethod
    def from_env(cls, env: dict | None = None) -> ContainerPolicy:
        env = os.environ if env is None else env
        d = cls()
        roots = _split(env.get("SPLSM_WORKDIR_ROOT"), os.pathsep)
        return cls(
            images=_split(env.get("SPLSM_ALLOWED_IMAGES")) or d.images,
            workdir_roots=tuple(Path(r).resolve() for r in roots) or d.workdir_roots,
            network=env.get("SPLSM_CONTAINER_NETWORK") or None,
            user=env.get("SPLSM_CONTAINER_USER") or None,
            mounts=_split(env.get("SPLSM_CONTAINER_MOUNTS"), os.pathsep),
            pass_env=_split(env["SPLSM_CONTAINER_PASS_ENV"])
            if "SPLSM_CONTAINER_PASS_ENV" in env
            else d.pass_env,
            docker_host=env.get("DOCKER_HOST") or None,
            volumes=tuple(_volume(v) for v in _split(env.get("SPLSM_CONTAINER_VOLUMES"))),
            image_paths=tuple(Path(p) for p in _split(env.get("SPLSM_CONTAINER_IMAGE_PATHS"), os.pathsep)),
        )

    def check(self, image: str, workdir: Path) -> None:
        """Refuse an image off the allow-list and a work directory outside every configured root."""
        if image not in self.images:
            raise PolicyError(
                f"container image {image!r} is not allowed; SPLSM_ALLOWED_IMAGES allows {', '.join(self.images)}"
            )
        real = Path(os.path.realpath(workdir))
        if not any(real == r or real.is_relative_to(r) for r in self.workdir_roots):
            raise PolicyError(
                f"work directory {workdir} (really {real}) is outside SPLSM_WORKDIR_ROOT "
                f"({os.pathsep.join(map(str, self.workdir_roots))}): it is mounted read-write into the container"
            )


class ExecutionConfig(BaseModel):
    """The one switch: where stages run."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = "in-process"
    container: ContainerConfig = Field(default_factory=ContainerConfig)


def logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run
        return logging.getLogger("splsm.runner")


def option_args(stage: Stage, options: BaseModel) -> list[str]:
    """A stage's options as its CLI takes them (the CLI makes its flags from the same fields)."""
    args: list[str] = []
    for name, field in type(options).model_fields.items():
        value = getattr(options, name)
        if value is None or value == field.default:
            continue
        if (field.json_schema_extra or {}).get("argument"):
            args.append(str(value))
        elif isinstance(value, bool):
            args.append(f"--{name.replace('_', '-')}" if value else f"--no-{name.replace('_', '-')}")
        else:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def stage_args(
    stage: Stage, config: Path, workdir: Path, force: bool = False, options: BaseModel | None = None
):
    """The CLI arguments that run ``stage`` (after ``splsm``)."""
    options = options if options is not None else stage.options()
    return [
        *stage.words,
        "--config",
        str(config),
        "--workdir",
        str(workdir),
        *(["--force"] if force else []),
        *option_args(stage, options),
    ]


def run_stage_cli(
    stage: str | Stage,
    config: str | os.PathLike,
    workdir: str | os.PathLike,
    force: bool = False,
    execution: ExecutionConfig | None = None,
    options: dict | BaseModel | None = None,
) -> dict:
    """Run one stage in the chosen mode; returns its summary (with its lineage ``run_id``). A stage that
    fails in a subprocess or container raises StageFailed; in-process, the stage's own error."""
    stage = stage if isinstance(stage, Stage) else get_stage(stage)
    execution = execution or ExecutionConfig()
    config, workdir = Path(config).resolve(), Path(workdir).resolve()
    cfg = load_config(config)
    ctx = stage.context(cfg, workdir, options)
    if execution.mode == "in-process":
        saved = dict(os.environ)
        os.environ.update(context_env())
        try:
            stage.run(ctx, force)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    else:
        args = stage_args(stage, config, workdir, force, ctx.options)
        if execution.mode == "subprocess":
            _run_subprocess(stage, args)
        else:
            run_in_container(stage, args, cfg, ctx.options, workdir, execution.container)
    return read_summary(stage.marker_of(ctx), stage.name)


def read_summary(marker: Path, stage: str) -> dict:
    """The summary a stage's run left in its marker, with its lineage run id."""
    done = read_marker(marker)
    if done is None:
        raise StageFailed(f"{stage} finished but left no readable marker at {marker}")
    return {"run_id": done.get("run_id"), **done.get("summary", {})}


def _run_subprocess(stage: Stage, args: list[str]) -> None:
    log = logger()
    env = {**os.environ, **context_env(), "PYTHONUNBUFFERED": "1"}
    child = Child(
        [sys.executable, "-m", "splsm.cli", *args], env=env, cwd=REPO_ROOT, on_line=log.info, keep=40
    )
    with child:
        code = child.wait()
    if code != 0:
        raise StageFailed(f"splsm {' '.join(stage.words)} exited with {code}:\n" + "\n".join(child.tail(15)))


# ----- container mode -----


def docker_client(docker_host: str | None = None):
    docker = require("docker", "containers", "running stages in containers")

    host = docker_host or os.environ.get("DOCKER_HOST")
    return docker.DockerClient(base_url=host, timeout=600) if host else docker.from_env(timeout=600)


def config_mounts(
    cfg, options: BaseModel | None, workdir: Path, policy: ContainerPolicy | None = None
) -> dict[str, dict]:
    """Docker SDK volume specs: the work directory read-write; read-only, every path the config reads
    (``core.config.paths_read``), every path among the stage's options, and the policy's extra mounts; all at
    the same paths. A path under one of the policy's volumes becomes that named volume at its mount point; a
    path under one of its image paths is left to the image."""
    policy = policy or ContainerPolicy()
    ro: set[Path] = set(paths_read(cfg))
    if options is not None:
        ro.update(Path(v).resolve() for v in options.model_dump().values() if isinstance(v, Path))
    ro = {p if p.is_dir() else p.parent for p in ro}
    ro.update(Path(p).resolve() for p in policy.mounts)
    paths = WorkPaths(workdir)
    rw = {paths.root, paths.lineage.parent}
    for p in rw:
        p.mkdir(parents=True, exist_ok=True)
    # a path inside a read-write mount needs no mount of its own, nor does one inside another read-only one
    ro = {p for p in ro if p.exists() and not any(p.is_relative_to(w) for w in rw)}
    ro = {p for p in ro if not any(p != q and p.is_relative_to(q) for q in ro)}
    rw = {p for p in rw if not any(p != q and p.is_relative_to(q) for q in rw)}
    volumes: dict[str, dict] = {}
    for mode, group in (("rw", rw), ("ro", ro)):
        for p in sorted(group):
            if any(p.is_relative_to(i) for i in policy.image_paths):
                continue
            vol = next((v for v in policy.volumes if p.is_relative_to(v[1])), None)
            if vol is None:
                volumes[str(p)] = {"bind": str(p), "mode": mode}
            elif vol[0] not in volumes:  # read-write where the stage writes, unless the volume is read-only
                volumes[vol[0]] = {"bind": vol[1], "mode": "ro" if vol[2] == "ro" else mode}
            elif mode == "rw" and vol[2] == "rw":
                volumes[vol[0]]["mode"] = "rw"
    return volumes


def image_digest(client, image: str) -> str:
    """The image's content id (``sha256:...``), or its registry digest when it was pulled or pushed."""
    img = client.images.get(image)
    repo_digests = img.attrs.get("RepoDigests") or []
    return repo_digests[0] if repo_digests else img.id


def gpu_requests(stage: Stage, gpus: int | list[str] | None) -> list | None:
    """The Engine API device request for a GPU stage: a count (-1: all) or device ids; none for CPU stages."""
    from docker.types import DeviceRequest

    if gpus is None or not stage.gpu:
        return None
    if isinstance(gpus, int):
        return [DeviceRequest(driver="nvidia", count=gpus, capabilities=[["gpu"]])]
    return [DeviceRequest(driver="nvidia", device_ids=[str(g) for g in gpus], capabilities=[["gpu"]])]


def confinement(spec: ContainerConfig) -> dict:
    """What every stage container runs under: no capabilities, no privilege gain, a read-only root
    filesystem (the work directory is its one writable mount, plus a tmpfs for scratch), bounded processes
    and memory. The stages need nothing more: they read and write files and talk HTTP."""
    return dict(
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        read_only=True,
        tmpfs={"/tmp": "rw,nosuid,nodev,size=2g"},
        pids_limit=spec.pids,
        mem_limit=spec.memory,
        shm_size=spec.shm_size,
    )


def run_in_container(
    stage: Stage, args: list[str], cfg, options: BaseModel | None, workdir: Path, spec: ContainerConfig
) -> None:
    """Run ``splsm ARGS`` in the stage's image; its log goes to the Prefect log, a failure raises StageFailed."""
    APIError = require("docker.errors", "containers", "running stages in containers").APIError

    log = logger()
    policy = ContainerPolicy.from_env()
    image = spec.train_image if stage.image == "train" and spec.train_image else spec.image
    policy.check(image, workdir)
    client = docker_client(policy.docker_host)
    # the API key variable the config names reaches the generate container under the same name
    key_env = getattr(cfg.generate.backend, "api_key_env", None)
    env = {k: os.environ[k] for k in [*policy.pass_env, *([key_env] if key_env else [])] if os.environ.get(k)}
    env.update(context_env())
    # the root filesystem is read-only: every cache and config a library writes goes to the scratch tmpfs
    env.update(HOME="/tmp/home", XDG_CACHE_HOME="/tmp/cache", MPLCONFIGDIR="/tmp/matplotlib")
    env.update(spec.env)
    env["SPLSM_IMAGE"] = image
    env["SPLSM_IMAGE_DIGEST"] = image_digest(client, image)
    log.info(f"{stage.name}: running `splsm {' '.join(args)}` in {image} ({env['SPLSM_IMAGE_DIGEST'][:19]})")
    # Created, then started inside the try: a container the engine cannot start (an unknown user, a
    # missing runtime) exists already, and must be removed like any other.
    container = client.containers.create(
        image,
        command=args,
        volumes=config_mounts(cfg, options, workdir, policy),
        environment=env,
        device_requests=gpu_requests(stage, spec.gpus),
        user=policy.user,
        network=policy.network,
        working_dir=str(workdir),
        labels={"splsm.stage": stage.name, "splsm.flow_run_id": env.get("SPLSM_FLOW_RUN_ID", "")},
        **confinement(spec),
    )
    try:
        try:
            container.start()
        except APIError as e:
            raise StageFailed(
                f"{stage.name}: the engine could not start {image}: {e.explanation or e}"
            ) from e
        lines = (
            chunk.decode(errors="replace")
            for chunk in _split_lines(container.logs(stream=True, follow=True, stdout=True, stderr=True))
        )
        tail = stream_lines(lines, log.info, keep=40)
        code = container.wait()["StatusCode"]
    finally:
        try:
            container.remove(force=True)
        except Exception as e:  # the run's outcome matters more than a cleanup hiccup
            log.warning(f"could not remove container {container.id[:12]}: {e}")
    if code != 0:
        raise StageFailed(f"{stage.name} in {image} exited with {code}:\n" + "\n".join(tail[-15:]))


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    buf = b""
    for chunk in chunks:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        yield from lines
    if buf:
        yield buf
