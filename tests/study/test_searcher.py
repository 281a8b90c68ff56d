"""The Optuna RDB searcher on a real SQLite storage: suggest, resume, and honest states."""

from __future__ import annotations

import pickle
import threading

import optuna
import pytest

from study.config import Range
from study.searcher import OptunaRDBSearcher

SPACE = {"depth": Range(1, 8), "lr": Range(1e-3, 1e-1, log=True), "init": ["kaiming", "dirac"]}


def _searcher(tmp_path, objectives=None):
    return OptunaRDBSearcher(f"sqlite:///{tmp_path / 'o.db'}", "s", SPACE, "tpe", 0, objectives)


def _trials(tmp_path):
    return optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}").get_trials()


def test_suggest_samples_the_space_and_tags_the_ray_trial(tmp_path):
    s = _searcher(tmp_path)
    params = s.suggest("t1")
    assert set(params) == {"depth", "lr", "init"}
    assert isinstance(params["depth"], int) and 1 <= params["depth"] <= 8
    assert 1e-3 <= params["lr"] <= 1e-1 and params["init"] in ("kaiming", "dirac")
    (t,) = _trials(tmp_path)
    assert t.user_attrs["ray_trial_id"] == "t1" and t.state.name == "RUNNING"


def test_a_restored_searcher_finds_its_trials_in_the_storage(tmp_path):
    s = _searcher(tmp_path)
    first = s.suggest("t1")
    s.on_trial_result("t1", {"objective": 0.3, "epoch": 1})
    restored = pickle.loads(pickle.dumps(s))  # what Tuner.restore does with the experiment state
    assert restored._study is None
    assert restored.suggest("t1") == first  # same trial, same parameters: no new Optuna trial
    restored.on_trial_result("t1", {"objective": 0.3, "epoch": 1})  # replayed epoch: not reported twice
    restored.on_trial_complete("t1", {"objective": 0.5, "final": True, "trial_status": "finished"})
    (t,) = _trials(tmp_path)
    assert t.state.name == "COMPLETE" and t.values == [0.5] and t.intermediate_values == {1: 0.3}
    restored.on_trial_complete("t1", {"objective": 0.9, "final": True, "trial_status": "finished"})
    assert _trials(tmp_path)[0].values == [0.5]  # told once


@pytest.mark.parametrize(
    "result, error, state, status",
    [
        ({"objective": 0.4, "final": False, "epoch": 2}, False, "PRUNED", "pruned"),  # stopped by ASHA
        ({"objective": 0.0, "final": True, "trial_status": "diverged", "trial_reason": "loss became nan"},
         False, "FAIL", "diverged"),
        (None, True, "FAIL", "failed"),
    ],
)
def test_trials_that_did_not_finish_are_not_complete(tmp_path, result, error, state, status):
    s = _searcher(tmp_path)
    s.suggest("t1")
    s.on_trial_complete("t1", result, error=error)
    (t,) = _trials(tmp_path)
    assert t.state.name == state and t.user_attrs["status"] == status


def test_multi_objective(tmp_path):
    s = _searcher(tmp_path, [("objective", "maximize"), ("latency_ms", "minimize")])
    s.suggest("t1")
    s.on_trial_result("t1", {"objective": 0.2, "epoch": 1})  # no intermediate values for multi-objective
    s.on_trial_complete("t1", {"objective": 0.8, "latency_ms": 3.5, "final": True, "trial_status": "finished"})
    (t,) = _trials(tmp_path)
    assert t.values == [0.8, 3.5]


def test_intermediate_values_are_written_off_tunes_loop_and_are_in_before_the_trial_is_told(tmp_path):
    s = _searcher(tmp_path)
    s.suggest("t1")
    storage = s.study._storage
    writers, write = [], storage.set_trial_intermediate_value

    def recording(*args):
        writers.append(threading.current_thread().name)
        return write(*args)

    storage.set_trial_intermediate_value = recording
    for epoch, acc in ((1, 0.2), (2, 0.4)):
        s.on_trial_result("t1", {"objective": acc, "epoch": epoch})
    pickle.dumps(s)  # Tune saving its experiment state: what was reported is in the storage by then
    assert _trials(tmp_path)[0].intermediate_values == {1: 0.2, 2: 0.4}
    s.on_trial_result("t1", {"objective": 0.6, "epoch": 3})
    s.on_trial_complete("t1", {"objective": 0.7, "final": True, "trial_status": "finished"})
    (t,) = _trials(tmp_path)
    assert t.state.name == "COMPLETE" and t.intermediate_values == {1: 0.2, 2: 0.4, 3: 0.6}
    assert writers and threading.current_thread().name not in writers


def test_a_failed_intermediate_write_is_logged_and_the_search_goes_on(tmp_path, caplog):
    s = _searcher(tmp_path)
    s.suggest("t1")

    def broken(*args):
        raise RuntimeError("database is locked")

    s.study._storage.set_trial_intermediate_value = broken
    s.on_trial_result("t1", {"objective": 0.2, "epoch": 1})
    s._writer.submit(lambda: None).result()  # the writer (one thread, in order) is past epoch 1's write
    assert "database is locked" not in caplog.text
    s.on_trial_result("t1", {"objective": 0.3, "epoch": 2})  # epoch 1's failure, done by now, is logged here
    assert caplog.text.count("database is locked") == 1
    s.on_trial_complete("t1", {"objective": 0.5, "final": True, "trial_status": "finished"})
    (t,) = _trials(tmp_path)
    assert t.state.name == "COMPLETE" and t.values == [0.5] and t.intermediate_values == {}
    assert caplog.text.count("database is locked") == 2


def test_a_searcher_pickled_before_the_background_writer_existed_still_works(tmp_path):
    s = _searcher(tmp_path)
    s.suggest("t1")
    old = pickle.loads(pickle.dumps(s))
    del old.__dict__["_writer"], old.__dict__["_pending"]  # the state an older driver saved
    old.on_trial_result("t1", {"objective": 0.3, "epoch": 1})
    old.on_trial_complete("t1", {"objective": 0.5, "final": True, "trial_status": "finished"})
    (t,) = _trials(tmp_path)
    assert t.state.name == "COMPLETE" and t.intermediate_values == {1: 0.3}
