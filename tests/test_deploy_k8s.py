"""deploy/k8s/base-job-template.json, the base job template of a Prefect Kubernetes work pool for the splsm
images: checked with Prefect's own validators, built into a Kubernetes Job by prefect-kubernetes' own job
configuration, and (slow) made a work pool of a real Prefect server that deploys prefect.yaml onto it, with a
real `prefect worker start --type kubernetes` submitting a flow run.

No Kubernetes cluster runs here: the worker submits its Job to a stand-in of the Kubernetes API that records
what it receives and answers as the API server does on creation. Not exercised: scheduling, pulling the
image, mounting the claim, the GPU device plugin, the pod running the flow.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import re
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from helpers_http import JsonHandler, serve, stop
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun
from prefect.server.schemas.actions import WorkPoolCreate, validate_base_job_template
from prefect.settings import (
    PREFECT_API_AUTH_STRING,
    PREFECT_SERVER_API_AUTH_STRING,
    temporary_settings,
)
from prefect.utilities.schema_tools.validation import ValidationError, is_valid_schema, validate
from prefect.utilities.templating import find_placeholders
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

from conftest import REPO

TEMPLATE = REPO / "deploy" / "k8s" / "base-job-template.json"
MOUNTS = {  # docker-compose.yml's volumes of the stage services, as subfolders of the one claim
    "/data/work": ("work", False),
    "/data/lineage": ("lineage", False),
    "/data/corpora": ("corpora", True),
    "/models": ("models", True),
}


def _template() -> dict:
    return json.loads(TEMPLATE.read_text())


def _defaults(t: dict) -> dict:
    return {k: p["default"] for k, p in t["variables"]["properties"].items() if "default" in p}


def _job(values: dict, worker_auth: str = "splsm:worker-own-copy") -> dict:
    """The Job manifest prefect-kubernetes makes from the template and these job variables for a flow run, by a
    worker whose own settings hold the API auth string (and, wrongly, the server's).

    ``from_template_and_values`` takes a Prefect client to resolve block and variable references; the template
    has none, so the client it is given (pointing at a closed port) is never called."""
    offline = PrefectClient("http://127.0.0.1:9/api")

    async def build():
        return await KubernetesWorkerJobConfiguration.from_template_and_values(
            _template(), values, client=offline
        )

    with temporary_settings(
        {PREFECT_API_AUTH_STRING: worker_auth, PREFECT_SERVER_API_AUTH_STRING: worker_auth}
    ):
        cfg = asyncio.run(build())
        cfg.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="stand-in-run"))
    return cfg.job_manifest


def _container(job: dict) -> dict:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


def _env(c: dict) -> dict[str, dict]:
    names = [e["name"] for e in c["env"]]
    assert len(names) == len(set(names)), f"an environment variable twice: {names}"
    return {e["name"]: e for e in c["env"]}


def test_template_passes_prefects_own_validation_of_a_base_job_template():
    t = _template()
    assert validate_base_job_template(t) == t  # every {{ placeholder }} is a declared variable
    WorkPoolCreate(name="splsm", type="kubernetes", base_job_template=t)  # what the server's API parses
    is_valid_schema(t["variables"])  # the variables are a valid JSON schema
    validate(
        _defaults(t), t["variables"], raise_on_error=True, ignore_required=True
    )  # and so are the defaults
    # the checks are not vacuous: a misspelt placeholder and a negative GPU count are refused
    bad = copy.deepcopy(t)
    _container(bad["job_configuration"]["job_manifest"])["resources"]["limits"]["nvidia.com/gpu"] = (
        "{{ gpu }}"
    )
    with pytest.raises(ValueError, match="undeclared variable.*gpu"):
        validate_base_job_template(bad)
    with pytest.raises(ValidationError, match="gpus"):
        validate({"gpus": -1}, t["variables"], raise_on_error=True, ignore_required=True)


def test_every_variable_and_placeholder_of_prefects_default_template_is_kept():
    """The template extends prefect-kubernetes' default: what the default declares and uses is all still there,
    unchanged but for the image's and env's defaults and descriptions."""
    ours, default = _template(), KubernetesWorker.get_default_base_job_template()
    props, dprops = ours["variables"]["properties"], default["variables"]["properties"]
    assert set(dprops) <= set(props)
    changed = {"image": {"default", "description", "examples"}, "env": {"default", "description"}}
    for name, schema in dprops.items():
        keep = set(schema) - changed.get(name, set())
        assert {k: props[name].get(k) for k in keep} == {k: schema[k] for k in keep}, name
    assert ours["variables"].get("definitions") == default["variables"].get("definitions")
    assert set(default["job_configuration"]) <= set(ours["job_configuration"])

    def names(x):
        return {p.name for p in find_placeholders(json.dumps(x))}

    assert names(default["job_configuration"]) <= names(ours["job_configuration"])
    # the rest of the default job configuration is unchanged
    for key, value in default["job_configuration"].items():
        if key != "job_manifest":
            assert ours["job_configuration"][key] == value, key


def test_committed_template_is_what_make_template_makes_from_the_installed_prefect_kubernetes():
    """An upgrade of prefect-kubernetes that changes its default fails here until `python
    deploy/k8s/make_template.py` has made the file again from the new default (and the diff is reviewed)."""
    spec = importlib.util.spec_from_file_location("make_template", TEMPLATE.with_name("make_template.py"))
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    assert TEMPLATE.read_text() == make.render(make.build())


def _check_hardened(job: dict, claim: str) -> None:
    pod = job["spec"]["template"]["spec"]
    c = _container(job)
    assert pod["restartPolicy"] == "Never"
    sec = pod["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] == 1000 and sec["fsGroup"] == 1000
    csec = c["securityContext"]
    assert csec["allowPrivilegeEscalation"] is False and csec["capabilities"] == {"drop": ["ALL"]}
    assert csec["readOnlyRootFilesystem"] is True and csec["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path, (sub, ro) in MOUNTS.items():
        m = mounts[path]
        assert volumes[m["name"]]["persistentVolumeClaim"] == {"claimName": claim}
        assert m["subPath"] == sub and m.get("readOnly", False) is ro, path
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # the one writable place besides the claim
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    env = _env(c)
    assert env["HOME"]["value"].startswith("/tmp/")
    assert env["SPLSM_LINEAGE_DB"]["value"] == "/data/lineage/lineage.duckdb"  # as docker-compose.yml sets it
    # The images' entrypoint is `splsm` (images/Dockerfile): the pod's command runs the worker's `prefect flow-run
    # execute` itself instead of handing it to splsm as arguments.
    targets = re.split(r"^FROM \S+ AS (\w+)$", (REPO / "images" / "Dockerfile").read_text(), flags=re.M)
    body = dict(zip(targets[1::2], targets[2::2], strict=True))
    for image in ("cpu", "train"):
        assert re.findall(r"^ENTRYPOINT (.*)$", body[image], re.M) == ['["splsm"]'], image
    assert c["command"] + c["args"] == ["/usr/bin/env", "prefect", "flow-run", "execute"]


def _check_auth_from_secret(c: dict, secret: str, key: str, worker_auth: str) -> None:
    """The auth string reaches the pod only as a reference to the Secret, never as the worker's own copy; the
    worker's server settings and its PREFECT_HOME stay behind too."""
    env = _env(c)
    assert env["PREFECT_API_AUTH_STRING"] == {
        "name": "PREFECT_API_AUTH_STRING",
        "valueFrom": {"secretKeyRef": {"name": secret, "key": key}},
    }
    leaked = [e for e in c["env"] if worker_auth.split(":")[1] in json.dumps(e)]
    assert not leaked and worker_auth.split(":")[1] not in json.dumps(c), leaked
    assert not {
        "PREFECT_SERVER_API_AUTH_STRING",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL",
        "PREFECT_HOME",
    } & set(env)


def test_job_from_the_template_with_default_values_runs_splsm_cpu_without_gpus_hardened():
    job = _job({}, worker_auth="splsm:worker-own-copy")
    c = _container(job)
    assert c["image"] == "splsm:cpu"
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 0}  # no cpu or memory limit unless given
    _check_hardened(job, "splsm-data")
    _check_auth_from_secret(c, "splsm-prefect-auth", "auth-string", "splsm:worker-own-copy")


