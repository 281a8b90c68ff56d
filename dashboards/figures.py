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
from dashboards.stats import best_vs_best, mean_ci, paired_verdict  # noqa: E402
from study.names import FINAL, batch_of, measured_inside_trial  # noqa: E402

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
    # Constrained layout keeps labels and legends inside the figure in the one draw that saving
    # does; bbox_inches="tight" drew every figure twice (0.3 s against 1.0 s for a 2x3 grid).
    buf = io.BytesIO()
    fig.set_layout_engine("constrained")
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


# Arm-specific fields that make a different *method* of an arm (the per-arm optimiser
# settings are tuning, not method): they label arm variants in the figures and verdicts.
VARIANT_FIELDS = {"rank1": ("projection", "projection_norm", "projection_momentum", "bn_recalibrate"),
                  "flat1d": ("flat1d_init",), "dense": ()}


def _arm_specific() -> set[str]:
    from rank1.train import ARM_SPECIFIC

    return {f for names in ARM_SPECIFIC.values() for f in names}


def seed_rows(data: StudyData) -> list[dict[str, Any]]:
    """One row per (finished trial, seed, arm) with what the figures need.

    ``group`` says which rows are *paired*: the arms of one trial and seed, trained side by
    side; or, for trials that train one arm each (a design whose cells are arms), the trials
    at the same shared settings and seed (the same initial draw and data order). ``variant``
    names the arm and its method settings where the study varies them.
    """
    rows = []
    own = _arm_specific() | {"arm", "seed"}
    for t in data.finished:
        for s, res in enumerate(t.results or []):
            cfg = res.get("config", {})
            if len(res["arms"]) > 1:  # arms trained side by side: paired within the trial
                group: tuple = ("trial", t.trial_id, s)
            else:  # one arm per trial: paired with other trials at the same shared settings and seed
                group = ("shared", cfg.get("seed", s), tuple(sorted((k, repr(v)) for k, v in cfg.items()
                                                                   if k not in own)))
            for arm, r in res["arms"].items():
                if r["status"] != "finished":
                    continue
                hist = r["history"]
                last = hist[-1] if hist else {}
                rows.append({
                    "trial": t.trial_id, "seed": s, "arm": arm, "group": group, "config": cfg,
                    "depth": cfg.get("depth", t.cfg("depth")), "init": cfg.get("init", t.cfg("init")),
                    "projection": cfg.get("projection", t.cfg("projection")),
                    "projection_norm": cfg.get("projection_norm", t.cfg("projection_norm")),
                    "batchnorm": cfg.get("batchnorm", t.cfg("batchnorm")),
                    "acc": r["final"].get("decomposed_val_acc", r["final"].get("val_acc")),
                    "test_acc": r["final"].get("test_acc"),
                    "grad_out": [last.get(f"grad.out.L{i:02d}") for i in range(64) if f"grad.out.L{i:02d}" in last],
                    "gradflow": r.get("gradflow", {}), "lowrank": r.get("lowrank", {}),
                    "residual": [h.get("residual.mean") for h in hist if "residual.mean" in h],
                    "inference": r.get("inference", {}), "same_start": not res.get("notes"),
                })
    # Variant labels: an arm's method settings that take more than one value in this study.
    for arm, fields in VARIANT_FIELDS.items():
        mine = [r for r in rows if r["arm"] == arm]
        varying = [f for f in fields if len({repr(r["config"].get(f)) for r in mine}) > 1]
        for r in mine:
            r["variant"] = arm + (" (" + ", ".join(f"{r['config'].get(f)}" for f in varying) + ")" if varying else "")
    return rows


