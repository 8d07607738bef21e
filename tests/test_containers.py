"""Stage execution modes: a subprocess, and a container of the cpu image on a real container engine.

The engine is rootful podman serving the Docker Engine API (scripts/container-engine.sh), set up here
when DOCKER_HOST does not already point at a running engine; the image is built from the local
debootstrap base through the Engine API, so no registry is needed (PyPI is, inside the build).
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, ca_bundle, local_wheels
from core.lineage.store import LineageStore
from core.paths import WorkPaths
from core.tables import read_table
from schemas import REJECTS, TRANSCRIPTS
from splsm.runner import ContainerConfig, ExecutionConfig, StageFailed, run_stage_cli

TINY_CONFIG = REPO / "configs" / "tiny.yaml"
TAG = "localhost/splsm:cpu-test"
IMAGE_UID = 1000  # the images' non-root user


def test_harvest_in_a_subprocess_records_the_callers_flow_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLSM_FLOW_RUN_ID", "flow-run-from-caller")
    run_stage_cli("harvest", TINY_CONFIG, tmp_path, execution=ExecutionConfig(mode="subprocess"))
    assert read_table(WorkPaths(tmp_path).harvest.transcripts, TRANSCRIPTS).num_rows == 17
    (row,) = LineageStore(WorkPaths(tmp_path).lineage).dicts(
        "SELECT status, flow_run_id, git_commit FROM runs"
    )
    assert row["status"] == "succeeded" and row["flow_run_id"] == "flow-run-from-caller"
    assert row["git_commit"]


def test_a_failing_stage_in_a_subprocess_fails_with_its_message(tmp_path):
    with pytest.raises(StageFailed, match="transcripts .* does not exist"):
        run_stage_cli("build", TINY_CONFIG, tmp_path, execution=ExecutionConfig(mode="subprocess"))


# ----- container mode ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cpu_image(engine) -> str:
    from splsm.images import build_image

    build_image(
        TAG,
        "cpu",
        {"BASE_IMAGE": "localhost/base:bookworm", "TORCH_INDEX_URL": "https://pypi.org/simple"},
        wheels=local_wheels(),
        ca_bundle=ca_bundle(),
        docker_host=engine,
    )
    return TAG


@pytest.fixture
def deployment(engine, tmp_path, monkeypatch):
    """The deployment's settings a worker would have: this engine, the test image, the test's work root."""
    monkeypatch.setenv("DOCKER_HOST", engine)
    monkeypatch.setenv("SPLSM_ALLOWED_IMAGES", TAG)
    monkeypatch.setenv("SPLSM_WORKDIR_ROOT", str(tmp_path))
    return monkeypatch


def _workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    os.chown(work, IMAGE_UID, IMAGE_UID)  # the container's user writes here
    return work


@pytest.mark.slow
def test_image_runs_as_a_non_root_user(engine, cpu_image):
    import docker

    client = docker.DockerClient(base_url=engine)
    out = client.containers.run(cpu_image, entrypoint=["id", "-u"], remove=True)
    assert out.decode().strip() == str(IMAGE_UID)


@pytest.mark.slow
def test_harvest_runs_in_its_container_and_records_the_image(engine, cpu_image, deployment, tmp_path, caplog):
    import docker

    from core.provenance import git_commit

    client = docker.DockerClient(base_url=engine)
    work = _workdir(tmp_path)
    execution = ExecutionConfig(mode="container", container=ContainerConfig(image=cpu_image))
    with caplog.at_level(logging.INFO, logger="splsm.runner"):
        run_stage_cli("harvest", TINY_CONFIG, work, execution=execution)

    assert read_table(WorkPaths(work).harvest.transcripts, TRANSCRIPTS).num_rows == 17
    rejects = read_table(WorkPaths(work).harvest.rejects, REJECTS)
    assert rejects.column("reason").to_pylist() == ["missing_audio"] * 2
    assert (WorkPaths(work).harvest.transcripts).stat().st_uid == IMAGE_UID  # written in the container
    (row,) = LineageStore(WorkPaths(work).lineage).dicts("SELECT * FROM runs")
    assert row["status"] == "succeeded" and row["image"] == cpu_image
    img = client.images.get(cpu_image)  # the content id, or the repository digest where the engine has one
    assert row["image_digest"] in {img.id, *(img.attrs.get("RepoDigests") or [])}
    assert "sha256:" in row["image_digest"]
    assert row["git_commit"] == git_commit()
    assert row["host"] != os.uname().nodename  # it ran in the container
    # the container's log reached the caller's log, and the container is gone
    assert "harvest: 17 transcripts" in caplog.text
    assert not client.containers.list(all=True, filters={"label": "splsm.stage=harvest"})
    # the corpora were read at their host paths, and fingerprint alike on both sides
    from core.config import load_config
    from core.stage import Artifact

    recorded = {
        (r["location"], r["content_hash"])
        for r in LineageStore(WorkPaths(work).lineage).dicts(
            "SELECT d.location, d.content_hash FROM run_io io JOIN datasets d USING (dataset_id)"
            " WHERE io.direction = 'input'"
        )
    }
    corpora = load_config(TINY_CONFIG).corpora
    assert {(str(c.root), Artifact("c", c.root, "corpus").ref().content_hash) for c in corpora} <= recorded


@pytest.mark.slow
def test_a_failing_stage_in_its_container_fails_and_is_removed(engine, cpu_image, deployment, tmp_path):
    import docker

    client = docker.DockerClient(base_url=engine)
    work = _workdir(tmp_path)
    execution = ExecutionConfig(mode="container", container=ContainerConfig(image=cpu_image))
    with pytest.raises(StageFailed, match=r"(?s)exited with 1.*checkpoint .* does not exist"):
        run_stage_cli("evaluate", TINY_CONFIG, work, execution=execution)
    assert not client.containers.list(all=True, filters={"label": "splsm.stage=evaluate"})


@pytest.mark.slow
def test_a_container_the_engine_cannot_start_fails_the_stage_and_is_removed(
    engine, cpu_image, deployment, tmp_path
):
    import docker

    client = docker.DockerClient(base_url=engine)
    work = _workdir(tmp_path)
    deployment.setenv("SPLSM_CONTAINER_USER", "no-such-user")
    execution = ExecutionConfig(mode="container", container=ContainerConfig(image=cpu_image))
    with pytest.raises(StageFailed, match=r"harvest: the engine could not start .*no-such-user"):
        run_stage_cli("harvest", TINY_CONFIG, work, execution=execution)
    assert not client.containers.list(all=True, filters={"label": "splsm.stage=harvest"})


@pytest.mark.slow
def test_stage_containers_hold_no_capabilities_no_privilege_gain_and_a_read_only_root(engine, cpu_image):
    import docker

    from splsm.runner import confinement

    client = docker.DockerClient(base_url=engine)
    probe = (
        "grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status;"
        " touch /usr/x 2>/dev/null && echo root-writable || echo root-read-only;"
        " touch /tmp/x && echo tmp-writable"
    )
    spec = ContainerConfig(pids=300, memory="1g")
    c = client.containers.create(cpu_image, entrypoint=["sh", "-c", probe], **confinement(spec))
    try:
        host = c.attrs["HostConfig"]  # what the engine was told, and holds
        assert (host["PidsLimit"], host["Memory"], host["ReadonlyRootfs"]) == (300, 1 << 30, True)
        dropped = {x.upper().removeprefix("CAP_") for x in host["CapDrop"]}  # podman lists ALL one by one
        assert "ALL" in dropped or {"CHOWN", "SETUID", "SETGID", "NET_RAW", "SYS_CHROOT"} <= dropped
        assert not host.get("CapAdd")
        assert any("no-new-privileges" in x for x in host["SecurityOpt"])
        c.start()
        assert c.wait(timeout=120)["StatusCode"] == 0
        lines = c.logs().decode().split()
    finally:
        c.remove(force=True)
    status = dict(zip(lines[0:6:2], lines[1:6:2], strict=True))  # what the process inside has
    assert status == {"CapEff:": "0000000000000000", "CapBnd:": "0000000000000000", "NoNewPrivs:": "1"}
    assert "root-read-only" in lines and "tmp-writable" in lines


def test_flow_parameters_cannot_choose_what_reaches_the_host():
    from splsm.runner import DEPLOYMENT_ONLY

    for key, value in [
        ("network", "host"),
        ("user", "root"),
        ("mounts", ["/"]),
        ("docker_host", "tcp://elsewhere:2375"),
        ("pass_env", ["POSTGRES_PASSWORD"]),
    ]:
        with pytest.raises(
            ValueError, match=f"container.{key} cannot come from flow parameters.*{DEPLOYMENT_ONLY[key]}"
        ):
            ExecutionConfig.model_validate(
                {"mode": "container", "container": {"image": "splsm:cpu", key: value}}
            )


def test_images_off_the_allow_list_and_workdirs_outside_the_root_are_refused_before_the_engine(
    tmp_path, monkeypatch
):
    from splsm.runner import PolicyError

    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")  # never reached
    monkeypatch.setenv("SPLSM_ALLOWED_IMAGES", "splsm:cpu, splsm:train")
    monkeypatch.setenv("SPLSM_WORKDIR_ROOT", str(tmp_path / "allowed"))
    (tmp_path / "allowed").mkdir()

    def run(stage: str, workdir, **container):
        execution = ExecutionConfig(mode="container", container=container)
        run_stage_cli(stage, TINY_CONFIG, workdir, execution=execution)

    inside = tmp_path / "allowed" / "w"
    with pytest.raises(
        PolicyError, match="image 'evil:latest' is not allowed; SPLSM_ALLOWED_IMAGES allows splsm:cpu"
    ):
        run("harvest", inside, image="evil:latest")
    with pytest.raises(PolicyError, match="train image.*|image 'other:1' is not allowed"):
        run("train", inside, train_image="other:1")
    with pytest.raises(PolicyError, match="outside SPLSM_WORKDIR_ROOT"):
        run("harvest", tmp_path / "elsewhere")
    # a link inside the root to a directory outside it is outside
    (tmp_path / "allowed" / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(PolicyError, match="really .*elsewhere"):
        run("harvest", tmp_path / "allowed" / "link")


def test_gpu_stages_request_gpus_by_count_or_id_and_cpu_stages_none():
    # what the Engine API receives (podman ignores device requests, so no engine can show them here)
    from splsm.runner import gpu_requests
    from stages.registry import STAGES

    train, evaluate, harvest = STAGES["train"], STAGES["evaluate"], STAGES["harvest"]
    (by_count,) = gpu_requests(train, 2)
    assert (by_count["Driver"], by_count["Count"], by_count["Capabilities"]) == ("nvidia", 2, [["gpu"]])
    (by_id,) = gpu_requests(evaluate, ["0", 3])
    assert by_id["DeviceIDs"] == ["0", "3"] and by_id["Count"] == 0
    assert gpu_requests(train, -1)[0]["Count"] == -1  # all
    assert gpu_requests(harvest, 2) is None and gpu_requests(train, None) is None


def test_container_mode_mounts_every_path_the_config_and_the_options_name(tmp_path):
    """What a stage reads outside the work directory is mounted read-only at the same path: the corpora and
    manifests, the model folders, the catalog, the Whisper checkpoint for pseudo-labels, the QA file, the
    baseline's work directory, and paths among the stage's options (import-reference's manifest and root)."""
    from core.config import load_config
    from splsm.runner import config_mounts
    from stages.registry import STAGES

    made = {}
    for name in ("corpus", "models/w", "models/l", "ckpt", "qa", "runs/asr-only", "ref", "refroot"):
        made[name] = tmp_path / "ext" / name
        made[name].mkdir(parents=True)
    (made["corpus"] / "m.jsonl").write_text("")
    (made["ckpt"] / "tiny.pt").write_bytes(b"")
    (made["qa"] / "q.jsonl").write_text("")
    (made["ref"] / "sample.jsonl").write_text("")
    cfg_file = tmp_path / "cfg" / "c.yaml"
    cfg_file.parent.mkdir()
    cfg_file.write_text(
        "name: x\ncorpora: [{name: a, kind: jsonl, root: ../ext/corpus, manifest: ../ext/corpus/m.jsonl}]\n"
        "models: {whisper: ../ext/models/w, llm: ../ext/models/l}\n"
        "harvest: {whisper_checkpoint: ../ext/ckpt/tiny.pt}\n"
        "evaluate: {qa_file: ../ext/qa/q.jsonl, baseline: ../ext/runs/asr-only}\n"
    )
    cfg = load_config(cfg_file)
    work = tmp_path / "work"
    opts = STAGES["import-reference"].options(manifest=made["ref"] / "sample.jsonl", root=made["refroot"])
    vols = config_mounts(cfg, opts, work)
    ro = {Path(k) for k, v in vols.items() if v["mode"] == "ro"}
    rw = {Path(k) for k, v in vols.items() if v["mode"] == "rw"}
    assert rw == {work.resolve()}
    expected = {cfg_file.parent, *(made[n].resolve() for n in made if n not in ("models/w", "models/l"))}
    expected |= {made["models/w"].resolve(), made["models/l"].resolve()}
    assert ro == expected
    assert all(vols[str(p)]["bind"] == str(p) for p in ro | rw)  # the same paths inside


def test_a_worker_in_a_container_mounts_named_volumes_and_leaves_the_images_own_paths(tmp_path):
    """Under compose the worker's paths are its container's, not the host's: a path under a policy volume's
    mount point becomes that named volume (read-write where the stage writes, never where the volume is
    read-only), a path under an image path (the config and demo data baked into the image) is not mounted."""
    from core.config import load_config
    from splsm.runner import ContainerPolicy, PolicyError, config_mounts

    image = tmp_path / "app"
    (image / "cfg").mkdir(parents=True)
    (image / "data").mkdir()
    (image / "data" / "m.jsonl").write_text("")
    corpora, models, work = tmp_path / "corpora", tmp_path / "models", tmp_path / "vol" / "work"
    for d in (corpora / "a", models / "w", models / "l"):
        d.mkdir(parents=True)
    cfg_file = image / "cfg" / "c.yaml"
    cfg_file.write_text(
        "name: x\ncorpora: [{name: a, kind: jsonl, root: ../data, manifest: ../data/m.jsonl},"
        f" {{name: b, kind: audio_folder, root: {corpora / 'a'}}}]\n"
        f"models: {{whisper: {models / 'w'}, llm: {models / 'l'}}}\n"
    )
    policy = ContainerPolicy.from_env(
        {
            "SPLSM_CONTAINER_VOLUMES": f"splsm-work:{work.parent},splsm-models:{models}:ro,splsm-corpora:{corpora}",
            "SPLSM_CONTAINER_IMAGE_PATHS": str(image),
        }
    )
    vols = config_mounts(load_config(cfg_file), None, work, policy)
    assert vols == {
        "splsm-work": {"bind": str(work.parent), "mode": "rw"},
        "splsm-models": {"bind": str(models), "mode": "ro"},
        "splsm-corpora": {"bind": str(corpora), "mode": "ro"},
    }
    for bad in ("splsm-work", "splsm-work:relative", "a:/x:rx", ":/x"):
        with pytest.raises(PolicyError, match="SPLSM_CONTAINER_VOLUMES"):
            ContainerPolicy.from_env({"SPLSM_CONTAINER_VOLUMES": bad})


@pytest.mark.skipif(os.geteuid() != 0, reason="the helper runs as root only")
def test_the_engine_helper_refuses_a_state_folder_it_does_not_own_alone(tmp_path):
    """Its socket is root on the host: a state folder another user made first (or a link, or one anyone may
    write) is refused before anything is installed or started."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 1000, 1000)
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    link = tmp_path / "link"
    link.symlink_to(theirs)
    for state, why in [(theirs, "belongs to uid 1000"), (open_to_all, "mode 777"), (link, "not a directory")]:
        proc = subprocess.run(
            ["bash", str(REPO / "scripts" / "container-engine.sh")],
            env={**os.environ, "STATE": str(state), "PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 3 and why in proc.stderr and "refusing it" in proc.stderr, proc.stderr
    fresh = (
        tmp_path / "fresh"
    )  # made by the helper itself: root's, 0700 (it then goes on to start the engine)
    proc = subprocess.run(
        ["bash", "-c", f'source <(sed -n "1,/^fi$/p" {REPO / "scripts" / "container-engine.sh"}); echo made'],
        env={**os.environ, "STATE": str(fresh)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "made" in proc.stdout, proc.stderr
    st = fresh.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)