def test_job_from_the_template_with_gpu_values_runs_splsm_train_with_the_gpus_and_the_given_claim():
    values = {
        "image": "registry.example.com/splsm:train",
        "gpus": 4,
        "memory_limit": "200Gi",
        "volume_claim": "lab-data",
        "auth_secret_name": "lab-prefect",
        "auth_secret_key": "value",
        "shm_size": "16Gi",
        "env": {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"},  # prefect.yaml's job variables
    }
    job = _job(values, worker_auth="splsm:worker-own-copy")
    c = _container(job)
    assert c["image"] == "registry.example.com/splsm:train"
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 4, "memory": "200Gi"}
    _check_hardened(job, "lab-data")
    _check_auth_from_secret(c, "lab-prefect", "value", "splsm:worker-own-copy")
    env = _env(c)
    assert env["PYTHONUNBUFFERED"]["value"] == "1" and env["HF_HUB_OFFLINE"]["value"] == "1"
    shm = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["sizeLimit"] == "16Gi"


# ----- a real Prefect server and worker, a stand-in Kubernetes API ------------------------------------------


class StandInKubernetesAPI:
    """Records every object POSTed to it and answers 201 with it, named and given a uid, as the API server
    does; anything else is a 404 Status."""

    def __init__(self):
        self.created: list[tuple[str, dict]] = []
        outer = self

        class Handler(JsonHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.created.append((self.path, body))
                meta = body.setdefault("metadata", {})
                meta.setdefault("name", meta.get("generateName", "job-") + "x1y2z")
                meta["uid"] = str(uuid.uuid4())
                meta.setdefault("namespace", self.path.split("/namespaces/")[1].split("/")[0])
                self._send(201, body)

            def do_GET(self):
                self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})

        self.httpd = serve(Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def kubeconfig(self, path: Path) -> Path:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "worker", "user": {"token": "stand-in"}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "worker"}}],
            "current-context": "stand-in",
        }
        path.write_text(yaml.safe_dump(cfg))
        return path

    def close(self):
        stop(self.httpd)


