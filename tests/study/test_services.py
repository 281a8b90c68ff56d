"""The embedded MLflow server's start and stop: its port is chosen where other processes do not
take ports unasked, a server launched early that loses its port anyway is replaced, and the
launched server's exit is left to overlap Ray's shutdown; a new home's store starts as a copy of
an empty, migrated one. And the local Ray instance: Ray's token authentication, asked for by name."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

import pytest

from study.runs import tracking
from study.services import (
    MlflowServer,
    _ephemeral_range,
    _usable_store,
    empty_store_template,
    free_port,
    local_ray_env,
)

pytestmark = pytest.mark.slow


def test_free_ports_lie_outside_the_kernels_ephemeral_range():
    lo, hi = _ephemeral_range()
    ports = {free_port() for _ in range(20)}
    assert all(not lo <= p <= hi and p >= 20000 for p in ports), (lo, hi, sorted(ports))
    with socket.socket() as s:  # and they are free: each can be bound
        s.bind(("127.0.0.1", ports.pop()))


def test_an_early_server_that_lost_its_port_is_replaced(tmp_path):
    """What Ray's start once did to the early-launched server: another process binds its port
    before it does. The server exits; ``tracking`` starts a fresh one on another port."""
    early = MlflowServer(tmp_path).launch()  # takes seconds to bind: the test gets there first
    thief = socket.socket()
    thief.bind(("127.0.0.1", early.port))
    thief.listen()
    try:
        cfg = types.SimpleNamespace(tracking_uri=None, home_path=tmp_path)
        with tracking(cfg, server=early) as uri:
            assert early.proc.poll() is not None  # the early one gave up
            assert uri != early.url
            with urllib.request.urlopen(uri + "/health", timeout=10) as r:
                assert r.status == 200
        with pytest.raises(OSError):  # the one tracking started itself, it stopped and waited for
            urllib.request.urlopen(uri + "/health", timeout=5)
    finally:
        thief.close()


def test_the_launched_server_is_signalled_at_the_end_and_its_launcher_waits(tmp_path):
    early = MlflowServer(tmp_path).launch()
    cfg = types.SimpleNamespace(tracking_uri=None, home_path=tmp_path)
    with tracking(cfg, server=early) as uri:
        assert uri == early.url and (tmp_path / "mlflow-server.json").exists()
    # Signalled, not waited for (the driver shuts Ray down meanwhile): it exits on the signal alone
    assert early.proc.returncode is None and not (tmp_path / "mlflow-server.json").exists()
    assert early.proc.wait(timeout=30) is not None
    early.stop()  # what the driver calls after Ray's shutdown: nothing left to do
    with pytest.raises(OSError):
        urllib.request.urlopen(uri + "/health", timeout=5)


@pytest.mark.slow(seconds=20)
def test_a_new_home_starts_from_a_copy_of_the_first_new_store(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("RANK1_MLFLOW_CACHE", str(tmp_path / "cache"))
    template = empty_store_template()
    first = MlflowServer(tmp_path / "a").start()  # migrates a store of its own, then keeps a copy of it
    first.stop()
    assert _usable_store(template)
    second = MlflowServer(tmp_path / "b").launch()
    assert (tmp_path / "b" / "mlflow.db").is_file()  # copied before its server started
    second.ready()
    try:
        client = MlflowClient(second.url)
        assert [e.name for e in client.search_experiments()] == ["Default"]  # nothing of the first home's
        run = client.create_run(client.create_experiment("x"))
        client.log_metric(run.info.run_id, "m", 1.5)
        assert client.get_run(run.info.run_id).data.metrics == {"m": 1.5}
    finally:
        second.stop()
    # A broken template is not copied: the next new store is migrated afresh and replaces it
    template.write_bytes(b"not a database")
    assert not _usable_store(template)
    third = MlflowServer(tmp_path / "c").start()
    third.stop()
    assert _usable_store(template)
    # Stores elsewhere (a given backend, or a home that has one) are left alone
    assert MlflowServer(tmp_path / "d", backend_store_uri="sqlite:///" + str(tmp_path / "own.db"))._prepare_store() is False
    assert not (tmp_path / "d" / "mlflow.db").exists()
    before = (tmp_path / "b" / "mlflow.db").read_bytes()
    assert MlflowServer(tmp_path / "b")._prepare_store() is False and (tmp_path / "b" / "mlflow.db").read_bytes() == before


def test_a_local_ray_instance_keeps_rays_token_auth_without_saying_how_to_opt_out(tmp_path):
    """Ray turns token authentication on for a new local instance and prints how to opt out on the
    first line of every study; the study asks for it by name instead: a fresh process, a fresh HOME
    (as a new user's), the instance authenticates by token (its workers inherit the mode; the token
    is made in ~/.ray), nothing is printed about it, and the environment is as it was after."""
    assert local_ray_env(None, {}, {}) == {"RAY_AUTH_MODE": "token"}
    # A cluster, or Ray imported already in this process (it read the mode then): nothing added.
    assert local_ray_env("10.0.0.1:6379", {}, {}) == {} == local_ray_env(None, {"RAY_ADDRESS": "auto"}, {})
    assert local_ray_env(None, {}, {"ray": sys}) == {}
    code = (
        "import os, sys\nfrom pathlib import Path\nfrom study.services import start_ray\n"
        "with start_ray(Path(sys.argv[1]), num_cpus=1):\n"
        "    import ray\n    from ray._raylet import AuthenticationMode, get_authentication_mode\n"
        "    print(get_authentication_mode() == AuthenticationMode.TOKEN)\n"
        "    print(ray.get(ray.remote(lambda: os.environ.get('RAY_AUTH_MODE')).remote()))\n"
        "print(os.environ.get('RAY_AUTH_MODE'))\n")
    user = tmp_path / "user"
    user.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "h")], capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).resolve().parents[2], env={**env, "HOME": str(user)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["True", "token", "None"], p.stdout + p.stderr[-3000:]
    assert "Token authentication" not in p.stdout + p.stderr
    assert (user / ".ray" / "auth_token").is_file()
