"""A study on a real multi-node Ray cluster on this machine: a head and a worker node, each
started with ``ray start`` as on a real cluster, the worker on its own loopback address
(127.0.0.2) as if on another host, a shared tracking server and trial storage."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from study.names import final_metric
from study.services import free_port
from tests.study.conftest import (
    MARK,
    cli,
    mlflow_client,
    stop_marked,
    tracking_server,
    trial_runs,
    write_study,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of 1 CPU each (a head and a worker), token auth on, as `ray start` sets it."""
    bin_dir = str(Path(sys.executable).parent)
    ray = os.path.join(bin_dir, "ray")
    mark = f"multinode-{uuid.uuid4().hex[:8]}"
    gcs, tmp = free_port(), f"/tmp/r1m-{uuid.uuid4().hex[:8]}"
    # The cluster's own token, in a file of its own: a fresh machine has no ~/.ray/auth_token
    # (there `ray start` with token auth refuses to start), and the user's must not be touched.
    token = Path(tmp + "-auth-token")
    token.write_text(secrets.token_hex(32) + "\n")
    token.chmod(0o600)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token), MARK: mark}
    subprocess.run([ray, "start", "--head", "--port", str(gcs), "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", tmp,
                    "--include-dashboard", "false"], check=True, env=env, capture_output=True)
    try:
        subprocess.run([ray, "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "1", "--num-gpus", "0",
                        "--node-ip-address", "127.0.0.2"], check=True, env=env, capture_output=True)
        address = f"127.0.0.1:{gcs}"
        nodes = subprocess.run(
            [sys.executable, "-c", f"import json, ray; ray.init(address={address!r}, log_to_driver=False); "
             "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))"],
            env=env, capture_output=True, text=True, check=True)
        node_ids = json.loads(nodes.stdout.strip().splitlines()[-1])
        assert len(node_ids) == 2, nodes.stdout + nodes.stderr
        yield address, env, set(node_ids)
    finally:
        stop_marked(mark)  # this cluster's processes only (`ray stop` would stop every Ray on the machine)
        token.unlink(missing_ok=True)


@pytest.mark.slow(seconds=40)
def test_trials_run_on_more_than_one_node(tmp_path, cluster):
    address, env, node_ids = cluster
    with tracking_server(tmp_path / "server") as url:
        local = write_study(tmp_path, name="localckpt", tracking_uri=url, home=str(tmp_path / "h0"))
        p = cli("study", "run", str(local), "--address", address, env=env, timeout=180)
        assert p.returncode == 2 and "storage_path: unset" in p.stderr and "127.0.0.2" in p.stderr, p.stderr
        path = write_study(tmp_path, name="twonodes", tracking_uri=url, storage_path=str(tmp_path / "shared"),
                           train={"measure_latency": False})
        p = cli("study", "run", str(path), "--address", address, env=env)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        with mlflow_client(tmp_path / "home", url) as (client, _):
            runs = trial_runs(client, "twonodes")
            assert len(runs) == 4 and all(r.data.tags["rank1.status"] == "finished" for r in runs)
            used = {r.data.tags["rank1.node_id"] for r in runs}
            assert used <= node_ids and len(used) == 2, (used, node_ids)  # both nodes ran trials
            assert all(final_metric("rank1.decomposed_val_acc") in r.data.metrics for r in runs)
    assert list((tmp_path / "shared" / "tune").glob("*/checkpoint_*")), "trial checkpoints in the shared storage"


def test_stores_other_hosts_cannot_reach_are_refused_before_any_work(tmp_path, cluster):
    address, env, _ = cluster
    path = write_study(tmp_path, name="unreachable")  # embedded MLflow on 127.0.0.1, checkpoints in the home
    p = cli("study", "run", str(path), "--address", address, env=env, timeout=180)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "tracking_uri: unset" in p.stderr and "(127.0.0.2) cannot reach" in p.stderr
    assert not (tmp_path / "home" / "study.yaml").exists()
    path = write_study(tmp_path, name="unreachable2", tracking_uri="http://127.0.0.1:1", home=str(tmp_path / "h2"))
    p = cli("study", "run", str(path), "--address", address, env=env, timeout=180)
    assert p.returncode == 2 and "cannot reach the MLflow server at http://127.0.0.1:1" in p.stderr, p.stderr


def test_a_trial_no_node_can_fit_fails_instead_of_waiting_forever(tmp_path, cluster):
    address, env, _ = cluster
    path = write_study(tmp_path, name="nogpu", resources={"cpu": 1, "gpu": 1}, storage_path=str(tmp_path / "shared"))
    with tracking_server(tmp_path / "server") as url:
        p = cli("study", "run", str(path), "--address", address, "--node-wait", "3", "--tracking-uri", url,
                env=env, timeout=180)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "waiting up to 3 s for a node with 1 CPU and 1 GPU" in p.stdout
    assert "could not ask the autoscaler" not in p.stdout  # the ask went to the cluster
    assert "resources: no node with 1 CPU and 1 GPU for a trial joined this Ray cluster within 3 s" in p.stderr
    assert "(cluster now: 2 CPU, 0 GPU)" in p.stderr and not (tmp_path / "home" / "study.yaml").exists()


@pytest.mark.slow(seconds=27)
def test_a_cluster_that_wants_a_token_says_so(tmp_path, cluster):
    address, env, _ = cluster
    path = write_study(tmp_path, name="notoken")
    p = cli("study", "run", str(path), "--address", address, env={**env, "RAY_AUTH_MODE": "disabled"}, timeout=180)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "wants its auth token: set RAY_AUTH_MODE=token" in p.stderr