def paired_diffs(rows, a: str = "rank1", b: str = "flat1d", key: str = "acc") -> dict[tuple[str, str], list[float]]:
    """``{(variant of a, variant of b): [a - b per group]}`` over groups holding both; plus
    ``(a, b)``: every group's one pair pooled, when each group holds one run of each arm
    (arms trained side by side), whatever its variants."""
    groups: dict[Any, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["arm"] in (a, b) and r[key] is not None:
            groups[r["group"]][r["arm"]].append(r)
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    both = [g for g in groups.values() if g.get(a) and g.get(b)]
    for g in both:
        for ra in g[a]:
            for rb in g[b]:
                out[(ra["variant"], rb["variant"])].append(ra[key] - rb[key])
    if both and all(len(g[a]) == 1 and len(g[b]) == 1 for g in both) and (a, b) not in out:
        out[(a, b)] = [g[a][0][key] - g[b][0][key] for g in both]
    return dict(out)


def _note(n_trials: int, n_rows: int, what: str, need: int = 2) -> str:
    s = f"Data: {n_trials} finished trial{'s' if n_trials != 1 else ''}, {n_rows} {what}."
    if n_trials < need:
        s += f" Too few to conclude anything (at least {need} finished trials are needed)."
    return s


_STYLES = ("-", "--", ":", "-.")


def _series(rows) -> list[tuple[str, str, str]]:
    """``(variant, arm, linestyle)`` of every arm variant in ``rows``, rank1 first, dense last."""
    out = []
    for arm in ARMS:
        vs = sorted({r["variant"] for r in rows if r["arm"] == arm})
        out += [(v, arm, _STYLES[i % len(_STYLES)]) for i, v in enumerate(vs)]
    return out


def _by(rows, key, variant):
    groups: dict[Any, list[float]] = defaultdict(list)
    for r in rows:
        if r["variant"] == variant and r[key] is not None and r["acc"] is not None:
            groups[r[key]].append(r["acc"])
    return groups


def _errorbar_plot(ax, rows, key, arms=ARMS) -> None:
    levels = sorted({r[key] for r in rows if r[key] is not None}, key=lambda v: (str(type(v)), v))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in levels)
    series = [s for s in _series(rows) if s[1] in arms]
    for j, (variant, arm, style) in enumerate(series):
        g = _by(rows, key, variant)
        xs, ms, lo, hi = [], [], [], []
        for i, lev in enumerate(levels):
            if lev not in g:
                continue
            m, low, high, n = mean_ci(g[lev])
            low, high = max(0.0, low), min(1.0, high)  # accuracy is bounded; so is its interval
            x = lev if numeric else i + (j - (len(series) - 1) / 2) * 0.12
            xs.append(x)
            ms.append(m)
            lo.append(m - low)
            hi.append(high - m)
            ax.annotate(f"n={n}", (x, m), textcoords="offset points", xytext=(5, -10), fontsize=7, color=COLORS[arm])
        if xs:
            ax.errorbar(xs, ms, yerr=[lo, hi], marker="o", capsize=4, label=variant, color=COLORS[arm],
                        linestyle=style if numeric else "none")
    ax.set_ylim(0, 1.05)
    if not numeric:
        ax.set_xticks(range(len(levels)), [str(v) for v in levels])
    ax.set_ylabel("decomposed val accuracy")
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=7)


def _start_note(rows) -> list[str]:
    if any(not r["same_start"] for r in rows):
        return ["Some runs do not start the arms from the same function (flat1d_init other than shared, or "
                "rank1_start full): their differences mix initialisation with training dynamics."]
    return []


def frontier(data: StudyData, rows) -> Section:
    s = Section("frontier", "1. Trainability frontier: accuracy vs depth, rank1 vs flat1d vs the dense control")
    bns = sorted({bool(r["batchnorm"]) for r in rows}) or [False]
    fig, axes = plt.subplots(1, len(bns), figsize=(6.4 * len(bns), 4), squeeze=False, sharey=True)
    for ax, bn in zip(axes[0], bns):
        _errorbar_plot(ax, [r for r in rows if bool(r["batchnorm"]) == bn], "depth")
        ax.set_xlabel("depth (conv layers)")
        ax.set_title(f"batch norm {'on' if bn else 'off'}: mean and 95% interval over seeds and trials", fontsize=9)
    s.figures.append(("frontier", _png(fig)))
    depths = sorted({r["depth"] for r in rows})
    arms = sorted({r["arm"] for r in rows}, key=ARMS.index)
    s.text.append(_note(len(data.finished), len(rows), "(trial, seed, arm) results")
                  + f" Depths covered: {', '.join(map(str, depths)) or 'none'}. Arms: {', '.join(arms) or 'none'}.")
    if "dense" not in arms:
        s.text.append("No dense control was trained (train.arm: all adds it): a low accuracy cannot be told apart "
                      "from a setting in which any conv net fails.")
    if len(depths) < MIN_FOR_TREND:
        s.text.append("Only one depth was trained: no trend in depth can be read from this study.")
    s.text += _start_note(rows)
    return s


