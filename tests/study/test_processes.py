"""Nothing a study starts outlives it: after a normal finish, Ctrl-C, a SIGKILLed driver (reaped
by the next start) or a failed start, no process the study started is left running.

Every process of a study inherits its driver's environment (Ray's GCS, raylet, agents and
workers, the MLflow server and its workers): the tests mark the driver's environment and
list the live processes that carry the mark, before and after each case.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.study.conftest import MARK, REPO, cli, marked, write_study
from tests.study.test_exactly_once import _checkpoints, _wait_for

pytestmark = pytest.mark.slow

RUNNING = dict(train={"epochs": 6, "width": 16}, search={"depth": {"low": 2, "high": 3}})


def settle(mark: str, timeout: float = 30.0) -> list[str]:
    """What is still running with ``mark`` once shutdown had ``timeout`` seconds to happen."""
    deadline = time.monotonic() + timeout
    while (left := marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _env(mark: str) -> dict[str, str]:
    return {**os.environ, MARK: mark}


def _start(path, log, mark):
    return subprocess.Popen([sys.executable, "-m", "study.cli", "study", "run", str(path)], cwd=REPO, env=_env(mark),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_a_finished_study_leaves_nothing_running(tmp_path):
    mark = uuid.uuid4().hex
    assert marked(mark) == []
    p = cli("study", "run", str(write_study(tmp_path, name="procs-done")), env={MARK: mark})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert settle(mark, 5) == []  # nothing to wait for: the driver stopped everything before it exited


def test_ctrl_c_leaves_nothing_running_and_the_study_resumes(tmp_path):
    mark = uuid.uuid4().hex
    path = write_study(tmp_path, name="procs-int", **RUNNING)
    home, log = tmp_path / "home", tmp_path / "run.log"
    proc = _start(path, log, mark)
    _wait_for(lambda: _checkpoints(home, 1), proc, log)
    assert marked(mark)  # the study's processes, running
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    proc.wait(timeout=120)
    assert settle(mark) == [], log.read_text()[-3000:]
    p = cli("study", "resume", str(home), env={MARK: mark})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert settle(mark, 5) == []


def test_a_sigkilled_driver_is_cleaned_up_by_the_next_start(tmp_path):
    mark = uuid.uuid4().hex
    path = write_study(tmp_path, name="procs-kill", **RUNNING)
    home, log = tmp_path / "home", tmp_path / "run.log"
    proc = _start(path, log, mark)
    _wait_for(lambda: _checkpoints(home, 1), proc, log)
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup runs in the driver
    proc.wait()
    time.sleep(3)
    left = marked(mark)
    p = cli("study", "resume", str(home), env={MARK: mark + "-resume"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    if left:  # whatever the killed driver left behind, the resume stopped first
        assert "an earlier, killed run of this study left behind" in p.stdout
    assert settle(mark, 15) == [] and settle(mark + "-resume", 5) == []


def test_a_failed_start_leaves_nothing_running(tmp_path):
    mark = uuid.uuid4().hex
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the trial storage should be a folder")
    path = write_study(tmp_path, name="procs-fail", storage_path=str(blocker / "ray"))
    p = cli("study", "run", str(path), env={MARK: mark}, timeout=300)
    assert p.returncode != 0  # Tune cannot write its experiment: the study fails after Ray and MLflow started
    assert settle(mark, 15) == []
