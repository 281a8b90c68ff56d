"""Exactly once: a killed driver or a killed trial worker loses nothing and duplicates nothing;
and what a killed driver left running, the next start stops."""

from __future__ import annotations

import contextlib
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
    no_report,
    optuna_trials,
    settle,
    trial_runs,
    write_study,
)

pytestmark = pytest.mark.slow

EPOCHS = 4  # long enough to be killed mid-trial, with trials still to start
LONG = dict(train={"epochs": EPOCHS, "width": 16, "measure_latency": False},
            search={"depth": {"low": 2, "high": 3}, "init": ["kaiming", "dirac"]})
# The drivers the tests kill save their experiment state at every step (Tune's default: every 10 s
# at least; a resumed driver keeps the period of the first): on a fast machine a trial's epochs take
# half a second, and its trial would be over before the driver had recorded it mid-way.
SAVE_OFTEN = {"TUNE_GLOBAL_CHECKPOINT_S": "0"}


def _start(path: Path, log: Path, *flags: str, env: dict[str, str] | None = None, command: str = "run",
           new_session: bool = False) -> subprocess.Popen:
    """``rank1 study COMMAND PATH FLAGS --no-report`` in the background; ``new_session``: as the
    foreground process group of a terminal of its own (for a Ctrl-C to the whole group)."""
    return subprocess.Popen([sys.executable, "-m", "study.cli", *no_report(["study", command, str(path), *flags])],
                            cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=new_session)


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


def _recorded_checkpoints(home: Path, since: float = 0.0) -> list[Path]:
    """Checkpoints after a trial's first, written after ``since``, that the driver has also
    written into its saved experiment state (every ~10 s) since: a driver killed now restores
    their trials from a checkpoint. (By the time a worker has written its second checkpoint,
    the driver has taken its first.)"""
    tune = home / "ray_results" / "tune"
    if not tune.is_dir():  # Tune has not started the experiment yet
        return []
    newest = max((s.stat().st_mtime for s in tune.glob("experiment_state-*.json")), default=0.0)
    found = []
    # The trials' folders only: the driver's keeper of Tune's state renames and removes its own
    # (dot-named) folders beside them while this looks, and a folder gone mid-scan is an error
    for trial in (t for t in tune.iterdir() if t.is_dir() and not t.name.startswith(".")):
        with contextlib.suppress(FileNotFoundError):
            found += [c for c in trial.glob("checkpoint_*")
                      if c.name != "checkpoint_000000" and since < c.stat().st_mtime < newest]
    return found


def _mid_way(home: Path, since: float) -> list[Path]:
    """Trials a driver killed now leaves mid-way: each has a checkpoint written after ``since``
    that the driver's saved experiment state knows of (:func:`_recorded_checkpoints`), and its
    newest state is of an epoch before the last (were its worker to run on for a moment after
    the kill, it could not reach its end)."""
    from study.trial import CHECKPOINT_FILE, load_checkpoint

    found = []
    for trial in {c.parent for c in _recorded_checkpoints(home, since)}:
        try:
            newest = max(trial.glob(f"checkpoint_*/{CHECKPOINT_FILE}"), key=lambda p: p.stat().st_mtime).parent
            state = load_checkpoint(newest)
        except (OSError, RuntimeError, EOFError, ValueError):  # superseded or being written as we look
            continue
        if not state.get("final") and state["epoch"] < EPOCHS:
            found.append(newest)
    return found


