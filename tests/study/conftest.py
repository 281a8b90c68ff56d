"""Helpers for the study tests: real processes, a real Ray, a real MLflow server."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def write_study(tmp_path: Path, name: str = "smoke", base: str = "smoke.yaml", **overrides) -> Path:
    """A copy of a shipped study file with overrides, its home under ``tmp_path``."""
    data = yaml.safe_load((REPO / "studies" / base).read_text())
    train = overrides.pop("train", {})
    data["train"].update(train)
    data.update(overrides)
    data["name"] = name
    data.setdefault("home", str(tmp_path / "home"))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def no_report(args) -> list[str]:
    """``study run``/``resume``/``submit`` ARGS with ``--no-report``: the study report's figures are
    seconds of CPU at every study's end, read only by the tests of the report (on the session's
    smoke study, ``tests/conftest.py``), so the other studies skip it."""
    args = list(args)
    return [*args, "--no-report"] if args[:2] in (["study", "run"], ["study", "resume"], ["study", "submit"]) else args


def cli(*args: str, timeout: float = 600, env: dict | None = None, report: bool = False) -> subprocess.CompletedProcess:
    """``rank1 ARGS`` in a fresh process, as a user runs it; a study run, resumed or submitted
    builds its report only with ``report`` (:func:`no_report`)."""
    return subprocess.run(
        [sys.executable, "-m", "study.cli", *(args if report else no_report(args))], capture_output=True, text=True,
        timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})},
    )


@contextlib.contextmanager
def mlflow_client(home: Path, uri: str | None = None, server: bool = False):
    """A client of the MLflow server at ``uri``; else, for reading a finished study back, of
    the home's own store (``mlflow.db``, what its embedded server wrote: MLflow's SQLAlchemy
    store, no server to start, seconds of CPU each); ``server``: a real server started over
    the home (for tests that write through its REST API)."""
    from mlflow import MlflowClient

    from study.services import MlflowServer

    if uri:
        yield MlflowClient(uri), uri
        return
    if not server:
        db = home / "mlflow.db"
        assert db.exists(), f"no MLflow store in {home}"
        uri = f"sqlite:///{db}"
        yield MlflowClient(uri, registry_uri=uri), uri
        return
    server = MlflowServer(home).start()
    try:
        yield MlflowClient(server.url), server.url
    finally:
        server.stop()


def trial_runs(client, name: str):
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], filter_string="tags.`rank1.role` = 'trial'", max_results=1000)


def optuna_trials(home: Path, name: str, storage: str | None = None):
    import optuna

    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{home / 'optuna.db'}").get_trials()


@pytest.fixture(autouse=True)
def _no_leftover_ray():
    yield
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass


def _missing(what: str) -> None:
    """A service the tests need is absent: a failure under CI (which installs it), else a skip."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} is not installed; `make test` installs it (make postgres)")
    pytest.skip(f"{what} is not installed (make postgres installs it)")


def _pg_bin(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return versions[-1] if versions else None


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on 127.0.0.1 with password auth (scram-sha-256) and two
    databases, ``mlflow`` and ``optuna``: ``dict(host, port, user, password)``.

    As root (CI), the server runs as the ``postgres`` user that Debian's package creates:
    PostgreSQL refuses to run as root.
    """
    import pwd
    import secrets
    import shutil
    import tempfile

    from study.services import free_port

    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        _missing("PostgreSQL (initdb, pg_ctl)")
    prefix: list[str] = []
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            _missing("the postgres user")
        prefix = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="rank1-pg-", dir="/tmp"))
    password, port = "pg-" + secrets.token_hex(12), free_port()
    data = root / "data"
    info = {"host": "127.0.0.1", "port": port, "user": "rank1", "password": password}
    try:
        (root / "pw").write_text(password + "\n")
        if prefix:
            for p in (root, root / "pw"):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        subprocess.run([*prefix, initdb, "-D", str(data), "-U", "rank1", "--pwfile", str(root / "pw"),
                        "-A", "scram-sha-256", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
                        "-o", f"-h 127.0.0.1 -p {port} -k {root} -F", "start"], check=True, capture_output=True)
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="rank1", password=password, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE mlflow")
            conn.execute("CREATE DATABASE optuna")
        yield info
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def tracking_server(home: Path, *args: str, env: dict | None = None):
    """``rank1 server --home HOME ARGS`` in its own process, as an admin starts one: its URL."""
    import time
    import urllib.request

    from study.services import free_port

    port = free_port()
    out = home.parent / f"{home.name}-server.out"
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    with open(out, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "study.cli", "server", "--home", str(home), "--port",
                                 str(port), *args], cwd=REPO, env={**os.environ, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, out.read_text()
                assert time.monotonic() < deadline, "the tracking server did not come up"
                try:
                    urllib.request.urlopen(url + "/health", timeout=2).close()
                    break
                except OSError:
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


MARK = "RANK1_TEST_PROCESS_MARK"  # set in the environment of what a test starts: every child inherits it


def marked(mark: str) -> list[str]:
    """The live processes carrying ``mark`` in their environment (zombies are gone already)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "name", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and p.environ().get(MARK) == mark:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            continue
    return out


def settle(mark: str, timeout: float = 30.0) -> list[str]:
    """What is still running with ``mark`` once shutdown had ``timeout`` seconds to happen."""
    import time

    deadline = time.monotonic() + timeout
    while (left := marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def stop_marked(mark: str, timeout: float = 2.0) -> None:
    """Stop the processes carrying ``mark`` (SIGTERM, then SIGKILL), and only those: never
    ``ray stop``, which stops every Ray instance of the user on the machine, theirs too."""
    import psutil

    from study.services import _terminate

    procs = {}
    for line in marked(mark):
        with contextlib.suppress(psutil.Error):
            pid = int(line.split()[0])
            procs[pid] = psutil.Process(pid).create_time()
    _terminate(procs, timeout)
