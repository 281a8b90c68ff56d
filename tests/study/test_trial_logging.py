"""A trial's MLflow run: logged in the background, and still exactly once when an attempt dies.

Against a real MLflow store (SQLite) and a real file system for the trial's run note; the kill
is simulated where the studies in test_exactly_once.py cannot aim it: between sending an
epoch and MLflow having it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from pyarrow import fs as pafs

from rank1.train import TrainConfig
from study.ends import read_end, write_end
from study.names import TAG_TRIAL
from study.trial import _RunLogger, _RunMemo


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the file (creating one runs MLflow's migrations: seconds)."""
    d = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{d / 'mlflow.db'}", d


@pytest.fixture
def ctx(store, tmp_path):
    uri, d = store
    client = MlflowClient(uri)
    exp = client.create_experiment(tmp_path.name, artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp).info.run_id
    return {"tracking_uri": uri, "experiment_id": exp, "parent_run_id": parent, "study": "t"}


def _steps(client: MlflowClient, run_id: str, key: str = "objective") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _logger(ctx, trial="trial-1", run_id=None) -> _RunLogger:
    return _RunLogger(ctx, trial, run_id, {"depth": 2}, TrainConfig(epochs=3), name="d2")


def _ended(log: _RunLogger, metrics: dict, step: int, status: str = "finished", results: list | None = None,
           time_ms: int | None = None) -> dict:
    """A trial's end record as run_trial builds it (the part study.ends reads)."""
    return {"status": status, "reason": None, "results": results or [], "step": step, "metrics": metrics,
            "time_ms": time_ms or int(time.time() * 1000), "artifact_uri": log.artifact_uri,
            "report": {"run_id": log.run_id, "final": True, "epoch": step}}


