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

import uuid

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
