"""``benchmarks/study_overhead.py``'s steady-state figure: seconds per trial from one study's own clock."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("study_overhead", ROOT / "benchmarks" / "study_overhead.py")
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
