"""The report's figures: matplotlib (Agg), one function per question, each with its data note.

Every section returns :class:`Section`: a title, figures as PNG bytes, and text that
states its data (how many trials and seeds) and says plainly when there are too few
to conclude.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dashboards.data import StudyData  # noqa: E402
from dashboards.stats import mean_ci, paired_verdict  # noqa: E402

__all__ = ["SECTIONS", "Section", "seed_rows"]

ARMS = ("rank1", "flat1d", "dense")
COLORS = {"rank1": "#c0392b", "flat1d": "#2471a3", "dense": "#7f8c8d"}
MIN_FOR_TREND = 2  # distinct values of a factor before a trend is drawn


@dataclass
class Section:
    key: str
    title: str
    figures: list[tuple[str, bytes]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def seed_rows(data: StudyData) -> list[dict[str, Any]]:
    """One row per (finished trial, seed, arm) with what the figures need."""
    rows = []
    for t in data.finished:
        for s, res in enumerate(t.results or []):
            for arm, r in res["arms"].items():
                if r["status"] != "finished":
                    continue
                hist = r["history"]
                last = hist[-1] if hist else {}
                inf = r.get("inference", {})
                rows.append({
                    "trial": t.trial_id, "seed": s, "arm": arm,
                    "depth": t.cfg("depth"), "init": t.cfg("init"), "projection": t.cfg("projection"),
                    "projection_norm": t.cfg("projection_norm"),
                    "acc": r["final"].get("decomposed_val_acc", r["final"].get("val_acc")),
                    "grad_out": [last.get(f"grad.out.L{i:02d}") for i in range(64) if f"grad.out.L{i:02d}" in last],
                    "residual": [h.get("residual.mean") for h in hist if "residual.mean" in h],
                    "inference": inf,
                })
    return rows


def _note(n_trials: int, n_rows: int, what: str, need: int = 2) -> str:
    s = f"Data: {n_trials} finished trial{'s' if n_trials != 1 else ''}, {n_rows} {what}."
    if n_trials < need:
        s += f" Too few to conclude anything (at least {need} finished trials are needed)."
    return s


def _by(rows, key, arm):
    groups: dict[Any, list[float]] = defaultdict(list)
    for r in rows:
        if r["arm"] == arm and r[key] is not None and r["acc"] is not None:
            groups[r[key]].append(r["acc"])
    return groups


def _errorbar_plot(ax, rows, key, arms=("rank1", "flat1d")) -> None:
    levels = sorted({r[key] for r in rows if r[key] is not None}, key=lambda v: (str(type(v)), v))
    numeric = all(isinstance(v, (int, float)) for v in levels)
    for j, arm in enumerate(arms):
        g = _by(rows, key, arm)
        xs, ms, lo, hi = [], [], [], []
        for i, lev in enumerate(levels):
            if lev not in g:
                continue
            m, low, high, n = mean_ci(g[lev])
            low, high = max(0.0, low), min(1.0, high)  # accuracy is bounded; so is its interval
            x = lev if numeric else i + (j - 0.5) * 0.15
            xs.append(x)
            ms.append(m)
            lo.append(m - low)
            hi.append(high - m)
            ax.annotate(f"n={n}", (x, m), textcoords="offset points", xytext=(5, -10), fontsize=7, color=COLORS[arm])
        if xs:
            ax.errorbar(xs, ms, yerr=[lo, hi], marker="o", capsize=4, label=arm, color=COLORS[arm],
                        linestyle="-" if numeric else "none")
    ax.set_ylim(0, 1.05)
    if not numeric:
        ax.set_xticks(range(len(levels)), [str(v) for v in levels])
    ax.set_ylabel("decomposed val accuracy")
    ax.grid(alpha=0.3)
    _legend(ax)


def frontier(data: StudyData, rows) -> Section:
    s = Section("frontier", "1. Trainability frontier: accuracy vs depth")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    _errorbar_plot(ax, rows, "depth", [a for a in ARMS if any(r["arm"] == a for r in rows)])
    ax.set_xlabel("depth (conv layers)")
    ax.set_title("mean and 95% interval over seeds and trials")
    s.figures.append(("frontier", _png(fig)))
    depths = sorted({r["depth"] for r in rows})
    s.text.append(_note(len(data.finished), len(rows), "(trial, seed, arm) results")
                  + f" Depths covered: {', '.join(map(str, depths)) or 'none'}.")
    if len(depths) < MIN_FOR_TREND:
        s.text.append("Only one depth was trained: no trend in depth can be read from this study.")
    return s


def gradient_flow(data: StudyData, rows) -> Section:
    s = Section("gradients", "2. Gradient flow: loss-gradient norm at each layer's output (last epoch)")
    arms = [a for a in ("rank1", "flat1d", "dense") if any(r["arm"] == a for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(arms)), figsize=(4.2 * max(1, len(arms)), 3.8), sharey=True, squeeze=False)
    depths = sorted({r["depth"] for r in rows})
    cmap = plt.get_cmap("viridis")
    for ax, arm in zip(axes[0], arms):
        for k, d in enumerate(depths):
            curves = [r["grad_out"] for r in rows if r["arm"] == arm and r["depth"] == d and r["grad_out"]]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = [math.exp(sum(math.log(max(c[i], 1e-30)) for c in curves) / len(curves)) for i in range(n)]
            ax.plot(range(n), mean, marker=".", color=cmap(k / max(1, len(depths) - 1)), label=f"depth {d}")
        ax.set_yscale("log")
        ax.set_xlabel("conv layer (input side = 0)")
        ax.set_title(arm)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("||dL / d output|| (geometric mean)")
    _legend(axes[0][-1], fontsize=7)
    s.figures.append(("gradient_flow", _png(fig)))
    s.text.append(_note(len(data.finished), len(rows), "(trial, seed, arm) curves")
                  + " A curve that falls towards layer 0 is a gradient vanishing on its way down.")
    return s


def projection(data: StudyData, rows) -> Section:
    s = Section("projection", "3. Projection: period, norm, and how far training drifts off rank-1")
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    _errorbar_plot(axes[0], rows, "projection")
    axes[0].set_title("by projection period")
    _errorbar_plot(axes[1], rows, "projection_norm")
    axes[1].set_title("by projection norm")
    ax = axes[2]
    n_curves = 0
    for r in rows:
        if r["arm"] == "rank1" and len(r["residual"]) > 0:
            ax.plot(range(1, len(r["residual"]) + 1), r["residual"], alpha=0.6, marker=".")
            n_curves += 1
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean ||W − P(W)|| / ||W|| before projecting")
    ax.set_title("rank-1 residual (rank1 arm)")
    ax.grid(alpha=0.3)
    s.figures.append(("projection", _png(fig)))
    s.text.append(_note(len(data.finished), len(rows), "(trial, seed, arm) results")
                  + f" {n_curves} residual curves (trials projecting every epoch or more often).")
    return s


def initialisation(data: StudyData, rows) -> Section:
    s = Section("init", "4. Initialisation: accuracy by factor init scheme")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    _errorbar_plot(ax, rows, "init")
    ax.set_xlabel("factor initialisation")
    s.figures.append(("init", _png(fig)))
    inits = sorted({str(r["init"]) for r in rows})
    s.text.append(_note(len(data.finished), len(rows), "(trial, seed, arm) results") + f" Schemes: {', '.join(inits)}.")
    return s


def speed(data: StudyData, rows) -> Section:
    s = Section("speed", "5. Speed: decomposed vs dense inference, and the accuracy-latency front")
    r1 = [r for r in rows if r["arm"] == "rank1" and r["inference"]]
    batches = sorted({int(k.rsplit("_b", 1)[1]) for r in r1 for k in r["inference"] if k.startswith("speedup_b")})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax = axes[0]
    for b in batches:
        g: dict[int, list[float]] = defaultdict(list)
        for r in r1:
            if f"speedup_b{b}" in r["inference"]:
                g[r["depth"]].append(r["inference"][f"speedup_b{b}"])
        xs = sorted(g)
        ax.plot(xs, [mean_ci(g[x])[0] for x in xs], marker="o", label=f"batch {b}")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("depth")
    ax.set_ylabel("speedup: dense latency / decomposed latency")
    ax.set_title(f"measured on the training device ({r1[0]['inference'].get('device', '?') if r1 else '?'})")
    ax.grid(alpha=0.3)
    _legend(ax)
    ax = axes[1]
    b = batches[0] if batches else 1
    pts = [(r["inference"].get(f"decomposed_latency_ms_b{b}"), r["acc"], r["trial"]) for r in r1]
    pts = [p for p in pts if p[0] is not None]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=COLORS["rank1"], alpha=0.7, label="trials")
        front, best = [], -1.0
        for lat, acc, _ in sorted(pts):
            if acc > best:
                front.append((lat, acc))
                best = acc
        ax.plot([p[0] for p in front], [p[1] for p in front], color="k", drawstyle="steps-post", label="Pareto front")
        ax.legend()
    ax.set_xlabel(f"decomposed latency, batch {b} (ms)")
    ax.set_ylabel("rank1 decomposed val accuracy")
    ax.grid(alpha=0.3)
    s.figures.append(("speed", _png(fig)))
    s.text.append(_note(len(data.finished), len(r1), "rank1 (trial, seed) measurements")
                  + " Latency is the median of repeated timed runs after warm-up.")
    return s


def search(data: StudyData, rows) -> Section:
    s = Section("search", "6. Search: optimisation history and parameter importances")
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    ax = axes[0]
    pts = [(n, v[0]) for n, st, v in data.optuna_order if st == "COMPLETE" and v]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label="trial value")
        best, run = [], -float("inf")
        for _, v in pts:
            run = max(run, v)
            best.append(run)
        ax.plot([p[0] for p in pts], best, color="k", drawstyle="steps-post", label="best so far")
        ax.legend()
    for n, st, _ in data.optuna_order:
        if st != "COMPLETE":
            ax.axvline(n, color="#bbb", lw=0.8)
    ax.set_xlabel("Optuna trial number")
    ax.set_ylabel("objective")
    ax.set_title("history (grey lines: pruned / failed trials)")
    ax.grid(alpha=0.3)
    ax = axes[1]
    if data.importances:
        names = list(data.importances)
        ax.barh(names, [data.importances[k] for k in names])
        ax.invert_yaxis()
        ax.set_xlabel("importance (fANOVA)")
    else:
        ax.text(0.5, 0.5, data.importance_note or "not available", ha="center", va="center", wrap=True)
        ax.set_axis_off()
    ax.set_title("parameter importances")
    s.figures.append(("search", _png(fig)))
    states: dict[str, int] = defaultdict(int)
    for _, st, _ in data.optuna_order:
        states[st.lower()] += 1
    s.text.append(f"Data: {len(data.optuna_order)} Optuna trials of {data.n_trials_planned} planned ("
                  + ", ".join(f"{v} {k}" for k, v in sorted(states.items())) + ").")
    if data.importance_note:
        s.text.append(data.importance_note + ".")
    return s


def verdict(data: StudyData, rows) -> Section:
    s = Section("verdict", "7. Paired verdict: does rank-1 training beat consecutive 1-D training?")
    pairs: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["arm"] in ("rank1", "flat1d") and r["acc"] is not None:
            pairs[(r["trial"], r["seed"])][r["arm"]] = r["acc"]
    diffs = [p["rank1"] - p["flat1d"] for p in pairs.values() if "rank1" in p and "flat1d" in p]
    trials = {k[0] for k, p in pairs.items() if "rank1" in p and "flat1d" in p}
    v = paired_verdict(diffs, len(trials))
    s.data = v.to_dict()
    s.text.append(v.sentence)
    if diffs:
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        ax.hist(diffs, bins=min(20, max(3, len(diffs))), color="#888")
        ax.axvline(0, color="k", lw=0.8)
        ax.axvspan(v.ci_low, v.ci_high, color=COLORS["rank1"], alpha=0.2, label="95% bootstrap CI of the mean")
        ax.axvline(v.mean_diff, color=COLORS["rank1"], label="mean")
        ax.set_xlabel("rank1 − flat1d decomposed val accuracy, per (trial, seed)")
        ax.legend(fontsize=8)
        s.figures.append(("verdict", _png(fig)))
    return s


def champion(data: StudyData, rows) -> Section:
    s = Section("champion", "8. Champion")
    c = data.champion
    if not c:
        s.text.append("No model was registered: no trial finished.")
        return s
    card = c.get("card") or {}
    m = card.get("metrics", {})
    s.data = {
        "registered model": c["name"], "version": c["version"], "alias": c["alias"],
        "trial": card.get("trial_id"), "config": " ".join(f"{k}={v}" for k, v in sorted(card.get("params", {}).items())),
        "decomposed val accuracy": f"{card.get('val_acc', float('nan')):.4f}",
        "speedup vs dense": ", ".join(f"batch {k.rsplit('_b', 1)[1]}: {v:.2f}x" for k, v in sorted(m.items())
                                      if k.startswith("rank1.speedup_b")) or "not measured",
        "parameters (dense / decomposed)": f"{int(m.get('rank1.dense_params', 0))} / {int(m.get('rank1.decomposed_params', 0))}",
        "pull": f"rank1 pull {c['name']}@{c['alias']} --out model/",
    }
    return s


SECTIONS = [frontier, gradient_flow, projection, initialisation, speed, search, verdict, champion]
