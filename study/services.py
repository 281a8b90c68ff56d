"""The services a study runs on: an MLflow tracking server and a Ray instance.

On one machine both are embedded: an MLflow server on 127.0.0.1 over SQLite in the
study home (trials always log through a server, never into the SQLite file: many
writers lock it up, and on a cluster the workers cannot see it), and a local Ray
instance whose temp dir lives under the study home. On a cluster the study file
names a tracking URL and the CLI an ``--address``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rank1.config import ConfigError

__all__ = [
    "AUTH_CACHE_S",
    "DRIVER_ENV",
    "QUIET_ENV",
    "MlflowServer",
    "ProcessLedger",
    "check_storage",
    "check_tracking_uri",
    "driver_env",
    "free_port",
    "local_ray_env",
    "ray_temp_dir",
    "scoped_env",
    "start_ray",
]


# Progress bars and links that MLflow and Tune print for every call drown the study's
# own table; trial output still lands in Ray's logs under the study home.
QUIET_ENV = {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
}


def quiet() -> None:
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


# What the driver's Tune runs with while a study runs, unless the user's environment says otherwise.
# Tune's default loggers would write every result of every trial again in the driver, three times
# (result.json, progress.csv, TensorBoard events: ~400 numbers per trial's final result), and sync
# them to the trial storage: CPU taken from the trials. Off, but for the JSON one, which the
# study adds back itself (Tune reads its results from it at the end of a fit: study.tuning).
# TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0 turns the others back on. And of every checkpoint Tune keeps
# (all of them: study.tuning._run_config) only its path goes in the experiment state, not a copy
# of its metrics (the latest one's are kept in full: Tune restores a trial's iteration from them).
DRIVER_ENV = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE": "1"}


@contextlib.contextmanager
def scoped_env(values: dict[str, str]) -> Iterator[None]:
    """``values`` in the environment for a block, where it does not say otherwise already;
    afterwards (a notebook's process goes on) the environment is as it was."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def driver_env() -> contextlib.AbstractContextManager[None]:
    """:data:`DRIVER_ENV` for the study's duration."""
    return scoped_env(DRIVER_ENV)


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out to a bind on port 0 (Linux: ip_local_port_range)."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):  # not Linux: Linux's default, below the others' (49152-65535)
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, taken from outside the kernel's ephemeral range where it can.

    Between this check and the server's own bind, a port of the ephemeral range can go to any
    process that binds port 0 (Ray's start opens a dozen listeners that way: a clean-clone test
    run once lost the MLflow server's port to one). Ports below that range and above Ray's
    worker ports (10002-19999) are only taken by those who ask for them by number. Where there
    is no such room (a range starting below 20100), the kernel's choice.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    below = range(20000, min(_ephemeral_range()[0], 32768))  # below Linux's range, and macOS's (49152-)
    rng = random.Random()
    for _ in range(50 if len(below) > 100 else 0):
        port = rng.choice(below)
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(family) as s:  # nothing outside is free (or there is no outside): the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the server goes when the driver goes, even on SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setsid()


def _auth_header() -> dict[str, str]:
    """Basic auth from the environment (MLflow's own variables); never from files or config."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        import base64

        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast when a tracking server cannot be reached or refuses our credentials."""
    if not uri.startswith(("http://", "https://")):
        raise ConfigError(f"tracking_uri: {uri!r} is not allowed (allowed: an http(s):// MLflow server URL, or unset)")
    try:
        with urllib.request.urlopen(urllib.request.Request(uri.rstrip("/") + "/health"), timeout=timeout) as r:
            if r.status != 200:
                raise ConfigError(f"tracking_uri: {uri} answered /health with HTTP {r.status}")
    except urllib.error.URLError as e:
        raise ConfigError(f"tracking_uri: cannot reach the MLflow server at {uri} ({getattr(e, 'reason', e)})") from None
    except OSError as e:
        raise ConfigError(f"tracking_uri: cannot reach the MLflow server at {uri} ({e})") from None
    # /health is open even on an authenticated server: check an API call too.
    req = urllib.request.Request(
        uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1", headers=_auth_header()
    )
    try:
        urllib.request.urlopen(req, timeout=timeout).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            what = "refused the credentials in" if _auth_header() else "asks for credentials: set"
            raise ConfigError(
                f"tracking_uri: the MLflow server at {uri} {what} MLFLOW_TRACKING_USERNAME and "
                f"MLFLOW_TRACKING_PASSWORD (HTTP {e.code})"
            ) from None
        raise ConfigError(f"tracking_uri: the MLflow server at {uri} answered HTTP {e.code}") from None
    except OSError as e:
        raise ConfigError(f"tracking_uri: cannot reach the MLflow server at {uri} ({e})") from None


def check_storage(url: str, field: str = "storage", timeout: int = 5) -> None:
    """Fail fast on a database URL that is malformed, lacks its driver, or cannot be reached.

    SQLite files are created on first use; a server database (PostgreSQL, MySQL) is
    connected to once, with credentials from the environment (``PGPASSWORD``, ``~/.pgpass``).
    """
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception as e:  # sqlalchemy's own error types vary by version
        raise ConfigError(f"{field}: {url!r} is not a database URL ({e})") from None
    if parsed.get_backend_name() == "sqlite":
        return
    import sqlalchemy

    shown = parsed.render_as_string(hide_password=True)
    args = {"connect_timeout": timeout} if parsed.get_backend_name() in ("postgresql", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(parsed, connect_args=args)
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as e:
        raise ConfigError(
            f"{field}: no database driver for {shown} ({e}); install it with pip install 'rank1-study[cluster]'"
        ) from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as e:
        reason = (str(getattr(e, "orig", e)).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{field}: cannot connect to {shown} ({reason})") from None
    finally:
        engine.dispose()


def empty_store_template() -> Path:
    """Where a new, already migrated MLflow store of the installed MLflow version is kept
    (``$RANK1_MLFLOW_CACHE``, else ``~/.cache/rank1/mlflow``): a server over a new study home
    starts from a copy of it instead of creating MLflow's ~65 tables (0.9 s of the server's
    5.5 s start-up on 2 cores, the longest wait of a study's start: Ray's takes ~3 s)."""
    from importlib.metadata import version

    env = os.environ.get("RANK1_MLFLOW_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "rank1" / "mlflow") / f"empty-{version('mlflow')}.db"


def _usable_store(path: Path) -> bool:
    """An intact SQLite file with MLflow's schema version in it."""
    if not path.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)) as db:
            return (db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
                    and db.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1)
    except sqlite3.Error:
        return False


AUTH_CACHE_S = 60  # how long `rank1 server --auth` trusts a checked password unless told (MlflowServer)


@dataclass
class MlflowServer:
    """An MLflow tracking server: by default over SQLite and an artifact folder in ``home``.

    ``backend_store_uri`` / ``artifacts_destination`` point it elsewhere (PostgreSQL, a
    shared or cloud store). ``auth=True`` runs MLflow's basic-auth app: the admin user is
    ``$MLFLOW_TRACKING_USERNAME`` with ``$MLFLOW_TRACKING_PASSWORD``, handed to the server
    through its environment only, never through a file, a flag or a log line. A verified
    credential is trusted for ``auth_cache_s`` seconds (MLflow's ``auth_cache_ttl_seconds``):
    MLflow checks a password against its hash, ~0.23 s of CPU, on every request otherwise
    (a trial makes dozens). The server runs one worker, so a password changed, an admin flag
    or a user deleted through MLflow's API takes effect at once; a change made in the user
    store's database directly, within ``auth_cache_s``. 0: check every request.
    """

    home: Path
    host: str = "127.0.0.1"
    port: int = 0
    backend_store_uri: str | None = None
    artifacts_destination: str | None = None
    auth: bool = False
    auth_db_uri: str | None = None
    auth_cache_s: int = AUTH_CACHE_S
    proc: subprocess.Popen | None = None
    _signalled: bool = field(default=False, init=False, repr=False)  # stop(wait=False) sent SIGTERM
    _make_template: bool = field(default=False, init=False, repr=False)  # keep its new store as the template

    @property
    def url(self) -> str:
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '::') else self.host}:{self.port}"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_store_uri or f"sqlite:///{self.home / 'mlflow.db'}",
            "--artifacts-destination", self.artifacts_destination or str(self.home / "mlartifacts"),
            "--host", self.host, "--port", str(self.port), "--workers", "1",
        ]
        # No background job runner: it forks half a dozen workers that a study never uses.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if self.auth:
            user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
            if not (user and password):
                raise ConfigError(
                    "--auth: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment "
                    "(the server's admin user; clients use the same variables)"
                )
            ini = self.home / "basic_auth.ini"  # no secret in it: the admin comes from the environment
            db = self.auth_db_uri or "sqlite:///" + str(self.home / "basic_auth.db")
            if "\n" in db or "\r" in db:
                raise ConfigError("--auth-db-uri: a line break is not allowed in a database URL")
            ini.write_text(
                "[mlflow]\n"
                "default_permission = NO_PERMISSIONS\n"
                f"database_uri = {db.replace('%', '%%')}\n"  # configparser interpolates '%'

                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                "grant_default_workspace_access = false\n"
                f"auth_cache_ttl_seconds = {int(self.auth_cache_s)}\n"
            )
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_USERNAME=user,
                       MLFLOW_AUTH_ADMIN_PASSWORD=password)
            # The UI's CSRF key: one per start unless given (several servers behind one name share one).
            env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
            cmd += ["--app-name", "basic-auth"]
        return cmd, env

    def _reason(self) -> str:
        """The last exception line of the server's log, if any."""
        try:
            lines = (self.home / "mlflow-server.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception): ", ln)]
        return f" ({errors[-1][:300]})" if errors else ""

    def start(self, timeout: float = 120.0) -> MlflowServer:
        """Start the server and wait until it answers."""
        return self.launch().ready(timeout)

    def launch(self) -> MlflowServer:
        """Start the server's process without waiting for it (its start-up, ~7 s on 2 cores,
        then overlaps whatever the caller does next); :meth:`ready` waits."""
        self.home.mkdir(parents=True, exist_ok=True)
        if self.port:  # a server already there would answer /health for us: refuse instead
            try:
                with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as s:
                    s.bind((self.host, self.port))
            except OSError as e:
                raise RuntimeError(f"cannot listen on {self.host}:{self.port} ({e.strerror}); "
                                   "another server has it: choose another --port") from None
        self.port = self.port or free_port(self.host)
        self._make_template = self._prepare_store()
        cmd, env = self._command()
        log = open(self.home / "mlflow-server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                     cwd=self.home, env=env)
        self._signalled = False
        return self

    def _prepare_store(self) -> bool:
        """Give a new home's store (the embedded server's own SQLite and artifact folder, no
        auth) a copy of the template, if there is an intact one. True when the server will
        migrate a new store of its own instead: kept as the template once the server is up.
        A given backend, ``--auth`` or a home that has a store is left as it is (False)."""
        db = self.home / "mlflow.db"
        if self.backend_store_uri or self.artifacts_destination or self.auth or db.exists():
            return False
        template = empty_store_template()
        if not _usable_store(template):
            template.unlink(missing_ok=True)
            return True
        tmp = db.with_name(f".mlflow.db.{os.getpid()}")
        try:
            shutil.copyfile(template, tmp)
            os.replace(tmp, db)
        except OSError:
            tmp.unlink(missing_ok=True)
            return True
        return False

    def _keep_template(self) -> None:
        """The store of a server that came up over a new home, as the template for the next:
        a consistent snapshot (SQLite's backup API), written atomically."""
        template = empty_store_template()
        tmp = template.with_name(f".{template.name}.{os.getpid()}")
        try:
            template.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.closing(sqlite3.connect(self.home / "mlflow.db")) as src, \
                    contextlib.closing(sqlite3.connect(tmp)) as dst:
                src.backup(dst)
            os.replace(tmp, template)
        except (OSError, sqlite3.Error):  # a cache: a study never fails for want of it
            tmp.unlink(missing_ok=True)

    def ready(self, timeout: float = 120.0) -> MlflowServer:
        """Wait until the launched server answers ``/health``; a server that exits or stays
        silent for ``timeout`` seconds is stopped and is an error naming its log."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the MLflow server exited with code {self.proc.returncode}{self._reason()}; "
                                   f"see {self.home / 'mlflow-server.log'}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200 and self.proc.poll() is None:
                        if self._make_template:
                            self._keep_template()
                            self._make_template = False
                        (self.home / "mlflow-server.json").write_text(
                            json.dumps({"url": self.url, "pid": self.proc.pid}))
                        return self
            except (OSError, http.client.HTTPException):  # not up yet (or not an HTTP server answering)
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the MLflow server did not start within {timeout:.0f} s; see {self.home / 'mlflow-server.log'}")

    def stop(self, wait: bool = True) -> None:
        """SIGTERM the server and wait until it is gone (SIGKILL after 15 s). ``wait=False``:
        only the signal, and the next ``stop()`` waits: a study signals its server before Ray
        shuts down, so that the two exits (about a second each) overlap."""
        if self.proc is not None and self.proc.poll() is None:
            if not self._signalled:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                self._signalled = True
            if wait:
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
        with contextlib.suppress(FileNotFoundError):
            (self.home / "mlflow-server.json").unlink()

    def wait(self) -> None:
        if self.proc is not None:
            self.proc.wait()


def ray_temp_dir(home: Path) -> Path:
    """Ray's temp dir: under the study home when the path is short enough for Ray's
    Unix sockets (their paths are limited to ~107 bytes), else a short one in /tmp."""
    candidate = home / ".ray"
    if len(str(candidate)) <= 40:
        return candidate
    return Path("/tmp") / f"rank1-ray-{hashlib.sha1(str(home).encode()).hexdigest()[:10]}"


# Ray (2.60) turns its token authentication on for every new local instance and says so, with how
# to opt out, on the first line a study prints ("Token authentication is enabled for this Ray
# cluster. Set RAY_AUTH_MODE=disabled to opt out ..."). Asked for by name, the instance is the same
# (token authentication; a token in ~/.ray/auth_token, made where there is none) and nothing is
# printed. Ray reads the mode once, when it is imported (set after that, the local instance's GCS
# never came up): so only where Ray is not imported yet; a user's RAY_AUTH_MODE wins, and a
# connection to a cluster (an address, RAY_ADDRESS) is left as the cluster wants it.
LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "token"}


def local_ray_env(address: str | None, environ=os.environ, modules=sys.modules) -> dict[str, str]:
    """What :func:`start_ray` adds to the environment for a local instance (:data:`LOCAL_RAY_ENV`),
    or nothing: a cluster, or Ray already imported in this process."""
    if address or environ.get("RAY_ADDRESS") or "ray" in modules:
        return {}
    return dict(LOCAL_RAY_ENV)


@contextlib.contextmanager
def start_ray(home: Path, address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """A local Ray instance (temp dir under the study home) or a connection to ``address``."""
    with scoped_env(local_ray_env(address)), _start_ray(home, address, num_cpus):
        yield


@contextlib.contextmanager
def _start_ray(home: Path, address: str | None, num_cpus: int | None) -> Iterator[None]:
    import ray

    runtime_env = {"env_vars": {k: v for k, v in QUIET_ENV.items()}}
    if address == "auto" and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]  # inside a Ray Job: the cluster that runs it, not a guess
    if address:
        try:
            ray.init(address=address, configure_logging=False, log_to_driver=False, runtime_env=runtime_env)
        except (ConnectionError, RuntimeError) as e:
            chain = f"{e} {e.__cause__}"
            if "InvalidAuthToken" in chain or "Authentication" in chain:
                raise ConfigError(
                    f"--address: the Ray cluster at {address} wants its auth token: set RAY_AUTH_MODE=token and "
                    "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token) in the environment"
                ) from None
            raise ConfigError(f"--address: cannot connect to the Ray cluster at {address} ({e})") from None
        try:
            yield
        finally:
            ray.shutdown()
        return
    tmp = ray_temp_dir(home)
    tmp.mkdir(parents=True, exist_ok=True)
    ledger = ProcessLedger(tmp / "processes.json")
    reaped = ledger.reap()  # what a killed driver of this home left running
    if reaped:
        print(f"note: stopped {reaped} process(es) an earlier, killed run of this study left behind", flush=True)
    ledger.watch()
    try:
        # No workers started ahead for the driver: Tune never ran a trial in them (a Tune run of two
        # trials and the smoke study each started new workers for their trials), so on 2 cores the
        # two Ray starts sat idle all study, their start (~0.5 s of CPU each) taken from the driver's.
        # Without them the smoke study's start-up was 0.6 s shorter by the medians (6 runs each way,
        # alternating; every pair shorter, by 0.1-0.9 s), its whole run not measurably.
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=str(tmp),
                 configure_logging=False, log_to_driver=False, runtime_env=runtime_env,
                 _system_config={"prestart_worker_first_driver": False})
        yield
    finally:
        ray.shutdown()
        ledger.stop()  # Ray's agents outlive ray.shutdown(): whatever this study started goes now


class ProcessLedger:
    """Every process a study's driver started (Ray's GCS, raylet, agents and workers, the MLflow
    server), recorded in a file while the study runs, so that none outlives it.

    A thread records the driver's descendants every second. At the end (a finished study,
    Ctrl-C, an exception) they are stopped: SIGTERM, then SIGKILL after a grace period. A
    driver killed outright cannot do that: the next ``run`` or ``resume`` of the same home
    reads the file and stops what is still running — each process matched by its pid *and*
    its start time, so a recycled pid is never touched.
    """

    def __init__(self, path: Path, interval_s: float = 1.0) -> None:
        self.path, self.interval_s = path, interval_s
        self._known: dict[int, float] = {}
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._since = float("inf")

    def _snapshot(self) -> None:
        import psutil

        me = psutil.Process()
        try:
            before = len(self._known)
            for p in me.children(recursive=True):
                if p.pid in self._known:  # its start time is read once
                    continue
                with contextlib.suppress(psutil.Error):
                    started = p.create_time()
                    if started >= self._since:  # only what the study started, not a caller's own children
                        self._known[p.pid] = started
            if len(self._known) == before and self.path.exists():  # nothing new to write down
                return
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"driver": [me.pid, me.create_time()],
                                       "processes": [[p, t] for p, t in self._known.items()]}))
            tmp.replace(self.path)
        except OSError:  # a full disk only costs the reaping of a later run
            pass

    def watch(self) -> None:
        self._since = time.time() - 0.5
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self._snapshot()

        self._thread = threading.Thread(target=loop, name="rank1-process-ledger", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 10.0) -> int:
        """Stop the watcher and every process it saw (and any descendant still running)."""
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=5)
        self._snapshot()
        n = _terminate(self._known, grace_s)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        return n

    def reap(self, grace_s: float = 10.0) -> int:
        """Stop the processes an earlier driver recorded, if it is gone; returns how many."""
        import psutil

        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return 0
        pid, started = data.get("driver", [-1, 0.0])
        with contextlib.suppress(psutil.Error):
            if pid != os.getpid() and abs(psutil.Process(pid).create_time() - started) < 1e-3:
                return 0  # the driver that started them still runs: they are not ours to stop
        n = _terminate({int(p): float(t) for p, t in data.get("processes", [])}, grace_s)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        return n


# Ray's node agents, by process title. Left behind by a killed driver (their raylet gone), they do
# not act on SIGTERM (Ray 2.60: both still running 15 s after it, where the trial workers, the MLflow
# server and Ray's other processes had stopped within 1.6 s), and they hold nothing of the study's:
# they get a moment, not the grace period (which every resume after a killed driver used to wait in
# full: 10 s).
DEAF_TO_SIGTERM = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _terminate(procs: dict[int, float], grace_s: float, deaf_s: float = 0.5) -> int:
    """SIGTERM the live processes among ``procs`` (pid -> start time) and their descendants, then
    SIGKILL whatever is left after ``grace_s`` (Ray's agents, :data:`DEAF_TO_SIGTERM`: once the
    others are gone, after ``deaf_s`` at most). Returns how many were still running."""
    import psutil

    live = []
    for pid, started in procs.items():
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if abs(p.create_time() - started) < 1e-3 and p.pid != os.getpid():
                live.append(p)
                live += [c for c in p.children(recursive=True) if c.pid != os.getpid()]
    live = list({p.pid: p for p in live}.values())
    deaf = set()
    for p in live:
        with contextlib.suppress(psutil.Error):
            if p.name() in DEAF_TO_SIGTERM or (p.cmdline() or [""])[0] in DEAF_TO_SIGTERM:
                deaf.add(p.pid)
            p.terminate()
    _, alive = psutil.wait_procs([p for p in live if p.pid not in deaf], timeout=grace_s)
    _, still = psutil.wait_procs([p for p in live if p.pid in deaf], timeout=deaf_s)
    for p in alive + still:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive + still, timeout=5)
    return len(live)