_WHEN = (("init", "at initialisation"), ("epoch1", "after epoch 1"), ("end", "at the end"))


def _geo(values: list[float]) -> float:
    v = [x for x in values if x is not None and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else float("nan")


def gradient_flow(data: StudyData, rows) -> Section:
    s = Section("gradients", "2. Gradient flow: per-element gradient at each layer's output, at init / epoch 1 / end")
    with_flow = [r for r in rows if r["gradflow"]]
    series = _series(with_flow)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.2), squeeze=False)
    depths = sorted({r["depth"] for r in with_flow})
    deepest = depths[-1] if depths else None
    for j, (when, label) in enumerate(_WHEN):
        ax = axes[0][j]
        for variant, arm, style in series:
            g: dict[int, list[float]] = defaultdict(list)
            for r in with_flow:
                v = r["gradflow"].get(when, {}).get("out.ratio")
                if r["variant"] == variant and v is not None:
                    g[r["depth"]].append(v)
            xs = sorted(g)
            if xs:
                ax.plot(xs, [_geo(g[x]) for x in xs], marker="o", color=COLORS[arm], linestyle=style, label=variant)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("depth")
        ax.set_title(f"first / last layer, {label}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax = axes[1][j]
        for variant, arm, style in series:
            curves = [[r["gradflow"].get(when, {}).get(f"out.L{i:02d}") for i in range(64)
                       if f"out.L{i:02d}" in r["gradflow"].get(when, {})]
                      for r in with_flow if r["variant"] == variant and r["depth"] == deepest]
            curves = [c for c in curves if c]
            if curves:
                n = min(len(c) for c in curves)
                ax.plot(range(n), [_geo([c[i] for c in curves]) for i in range(n)], marker=".", color=COLORS[arm],
                        linestyle=style, label=variant)
        ax.set_yscale("log")
        ax.set_xlabel(f"conv layer at depth {deepest} (input side = 0)")
        ax.set_title(f"per-layer RMS ||dL/d output||, {label}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("ratio (geometric mean)")
    axes[1][0].set_ylabel("RMS gradient (geometric mean)")
    _legend(axes[0][-1], fontsize=7)
    s.figures.append(("gradient_flow", _png(fig)))
    s.text.append(_note(len(data.finished), len(with_flow), "(trial, seed, arm) measurements")
                  + " Measured the same way for every arm: the RMS of the loss gradient with respect to each conv "
                    "layer's output on fixed training batches, on the network the arm is scored as (rank1: "
                    "projected). A ratio far below 1 is a gradient vanishing on its way down. The ratio at "
                    "initialisation and after epoch 1 is the candidate cause; at the end it may only show the "
                    "consequence of an arm that already failed.")
    s.data = {"ratio": {v: {when: _geo([r["gradflow"].get(when, {}).get("out.ratio") for r in with_flow
                                        if r["variant"] == v]) for when, _ in _WHEN} for v, _, _ in series}}
    return s


def low_rank(data: StudyData, rows) -> Section:
    s = Section("lowrank", "3. Low-rank outputs: rank1 vs flat1d vs dense")
    with_rank = [r for r in rows if r["lowrank"]]
    series = _series(with_rank)
    depths = sorted({r["depth"] for r in with_rank})
    deepest = depths[-1] if depths else None
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    for variant, arm, style in series:
        curves = [[r["lowrank"][f"L{i:02d}.entropy_frac"] for i in range(64) if f"L{i:02d}.entropy_frac" in r["lowrank"]]
                  for r in with_rank if r["variant"] == variant and r["depth"] == deepest]
        curves = [c for c in curves if c]
        if curves:
            n = min(len(c) for c in curves)
            ax.plot(range(n), [statistics_mean([c[i] for c in curves]) for i in range(n)], marker=".",
                    color=COLORS[arm], linestyle=style, label=variant)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"conv layer at depth {deepest}")
    ax.set_ylabel("effective rank / max rank")
    ax.set_title("entropy effective rank of each layer's output", fontsize=9)
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=7)
    for ax, key, title in ((axes[1], "mean.entropy_frac", "mean over layers (entropy rank / max)"),
                           (axes[2], "penultimate.energy99", "penultimate features: rank holding 99% energy")):
        for variant, arm, style in series:
            g: dict[int, list[float]] = defaultdict(list)
            for r in with_rank:
                if r["variant"] == variant and key in r["lowrank"]:
                    g[r["depth"]].append(r["lowrank"][key])
            xs = sorted(g)
            if xs:
                ms = [mean_ci(g[x]) for x in xs]
                ax.errorbar(xs, [m[0] for m in ms], yerr=[[m[0] - m[1] for m in ms], [m[2] - m[0] for m in ms]],
                            marker="o", capsize=3, color=COLORS[arm], linestyle=style, label=variant)
        ax.set_xlabel("depth")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    s.figures.append(("low_rank", _png(fig)))
    s.text.append(_note(len(data.finished), len(with_rank), "(trial, seed, arm) measurements")
                  + " Each conv layer's output on a fixed validation batch, one channels x pixels matrix per image: "
                    "the entropy effective rank (exp of the entropy of the normalised singular values) over the "
                    "largest possible rank, averaged over images; the penultimate features are one images x features "
                    "matrix. The paper claims rank-1 filters constrain outputs to a low-dimensional subspace: that "
                    "predicts lower ranks for rank1 than for dense (flat1d computes the same function class as rank1).")
    s.data = {v: {k: statistics_mean([r["lowrank"].get(k) for r in with_rank if r["variant"] == v
                                      and r["lowrank"].get(k) is not None])
                  for k in ("mean.entropy_frac", "mean.energy99_frac", "penultimate.energy99", "penultimate.entropy")}
              for v, _, _ in series}
    return s


