"""The KubeRay manifests: well-formed, the same entrypoint and study as `rank1 study submit`,
secrets only through Kubernetes secrets, trials only on GPU workers."""

from __future__ import annotations

import re
import shlex
from urllib.parse import urlsplit

import pytest
import yaml

from study.cli import build_parser, cmd_server, cmd_study_run
from study.config import load_study
from tests.study.conftest import REPO

K8S = REPO / "k8s"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _containers(doc: dict) -> list[dict]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            found.extend(node.get("containers", []))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return found


def _assert_secrets_by_reference(containers: list[dict]) -> None:
    for c in containers:
        for e in c.get("env", []):
            if any(w in e["name"] for w in ("PASSWORD", "TOKEN", "SECRET")):
                assert "value" not in e and e["valueFrom"]["secretKeyRef"]["name"], e
        for arg in c.get("command", []) + c.get("args", []):
            assert "://" not in arg or urlsplit(arg).password is None, arg


def test_rayjob_runs_the_study_entrypoint():
    (job,) = _docs("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "rank1"
    args = build_parser().parse_args(argv[1:])
    assert args.func is cmd_study_run and args.address == "auto"
    cfg = load_study(REPO / args.study, {"storage": args.storage, "storage_path": args.storage_path})
    assert cfg.storage == args.storage and cfg.storage_path == args.storage_path  # the flags reach the study
    assert cfg.resources.gpu > 0 and cfg.storage.startswith("postgresql+psycopg://rank1@rank1-postgres")


def test_rayjob_cluster_shape():
    (job,) = _docs("rayjob.yaml")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no trials on the head
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1 and cluster["enableInTreeAutoscaling"] is True
    (worker,) = _containers(gpu)
    assert worker["resources"]["limits"]["nvidia.com/gpu"] >= 1
    containers = _containers(cluster)
    assert len(containers) == 2 and len({c["image"] for c in containers}) == 1  # same code on head and workers
    mlflow_and_ray = {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_MODE",
                      "RAY_AUTH_TOKEN"}
    head = _containers(cluster["headGroupSpec"])[0]
    assert mlflow_and_ray | {"PGPASSWORD"} <= {e["name"] for e in head["env"]}  # the driver opens the Optuna storage
    assert mlflow_and_ray <= {e["name"] for e in worker["env"]} and "PGPASSWORD" not in {e["name"] for e in worker["env"]}
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in head["env"]  # the dashboard is reachable in the pod network
    _assert_secrets_by_reference(containers)


def test_tracking_server_manifest():
    deployment, service = _docs("tracking-server.yaml")
    assert deployment["kind"] == "Deployment" and service["kind"] == "Service"
    assert service["spec"]["type"] == "ClusterIP"  # not exposed outside the cluster
    (c,) = _containers(deployment)
    assert c["command"][0] == "rank1"
    args = build_parser().parse_args(c["command"][1:])
    assert args.func is cmd_server and args.auth and args.backend_store_uri.startswith("postgresql+psycopg://")
    assert service["spec"]["ports"][0]["targetPort"] == args.port == c["ports"][0]["containerPort"]
    _assert_secrets_by_reference([c])
    # The RayJob's pods reach it by the Service's name.
    (job,) = _docs("rayjob.yaml")
    uris = {e.get("value") for c in _containers(job) for e in c["env"] if e["name"] == "MLFLOW_TRACKING_URI"}
    assert uris == {f"http://{service['metadata']['name']}:{args.port}"}


def test_the_image_holds_every_package():
    include = re.search(r"\[tool\.setuptools\.packages\.find\]\ninclude = \[(.*)\]",
                        (REPO / "pyproject.toml").read_text()).group(1)
    text = (K8S / "Dockerfile").read_text()
    for pkg in re.findall(r'"(\w+)\*"', include) + ["studies"]:
        assert f"COPY --chown=ray:users {pkg} {pkg}" in text, pkg
    assert "'.[cluster]'" in text


@pytest.mark.parametrize("name", ["rayjob.yaml", "tracking-server.yaml"])
def test_no_literal_secret_anywhere(name):
    text = (K8S / name).read_text()
    assert "PASSWORD=" not in text.replace("--from-literal=MLFLOW_TRACKING_PASSWORD=...", "").replace(
        "--from-literal=PGPASSWORD=...", "")
