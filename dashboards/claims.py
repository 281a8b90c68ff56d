"""The paper's claims, one table and one verdict each, from a study's exported records.

Kim et al. (2018) claim that (1) training 3-D rank-1 filters trains where consecutive 1-D
filters cannot, (2) thanks to better gradient flow, (3) rank-1 filters give low-rank
outputs, and (4) the decomposed filters run fast. :func:`claims` turns the records of
``rank1 study export`` (or of ``rank1 sweep``) into a table per claim and a sentence per
claim, by fixed rules stated with each sentence, whichever way the data go:

* trainability: an arm variant *fails* in a cell when its mean test accuracy is below
  chance + 0.1; the claim holds where every flat1d variant fails and some rank1 variant's
  95% interval lies above that line, and holds only there.
* gradient flow: per cell, the arm whose first/last RMS-gradient ratio after epoch 1 is
  closer to 1 (``|log ratio|`` smaller) has the better flow; the sentence counts cells.
* low-rank outputs: rank1's final (penultimate) features against the dense control's
  (dimensions holding 99% of the energy), and each conv layer's mean effective rank (a
  fraction of the maximum), cell by cell.
* fast inference: the registered champion's deployed speedup over its dense form at every
  batch size measured, and the fraction of the FLOP ratio it reaches.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from rank1.sweep import summarise, tables_markdown
from study.names import batch_of, counted

__all__ = ["claims", "scored"]


def scored(records: list[dict[str, Any]], num_classes: int) -> list[dict[str, Any]]:
    """Records with an accuracy for every run: one that diverged or failed scores chance."""
    chance = 1.0 / num_classes
    out = []
    for r in records:
        ok = r["status"] == "finished" and r.get("val_acc") is not None
        out.append({**r, "val_acc": r["val_acc"] if ok else chance, "test_acc": r["test_acc"] if ok else chance})
    return out


def _cells(rows: list[dict[str, Any]], by: list[str]) -> dict[tuple, dict[str, dict[str, Any]]]:
    cells: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault(tuple(r[b] for b in by), {})[r["variant"]] = r
    return cells


def _where(by: list[str], key: tuple) -> str:
    return ", ".join(f"{b} {v}" for b, v in zip(by, key))


def claims(records: list[dict[str, Any]], by: list[str], select: list[str], num_classes: int = 10,
           champion: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"markdown": ..., "verdicts": {claim: sentence}, "rows": ...}`` for the search records."""
    rows = summarise(scored(records, num_classes), by, select)
    cells = _cells(rows, by)
    fail = 1.0 / num_classes + 0.1
    verdicts: dict[str, str] = {}

    # (1) trainability: per flat1d variant, the cells where it fails and some rank1 variant trains
    fails_where: dict[str, list[tuple]] = {}
    rank1_fails = []
    for key, vs in cells.items():
        r1 = [r for r in vs.values() if r["arm"] == "rank1"]
        trains = any(r["test_low"] > fail for r in r1)
        for v, r in vs.items():
            if r["arm"] == "flat1d":
                fails_where.setdefault(v, [])
                if r["test_acc"] < fail and trains:
                    fails_where[v].append(key)
        flat = [r for r in vs.values() if r["arm"] == "flat1d"]
        if r1 and all(r["test_acc"] < fail for r in r1) and any(r["test_acc"] >= fail for r in flat):
            rank1_fails.append(key)
    failing = {v: ks for v, ks in fails_where.items() if ks}
    line = f"fails: mean test accuracy below {fail:.2f}; trains: the 95% interval above it"
    if not failing:
        verdicts["trainability"] = (
            f"Does not hold here: in none of the {len(cells)} cells does rank-1 training train where a "
            f"consecutive-1-D network fails ({line})."
            + (f" The reverse happens in {len(rank1_fails)} cell(s): {'; '.join(_where(by, k) for k in rank1_fails)}."
               if rank1_fails else ""))
    else:
        parts = [f"{v} " + ("at " + "; ".join(_where(by, k) for k in ks) if len(ks) < len(cells) else "at every cell")
                 for v, ks in failing.items()]
        fine = [v for v, ks in fails_where.items() if not ks]
        everywhere = not fine and all(len(ks) == len(cells) for ks in failing.values())
        verdicts["trainability"] = (
            ("Holds for " if everywhere else "Holds only for ") + ", and for ".join(parts)
            + f": there the consecutive-1-D network fails while rank-1 training trains ({line})"
            + (f"; {', '.join(fine)} trains wherever rank1 does" if fine else "") + "."
            + (f" The reverse happens in {len(rank1_fails)} cell(s): {'; '.join(_where(by, k) for k in rank1_fails)}."
               if rank1_fails else ""))

    # (2) gradient flow, after epoch 1 (a cause; the end shows consequences)
    better, worse, ties = [], [], []
    for key, vs in cells.items():
        r1 = [r for r in vs.values() if r["arm"] == "rank1" and math.isfinite(r["grad_ratio_epoch1"])]
        fl = [r for r in vs.values() if r["arm"] == "flat1d" and math.isfinite(r["grad_ratio_epoch1"])]
        if not (r1 and fl):
            continue
        a = min(abs(math.log(r["grad_ratio_epoch1"])) for r in r1)
        b = min(abs(math.log(r["grad_ratio_epoch1"])) for r in fl)
        (better if a < b * 0.9 else worse if b < a * 0.9 else ties).append(key)
    n = len(better) + len(worse) + len(ties)
    if n:
        head = ("Holds" if len(better) >= 2 * n / 3 else "Does not hold" if len(better) <= n / 3 else "Mixed")
        verdicts["gradient_flow"] = (
            f"{head}: after epoch 1, rank1's gradient flow is better than flat1d's in {len(better)} of {n} cells "
            f"(a first/last ratio of the RMS output gradient closer to 1 by more than 10%, each arm's best-flowing "
            f"variant), worse in {len(worse)}, about equal in {len(ties)}.")
    else:
        verdicts["gradient_flow"] = "Not measured: no cell has both rank1 and flat1d gradient-flow measurements."

    # (3) low-rank outputs: rank1 vs the dense control, each conv layer's output and the final features
    def compare(key: str) -> tuple[list[tuple], list[float]]:
        lower, gaps = [], []
        for k, vs in cells.items():
            r1 = [r[key] for r in vs.values() if r["arm"] == "rank1" and math.isfinite(r[key])]
            de = [r[key] for r in vs.values() if r["arm"] == "dense" and math.isfinite(r[key])]
            if r1 and de:
                gaps.append(statistics.mean(r1) - statistics.mean(de))
                if gaps[-1] < 0:
                    lower.append(k)
        return lower, gaps

    layer_lower, layer_gaps = compare("rank_mean.entropy_frac")
    final_lower, final_gaps = compare("rank_penultimate.energy99")
    if final_gaps:
        n = len(final_gaps)
        head = "Holds" if len(final_lower) == n else "Does not hold" if not final_lower else "Holds only when " + \
            "; or ".join(_where(by, k) for k in final_lower)
        verdicts["low_rank"] = (
            f"{head}: the final (penultimate) features of rank1 networks need fewer dimensions for 99% of their "
            f"energy than the dense control's in {len(final_lower)} of {n} cells (mean difference "
            f"{statistics.mean(final_gaps):+.1f} dimensions); each conv layer's own output is lower-rank in "
            f"{len(layer_lower)} of {len(layer_gaps)} cells (mean difference {statistics.mean(layer_gaps):+.3f} of the "
            "maximum, entropy effective rank averaged over layers).")
    else:
        verdicts["low_rank"] = "Not measured: no cell has both the rank1 and the dense arm."

    # (4) fast inference: the champion as deployed
    speed_md = ""
    if champion:
        m, arm = champion.get("metrics", {}), champion.get("arm", "rank1")
        sp = {batch_of(k): v for k, v in m.items() if k.startswith(f"{arm}.speedup_b")}
        fr = {batch_of(k): v for k, v in m.items() if k.startswith(f"{arm}.fraction_of_flop_ratio_b")}
        if sp:
            ok = all(v > 1 for v in sp.values())
            verdicts["fast_inference"] = (
                ("Holds" if ok else "Holds only at some batch sizes" if any(v > 1 for v in sp.values()) else "Does not hold")
                + f": the champion's ({arm}) deployed decomposed form is " + ", ".join(
                    f"{v:.2f}x its dense form at batch {b} ({fr.get(b, float('nan')):.0%} of the "
                    f"{m.get(f'{arm}.flop_ratio', float('nan')):.2f}x FLOP ratio)" for b, v in sorted(sp.items()))
                + f", measured where it trained ({counted(m.get(f'{arm}.threads'), 'thread')}"
                + (f", {counted(m['latency.other_trials_running'], 'other trial')} running" if
                   "latency.other_trials_running" in m else "") + ").")
            speed_md = ("| batch | deployed form | speedup over dense | FLOP ratio | of FLOP ratio |\n|---|---|---|---|---|\n"
                        + "".join(f"| {b} | {m.get(f'{arm}.deploy_b{b}', '')} | {v:.2f}x | "
                                  f"{m.get(f'{arm}.flop_ratio', float('nan')):.2f}x | {fr.get(b, float('nan')):.0%} |\n"
                                  for b, v in sorted(sp.items())))
    md = tables_markdown(rows, by, select)
    return {"rows": rows, "verdicts": verdicts, "markdown": md, "speed_markdown": speed_md}