def statistics_mean(values: list[float]) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else float("nan")


def projection(data: StudyData, rows) -> Section:
    s = Section("projection", "4. Projection: period, norm, and how far training drifts off rank-1")
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    r1 = [r for r in rows if r["arm"] == "rank1"]
    _errorbar_plot(axes[0], [dict(r, variant="rank1") for r in r1], "projection", arms=("rank1",))
    axes[0].set_title("rank1 by projection period", fontsize=9)
    _errorbar_plot(axes[1], [dict(r, variant="rank1") for r in r1], "projection_norm", arms=("rank1",))
    axes[1].set_title("rank1 by projection norm", fontsize=9)
    for ax in axes[:2]:
        for arm, ls in (("flat1d", "--"), ("dense", ":")):
            accs = [r["acc"] for r in rows if r["arm"] == arm and r["acc"] is not None]
            if accs:
                ax.axhline(mean_ci(accs)[0], color=COLORS[arm], ls=ls, lw=1, label=f"{arm} (mean, all settings)")
        _legend(ax, fontsize=7)
    ax = axes[2]
    n_curves = 0
    for r in r1:
        if len(r["residual"]) > 0:
            ax.plot(range(1, len(r["residual"]) + 1), r["residual"], alpha=0.6, marker=".")
            n_curves += 1
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean ||W − P(W)|| / ||W|| before projecting")
    ax.set_title("rank-1 residual (rank1 arm)", fontsize=9)
    ax.grid(alpha=0.3)
    s.figures.append(("projection", _png(fig)))
    s.text.append(_note(len(data.finished), len(rows), "(trial, seed, arm) results")
                  + f" {n_curves} residual curves (trials projecting every epoch or more often). The flat1d and dense "
                    "lines are references: projection settings do not change those arms.")
    return s


