"""Nothing a study starts outlives it: after a normal finish, Ctrl-C, a SIGKILLed driver (reaped
by the next start) or a failed start, no process the study started is left running.

Every process of a study inherits its driver's environment (Ray's GCS, raylet, agents and
workers, the MLflow server and its workers): the tests mark the driver's environment and
list the live processes that carry the mark, before and after each case. Three cases ride
on studies other tests run anyway: the normal finish is the session's smoke study
(tests/conftest.py); Ctrl-C and the SIGKILLed driver, each followed by a resume, are steps of
the exactly-once study that is interrupted every way in turn
(tests/study/test_exactly_once.py::test_a_killed_worker_then_ctrl_c_then_a_killed_driver_lose_nothing_and_leave_nothing).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import psutil
import pytest

from tests.study.conftest import MARK, cli, settle, write_study

pytestmark = pytest.mark.slow


def test_a_finished_study_leaves_nothing_running(smoke_study):
    tmp, _, p = smoke_study
    mark = (tmp / "process-mark").read_text()
    assert p.returncode == 0 and mark
    assert settle(mark, 5) == []  # nothing to wait for: the driver stopped everything before it exited


def test_a_finished_study_leaves_nothing_in_its_temp_dir(smoke_study):
    """Trials stage each checkpoint in a temp folder for Tune to copy: it goes once copied (it
    was kept, ~1 MB a report, and had filled /tmp with thousands of them)."""
    tmp, _, p = smoke_study
    assert p.returncode == 0
    left = sorted(q.name for q in (tmp / "scratch").iterdir())
    # torch's compile cache (``torchinductor_<user>``, created empty when torch looks for it) is
    # torch's, meant to persist; everything else would be the study's
    assert [n for n in left if not n.startswith("torchinductor_")] == []


@pytest.mark.slow(seconds=16)
def test_a_failed_start_leaves_nothing_running(tmp_path):
    mark = uuid.uuid4().hex
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the trial storage should be a folder")
    path = write_study(tmp_path, name="procs-fail", storage_path=str(blocker / "ray"))
    p = cli("study", "run", str(path), env={MARK: mark}, timeout=300)
    assert p.returncode != 0  # Tune cannot write its experiment: the study fails after Ray and MLflow started
    assert settle(mark, 15) == []


def _child(argv0: str, ignore_sigterm: bool) -> subprocess.Popen:
    """A Python child named ``argv0`` (as Ray titles its processes) that, if told to, ignores SIGTERM."""
    code = ("import signal, sys, time\n"
            + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_sigterm else "")
            + "print('ready', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([argv0, "-c", code], executable=sys.executable, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"  # its SIGTERM handler is set
    return proc


def test_ray_agents_deaf_to_sigterm_are_killed_without_the_grace_period_others_get():
    """What a killed driver leaves: Ray's agents ignore SIGTERM, and are killed once the rest have
    stopped (not after the grace period: every resume waited it out); any other process that
    ignores SIGTERM still gets the whole grace period before it is killed."""
    from study.services import DEAF_TO_SIGTERM, _terminate

    agent = _child(DEAF_TO_SIGTERM[0], ignore_sigterm=True)
    worker = _child("ray::ImplicitFunc.train", ignore_sigterm=False)
    procs = {p.pid: psutil.Process(p.pid).create_time() for p in (agent, worker)}
    t0 = time.monotonic()
    assert _terminate(procs, grace_s=30) == 2
    assert time.monotonic() - t0 < 10  # not the 30 s of grace
    # gone (the agent, which ignores SIGTERM, by SIGKILL); _terminate reaped them, so no exit status here
    assert not any(psutil.pid_exists(p.pid) for p in (agent, worker))

    stubborn = _child("python", ignore_sigterm=True)
    t0 = time.monotonic()
    assert _terminate({stubborn.pid: psutil.Process(stubborn.pid).create_time()}, grace_s=2) == 1
    assert time.monotonic() - t0 >= 2 and not psutil.pid_exists(stubborn.pid)  # waited for, then killed
