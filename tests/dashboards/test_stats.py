"""Intervals and the paired verdict against scipy and by construction."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dashboards.stats import best_vs_best, mean_ci, paired_verdict


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
    # one pair has no interval to give (its bootstrap interval would be the pair itself)
    one = paired_verdict([-0.2], n_trials=1)
    assert "one pair: no interval" in one.sentence and "CI" not in one.sentence
    assert one.brief() == "-0.200 over 1 pair (one pair: no interval; too few pairs to conclude)"
    assert v.brief() == (f"+0.150 over 2 pairs (95% bootstrap CI [{v.ci_low:+.3f}, {v.ci_high:+.3f}]; "
                         "too few pairs to conclude)")
    assert paired_verdict([], 0).brief() == "no pair finished both arms"
    # and an arm with one confirmation seed gives no Welch interval either
    bvb = best_vs_best("rank1", [0.5], "flat1d", [0.4, 0.45])
    assert "one seed in an arm: no interval" in bvb.sentence and bvb.interval() == "one seed in an arm: no interval"
    two = best_vs_best("rank1", [0.5, 0.55], "flat1d", [0.4, 0.45])
    assert two.interval() == f"95% Welch CI [{two.ci_low:+.3f}, {two.ci_high:+.3f}]" and two.interval() in two.sentence


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