def test_epochs_are_sent_in_order_in_the_background_and_all_there_after_close(ctx):
    log = _logger(ctx)
    for epoch in (1, 2, 3):
        log.log_epoch(epoch, {"objective": 0.1 * epoch, "rank1.val_acc": 0.1 * epoch})
        assert list(log.unlogged) == [epoch]  # the checkpoint of this epoch carries it until it is in
    log.close()
    client = MlflowClient(ctx["tracking_uri"])
    assert _steps(client, log.run_id) == [1, 2, 3] and client.get_run(log.run_id).info.status == "RUNNING"
    ended = _ended(log, {"final/x": 1.0}, step=3, time_ms=1_700_000_000_000)
    write_end(client, ended)  # the driver's part (study.ends)
    run = client.get_run(log.run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == ended["time_ms"]
    assert run.data.tags["rank1.status"] == "finished" and run.data.metrics["final/x"] == 1.0
    assert [m.value for m in sorted(client.get_metric_history(log.run_id, "objective"), key=lambda m: m.step)] \
        == pytest.approx([0.1, 0.2, 0.3])
    assert run.data.params["search.depth"] == "2" and run.data.params["epochs"] == "3"
    assert log.unlogged == {}


def test_a_restarted_attempt_sends_what_its_checkpoint_holds_as_unlogged_exactly_once(ctx):
    client = MlflowClient(ctx["tracking_uri"])
    first = _logger(ctx)
    first.log_epoch(1, {"objective": 0.1})
    first.wait()
    # Epoch 2 was sent, its checkpoint written, and the attempt died before MLflow had it.
    lost = {2: {"objective": 0.2}}
    assert _steps(client, first.run_id) == [1]
    again = _logger(ctx, run_id=first.run_id)  # from the checkpoint: its run id and its unlogged epochs
    assert again.last_logged == 1
    again.resend(lost)
    again.log_epoch(3, {"objective": 0.3})
    again.wait()
    assert _steps(client, first.run_id) == [1, 2, 3]
    # Had MLflow got it after all, resending it does not log it twice.
    third = _logger(ctx, run_id=first.run_id)
    third.resend({3: {"objective": 0.3}})
    third.wait()
    assert _steps(client, first.run_id) == [1, 2, 3]


def test_without_a_run_id_a_restarted_trial_finds_its_run_by_its_tag(ctx):
    client = MlflowClient(ctx["tracking_uri"])
    first = _logger(ctx)  # not a first attempt as far as it knows (outside Tune: no note)
    first.wait()
    again = _logger(ctx)
    assert again.run_id == first.run_id
    again.wait()
    runs = client.search_runs([ctx["experiment_id"]], filter_string=f"tags.`{TAG_TRIAL}` = 'trial-1'")
    assert len(runs) == 1


def test_an_error_of_a_background_call_surfaces_in_the_trial(ctx):
    log = _logger(ctx)
    log.wait()
    log._run_id = "0" * 32  # a run MLflow does not have
    log.log_epoch(1, {"objective": 0.1})
    with pytest.raises(Exception, match="0000"):
        log.wait()
    assert list(log.unlogged) == [1]  # not known to be logged: a checkpoint keeps it


def test_a_new_run_is_created_in_the_background_and_its_failure_surfaces_at_the_first_epoch(ctx):
    """The first epoch trains while the run is created; its id, asked for, waits for it."""
    log = _logger(ctx, trial="made-behind")
    run = MlflowClient(ctx["tracking_uri"]).get_run(log.run_id)
    assert run.data.tags[TAG_TRIAL] == "made-behind" and run.data.params["search.depth"] == "2"
    bad = _logger({**ctx, "experiment_id": "987654"}, trial="no-experiment")  # returns: nothing asked yet
    with pytest.raises(Exception, match="987654"):
        bad.log_epoch(1, {"objective": 0.1})


def _memo(ctx, tmp_path, fresh: bool, trial: str = "trial-1") -> _RunMemo:
    memo = _RunMemo({**ctx, "fresh": fresh}, trial)
    memo.fs, memo.dir = pafs.LocalFileSystem(), str(tmp_path / "tune" / trial)  # as Tune's storage gives them
    return memo


def test_the_run_note_in_trial_storage(ctx, tmp_path):
    memo = _memo(ctx, tmp_path, fresh=True)
    assert memo.first_attempt() and memo.run_id() is None  # a fresh study's trial: no run can exist yet
    memo.creating()
    # Died between asking for a run and writing it down: the next attempt must look for it.
    assert not memo.first_attempt() and memo.run_id() is None
    memo.created("abc")
    assert memo.run_id() == "abc" and not memo.first_attempt()
    assert _memo(ctx, tmp_path, fresh=False).run_id() == "abc"  # a resumed driver reads it too
    # A note for another trial, study or experiment is not this trial's; another server URL
    # for the same store is (a resumed study's embedded server listens on another port).
    assert _memo({**ctx, "experiment_id": "9"}, tmp_path, fresh=True).run_id() is None
    assert _memo({**ctx, "parent_run_id": "other"}, tmp_path, fresh=True).run_id() is None
    assert _memo({**ctx, "tracking_uri": "http://127.0.0.1:1"}, tmp_path, fresh=True).run_id() == "abc"
    (tmp_path / "tune" / "trial-1" / _RunMemo.NAME).write_text("{not json")
    assert _memo(ctx, tmp_path, fresh=True).run_id() is None
    # A resumed study without notes (an older version's trials): look, never assume.
    assert not _memo(ctx, tmp_path, fresh=False, trial="trial-2").first_attempt()


def test_a_first_attempt_creates_its_run_without_a_search_and_a_retry_reuses_it(ctx, tmp_path, monkeypatch):
    notes = {}

    def memo(c, trial):
        return notes.setdefault(trial, _memo(c, tmp_path, fresh=True, trial=trial))

    monkeypatch.setattr("study.trial._RunMemo", memo)
    searched = []
    real = MlflowClient.search_runs
    monkeypatch.setattr(MlflowClient, "search_runs", lambda self, *a, **k: searched.append(a) or real(self, *a, **k))
    first = _logger({**ctx, "fresh": True})
    first.wait()
    retry = _logger({**ctx, "fresh": True})  # the worker died before its first checkpoint
    retry.wait()
    assert searched == [] and retry.run_id == first.run_id


def _write_states(folder, epochs: dict[int, int], at: int = 0) -> None:
    """``{checkpoint index: epoch}`` as a trial's checkpoints, written in that order from second
    ``at`` on, a second apart (as modification times)."""
    import os

    import torch

    from study.trial import CHECKPOINT_FILE

    for n, (index, epoch) in enumerate(epochs.items()):
        d = folder / f"checkpoint_{index:06d}"
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": epoch}, d / CHECKPOINT_FILE)
        t = (10**9 + at + n) * 10**9
        os.utime(d / CHECKPOINT_FILE, ns=(t, t))


def test_old_checkpoints_are_emptied_not_deleted_and_a_restore_takes_the_newest_that_loads(
        tmp_path, monkeypatch):
    """The race a killed driver met: its saved experiment state named a checkpoint Tune had since
    deleted, and the resume could not restore that trial. Every folder now stays; the trial
    empties the old ones, and a restore from one continues from the newest that loads."""
    import json

    import pytest
    from ray import tune

    from study.trial import (
        CHECKPOINT_FILE,
        KEEP_CHECKPOINTS,
        SUPERSEDED_FILE,
        _empty_old_checkpoints,
        restore_state,
    )

    folder = tmp_path / "run_trial_1"
    fs = pafs.LocalFileSystem()
    monkeypatch.setattr("study.trial._trial_storage", lambda: (fs, str(folder)))
    _write_states(folder, {i: i + 1 for i in range(5)})
    _empty_old_checkpoints()
    held = sorted(p.parent.name for p in folder.glob(f"*/{CHECKPOINT_FILE}"))
    assert KEEP_CHECKPOINTS == 2 and held == ["checkpoint_000003", "checkpoint_000004"]
    assert sorted(p.name for p in folder.iterdir()) == [f"checkpoint_{i:06d}" for i in range(5)]  # none gone
    for i in range(3):
        note = json.loads((folder / f"checkpoint_{i:06d}" / SUPERSEDED_FILE).read_text())
        assert note == {"superseded_by": "checkpoint_000004"}

    def restore(index):
        state, instead = restore_state(tune.Checkpoint(str(folder / f"checkpoint_{index:06d}"), fs))
        return state["epoch"], instead and instead.rsplit("/", 1)[-1]

    assert restore(3) == (4, None)  # the one named holds its state: that one, as before
    assert restore(0) == (5, "checkpoint_000004")
    _write_states(folder, {4: 5}, at=10)
    (folder / "checkpoint_000004" / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 torn by a kill")
    assert restore(4) == (4, "checkpoint_000003") == restore(0)  # a torn one is passed over
    # Newest by when it was written, not by index: a resumed trial counts from the index its saved
    # state names, and writes over folders the killed driver's attempt had already filled.
    _write_states(folder, {7: 8, 1: 9}, at=20)
    assert restore(2) == (9, "checkpoint_000001")
    # Tune recorded no checkpoint (a driver killed before its next saved state): the trial's own
    # folder's newest, not a start from nothing.
    state, instead = restore_state(None)
    assert (state["epoch"], instead.rsplit("/", 1)[-1]) == (9, "checkpoint_000001")
    for p in folder.glob(f"*/{CHECKPOINT_FILE}"):
        p.unlink()
    with pytest.raises(RuntimeError, match="no checkpoint of this trial beside .*checkpoint_000002 loads"):
        restore(2)
    assert restore_state(None) == (None, None)  # nothing stored: it starts from nothing
    monkeypatch.setattr("study.trial._trial_storage", lambda: (fs, str(tmp_path / "run_trial_2")))
    assert restore_state(None) == (None, None)  # a trial's first attempt: no folder yet


def test_an_end_kept_by_the_final_checkpoint_and_written_again_is_in_mlflow_once(ctx):
    """The final checkpoint keeps the trial's end (in its state, and on its own for the driver);
    the driver writes it to MLflow, and writes it again where it cannot know it did (a driver
    killed after writing, a trial restored from that checkpoint that marked its run running
    again): the run's final numbers are the first attempt's, each once in its history, and the run
    ends as it had, at the time the trial ended."""
    import json

    import numpy as np

    from study.trial import _end_record, _staged_checkpoint, load_checkpoint

    client = MlflowClient(ctx["tracking_uri"])
    first = _logger(ctx)
    first.log_epoch(1, {"objective": 0.5})
    first.close()
    results = [{"arms": {"rank1": {"inference": {"deploy_b1": "cpp x4", "threads": 2}}}}]
    ended = {**_ended(first, {"final/latency_ms": np.float64(1.5), "final/objective": 0.5, "final/nan": float("nan")},
                      step=1, results=results, time_ms=1_700_000_000_000),
             "report": {"objective": 0.5, "final": True, "epoch": 1, "run_id": first.run_id}}
    record = _end_record(ended)
    with _staged_checkpoint({"epoch": 1, "end": record}) as checkpoint:
        state = load_checkpoint(checkpoint.path)  # as a restore loads it
        kept = read_end(checkpoint)  # as the driver reads it: the end alone
    assert not Path(checkpoint.path).exists()  # staged for Tune's copy only
    assert kept == json.loads(state["end"])
    assert kept["metrics"]["final/latency_ms"] == 1.5 and kept["report"] == ended["report"]
    assert kept["results"] == results and kept["time_ms"] == ended["time_ms"]
    with _staged_checkpoint({"epoch": 1}) as checkpoint:
        assert read_end(checkpoint) is None  # an epoch's checkpoint holds no end
    write_end(client, kept)
    again = _logger(ctx, run_id=first.run_id)  # a restarted attempt marks the run running again
    again.close()
    assert client.get_run(first.run_id).data.tags["rank1.status"] == "running"
    write_end(client, kept)
    for key, value in (("final/latency_ms", 1.5), ("final/objective", 0.5)):
        assert [(m.value, m.step) for m in client.get_metric_history(first.run_id, key)] == [(value, 1)]
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["rank1.status"] == "finished"
    assert run.info.end_time == kept["time_ms"]
    assert run.data.tags["rank1.rank1.deploy_b1"] == "cpp x4" and "final/nan" not in run.data.metrics
    assert json.loads(Path(client.download_artifacts(first.run_id, "trial_result.json")).read_text()) == results
    # Without the kept time, a second write is a second entry: what the record prevents.
    write_end(client, {**kept, "time_ms": kept["time_ms"] + 1})
    assert len(client.get_metric_history(first.run_id, "final/objective")) == 2


def test_after_a_fit_the_ends_mlflow_lacks_are_written_from_the_final_checkpoints(ctx, tmp_path):
    """What a driver killed between a trial's completion and its end's write leaves: the run still
    running, the end in Tune's result's checkpoint. Written for that trial only: not for one whose
    end is in, one that errored, or one stopped before its final report (reconcile's to mark)."""
    from ray.tune import Checkpoint, Result

    from study.ends import END_FILE, complete_ends
    from study.runs import trial_runs

    client = MlflowClient(ctx["tracking_uri"])
    results = []
    for trial, final, error, ended_in in (("t-lost", True, None, False), ("t-written", True, None, True),
                                          ("t-errored", True, RuntimeError("boom"), False),
                                          ("t-pruned", False, None, False)):
        log = _logger(ctx, trial=trial)
        log.close()
        end = _ended(log, {"final/objective": 0.7}, step=2, time_ms=1_700_000_000_000)
        folder = tmp_path / trial
        folder.mkdir()
        if final:
            (folder / END_FILE).write_text(json.dumps(end))
        if ended_in:
            write_end(client, end)
        results.append(Result(metrics={"trial_id": trial, "final": final, "epoch": 2},
                              checkpoint=Checkpoint.from_directory(str(folder)), error=error, path=str(folder)))
    assert complete_ends(client, results, trial_runs(client, ctx["experiment_id"])) == 1
    runs = {t: rs[0] for t, rs in trial_runs(client, ctx["experiment_id"]).items()}
    assert runs["t-lost"].info.status == "FINISHED" and runs["t-lost"].data.metrics["final/objective"] == 0.7
    assert len(client.get_metric_history(runs["t-written"].info.run_id, "final/objective")) == 1
    assert {t: runs[t].info.status for t in ("t-errored", "t-pruned")} == {"t-errored": "RUNNING", "t-pruned": "RUNNING"}
    assert complete_ends(client, results, trial_runs(client, ctx["experiment_id"])) == 0  # nothing left
