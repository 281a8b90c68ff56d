"""Factorial sweeps of the arms, torch only: plan, run (in parallel, resumable), aggregate.

A sweep is a grid over :class:`rank1.train.TrainConfig` fields times seeds, for every
arm of ``base.arms``. A field that changes one arm only (:data:`rank1.train.ARM_SPECIFIC`:
rank1's projection, flat1d's initialisation, each arm's own learning rate, ...) expands
that arm alone, so no run is repeated: a grid over three projection periods and two
flat1d initialisations trains rank1 three times, flat1d twice and dense once per cell and
seed. Every run trains one arm; runs of different arms with the same shared settings and
seed start from the same draw and see the same data order, so they are paired exactly
as if trained side by side (``train_arm`` guarantees it).

Runs append one JSON line each to ``runs.jsonl`` as they finish: a killed sweep loses
nothing, and running it again trains only what is missing. :func:`summarise` turns
records (from a sweep or a study export) into the tables the README quotes: each arm
variant at its own best value of the tuned fields (chosen by mean validation accuracy
over seeds), scored on test, with mean ± std and a 95% interval over seeds.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rank1.train import ARM_SPECIFIC, TrainConfig

__all__ = ["VARIANT_FIELDS", "plan", "record_of", "run_sweep", "summarise", "tables_markdown"]

# Arm-specific fields that make another *method* of an arm (the per-arm optimiser settings
# are tuning): they name arm variants in tables.
VARIANT_FIELDS = {"rank1": ("projection", "projection_norm", "projection_momentum", "bn_recalibrate"),
                  "flat1d": ("flat1d_init",), "dense": ()}
_SPECIFIC = {f for names in ARM_SPECIFIC.values() for f in names}


def _product(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def plan(base: TrainConfig, grid: dict[str, list[Any]], seeds: Iterable[int]) -> list[TrainConfig]:
    """Every single-arm run of the sweep, in a fixed order (shared cell, seed, arm, arm cell)."""
    unknown = sorted(set(grid) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"grid: {unknown[0]!r} is not a training option")
    shared = {k: v for k, v in grid.items() if k not in _SPECIFIC}
    defaults = TrainConfig()
    runs = []
    for cell in _product(shared):
        for seed in seeds:
            for arm in base.arms:
                own = {k: v for k, v in grid.items() if k in ARM_SPECIFIC[arm]}
                # The other arms' own settings are reset: they would not change this arm.
                reset = {k: getattr(defaults, k) for other, names in ARM_SPECIFIC.items() if other != arm
                         for k in names}
                for arm_cell in _product(own):
                    runs.append(dataclasses.replace(base, **reset, **cell, **arm_cell, arm=arm, seed=seed))
    return runs


def run_key(cfg: TrainConfig) -> str:
    """A run's identity: every setting that differs from the default (so a changed base trains
    again, and a field added later at its default does not make old runs look new)."""
    defaults = TrainConfig().to_dict()
    return json.dumps({k: v for k, v in cfg.to_dict().items() if v != defaults[k]}, sort_keys=True)


def _key_of(rec: dict[str, Any]) -> str | None:
    from rank1.config import ConfigError, from_dict

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        return run_key(from_dict(TrainConfig, {k: v for k, v in rec["config"].items() if k in known}))
    except ConfigError:
        return None


def record_of(cfg: TrainConfig, result: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """The compact record of one single-arm run: what the tables need, nothing per step."""
    (arm, r), = result["arms"].items()
    f = r["final"]
    chance = 1.0 / num_classes
    ok = r["status"] == "finished"
    return {
        "key": run_key(cfg), "arm": arm, "seed": cfg.seed, "config": cfg.to_dict(), "status": r["status"],
        "reason": r["reason"], "epochs_run": r["epochs_run"],
        # A run that diverged or failed scores what a broken network scores: chance.
        "val_acc": f.get("decomposed_val_acc", f.get("val_acc")) if ok else chance,
        "test_acc": f.get("test_acc") if ok else chance,
        "val_acc_by_epoch": [h["val_acc"] for h in r["history"]],
        "gradflow": r.get("gradflow", {}), "lowrank": r.get("lowrank", {}),
        "train_time_s": r["train_time_s"], "time_s": result["time_s"],
    }


_WORKER: dict[str, Any] = {}


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_one(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    from rank1.config import from_dict
    from rank1.train import data_for, train_pair

    cfg = from_dict(TrainConfig, cfg_dict)
    if _WORKER.get("key") != cfg.data_key:  # one load per worker process
        _WORKER.update(key=cfg.data_key, data=data_for(cfg))
    data = _WORKER["data"]
    return record_of(cfg, train_pair(cfg, data=data).to_dict(), data.num_classes)


def run_sweep(runs: list[TrainConfig], out: Path, jobs: int = 1,
              progress: Callable[[int, int, dict[str, Any] | None], None] | None = None) -> list[dict[str, Any]]:
    """Train every run not yet in ``out/runs.jsonl`` (``jobs`` processes, the CPU's threads shared
    among them), appending each record as it finishes; returns the records of ``runs``."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a kill: that run trains again
                continue
            key = _key_of(rec)
            if key is not None:
                done[key] = {**rec, "key": key}
    todo = [c for c in runs if run_key(c) not in done]
    total = len(runs)
    if progress:
        progress(total - len(todo), total, None)
    with open(log, "a") as f:
        def keep(rec: dict[str, Any]) -> None:
            done[rec["key"]] = rec
            f.write(json.dumps(rec) + "\n")
            f.flush()
            if progress:
                progress(sum(run_key(c) in done for c in runs), total, rec)

        if jobs <= 1:
            for cfg in todo:
                keep(_run_one(cfg.to_dict()))
        else:
            import concurrent.futures as cf
            import multiprocessing as mp

            threads = max(1, (os.cpu_count() or jobs) // jobs)
            with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                        initargs=(threads,)) as pool:
                futures = [pool.submit(_run_one, c.to_dict()) for c in todo]
                for fut in cf.as_completed(futures):
                    keep(fut.result())
    return [done[run_key(c)] for c in runs]