def initialisation(data: StudyData, rows) -> Section:
    s = Section("init", "5. Initialisation: accuracy by factor init scheme")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    _errorbar_plot(ax, rows, "init")
    ax.set_xlabel("factor initialisation")
    s.figures.append(("init", _png(fig)))
    inits = sorted({str(r["init"]) for r in rows})
    s.text.append(_note(len(data.finished), len(rows), "(trial, seed, arm) results") + f" Schemes: {', '.join(inits)}.")
    return s


def speed(data: StudyData, rows) -> Section:
    s = Section("speed", "6. Speed: decomposed vs dense inference, and the accuracy-latency front")
    r1 = [r for r in rows if r["arm"] == "rank1" and r["inference"]]
    batches = sorted({batch_of(k) for r in r1 for k in r["inference"] if k.startswith("speedup_b")})
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
        # Ringed points too: a front of one trial (the fastest is also the most accurate) is no line.
        ax.plot([p[0] for p in front], [p[1] for p in front], color="k", drawstyle="steps-post", marker="o",
                markerfacecolor="none", markersize=10, label="Pareto front")
        ax.legend()
    ax.set_xlabel(f"decomposed latency, batch {b} (ms)")
    ax.set_ylabel("rank1 decomposed val accuracy")
    ax.grid(alpha=0.3)
    s.figures.append(("speed", _png(fig)))
    s.text.append(_note(len(data.finished), len(r1), "rank1 (trial, seed) measurements")
                  + " Latency is the median of repeated timed runs after warm-up.")
    return s


def search(data: StudyData, rows) -> Section:
    s = Section("search", "7. Search: optimisation history and parameter importances")
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


PAIRED_QUESTION = ("Paired at equal settings answers: does the training method matter, everything else equal? "
                   "Each pair is the rank1 and the flat1d arm at the same shared settings and seed (the same data "
                   "order, and the same initial function where flat1d_init is shared and rank1_start is rank1), "
                   "scored on validation.")
BEST_QUESTION = ("Tuned best vs best answers: does the best rank-1 network beat the best flattened one? Each arm's "
                 "best configuration by its own validation accuracy, retrained with fresh seeds, scored on test.")


def confirm_accuracies(data: StudyData) -> dict[str, list[float]]:
    """Test accuracy of each arm's confirmation runs (finished ones), in seed order."""
    out: dict[str, list[float]] = defaultdict(list)
    for t in data.confirms:
        arm = t.config.get("arm")
        acc = t.metrics.get(f"{FINAL}{arm}.test_acc")
        if t.status == "finished" and acc is not None:
            out[arm].append(acc)
    return dict(out)


