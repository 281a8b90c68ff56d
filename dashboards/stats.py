"""Intervals and the paired verdict: what the report may claim, and with what confidence."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Verdict", "mean_ci", "paired_verdict"]


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float, int]:
    """``(mean, low, high, n)``: a Student-t interval; ``low = high = mean`` when n < 2."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    m = float(v.mean())
    if n < 2:
        return m, m, m, n
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return m, m - half, m + half, n


@dataclass
class Verdict:
    """rank1 − flat1d decomposed validation accuracy over paired (trial, seed) runs."""

    n_pairs: int
    n_trials: int
    mean_diff: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    test: str
    sentence: str
    enough: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def paired_verdict(diffs: list[float], n_trials: int, seed: int = 0, n_boot: int = 10000,
                   min_pairs: int = 6) -> Verdict:
    """Bootstrap 95% interval of the mean difference and a Wilcoxon signed-rank test.

    With fewer than ``min_pairs`` pairs the numbers are still given, but the sentence
    says plainly that they are too few to conclude.
    """
    d = np.asarray([x for x in diffs if math.isfinite(x)], dtype=float)
    n = len(d)
    if n == 0:
        return Verdict(0, n_trials, None, None, None, None, "none",
                       "No trial finished both arms, so there is nothing to compare yet.", False)
    mean = float(d.mean())
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = (float(x) for x in np.percentile(boots, [2.5, 97.5]))
    p: float | None = None
    test = "Wilcoxon signed-rank"
    if n >= 2 and np.any(d != 0):
        from scipy import stats

        p = float(stats.wilcoxon(d).pvalue)
    enough = n >= min_pairs
    who = "rank1 (3-D filters projected to rank-1)" if mean > 0 else "flat1d (consecutive 1-D filters)"
    ptxt = f"{test} p = {p:.3g}" if p is not None else "no test: every difference is zero"
    head = (f"Over {n} paired run{'s' if n != 1 else ''} ({n_trials} trial{'s' if n_trials != 1 else ''}), "
            f"rank1 − flat1d decomposed validation accuracy is {mean:+.3f} "
            f"(95% bootstrap CI [{lo:+.3f}, {hi:+.3f}]; {ptxt}).")
    if not enough:
        tail = f" That is too few pairs to conclude anything (at least {min_pairs} are needed)."
    elif lo > 0 or hi < 0:
        tail = f" The interval excludes zero: {who} trained better in this study."
    else:
        tail = " The interval includes zero: no difference between the arms can be claimed from this study."
    return Verdict(n, n_trials, mean, lo, hi, p, test, head + tail, enough)
