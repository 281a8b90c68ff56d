"""``benchmarks/study_overhead.py``'s steady-state figure: seconds per trial from one study's own clock;
``benchmarks/mlflow_server_cost.py``'s trials send what it says they send."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str = "study_overhead"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _runs(starts_s):
    return [SimpleNamespace(info=SimpleNamespace(start_time=int(t * 1000))) for t in starts_s]


def test_the_steady_state_leaves_out_the_first_start_of_the_workers():
    cadence = _bench()._cadence
    # One at a time: the first trial pays the worker's start (10 s), then one every 2.5 s.
    assert math.isclose(cadence(_runs([0, 10, 12.5, 15, 17.5]), 1), 2.5)
    # Two at a time: two cold trials start together, then one every 1.5 s on average.
    assert math.isclose(cadence(_runs([0, 0.1, 9, 10.5, 12, 13.5]), 2), 1.5)
    assert math.isnan(cadence(_runs([0, 10]), 1))  # no steady state to measure


def _run(pid, start_s, end_s, build, train, finish):
    metrics = {"final/overhead.build_s": build, "final/overhead.train_s": train, "final/overhead.finish_s": finish}
    return SimpleNamespace(info=SimpleNamespace(start_time=int(start_s * 1000),
                                                end_time=None if end_s is None else int(end_s * 1000)),
                           data=SimpleNamespace(tags={"rank1.pid": pid}, metrics=metrics))


def test_the_trials_own_clocks_pair_the_trials_of_each_worker_and_leave_out_their_work():
    own_clock = _bench()._own_clock
    runs = [  # two workers, interleaved in time; a worker's first trial pays its start in `build`
        _run("a", 0.0, 3.3, build=1.5, train=2.5, finish=0.6),   # in its run: 3.3 - 3.1 = 0.2
        _run("b", 0.5, 4.0, build=1.5, train=2.5, finish=0.7),   # 3.5 - 3.2 = 0.3
        _run("a", 3.45, 6.85, build=0.05, train=2.6, finish=0.6),  # between: 3.45 - 3.3 - 0.05 = 0.1; run 0.2
        _run("b", 4.2, 7.0, build=0.05, train=2.2, finish=0.5),  # between: 4.2 - 4.0 - 0.05 = 0.15
        _run("a", 7.0, None, build=0.05, train=0.0, finish=0.0),  # still running: ends no pair
    ]
    got = own_clock(runs)
    assert got["pairs"] == 3  # a0-a1, a1-a2, b0-b1; never a0-b0 (another worker)
    # the pairs: a0-a1 0.2 + 0.1; b0-b1 0.3 + 0.15; a1-a2 0.2 + (7.0 - 6.85 - 0.05 = 0.1)
    assert math.isclose(got["per_trial_s"], 0.3, abs_tol=1e-3)
    assert math.isclose(got["in_run_s"], 0.2, abs_tol=1e-3)
    assert math.isclose(got["between_s"], 0.1, abs_tol=1e-3)
    assert own_clock(runs[:2])["pairs"] == 0 and math.isnan(own_clock(runs[:2])["per_trial_s"])


@pytest.mark.slow(seconds=15)  # a new MLflow store's schema
def test_the_server_cost_benchmark_sends_a_trials_numbers_with_and_without_the_per_layer_ones(tmp_path, monkeypatch):
    """Against a real MLflow store (SQLite, no server): each form logs the counts the benchmark's
    docstring and results file state, the summary form no per-layer key, and the split by request
    has every request of a trial."""
    from mlflow import MlflowClient

    bench = _bench("mlflow_server_cost")
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("cost")
    clock = iter(range(1000))
    for form, numbers in (("full", 401), ("summary", 157)):
        spent = bench._trials(client, experiment_id, 1, form, cpu=lambda: float(next(clock)))
        assert list(spent) == list(bench.REQUESTS) and all(v > 0 for v in spent.values())
        (run,) = client.search_runs([experiment_id])  # the other form's run is deleted
        client.delete_run(run.info.run_id)
        rows = [m for k in run.data.metrics for m in client.get_metric_history(run.info.run_id, k)]
        assert len(rows) == numbers
        assert sorted({m.step for m in rows}) == [1, 2, 3]
        assert sum(m.key.startswith("final/") for m in rows) == sum(bench.END[:1 if form == "summary" else 2])
        assert any(".L0" in m.key for m in rows) == (form == "full")
        per_layer_epochs = [m.key for m in rows if m.step < 3 and ".L" in m.key]
        assert all(k.startswith("layers/") for k in per_layer_epochs)  # named as a study names them
        assert len(run.data.params) == bench.PARAMS and run.data.tags["rank1.status"] == "finished"