@pytest.mark.slow
def test_work_pool_on_a_real_prefect_server_takes_prefect_yaml_and_its_worker_submits_the_job_to_a_stand_in_kubernetes_api(
    tmp_path,
):
    from test_deploy_prefect import AUTH, PREFECT, prefect_server

    api = StandInKubernetesAPI()
    try:
        with prefect_server(tmp_path) as srv:
            srv.cli(
                "work-pool", "create", "splsm", "--type", "kubernetes", "--base-job-template", str(TEMPLATE)
            )
            pool = srv.api("GET", "/work_pools/splsm")
            assert pool["type"] == "kubernetes" and pool["base_job_template"] == _template()
            # every deployment of prefect.yaml, with its job variables, is accepted by this pool
            srv.cli("--no-prompt", "deploy", "--all", timeout=600)
            spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
            deployed = srv.api("POST", "/deployments/filter", json={})
            assert {d["name"] for d in deployed} == {d["name"] for d in spec["deployments"]}
            assert {d["work_pool_name"] for d in deployed} == {"splsm"}
            # the server checks a run's job variables against the template's schema
            refused = srv.cli(
                "deployment", "run", "self_powered_pipeline/paper", "-jv", "gpus=-1", check=False
            )
            assert refused.returncode != 0 and "gpus" in refused.stdout + refused.stderr
            paper = {"deployments": {"name": {"any_": ["paper"]}}}
            assert srv.api("POST", "/flow_runs/filter", json=paper) == []  # and no run was made
            run = srv.cli(
                "deployment",
                "run",
                "self_powered_pipeline/paper",
                "-jv",
                "image=splsm:train",
                "-jv",
                "gpus=2",
            )
            run_id = re.findall(r"UUID: ([0-9a-f-]{36})", run.stdout)[0]
            assert srv.api("GET", f"/flow_runs/{run_id}")["job_variables"] == {
                "image": "splsm:train",
                "gpus": 2,
            }
            env = {
                **srv.env,
                "KUBECONFIG": str(api.kubeconfig(tmp_path / "kubeconfig")),
                # the observer watches pod events through the Kubernetes API; the stand-in has none to give
                "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_ENABLED": "false",
            }
            done = subprocess.run(
                [PREFECT, "worker", "start", "--pool", "splsm", "--type", "kubernetes", "--run-once"],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            # the job of this run (not of a scheduled regeneration, should 03:00 UTC be near)
            jobs = [
                (path, body)
                for path, body in api.created
                if {"name": "PREFECT__FLOW_RUN_ID", "value": run_id} in _container(body)["env"]
            ]
            assert [p for p, _ in jobs] == ["/apis/batch/v1/namespaces/default/jobs"], (
                done.stdout + done.stderr
            )
            job = jobs[0][1]
            state = srv.api("GET", f"/flow_runs/{run_id}")
    finally:
        api.close()

    c = _container(job)
    assert c["image"] == "splsm:train" and c["resources"]["limits"] == {"nvidia.com/gpu": 2}
    _check_hardened(job, "splsm-data")
    _check_auth_from_secret(c, "splsm-prefect-auth", "auth-string", ":".join(AUTH))
    env = _env(c)
    assert env["PREFECT__FLOW_RUN_ID"]["value"] == run_id
    assert env["HF_HUB_OFFLINE"]["value"] == "1"  # prefect.yaml's job variables reach the pod
    assert state["state"]["type"] == "PENDING"  # submitted; a pod would take it from here
