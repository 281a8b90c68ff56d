"""Nothing a study starts outlives it: after a normal finish, Ctrl-C, a SIGKILLed driver (reaped
by the next start) or a failed start, no process the study started is left running.

Every process of a study inherits its driver's environment (Ray's GCS, raylet, agents and
workers, the MLflow server and its workers): the tests mark the driver's environment and
list the live processes that carry the mark, before and after each case. Two cases ride on
studies other tests run anyway: the normal finish is the session's smoke study
(tests/conftest.py), the SIGKILLed driver the exactly-once kill-and-resume study
(tests/study/test_exactly_once.py::test_sigkill_the_driver_then_resume).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest

from tests.study.conftest import MARK, REPO, cli, marked, settle, write_study
from tests.study.test_exactly_once import _checkpoints, _wait_for

pytestmark = pytest.mark.slow

RUNNING = dict(train={"epochs": 3, "width": 16, "measure_latency": False}, search={"depth": {"low": 2, "high": 3}})


def _env(mark: str) -> dict[str, str]:
    return {**os.environ, MARK: mark}


def _start(path, log, mark):
    return subprocess.Popen([sys.executable, "-m", "study.cli", "study", "run", str(path)], cwd=REPO, env=_env(mark),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_a_finished_study_leaves_nothing_running(smoke_study):
    tmp, _, p = smoke_study
    mark = (tmp / "process-mark").read_text()
    assert p.returncode == 0 and mark
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


def test_a_failed_start_leaves_nothing_running(tmp_path):
    mark = uuid.uuid4().hex
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the trial storage should be a folder")
    path = write_study(tmp_path, name="procs-fail", storage_path=str(blocker / "ray"))
    p = cli("study", "run", str(path), env={MARK: mark}, timeout=300)
    assert p.returncode != 0  # Tune cannot write its experiment: the study fails after Ray and MLflow started
    assert settle(mark, 15) == []
