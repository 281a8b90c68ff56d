"""What a study prints: the live table of trials while it runs, and its summary at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from study.home import STATE_FILE
from study.names import batch_of, experiment_url, measured_inside_trial

__all__ = ["ProgressTable", "print_summary", "progress_callback"]


class ProgressTable:
    """A live table of trials (a Tune callback). Holds nothing that cannot be pickled:
    Tune saves its callbacks with the experiment state."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self._live = None

    def __getstate__(self) -> dict[str, Any]:
        return {"rows": self.rows, "_live": None}

    def _render(self):
        from rich.table import Table

        t = Table(title=f"trials ({sum(r['status'] in ('done', 'pruned', 'error') for r in self.rows.values())}"
                        f"/{len(self.rows)} ended)")
        for col in ("trial", "status", "params", "epoch", "rank1 acc", "flat1d acc", "value"):
            t.add_column(col, overflow="fold")
        for tid, r in sorted(self.rows.items()):
            t.add_row(tid, r["status"], r["params"], str(r.get("epoch", "")), _f3(r.get("rank1.val_acc")),
                      _f3(r.get("flat1d.val_acc")), _f3(r.get("value")))
        return t

ARMS = ("rank1", "flat1d", "dense")


def _f3(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else ""


def progress_callback():
    from ray import tune

    class _Callback(ProgressTable, tune.Callback):
        def setup(self, **info):
            import sys

            from rich.console import Console
            from rich.live import Live

            console = Console()
            if sys.stdout.isatty():
                self._live = Live(self._render(), console=console, refresh_per_second=2)
                self._live.start()

        def _update(self, trial, status, result=None):
            row = self.rows.setdefault(trial.trial_id, {"status": status, "params": ""})
            row["status"] = status
            row["params"] = " ".join(f"{k}={v}" for k, v in sorted(trial.config.items()))
            if result:
                row.update({k: result.get(k) for k in (*(f"{a}.val_acc" for a in ARMS), "epoch")
                            if result.get(k) is not None})
                if result.get("final"):  # the shipped (decomposed) models' accuracy, not the last epoch's
                    row["value"] = result.get("objective")
                    row["status"] = result.get("trial_status", status)
                    for arm in ARMS:
                        for key in (f"{arm}.decomposed_val_acc", f"{arm}.shipped_val_acc"):
                            if key in result:
                                row[f"{arm}.val_acc"] = result[key]
            if self._live is not None:
                self._live.update(self._render())
            elif status != "running":
                accs = " ".join(f"{a} {_f3(row[f'{a}.val_acc'])}" for a in ARMS if row.get(f"{a}.val_acc") is not None)
                print(f"trial {trial.trial_id} {row['status']}: {row['params']}  val acc {accs or '-'}", flush=True)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._update(trial, "running")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._update(trial, "running", result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            self._update(trial, "done" if last.get("final") else "pruned", last)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._update(trial, "error")

        def on_experiment_end(self, trials, **info):
            if self._live is not None:
                self._live.stop()
                self._live = None

    return _Callback()


def print_summary(outcome, keep_ui: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"study {outcome.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(outcome.trials.items())))
    # Long values wrap instead of ending in "…": piped to a file (80 columns) nothing is cut off.
    t.add_column("", overflow="fold")
    t.add_column("", overflow="fold")
    b = outcome.best
    if b:
        m = b.get("metrics", {})
        t.add_row("best trial", f"{b['trial_id']} (Optuna #{b['optuna_number']})")
        t.add_row("best config", " ".join(f"{k}={v}" for k, v in sorted(b["params"].items())))
        t.add_row("rank1 decomposed val acc", _f3(m.get("rank1.decomposed_val_acc")))
        t.add_row("flat1d decomposed val acc", _f3(m.get("flat1d.decomposed_val_acc")))
        if "dense.shipped_val_acc" in m:
            t.add_row("dense val acc (the control)", _f3(m.get("dense.shipped_val_acc")))
        arm = b.get("arm") or next((a for a in ("rank1", "flat1d") if f"{a}.flop_ratio" in m), "rank1")
        for key in sorted((k for k in m if k.startswith(f"{arm}.speedup_b")), key=batch_of):
            n = batch_of(key)
            frac = m.get(f"{arm}.fraction_of_flop_ratio_b{n}")
            t.add_row(f"speedup vs dense, batch {n}", f"{m[key]:.2f}x, {arm} as deployed" + (
                f" ({frac:.0%} of its {m[f'{arm}.flop_ratio']:.2f}x FLOP ratio)"
                if frac is not None and f"{arm}.flop_ratio" in m else ""))
        if f"{arm}.flop_ratio" in m and not any(k.startswith(f"{arm}.speedup_b") for k in m):
            t.add_row("speedup vs dense", "not measured (train.measure_latency: false)"
                      + ("; `rank1 pull` measures it on the machine that loads it" if outcome.model_uri else ""))
        elif "latency.threads" in m:
            # a latency timed beside other trials on shared cores is not what a user gets alone
            t.add_row("speed measured", measured_inside_trial(m["latency.threads"], m.get("latency.other_trials_running"))
                      + ("; `rank1 pull` measures it again on the machine that loads it" if outcome.model_uri else ""))
        t.add_row("model", f"{outcome.model_uri} (version {outcome.model_version}, alias {outcome.alias})")
    else:
        t.add_row("best trial", "none finished")
    runs = outcome.confirm.get("runs", {}) if outcome.confirm else {}
    if runs:
        from dashboards.stats import best_vs_best

        accs = {a: [r["test_acc"] for r in rs if r["status"] == "finished"] for a, rs in runs.items()}
        for a, b in (("rank1", "flat1d"), ("rank1", "dense")):
            if a in accs and b in accs:
                v = best_vs_best(a, accs[a], b, accs[b])
                t.add_row(f"best vs best, test: {a} − {b}",
                          f"{v.diff:+.3f} ({v.interval()}; {a} {v.mean_a:.3f}, {b} "
                          f"{v.mean_b:.3f}; {v.n_a} + {v.n_b} fresh seeds)" if v.diff is not None else v.sentence)
    t.add_row("study home", outcome.home)
    ui = outcome.tracking_uri if keep_ui else f"rank1 ui --home {outcome.home}"
    t.add_row("MLflow UI", ui)
    state = Path(outcome.home) / STATE_FILE
    exp = json.loads(state.read_text()).get("experiment_id") if state.exists() else None
    console.print(t)
    # The links on lines of their own, never wrapped, so that they can be copied whole.
    runs_url = experiment_url(outcome.tracking_uri if keep_ui else "http://127.0.0.1:5000", exp) if exp else None
    if not keep_ui:
        console.print(f"Open the MLflow UI with: [bold]rank1 ui --home {outcome.home}[/]"
                      + (", then the study's runs:" if runs_url else " (then http://127.0.0.1:5000)"), soft_wrap=True)
    elif runs_url:
        console.print("The study's runs in the MLflow UI:")
    if runs_url:
        console.print(runs_url, soft_wrap=True, markup=False, highlight=False)
