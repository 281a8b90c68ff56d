"""Exactly once: a killed driver or a killed trial worker loses nothing and duplicates nothing;
and what a killed driver left running, the next start stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.study.conftest import (
    MARK,
    REPO,
    cli,
    marked,
    mlflow_client,
    optuna_trials,
    settle,
    trial_runs,
    write_study,
)

pytestmark = pytest.mark.slow

EPOCHS = 4  # long enough to be killed mid-trial, with trials still to start
LONG = dict(train={"epochs": EPOCHS, "width": 16, "measure_latency": False},
            search={"depth": {"low": 2, "high": 3}, "init": ["kaiming", "dirac"]})


def _start(path: Path, log: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "study.cli", "study", "run", str(path), *flags], cwd=REPO,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def _wait_for(pred, proc: subprocess.Popen, log: Path, timeout: float = 300):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        found = pred()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the study ended before the test could interrupt it:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")


def _checkpoints(home: Path, index: int) -> list[Path]:
    return sorted((home / "ray_results" / "tune").glob(f"*/checkpoint_{index:06d}"))


def _recorded_checkpoints(home: Path) -> list[Path]:
    """Trials two epochs in whose first checkpoint the driver has also written into its saved
    experiment state (every ~10 s): a driver killed now restores them from a checkpoint. (By
    the time a worker has written its second checkpoint, the driver has taken its first.)"""
    states = list((home / "ray_results" / "tune").glob("experiment_state-*.json"))
    newest = max((s.stat().st_mtime for s in states), default=0.0)
    return [c for c in _checkpoints(home, 1) if c.stat().st_mtime < newest]


def _assert_exactly_once(home: Path, name: str, n_trials: int, uri: str | None = None,
                         storage: str | None = None) -> dict[str, object]:
    """Every trial: one MLflow run, every epoch logged once; every finished trial valued in Optuna."""
    with mlflow_client(home, uri) as (client, _):
        runs = trial_runs(client, name)
        ids = [r.data.tags["rank1.trial_id"] for r in runs]
        assert len(ids) == n_trials and len(set(ids)) == n_trials, ids
        by_id = {}
        for r in runs:
            assert r.data.tags["rank1.status"] == "finished", r.data.tags
            steps = [m.step for m in client.get_metric_history(r.info.run_id, "rank1.val_acc")]
            assert sorted(steps) == list(range(1, EPOCHS + 1)), steps  # each epoch exactly once
            by_id[r.data.tags["rank1.trial_id"]] = r
    trials = optuna_trials(home, name, storage)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n_trials
    for t in complete:
        run = by_id[t.user_attrs["ray_trial_id"]]
        assert t.values[0] == pytest.approx(run.data.metrics["objective"])
    # Optuna may hold one more trial that was asked just before the kill and never ran.
    assert all(t.user_attrs.get("status") == "orphaned" for t in trials if t.state.name != "COMPLETE")
    return by_id


def kill_driver_then_resume(tmp_path: Path, name: str, flags: dict[str, str] | None = None, processes: bool = False,
                            **where) -> None:
    """SIGKILL a study's driver mid-trial, resume it, and check exactly-once on its stores.

    ``where``: locations in the study file; ``flags``: locations given as `study run` flags
    only, which `study resume` must remember without being told again. ``processes``: also
    check that what the killed driver left running (Ray's processes, the MLflow server) is
    stopped by the resume, and that nothing of either run outlives it
    (tests/study/test_processes.py marks processes the same way)."""
    path = write_study(tmp_path, name=name, **LONG, **where)
    home = tmp_path / "home"
    log = tmp_path / "run.log"
    flags = flags or {}
    mark = uuid.uuid4().hex if processes else None
    proc = _start(path, log, *[a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", v)],
                  env={MARK: mark} if mark else None)
    where = {**where, **flags}
    _wait_for(lambda: _recorded_checkpoints(home), proc, log)  # some trial can be resumed mid-way
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup runs in the driver
    proc.wait()
    assert not (home / "outcome.json").exists()

    status = cli("study", "status", str(home), "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["states"].get("finished", 0) < 4

    left = marked(mark) if mark else []
    p = cli("study", "resume", str(home), env={MARK: f"{mark}-resume"} if mark else None)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    if left:  # whatever the killed driver left behind, the resume stopped first
        assert "an earlier, killed run of this study left behind" in p.stdout
    if mark:
        assert settle(mark, 15) == [] and settle(f"{mark}-resume", 5) == []
    by_id = _assert_exactly_once(home, name, 4, where.get("tracking_uri"), where.get("storage"))
    resumed = {tid: int(r.data.tags["rank1.resumed_from_epoch"]) for tid, r in by_id.items()
               if "rank1.resumed_from_epoch" in r.data.tags}
    assert resumed and all(e >= 1 for e in resumed.values()), resumed  # continued, not restarted
    for tid, epoch in resumed.items():
        assert by_id[tid].data.metrics["final/epochs_trained_here"] == EPOCHS - epoch
    assert json.loads((home / "outcome.json").read_text())["alias"] == "champion"


def test_sigkill_the_driver_then_resume(tmp_path):
    kill_driver_then_resume(tmp_path, "killdriver", processes=True)


def test_sigkill_a_trial_worker(tmp_path):
    path = write_study(tmp_path, name="killworker", **LONG)
    home = tmp_path / "home"
    log = tmp_path / "run.log"
    proc = _start(path, log)
    _wait_for(lambda: _checkpoints(home, 1), proc, log)
    url = json.loads((home / "mlflow-server.json").read_text())["url"]
    from mlflow import MlflowClient

    client = MlflowClient(url)

    def running_trial():
        # Mid-way (epoch 1-2 of 4 logged), so it is still running when the kill lands.
        for r in trial_runs(client, "killworker"):
            if r.data.tags.get("rank1.status") == "running" and r.data.metrics.get("objective") is not None:
                steps = [m.step for m in client.get_metric_history(r.info.run_id, "objective")]
                if steps and max(steps) <= EPOCHS // 2:
                    return r
        return None

    victim = _wait_for(running_trial, proc, log)
    os.kill(int(victim.data.tags["rank1.pid"]), signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    by_id = _assert_exactly_once(home, "killworker", 4)
    tid = victim.data.tags["rank1.trial_id"]
    assert int(by_id[tid].data.tags["rank1.resumed_from_epoch"]) >= 1  # Tune retried it from its checkpoint


def test_a_diverging_trial_is_recorded_and_the_study_goes_on(tmp_path):
    # Random sampler, seed 0: lr 1e6, 0.05, 1e6 for the three trials.
    path = write_study(tmp_path, name="diverge", search={"lr": [0.05, 1000000.0]}, n_trials=3, seed=0,
                       train={"momentum": 0.0, "weight_decay": 0.0, "measure_latency": False})
    p = cli("study", "run", str(path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "not measured (train.measure_latency: false)" in p.stdout  # the summary says why it has no speed
    home = tmp_path / "home"
    with mlflow_client(home) as (client, _):
        runs = {float(r.data.params["lr"]): r for r in trial_runs(client, "diverge")}
        statuses = sorted(r.data.tags["rank1.status"] for r in trial_runs(client, "diverge"))
    assert statuses == ["diverged", "diverged", "finished"]
    bad = runs[1000000.0]
    assert bad.info.status == "FAILED" and "loss became" in bad.data.tags["rank1.reason"]
    states = sorted((t.state.name, t.user_attrs.get("status")) for t in optuna_trials(home, "diverge"))
    assert states == [("COMPLETE", "finished"), ("FAIL", "diverged"), ("FAIL", "diverged")]
    outcome = json.loads((home / "outcome.json").read_text())
    assert outcome["best"]["params"] == {"lr": 0.05}
