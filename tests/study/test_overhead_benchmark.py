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