def verdict(data: StudyData, rows) -> Section:
    s = Section("verdict", "8. Verdicts: does rank-1 training beat consecutive 1-D training?")
    by_pair = paired_diffs(rows)
    # The headline: every pair pooled where each group holds one run of each arm; else the
    # variant pair with the most pairs.
    head = ("rank1", "flat1d") if ("rank1", "flat1d") in by_pair else max(
        by_pair, key=lambda k: (len(by_pair[k]), k), default=None)
    diffs = by_pair.get(head, []) if head else []

    def trials_of(pair: tuple[str, str] | None) -> int:  # the trials a pair's runs came from
        return len({r["trial"] for r in rows if r["arm"] == "rank1" and (pair is None or pair[0] in ("rank1", r["variant"]))})

    v = paired_verdict(diffs, trials_of(head) if diffs else 0)
    s.data = {**v.to_dict(), "pair": list(head) if head else None,
              "pairs": {f"{a} vs {b}": paired_verdict(d, trials_of((a, b))).to_dict()
                        for (a, b), d in sorted(by_pair.items())}}
    label = f" ({head[0]} vs {head[1]})" if head and head != ("rank1", "flat1d") else ""
    s.text.append(v.sentence + label)
    s.text.append(PAIRED_QUESTION)
    for (a, b), d in sorted(by_pair.items()):
        if (a, b) != head:
            pv = paired_verdict(d, trials_of((a, b)))
            s.text.append(f"{a} vs {b}: {pv.brief()}.")
    s.text += _start_note(rows)
    accs = confirm_accuracies(data)
    if not data.confirm_seeds:
        s.text.append("Tuned best vs best: the study ran no confirmation phase (confirm_seeds is unset), so the "
                      "best configurations of the arms were not retrained on fresh seeds or scored on test.")
    else:
        s.text.append(BEST_QUESTION)
        bvb = {}
        for a, b in (("rank1", "flat1d"), ("rank1", "dense"), ("flat1d", "dense")):
            if a in accs or b in accs:
                if a in accs and b in accs or (a, b) == ("rank1", "flat1d"):
                    bvb[f"{a} vs {b}"] = best_vs_best(a, accs.get(a, []), b, accs.get(b, []))
        for bv in bvb.values():
            s.text.append(bv.sentence)
        s.data["best_vs_best"] = {k: bv.to_dict() for k, bv in bvb.items()}
    if diffs or accs:
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
        ax = axes[0]
        if diffs:
            ax.hist(diffs, bins=min(20, max(3, len(diffs))), color="#888")
            ax.axvline(0, color="k", lw=0.8)
            ax.axvspan(v.ci_low, v.ci_high, color=COLORS["rank1"], alpha=0.2, label="95% bootstrap CI of the mean")
            ax.axvline(v.mean_diff, color=COLORS["rank1"], label="mean")
            ax.legend(fontsize=8)
        ax.set_xlabel(f"{head[0] if head else 'rank1'} − {head[1] if head else 'flat1d'} val accuracy, per pair")
        ax.set_title("paired at equal settings", fontsize=9)
        ax = axes[1]
        for i, arm in enumerate(a for a in ARMS if a in accs):
            m, lo, hi, n = mean_ci(accs[arm])
            lo, hi = max(0.0, lo), min(1.0, hi)  # accuracy is bounded; so is its interval
            ax.scatter([i] * n, accs[arm], color=COLORS[arm], alpha=0.6)
            ax.errorbar([i + 0.15], [m], yerr=[[m - lo], [hi - m]], marker="o", capsize=4, color=COLORS[arm])
        ax.set_xticks(range(len([a for a in ARMS if a in accs])), [a for a in ARMS if a in accs])
        ax.set_ylabel("test accuracy")
        ax.set_title("tuned best vs best (confirmation seeds, mean and 95% interval)", fontsize=9)
        ax.grid(alpha=0.3)
        s.figures.append(("verdict", _png(fig)))
    return s


def champion(data: StudyData, rows) -> Section:
    s = Section("champion", "9. Champion")
    c = data.champion
    if not c:
        s.text.append("No model was registered: no trial finished.")
        return s
    card = c.get("card") or {}
    m, arm = card.get("metrics", {}), card.get("arm", "rank1")  # the arm it ships (flat1d where that won)
    s.data = {
        "registered model": c["name"], "version": c["version"], "alias": c["alias"],
        "trial": card.get("trial_id"), "config": " ".join(f"{k}={v}" for k, v in sorted(card.get("params", {}).items())),
        "decomposed val accuracy": f"{card.get('val_acc', float('nan')):.4f}",
        "arm": arm,
        "speedup vs dense": ", ".join(f"batch {batch_of(k)}: {v:.2f}x"
                                      for k, v in sorted(m.items(), key=lambda kv: batch_of(kv[0]) or 0)
                                      if k.startswith(f"{arm}.speedup_b")) or "not measured",
        **({"speed measured": measured_inside_trial(m.get("latency.threads", m.get(f"{arm}.threads")),
                                                    m.get("latency.other_trials_running"))
            + f"; rank1 pull {c['name']}@{c['alias']} measures it again on the machine that loads it"}
           if any(k.startswith(f"{arm}.speedup_b") for k in m) else {}),
        "parameters (dense / decomposed)": f"{int(m.get(f'{arm}.dense_params', 0))} / "
                                           f"{int(m.get(f'{arm}.decomposed_params', 0))}",
        "pull": c.get("pull") or f"rank1 pull {c['name']}@{c['alias']} --out model/",
    }
    return s


SECTIONS = [frontier, gradient_flow, low_rank, projection, initialisation, speed, search, verdict, champion]
