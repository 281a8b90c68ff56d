"""Intervals and the paired verdict: what the report may claim, and with what confidence."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["BestVsBest", "Verdict", "best_vs_best", "mean_ci", "paired_verdict", "welch_ci"]


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

    def interval(self) -> str:
        return _interval("bootstrap", self.ci_low, self.ci_high, "one pair" if self.n_pairs < 2 else None)

    def brief(self) -> str:
        """A line for one variant pair: mean difference, how many pairs, the interval."""
        if self.n_pairs == 0:
            return "no pair finished both arms"
        pairs = f"{self.n_pairs} pair{'s' if self.n_pairs != 1 else ''}"
        caveat = "" if self.enough else "; too few pairs to conclude"
        return f"{self.mean_diff:+.3f} over {pairs} ({self.interval()}{caveat})"


def _interval(kind: str, lo: float | None, hi: float | None, none_because: str | None = None) -> str:
    """A 95% interval as the report and the summary word it, or why there is none: from a
    single pair, or an arm with a single seed, the "interval" would be the point itself."""
    return f"{none_because}: no interval" if none_because else f"95% {kind} CI [{lo:+.3f}, {hi:+.3f}]"


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
    verdict = Verdict(n, n_trials, mean, lo, hi, p, test, "", enough)
    head = (f"Over {n} paired run{'s' if n != 1 else ''} ({n_trials} trial{'s' if n_trials != 1 else ''}), "
            f"rank1 − flat1d decomposed validation accuracy is {mean:+.3f} ({verdict.interval()}; {ptxt}).")
    if not enough:
        tail = f" That is too few pairs to conclude anything (at least {min_pairs} are needed)."
    elif lo > 0 or hi < 0:
        tail = f" The interval excludes zero: {who} trained better in this study."
    else:
        tail = " The interval includes zero: no difference between the arms can be claimed from this study."
    verdict.sentence = head + tail
    return verdict


def welch_ci(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float, float | None]:
    """``(mean(a) - mean(b), low, high, p)``: Welch's t interval and test for a difference of
    means of two independent samples (unequal variances, Welch-Satterthwaite degrees of
    freedom); ``low = high = diff`` and ``p = None`` when either sample has fewer than 2."""
    x = np.asarray([v for v in a if v is not None and math.isfinite(v)], dtype=float)
    y = np.asarray([v for v in b if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0 or len(y) == 0:
        return float("nan"), float("nan"), float("nan"), None
    diff = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return diff, diff, diff, None
    from scipy import stats

    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:
        return diff, diff, diff, None
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df) * se)
    p = float(2 * stats.t.sf(abs(diff) / se, df))
    return diff, diff - half, diff + half, p


@dataclass
class BestVsBest:
    """The best configuration of arm ``a`` against that of arm ``b``, each retrained with fresh
    seeds and scored on test."""

    a: str
    b: str
    n_a: int
    n_b: int
    mean_a: float | None
    mean_b: float | None
    diff: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    sentence: str
    enough: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def interval(self) -> str:
        return _interval("Welch", self.ci_low, self.ci_high,
                         "one seed in an arm" if min(self.n_a, self.n_b) < 2 else None)


def best_vs_best(a: str, acc_a: list[float], b: str, acc_b: list[float], min_seeds: int = 3) -> BestVsBest:
    """Welch's 95% interval of ``mean(test acc of a) - mean(test acc of b)`` over the
    confirmation seeds, in one quotable sentence."""
    diff, lo, hi, p = welch_ci(acc_a, acc_b)
    na = sum(1 for v in acc_a if v is not None and math.isfinite(v))
    nb = sum(1 for v in acc_b if v is not None and math.isfinite(v))
    if not (na and nb):
        return BestVsBest(a, b, na, nb, None, None, None, None, None, None,
                          f"No confirmation run of {a if not na else b} finished: nothing to compare.", False)
    ma = float(np.mean([v for v in acc_a if v is not None and math.isfinite(v)]))
    mb = float(np.mean([v for v in acc_b if v is not None and math.isfinite(v)]))
    ptxt = f"Welch p = {p:.3g}" if p is not None else "no test"
    enough = min(na, nb) >= min_seeds
    result = BestVsBest(a, b, na, nb, ma, mb, diff, lo, hi, p, "", enough)
    head = (f"Tuned best vs best on test: {a} {ma:.3f} ({na} seeds) vs {b} {mb:.3f} ({nb} seeds), "
            f"difference {diff:+.3f} ({result.interval()}; {ptxt}).")
    if not enough:
        tail = f" Too few seeds to conclude anything (at least {min_seeds} per arm are needed)."
    elif lo > 0 or hi < 0:
        tail = f" The interval excludes zero: the best {a if diff > 0 else b} network is better on test."
    else:
        tail = f" The interval includes zero: the best {a} and {b} networks cannot be told apart on test."
    result.sentence = head + tail
    return result