# ----------------------------------------------------------------------------- aggregation


def _t_interval(values: list[float]) -> tuple[float, float, float, float]:
    """``(mean, std, low, high)``: a Student-t 95% interval over seeds."""
    n = len(values)
    m = statistics.mean(values)
    if n < 2:
        return m, 0.0, m, m
    from scipy import stats

    sd = statistics.stdev(values)
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return m, sd, m - half, m + half


def _geo(values: list[float]) -> float:
    v = [x for x in values if x is not None and x > 0 and math.isfinite(x)]
    return math.exp(statistics.mean(math.log(x) for x in v)) if v else float("nan")


def variant_of(rec: dict[str, Any], varying: dict[str, list[str]]) -> str:
    arm = rec["arm"]
    fields = varying.get(arm, [])
    return arm + (" (" + ", ".join(str(rec["config"].get(f)) for f in fields) + ")" if fields else "")


def summarise(records: list[dict[str, Any]], by: list[str], select: list[str]) -> list[dict[str, Any]]:
    """One row per (values of ``by``, arm variant): the ``select`` fields set to the arm
    variant's best (highest mean validation accuracy over seeds; ties: the first in sort
    order), and there the test accuracy over seeds, gradient flow and effective ranks."""
    varying = {arm: [f for f in fields if len({repr(r["config"].get(f)) for r in records if r["arm"] == arm}) > 1]
               for arm, fields in VARIANT_FIELDS.items()}
    cells: dict[tuple, dict[tuple, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cell = (tuple(r["config"].get(b) for b in by), variant_of(r, varying))
        cells[cell][tuple(r["config"].get(s) for s in select)].append(r)
    rows = []
    for (where, variant), options in sorted(cells.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1])):
        scored = {opt: statistics.mean(r["val_acc"] for r in rs) for opt, rs in options.items()}
        best = max(sorted(scored, key=repr), key=lambda o: scored[o])
        rs = sorted(options[best], key=lambda r: r["seed"])
        m, sd, lo, hi = _t_interval([r["test_acc"] for r in rs])
        lo, hi = max(0.0, lo), min(1.0, hi)  # an accuracy's interval stays within [0, 1]
        row = {**dict(zip(by, where)), "variant": variant, "arm": rs[0]["arm"], **dict(zip(select, best)),
               "val_acc": scored[best], "test_acc": m, "test_std": sd, "test_low": lo, "test_high": hi,
               "n": len(rs), "diverged": sum(r["status"] != "finished" for r in rs),
               "options": {repr(o): v for o, v in sorted(scored.items(), key=lambda kv: repr(kv[0]))}}
        for when in ("init", "epoch1", "end"):
            row[f"grad_ratio_{when}"] = _geo([r["gradflow"].get(when, {}).get("out.ratio") for r in rs])
        for key in ("mean.entropy_frac", "mean.energy99_frac", "penultimate.energy99"):
            vals = [r["lowrank"][key] for r in rs if key in r["lowrank"]]
            row[f"rank_{key}"] = statistics.mean(vals) if vals else float("nan")
        rows.append(row)
    return rows


