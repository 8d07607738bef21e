"""Make base-job-template.json, the Prefect Kubernetes work pool's base job template for the splsm images, from
the default of the installed prefect-kubernetes (the kubernetes extra), extended:

  image             splsm:cpu by default; splsm:train for train (NVIDIA GPUs)
  gpus              limits nvidia.com/gpu (0 by default)
  volume_claim      one PersistentVolumeClaim with the folders work, lineage, corpora and models, mounted where
                    docker-compose.yml mounts its volumes (/data/work, /data/lineage, /data/corpora and /models
                    read-only); SPLSM_LINEAGE_DB points into /data/lineage
  auth_secret_name  the Secret (and auth_secret_key, its key) PREFECT_API_AUTH_STRING is read from
  tmp_size, shm_size  the scratch volume at /tmp and the memory at /dev/shm
  hardening         as the compose services: non-root uid 1000, no privilege escalation, every capability
                    dropped, a read-only root filesystem with HOME and caches on /tmp

    python deploy/k8s/make_template.py           # write base-job-template.json
    python deploy/k8s/make_template.py --check   # exit 1 if the file is not what this makes (after an upgrade)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("base-job-template.json")

# The worker hands its own Prefect settings to every job; these stay behind (null removes a variable).
WITHHELD_ENV = [
    "PREFECT_API_AUTH_STRING",  # the job reads it from the Secret, not from the worker in plain text
    "PREFECT_SERVER_API_AUTH_STRING",  # the server's secrets, should the worker's environment hold them
    "PREFECT_SERVER_DATABASE_PASSWORD",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    "PREFECT_HOME",  # a path on the worker's machine; the job's is under HOME, on the writable /tmp
]

VARIABLES = {
    "gpus": {
        "title": "GPUs",
        "description": "NVIDIA GPUs for the job's container (limits nvidia.com/gpu; the nodes need the NVIDIA "
        "device plugin). 0: none.",
        "type": "integer",
        "minimum": 0,
        "default": 0,
    },
    "volume_claim": {
        "title": "Data Volume Claim",
        "description": "The PersistentVolumeClaim holding the stages' shared data, mounted as docker-compose.yml "
        "mounts its volumes: its folder work at /data/work, lineage at /data/lineage (SPLSM_LINEAGE_DB), "
        "corpora at /data/corpora and models at /models (both read-only). Jobs on several nodes at once need "
        "ReadWriteMany.",
        "type": "string",
        "default": "splsm-data",
    },
    "auth_secret_name": {
        "title": "Auth String Secret",
        "description": "The Kubernetes Secret holding the Prefect API auth string (PREFECT_API_AUTH_STRING) the "
        "server requires.",
        "type": "string",
        "default": "splsm-prefect-auth",
    },
    "auth_secret_key": {
        "title": "Auth String Secret Key",
        "description": "The key in that Secret whose value is the auth string.",
        "type": "string",
        "default": "auth-string",
    },
    "tmp_size": {
        "title": "Scratch Size",
        "description": "Size limit of the scratch volume at /tmp (the root filesystem is read-only; HOME and the "
        "caches live there).",
        "type": "string",
        "default": "2Gi",
    },
    "shm_size": {
        "title": "Shared Memory Size",
        "description": "Size limit of /dev/shm (memory: it counts against the memory limit). Training on "
        "several GPUs wants more, e.g. 16Gi.",
        "type": "string",
        "default": "1Gi",
    },
}


def build(default: dict | None = None) -> dict:
    """The template: prefect-kubernetes' default (or ``default``) with the splsm settings added."""
    if default is None:
        from prefect_kubernetes.worker import KubernetesWorker

        default = KubernetesWorker.get_default_base_job_template()
    t = json.loads(json.dumps(default))
    v = t["variables"]
    v["description"] = (
        "Job variables of the splsm Kubernetes work pool (deploy/k8s/make_template.py): prefect-kubernetes' "
        "defaults, plus the splsm image, GPUs, the data volume claim, the auth-string secret and scratch sizes."
    )
    p = v["properties"]
    p["image"] |= {
        "default": "splsm:cpu",
        "description": "The splsm image the job runs: splsm:cpu (harvest, generate's client, build, evaluate, "
        "the demo) or splsm:train (train, on NVIDIA GPUs), as the cluster can pull it "
        "(e.g. registry.example.com/splsm:train).",
        "examples": ["splsm:cpu", "splsm:train"],
    }
    p["env"] |= {
        "default": dict.fromkeys(WITHHELD_ENV),
        "description": "Environment variables to set when starting a flow run. The worker passes its own "
        "Prefect settings to the job; those null here stay behind: "
        + ", ".join(WITHHELD_ENV)
        + " (the auth string comes from the Secret auth_secret_name names).",
    }
    p |= VARIABLES

    pod = t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pod["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,  # the claim's files writable by the image's user
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod["volumes"] = [
        {"name": "data", "persistentVolumeClaim": {"claimName": "{{ volume_claim }}"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "{{ tmp_size }}"}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "{{ shm_size }}"}},
    ]
    (c,) = pod["containers"]
    # the images' entrypoint is `splsm`: the worker's `prefect flow-run execute` (args) runs as it is
    c["command"] = ["/usr/bin/env"]
    # A list instead of {{ env }}: the worker puts the job's variables before these (a name given twice keeps
    # theirs), and a list can read the auth string from the Secret.
    c["env"] = [
        {
            "name": "PREFECT_API_AUTH_STRING",
            "valueFrom": {"secretKeyRef": {"name": "{{ auth_secret_name }}", "key": "{{ auth_secret_key }}"}},
        },
        {"name": "HOME", "value": "/tmp/home"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/cache"},
        {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
        {"name": "SPLSM_LINEAGE_DB", "value": "/data/lineage/lineage.duckdb"},
    ]
    c["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpus }}"
    c["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": 1000,
    }
    c["volumeMounts"] = [
        {"name": "data", "mountPath": "/data/work", "subPath": "work"},
        {"name": "data", "mountPath": "/data/lineage", "subPath": "lineage"},
        {"name": "data", "mountPath": "/data/corpora", "subPath": "corpora", "readOnly": True},
        {"name": "data", "mountPath": "/models", "subPath": "models", "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    return t


def render(t: dict) -> str:
    return json.dumps(t, indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render(build())
    if argv[1:] == ["--check"]:
        if OUT.read_text() != text:
            print(
                f"{OUT} is not what {Path(__file__).name} makes from the installed prefect-kubernetes; run it"
            )
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
