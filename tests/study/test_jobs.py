"""Studies as Ray Jobs against a real head started with `ray start --head` on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.study.conftest import MARK, cli, stop_marked, write_study

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """A one-node Ray cluster with its dashboard (the Jobs API) on loopback."""
    bin_dir = str(Path(sys.executable).parent)
    mark = f"jobs-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), MARK: mark}
    dash, gcs = _port(), _port()
    tmp = f"/tmp/r1j-{uuid.uuid4().hex[:8]}"
    subprocess.run([os.path.join(bin_dir, "ray"), "start", "--head", "--port", str(gcs), "--dashboard-host",
                    "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2", "--temp-dir", tmp,
                    # its own agent port: the default (52365) is taken when another Ray runs on this machine
                    "--dashboard-agent-listen-port", str(_port()),
                    "--include-dashboard", "true"], check=True, env=env, capture_output=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        yield url, env
    finally:
        stop_marked(mark)  # this cluster's processes only (`ray stop` would stop every Ray on the machine)


@pytest.mark.slow(seconds=35)
def test_submit_wait_jobs_logs(tmp_path, head):
    url, env = head
    path = write_study(tmp_path, name="jobsmoke", train={"measure_latency": False})
    p = cli("study", "submit", str(path), "--address", url, "--wait", env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    job_id = p.stdout.split("submitted job ", 1)[1].split()[0]
    assert f"job {job_id}: SUCCEEDED" in p.stdout and "study jobsmoke: 4 finished" in p.stdout
    assert (tmp_path / "home" / "outcome.json").exists()
    # the job ran the study as submitted: no report asked for, none built
    assert "report: not built (asked not to)" in p.stdout and not (tmp_path / "home" / "report").exists()
    jobs = cli("study", "jobs", "--address", url, env=env)
    assert jobs.returncode == 0 and job_id in jobs.stdout and "SUCCEEDED" in jobs.stdout
    assert "--no-report" in jobs.stdout
    logs = cli("study", "logs", job_id, "--address", url, env=env)
    assert logs.returncode == 0 and "models:/jobsmoke-decomposed@champion" in logs.stdout


@pytest.mark.slow(seconds=17)
def test_stop_a_running_job(tmp_path, head):
    url, env = head
    path = write_study(tmp_path, name="jobstop", train={"epochs": 20, "width": 16, "measure_latency": False})
    p = cli("study", "submit", str(path), "--address", url, env=env)
    assert p.returncode == 0, p.stderr
    job_id = p.stdout.split("submitted job ", 1)[1].split()[0]
    time.sleep(5)
    s = cli("study", "stop", job_id, "--address", url, env=env)
    assert s.returncode == 0 and "stop requested" in s.stdout
    from study.jobs import client

    deadline = time.monotonic() + 120
    while str(client(url).get_job_status(job_id).value) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < deadline
        time.sleep(1)
    assert str(client(url).get_job_status(job_id).value) == "STOPPED"


def test_a_wrong_address_fails_fast(tmp_path, capsys):
    """In a real process; the other bad inputs of the jobs commands in-process (below)."""
    from study.cli import main

    path = write_study(tmp_path, name="nowhere")
    t0 = time.monotonic()
    p = cli("study", "submit", str(path), "--address", f"http://127.0.0.1:{_port()}", timeout=120)
    assert p.returncode == 2 and "cannot reach the Ray Jobs API" in p.stderr
    assert time.monotonic() - t0 < 60
    assert main(["study", "jobs", "--address", "127.0.0.1:8265"]) == 2
    assert "the head's dashboard URL" in capsys.readouterr().err


def test_a_bad_study_is_refused_before_submission(tmp_path, capsys):
    from study.cli import main

    path = write_study(tmp_path, name="badjob")
    data = yaml.safe_load(path.read_text())
    data["n_trials"] = 0
    path.write_text(yaml.safe_dump(data))
    assert main(["study", "submit", str(path), "--address", "http://127.0.0.1:9"]) == 2
    assert "n_trials: 0 must be >= 1" in capsys.readouterr().err