def _order(values: tuple) -> tuple:
    """A sort key that orders numbers as numbers (4 before 16) and everything else by its text."""
    return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, repr(v))
                 for v in values)


def _fmt_acc(row: dict[str, Any]) -> str:
    s = f"{row['test_acc']:.3f} ± {row['test_std']:.3f} [{row['test_low']:.3f}, {row['test_high']:.3f}]"
    return s + (f" ({row['diverged']} diverged)" if row["diverged"] else "")


def tables_markdown(rows: list[dict[str, Any]], by: list[str], select: list[str]) -> str:
    """The three tables: test accuracy at each variant's best ``select`` (trainability),
    gradient ratio at init / epoch 1 / end (gradient flow), effective ranks (low-rank outputs)."""
    variants = list(dict.fromkeys(r["variant"] for r in sorted(rows, key=lambda r: (
        ("rank1", "flat1d", "dense").index(r["arm"]), r["variant"]))))
    wheres = list(dict.fromkeys(tuple(r[b] for b in by) for r in rows))
    at = {(tuple(r[b] for b in by), r["variant"]): r for r in rows}
    head = "| " + " | ".join(by) + " | "
    out = ["**Test accuracy at each arm's own best " + ", ".join(select) + "** (chosen by mean validation "
           "accuracy over seeds; mean ± std [95% t-interval] over seeds; the chosen value in brackets)", "",
           head + " | ".join(variants) + " |", "|" + "---|" * (len(by) + len(variants))]
    for w in wheres:
        cells = []
        for v in variants:
            r = at.get((w, v))
            cells.append("—" if r is None else _fmt_acc(r) + " (" + ", ".join(f"{r[s]}" for s in select) + ")")
        out.append("| " + " | ".join(map(str, w)) + " | " + " | ".join(cells) + " |")
    out += ["", "**Gradient flow**: first / last layer ratio of the RMS output gradient, at initialisation → "
            "after epoch 1 → at the end (geometric mean over seeds, at the chosen setting)", "",
            head + " | ".join(variants) + " |", "|" + "---|" * (len(by) + len(variants))]
    for w in wheres:
        cells = []
        for v in variants:
            r = at.get((w, v))
            cells.append("—" if r is None else " → ".join(f"{r[f'grad_ratio_{k}']:.3g}" for k in ("init", "epoch1", "end")))
        out.append("| " + " | ".join(map(str, w)) + " | " + " | ".join(cells) + " |")
    out += ["", "**Low-rank outputs**: entropy effective rank / max rank, mean over conv layers; and the rank "
            "holding 99% of the energy of the penultimate features (mean over seeds)", "",
            head + " | ".join(variants) + " |", "|" + "---|" * (len(by) + len(variants))]
    for w in wheres:
        cells = []
        for v in variants:
            r = at.get((w, v))
            cells.append("—" if r is None else f"{r['rank_mean.entropy_frac']:.3f}; {r['rank_penultimate.energy99']:.1f}")
        out.append("| " + " | ".join(map(str, w)) + " | " + " | ".join(cells) + " |")
    return "\n".join(out)


def stamp() -> str:
    return time.strftime("%Y-%m-%d")
