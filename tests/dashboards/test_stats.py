"""Intervals and the paired verdict against scipy and by construction."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dashboards.stats import mean_ci, paired_verdict


def test_mean_ci_is_the_student_t_interval():
    x = [0.8, 0.85, 0.9, 0.7, 0.95]
    m, lo, hi, n = mean_ci(x)
    ref = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert (m, n) == (pytest.approx(np.mean(x)), 5)
    assert (lo, hi) == (pytest.approx(ref[0]), pytest.approx(ref[1]))
    assert mean_ci([0.5]) == (0.5, 0.5, 0.5, 1)
    assert mean_ci([])[3] == 0


def test_verdict_says_when_there_are_too_few_pairs():
    v = paired_verdict([0.1, 0.2], n_trials=2)
    assert not v.enough and "too few pairs to conclude" in v.sentence
    assert paired_verdict([], 0).sentence.startswith("No trial finished both arms")


def test_verdict_when_one_arm_clearly_wins():
    rng = np.random.default_rng(0)
    diffs = list(-0.1 + 0.01 * rng.standard_normal(12))
    v = paired_verdict(diffs, n_trials=12)
    assert v.enough and v.ci_high < 0 and v.p_value < 0.01
    assert "flat1d (consecutive 1-D filters) trained better" in v.sentence
    assert f"{np.mean(diffs):+.3f}" in v.sentence
    assert v.p_value == pytest.approx(stats.wilcoxon(diffs).pvalue)
    assert paired_verdict(diffs, 12) == v  # the bootstrap is seeded


def test_verdict_when_the_interval_includes_zero():
    v = paired_verdict([0.05, -0.04, 0.02, -0.03, 0.01, -0.02, 0.0, 0.03], n_trials=8)
    assert v.ci_low < 0 < v.ci_high and "no difference between the arms can be claimed" in v.sentence
