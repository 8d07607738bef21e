"""Building the project's images (``images/Dockerfile``) through the Docker Engine API.

The build context is the repository as ``.dockerignore`` leaves it, plus optional wheels and a CA bundle
under ``images/local/`` (bind-mounted by the Dockerfile's RUNs), so an image builds on a machine with no
registry but the package index, or none at all.
"""

from __future__ import annotations

import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from core.paths import REPO_ROOT
from core.provenance import git_commit
from splsm.runner import docker_client, logger

DOCKERFILE = "images/Dockerfile"


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
    log = logger()
    client = docker_client(docker_host)
    args = dict(buildargs or {})
    args.setdefault("SPLSM_IMAGE", tag)
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