def _lose_the_recorded_checkpoints(home: Path) -> dict[str, int]:
    """The race a killed driver can leave: the experiment state it saved names checkpoints that
    no longer hold their state, while newer ones it never recorded are on storage. For every
    unfinished trial: its newest state copied into a checkpoint folder after the last, and every
    other checkpoint emptied as the trial empties old ones. ``{trial folder: the epoch left}``."""
    from study.trial import CHECKPOINT_FILE, SUPERSEDED_FILE, load_checkpoint

    def whole(path: Path) -> dict | None:  # None: being written this moment by a worker the killed driver left
        try:
            return load_checkpoint(path.parent)
        except (OSError, RuntimeError, EOFError, ValueError):
            return None

    left = {}
    for trial in (home / "ray_results" / "tune").glob("run_trial_*"):
        states = sorted(trial.glob(f"checkpoint_*/{CHECKPOINT_FILE}"), key=lambda p: p.stat().st_mtime)
        loaded = [(p, whole(p)) for p in states]
        complete = [(p, s) for p, s in loaded if s is not None]
        if not complete or any(s.get("final") for _, s in complete):
            continue
        newest, state = complete[-1]
        last = max(int(p.name.split("_")[1]) for p in trial.glob("checkpoint_*"))
        unrecorded = trial / f"checkpoint_{last + 1:06d}"
        unrecorded.mkdir(exist_ok=True)  # a worker the killed driver left may be writing it too:
        tmp = unrecorded / f".{CHECKPOINT_FILE}.{os.getpid()}"  # so the copy lands whole, at once
        tmp.write_bytes(newest.read_bytes())
        os.replace(tmp, unrecorded / CHECKPOINT_FILE)
        for p in states:
            (p.parent / SUPERSEDED_FILE).write_text(json.dumps({"superseded_by": unrecorded.name}))
            p.unlink(missing_ok=True)
        left[trial.name] = state["epoch"]
    return left


def _assert_checkpoints_kept(home: Path) -> None:
    """No checkpoint folder of any trial is gone (a saved experiment state may name any of them);
    at most the newest KEEP_CHECKPOINTS hold their state, every other says what superseded it."""
    from study.trial import CHECKPOINT_FILE, KEEP_CHECKPOINTS, SUPERSEDED_FILE

    for trial in (home / "ray_results").glob("*/run_trial_*"):
        folders = sorted(trial.glob("checkpoint_*"))
        assert [int(f.name.split("_")[1]) for f in folders] == list(range(len(folders))), folders
        held = [f for f in folders if (f / CHECKPOINT_FILE).exists()]
        assert 1 <= len(held) <= KEEP_CHECKPOINTS, (trial, held)
        assert all((f / SUPERSEDED_FILE).exists() for f in folders if f not in held), trial


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


def _assert_continued(by_id: dict[str, object]) -> dict[str, int]:
    """Some trials were resumed, each from an epoch it had reached and trained only the rest
    (continued, not restarted): ``{trial id: the epoch it was resumed from}``."""
    resumed = {tid: int(r.data.tags["rank1.resumed_from_epoch"]) for tid, r in by_id.items()
               if "rank1.resumed_from_epoch" in r.data.tags}
    assert resumed and all(e >= 1 for e in resumed.values()), resumed
    for tid, epoch in resumed.items():
        assert by_id[tid].data.metrics["final/epochs_trained_here"] == EPOCHS - epoch
    return resumed


