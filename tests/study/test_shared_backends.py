"""Tracking and search state a cluster can share: PostgreSQL for MLflow and Optuna, and an
authenticated MLflow server, each a real server on 127.0.0.1."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest

from study.services import ray_temp_dir
from tests.study.conftest import cli, mlflow_client, tracking_server, trial_runs, write_study
from tests.study.test_exactly_once import kill_driver_then_resume

pytestmark = pytest.mark.slow


def _pg_url(pg: dict, db: str, driver: str = "postgresql") -> str:
    return f"{driver}://{pg['user']}@{pg['host']}:{pg['port']}/{db}"  # the password: PGPASSWORD only


def test_unreachable_or_refusing_storage_fails_before_any_work(tmp_path, postgres, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "not-the-password")
    path = write_study(tmp_path, name="pgwrong", storage=_pg_url(postgres, "optuna", "postgresql+psycopg"))
    t0 = time.monotonic()
    p = cli("study", "run", str(path), timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "storage: cannot connect to postgresql+psycopg://rank1@" in p.stderr
    assert "password authentication failed" in p.stderr and "not-the-password" not in p.stderr
    assert time.monotonic() - t0 < 60 and not (tmp_path / "home").exists()


def test_a_password_in_a_url_is_refused(tmp_path, capsys):
    """The first case in a real process, the others in-process, as `rank1 study run` checks a file."""
    from study.cli import main

    for i, (field, url) in enumerate((("storage", "postgresql://rank1:hunter2@db/optuna"),
                                      ("storage", "postgresql+psycopg://rank1@db/optuna?sslmode=require&password=hunter2"),
                                      ("tracking_uri", "http://admin:hunter2@mlflow:5000"))):
        path = str(write_study(tmp_path, name="leaky", **{field: url}))
        if i == 0:
            p = cli("study", "run", path, timeout=120)
            code, err = p.returncode, p.stderr
        else:
            code, err = main(["study", "run", path]), capsys.readouterr().err
        assert code == 2 and f"{field}: the URL carries a password" in err, err
        assert "hunter2" not in err


def _files_containing(root: Path, secret: bytes) -> list[str]:
    hits = []
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            try:
                if secret in f.read_bytes():
                    hits.append(str(f))
            except OSError:
                pass
    return hits


@pytest.mark.slow(seconds=140)
def test_an_authenticated_server_on_postgresql_keeps_exactly_once_through_a_driver_kill_and_no_secret(
        tmp_path, postgres, monkeypatch, capsys):
    """One study against what a cluster shares: an MLflow server with basic auth whose backend
    store is PostgreSQL, and Optuna's storage in PostgreSQL. Wrong or missing credentials are
    refused before anything starts; with the right ones the study's driver is SIGKILLed
    mid-trial and `study resume HOME` (told nothing) finds both stores again and loses and
    duplicates nothing; and neither secret is in anything it wrote or printed."""
    user, password = "rank1-admin", "pw-" + secrets.token_hex(16)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.setenv("PGPASSWORD", postgres["password"])
    server_home = tmp_path / "server"
    with tracking_server(server_home, "--auth", "--backend-store-uri",
                         _pg_url(postgres, "mlflow", "postgresql+psycopg"),
                         "--artifacts-destination", str(tmp_path / "shared-artifacts")) as url:
        # Wrong credentials: refused before anything starts.
        path = write_study(tmp_path, name="authwrong", tracking_uri=url, home=str(tmp_path / "wrong"))
        p = cli("study", "run", str(path), env={"MLFLOW_TRACKING_PASSWORD": "wrong-" + password}, timeout=120)
        assert p.returncode == 2, p.stdout + p.stderr
        assert "refused the credentials in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (HTTP 401)" in p.stderr
        assert password not in p.stdout + p.stderr  # not even the wrong one's tail
        assert not (tmp_path / "wrong").exists()
        # No credentials at all: the same, with a hint (in-process, as `rank1 study run` checks).
        from study.cli import main

        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "")
        capsys.readouterr()
        assert main(["study", "run", str(path)]) == 2
        err = capsys.readouterr().err
        assert "asks for credentials" in err, err
        assert not (tmp_path / "wrong").exists()
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

        # The right ones: the server named by MLflow's own variable (as on a cluster node whose
        # environment sets it) for the first driver only, the Optuna storage by a flag.
        printed = kill_driver_then_resume(tmp_path, "pgauth", flags={"storage": _pg_url(postgres, "optuna",
                                                                                          "postgresql+psycopg")},
                                          env={"MLFLOW_TRACKING_URI": url})
        # The runs are in PostgreSQL, not in a SQLite file somewhere (no embedded server).
        assert not (tmp_path / "home" / "mlflow.db").exists() and not (tmp_path / "home" / "optuna.db").exists()
        assert not (server_home / "mlflow.db").exists()
        with mlflow_client(tmp_path / "home", url) as (client, _):
            runs = trial_runs(client, "pgauth")
            everything = [client.get_run(r.info.run_id) for r in runs]
            everything += client.search_runs([runs[0].info.experiment_id], max_results=100)
            for r in everything:  # params, tags and metric names of every run
                text = repr((r.data.params, r.data.tags, list(r.data.metrics)))
                assert password not in text and user not in text.replace(f"mlflow.user': '{user}", "")
                assert postgres["password"] not in text
    import psycopg

    with psycopg.connect(host=postgres["host"], port=postgres["port"], user=postgres["user"],
                         password=postgres["password"], dbname="mlflow") as conn:
        n = conn.execute("SELECT count(*) FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
                         "WHERE e.name = 'pgauth'").fetchone()[0]
    assert n == 5  # one parent run and four trial runs
    # Neither secret is anywhere on disk: the study home (logs, Ray's session logs, checkpoints,
    # report), the server's folder (its log, artifacts, config) and what the drivers printed.
    import base64

    header = base64.b64encode(f"{user}:{password}".encode())  # as an Authorization header carries it
    for secret in (password, postgres["password"]):
        assert secret not in printed
    for secret in (password.encode(), header, postgres["password"].encode()):
        for root in (tmp_path / "home", ray_temp_dir(tmp_path / "home"), server_home, tmp_path / "shared-artifacts"):
            if root.exists():
                assert _files_containing(root, secret) == [], root


def test_rank1_server_refuses_bad_stores_before_starting(tmp_path, monkeypatch, capsys):
    """One case in a real process, the rest in-process as `rank1` parses and checks them."""
    from study.cli import main

    p = cli("server", "--home", str(tmp_path / "s"), "--backend-store-uri", "postgresql://rank1@127.0.0.1:1/mlflow",
            timeout=60)
    assert p.returncode == 2 and "--backend-store-uri: cannot connect to postgresql://rank1@127.0.0.1:1/mlflow" in p.stderr

    def refused(*argv: str) -> str:
        assert main(list(argv)) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        return err

    assert "--backend-store-uri: the URL carries a password" in refused(
        "server", "--home", str(tmp_path / "s"), "--backend-store-uri", "postgresql://rank1:pw@db/mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "")
    assert "--auth: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in refused(
        "server", "--home", str(tmp_path / "s"), "--auth")
    assert not (tmp_path / "s").exists()  # refused before anything was written
    import socket

    with socket.socket() as busy:  # a port someone else listens on: refused, not mistaken for ours
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert f"cannot listen on 127.0.0.1:{port}" in refused("server", "--home", str(tmp_path / "s"), "--port", port)
    for bad in ("inf", "nan", "-1"):
        assert f"--node-wait: {bad} is not allowed" in refused(
            "study", "run", str(write_study(tmp_path, name="w")), "--node-wait", bad)


def test_an_authenticated_server_trusts_a_checked_password_until_the_user_api_changes_it(tmp_path, monkeypatch):
    """`rank1 server --auth` keeps a verified credential for --auth-cache seconds (MLflow checks a
    password against its hash on every request otherwise): a password changed or a user deleted
    through MLflow's API is refused at once all the same, and a wrong password is never trusted."""
    import base64
    import json
    import urllib.error
    import urllib.request

    admin, admin_pw = "rank1-admin", "pw-" + secrets.token_hex(16)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_pw)

    def call(url: str, user: str, password: str, path: str = "experiments/search?max_results=1",
             method: str = "GET", body: dict | None = None) -> int:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    home = tmp_path / "server"
    with tracking_server(home, "--auth") as url:
        assert "auth_cache_ttl_seconds = 60\n" in (home / "basic_auth.ini").read_text()
        assert call(url, admin, admin_pw) == 200 and call(url, admin, admin_pw) == 200  # the second from the cache
        assert call(url, admin, "wrong-" + admin_pw) == 401 and call(url, admin, "wrong-" + admin_pw) == 401
        old, new = "old-" + secrets.token_hex(8), "new-" + secrets.token_hex(8)
        assert call(url, admin, admin_pw, "users/create", "POST", {"username": "alice", "password": old}) == 200
        assert call(url, "alice", old) == 200  # checked once, now trusted
        assert call(url, admin, admin_pw, "users/update-password", "PATCH", {"username": "alice", "password": new}) == 200
        assert call(url, "alice", old) == 401 and call(url, "alice", new) == 200  # at once, not after 60 s
        assert call(url, admin, admin_pw, "users/delete", "DELETE", {"username": "alice"}) == 200
        assert call(url, "alice", new) == 401