def kill_driver_then_resume(tmp_path: Path, name: str, flags: dict[str, str] | None = None,
                            env: dict[str, str] | None = None, **where) -> str:
    """SIGKILL a study's driver mid-trial, resume it, and check exactly-once on its stores:
    what both drivers printed.

    ``where``: locations in the study file; ``flags``: locations given as `study run` flags
    only, and ``env`` (e.g. ``MLFLOW_TRACKING_URI``) the first driver's environment only:
    `study resume` must remember them without being told again."""
    path = write_study(tmp_path, name=name, **LONG, **where)
    home = tmp_path / "home"
    log = tmp_path / "run.log"
    flags = flags or {}
    proc = _start(path, log, *[a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", v)],
                  env={**SAVE_OFTEN, **(env or {})})
    _wait_for(lambda: _mid_way(home, since=0.0), proc, log)  # some trial can be resumed mid-way
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup runs in the driver
    proc.wait()
    _assert_killed_mid_study(home)
    p = cli("study", "resume", str(home))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    uri = {**where, **flags}.get("tracking_uri") or (env or {}).get("MLFLOW_TRACKING_URI")
    _assert_continued(_assert_exactly_once(home, name, 4, uri, {**where, **flags}.get("storage")))
    assert json.loads((home / "outcome.json").read_text())["alias"] == "champion"
    return log.read_text() + p.stdout + p.stderr


def _assert_killed_mid_study(home: Path, since: float = 0.0) -> None:
    """The driver was killed with trials to go: no outcome written since ``since``."""
    outcome = home / "outcome.json"
    assert not outcome.exists() or outcome.stat().st_mtime < since
    status = cli("study", "status", str(home), "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["states"].get("finished", 0) < 4


def _running_trial(client, name: str):
    """A trial mid-way (epoch 1-2 of 4 logged), so that it is still running when a kill lands."""
    for r in trial_runs(client, name):
        if r.data.tags.get("rank1.status") == "running" and r.data.metrics.get("objective") is not None:
            steps = [m.step for m in client.get_metric_history(r.info.run_id, "objective")]
            if steps and max(steps) <= EPOCHS // 2:
                return r
    return None


@pytest.mark.slow(seconds=110)
def test_a_killed_worker_then_ctrl_c_then_a_killed_driver_lose_nothing_and_leave_nothing(tmp_path):
    """One study through every interruption in turn, each checked as it happens, then
    exactly-once over all of them:

    1. a trial's worker is SIGKILLed mid-trial: Tune retries the trial from its checkpoint
       while the driver runs on;
    2. Ctrl-C (SIGINT to the whole foreground group): no process the study started is left
       (tests/study/test_processes.py marks processes the same way);
    3. `study resume` gets on with it, then its driver is SIGKILLed (no cleanup runs): the next
       resume stops what it left running, completes, and nothing of any run outlives it.
    """
    from mlflow import MlflowClient

    name, mark = "interrupts", uuid.uuid4().hex
    path = write_study(tmp_path, name=name, **LONG)
    home, log = tmp_path / "home", tmp_path / "run.log"
    proc = _start(path, log, env={MARK: mark, **SAVE_OFTEN}, new_session=True)

    # 1. A trial's worker.
    _wait_for(lambda: _checkpoints(home, 1), proc, log)
    client = MlflowClient(json.loads((home / "mlflow-server.json").read_text())["url"])
    victim = _wait_for(lambda: _running_trial(client, name), proc, log)
    os.kill(int(victim.data.tags["rank1.pid"]), signal.SIGKILL)
    # No resume has happened yet: a trial that continues from an epoch is Tune's own retry.
    retried = _wait_for(lambda: client.get_run(victim.info.run_id).data.tags.get("rank1.resumed_from_epoch"),
                        proc, log)
    assert int(retried) >= 1

    # 2. Ctrl-C.
    assert marked(mark)  # the study's processes, running
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=300)  # it wraps up what it has (the champion) first
    assert settle(mark) == [], log.read_text()[-3000:]
    assert json.loads((home / "outcome.json").read_text())["trials"].get("finished", 0) < 4  # stopped short

    # 3. Resume, and SIGKILL that driver once it has recorded a trial mid-way.
    t0 = time.time()
    log = tmp_path / "resume.log"
    proc = _start(home, log, env={MARK: f"{mark}-resume", **SAVE_OFTEN}, command="resume", new_session=True)
    _wait_for(lambda: _mid_way(home, since=t0), proc, log)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lost = _lose_the_recorded_checkpoints(home)  # at once: a worker the killed driver left may run on a moment
    assert lost, "no trial was mid-way"
    _assert_killed_mid_study(home, since=t0)

    left = marked(f"{mark}-resume")
    p = cli("study", "resume", str(home), env={MARK: f"{mark}-final"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    if left:  # whatever the killed driver left behind, the resume stopped first
        assert "an earlier, killed run of this study left behind" in p.stdout
    assert [settle(m, 15) for m in (mark, f"{mark}-resume", f"{mark}-final")] == [[], [], []]

    resumed = _assert_continued(_assert_exactly_once(home, name, 4))
    assert victim.data.tags["rank1.trial_id"] in resumed, resumed
    # Each trial with a state on storage went on from the newest one there, whether the saved state
    # named a checkpoint that had lost its state or none at all (a trial the killed driver had started
    # and not yet recorded). (Or from a later one: a worker the killed driver left may have written
    # another before it was stopped.)
    lost = {folder.split("_")[2]: epoch for folder, epoch in lost.items()}  # run_trial_<trial id>_<n>_...
    assert all(resumed.get(tid, -1) >= epoch for tid, epoch in lost.items()), (resumed, lost)
    _assert_checkpoints_kept(home)
    assert json.loads((home / "outcome.json").read_text())["alias"] == "champion"
