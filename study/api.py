"""The study service from Python: run a study, read its results as a table, pull its model.

The CLI (``rank1 study ...``, ``rank1 pull``) calls these functions, so the two cannot
drift. In a notebook::

    import study
    res = study.run("studies/demo.yaml")           # or study.resume("runs/demo")
    df = study.results("runs/demo")                # one row per (trial, seed, arm), and per confirmation run
    df.groupby(["arm", "depth"])["val_acc"].mean()
    card = study.pull("demo-decomposed@champion", "model/", home="runs/demo")
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rank1.config import ConfigError

__all__ = ["export", "load", "pull", "records", "report", "results", "resume", "run", "status", "tracking"]


def _quiet(fn):
    """``fn`` with MLflow's and Tune's per-call output off (progress bars of every artifact
    download, run links), as the CLI runs: in a notebook a study's results arrived under a
    progress bar per trial. The environment is as it was afterwards."""

    @functools.wraps(fn)
    def quiet(*args, **kwargs):
        from study.services import QUIET_ENV, scoped_env

        with scoped_env(QUIET_ENV):
            return fn(*args, **kwargs)

    return quiet


@_quiet
def run(study: str | Path, home: str | Path | None = None, address: str | None = None,
        overrides: dict[str, Any] | None = None, keep_ui: bool = False, node_wait_s: float = 600.0,
        report: bool = True):
    """Run the study file ``study`` (``home``, ``overrides`` of its locations); returns its
    :class:`study.driver.StudyOutcome` (trials, best, champion, timings). ``report=False``: no
    study report at the end (:func:`report` builds it later)."""
    from study.config import load_study

    over = {**(overrides or {}), **({"home": str(home)} if home else {})} or None
    load_study(study, over)  # a bad file fails here, before the driver imports Ray and MLflow (seconds)
    from study.driver import run_study

    return run_study(study, address=address, keep_ui=keep_ui, overrides=over, node_wait_s=node_wait_s,
                     report=report)


@_quiet
def resume(home: str | Path, address: str | None = None, keep_ui: bool = False, node_wait_s: float = 600.0,
           report: bool = True):
    """Continue a stopped or killed study from its home (its stores as it started with them)."""
    from study.home import load_home

    load_home(home)  # not a home, or a bad file in it: fails before the driver imports Ray and MLflow
    from study.driver import resume_study

    return resume_study(home, address=address, keep_ui=keep_ui, node_wait_s=node_wait_s, report=report)


def load(home: str | Path):
    """The :class:`study.config.StudyConfig` of a home, with the locations it ran with."""
    from study.home import load_home

    return load_home(home)


def status(home: str | Path) -> dict[str, Any]:
    """Trials by state and the best so far, from the Optuna storage."""
    from study.states import study_status

    return study_status(home)


def _given_server(home: str | Path | None, tracking_uri: str | None) -> str | None:
    """``tracking_uri``, else the study's own server as it ran with it, else ``$MLFLOW_TRACKING_URI``;
    None: the home's embedded store is read through a server started for it."""
    uri = tracking_uri
    if not uri and home is not None:
        with contextlib.suppress(ConfigError):
            uri = load(home).tracking_uri
    return uri or os.environ.get("MLFLOW_TRACKING_URI")


@contextlib.contextmanager
def tracking(home: str | Path | None = None, tracking_uri: str | None = None) -> Iterator[str]:
    """A tracking URI to read a study from: ``tracking_uri``, ``$MLFLOW_TRACKING_URI``, the
    study's own server, or an MLflow server started over the home's embedded store (and
    stopped after)."""
    from study.services import MlflowServer

    uri = _given_server(home, tracking_uri)
    if uri:
        yield uri
        return
    if home is None:
        raise ConfigError("give --home STUDY_HOME, --tracking-uri URL, or set MLFLOW_TRACKING_URI")
    home = Path(home).expanduser().resolve()
    if not (home / "mlflow.db").exists():
        raise ConfigError(f"--home: {str(home)!r} has no embedded MLflow store (mlflow.db)")
    server = MlflowServer(home).start()
    try:
        yield server.url
    finally:
        server.stop()


def _variant(arm: str, config: dict[str, Any], varying: dict[str, list[str]]) -> str:
    fields = varying.get(arm, [])
    return arm + (" (" + ", ".join(str(config.get(f)) for f in fields) + ")" if fields else "")


@_quiet
def records(home: str | Path, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every (trial, seed, arm) and every confirmation run of a study, from MLflow (the runs and
    their per-seed results) and Optuna (the trial's number and state): one dict each, the
    shape :func:`rank1.sweep.summarise` reads, plus where it came from."""
    from dashboards.data import load_study_data

    cfg = load(home)
    with tracking(home, tracking_uri) as uri:
        data = load_study_data(uri, cfg)
    out = []
    for phase, trials in (("search", data.trials), ("confirm", data.confirms)):
        for t in trials:
            for s, res in enumerate(t.results or []):
                cfg_s = res.get("config", {})
                for arm, r in res["arms"].items():
                    f = r["final"]
                    inf = r.get("inference", {})
                    out.append({
                        "phase": phase, "trial_id": t.trial_id, "run_id": t.run_id, "optuna_state": t.optuna_state,
                        "optuna_number": t.optuna_number,
                        "trial_status": t.status, "arm": arm, "seed": cfg_s.get("seed", s), "config": cfg_s,
                        "params": dict(t.params), "status": r["status"], "reason": r.get("reason"),
                        "epochs_run": r["epochs_run"],
                        "val_acc": f.get("decomposed_val_acc", f.get("val_acc")), "test_acc": f.get("test_acc"),
                        "val_acc_by_epoch": [h.get("val_acc") for h in r.get("history", [])],
                        "gradflow": r.get("gradflow", {}), "lowrank": r.get("lowrank", {}),
                        "inference": {k: v for k, v in inf.items() if not k.startswith("deploy_impls")},
                        "train_time_s": r.get("train_time_s"), "notes": res.get("notes", []),
                    })
    return out


def results(home: str | Path, tracking_uri: str | None = None):
    """The study as a pandas DataFrame: one row per (trial, seed, arm) of the search and per
    confirmation run, with the trial's parameters (``param.*``), the training options that
    vary, the arm's accuracy, gradient flow, effective ranks and speed."""
    return _frame(records(home, tracking_uri))


def _frame(recs: list[dict[str, Any]]):
    """:func:`results` of the records :func:`records` gave."""
    import pandas as pd

    from rank1.sweep import VARIANT_FIELDS

    varying = {arm: [f for f in fields if len({repr(r["config"].get(f)) for r in recs if r["arm"] == arm}) > 1]
               for arm, fields in VARIANT_FIELDS.items()}
    keys = sorted({k for r in recs for k in r["config"]})
    vary = [k for k in keys if len({repr(r["config"].get(k)) for r in recs}) > 1 and k not in ("seed", "arm")]
    rows = []
    for r in recs:
        inf = r["inference"]
        row = {k: r[k] for k in ("phase", "trial_id", "run_id", "optuna_number", "optuna_state", "trial_status", "arm",
                                 "seed", "status", "epochs_run", "val_acc", "test_acc")}
        row["variant"] = _variant(r["arm"], r["config"], varying)
        row.update({f"param.{k}": v for k, v in r["params"].items()})
        row.update({k: r["config"].get(k) for k in vary})
        for when in ("init", "epoch1", "end"):
            row[f"grad_ratio.{when}"] = r["gradflow"].get(when, {}).get("out.ratio")
        for k in ("mean.entropy_frac", "mean.energy99_frac", "penultimate.energy99", "penultimate.entropy"):
            row[f"rank.{k}"] = r["lowrank"].get(k)
        for k in ("flop_ratio", "threads", *sorted(k for k in inf if k.startswith(("speedup_b", "chain_speedup_b",
                                                                                    "decomposed_latency_ms_b",
                                                                                    "dense_latency_ms_b", "deploy_b")))):
            row[k] = inf.get(k)
        row["same_start"] = not r["notes"]
        rows.append(row)
    return pd.DataFrame(rows)


@_quiet
def export(home: str | Path, out: str | Path, tracking_uri: str | None = None) -> dict[str, Path]:
    """Write a study's results for others to check: ``runs.jsonl`` (every record of
    :func:`records`), ``trials.csv`` (:func:`results`) and ``summary.json`` (the study, its
    MLflow experiment and parent run, the verdicts, the confirmation, the wall time)."""
    from study.home import OUTCOME_FILE, STATE_FILE

    cfg = load(home)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tracking(home, tracking_uri) as uri:  # one server for all of it (an embedded home's starts once)
        recs = records(home, uri)
        (out / "runs.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in recs))
        _frame(recs).to_csv(out / "trials.csv", index=False)
        home_p = Path(cfg.home_path)
        summary: dict[str, Any] = {"study": cfg.name, "study_config": cfg.to_dict(), "n_records": len(recs)}
        for name in (STATE_FILE, OUTCOME_FILE, "confirm.json", "report/verdict.json"):
            p = home_p / name
            if p.exists():
                summary[name.split("/")[-1].removesuffix(".json")] = json.loads(p.read_text())
        summary["mlflow_run_ids"] = sorted({r["run_id"] for r in recs})
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(cfg.name)
        summary["mlflow_experiment_id"] = exp.experiment_id if exp else None
        parent = summary.get("state", {}).get("parent_run_id")
        if parent:  # when the study ran, as its parent run says (a resumed study: first start to last end)
            info = client.get_run(parent).info
            summary["started"], summary["ended"] = (
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t / 1000)) if t else None
                for t in (info.start_time, info.end_time))
        try:
            mv = client.get_model_version_by_alias(cfg.model_name, "champion")
            summary["champion"] = {"model": cfg.model_name, "version": mv.version, "run_id": mv.run_id,
                                   **{k: mv.tags.get(k) for k in ("trial_id", "seed", "arm", "value", "metric")}}
        except Exception:  # no champion registered
            summary["champion"] = None
    # Where it ran: the driver's record of its machine, else (a study from before it kept one) this one's.
    from rank1.measure import machine_info

    summary["machine"] = summary.get("outcome", {}).get("machine") or {**machine_info("cpu"),
                                                                         "source": "the machine that exported it"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return {"runs": out / "runs.jsonl", "trials": out / "trials.csv", "summary": out / "summary.json"}


@_quiet
def pull(ref: str, out: str | Path, home: str | Path | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """Download registered model ``ref`` (``NAME``, ``NAME@alias``, ``NAME/version``) into ``out``;
    returns its card. Load it with ``mlflow.pyfunc.load_model(out / "model")``."""
    from study.registry import parse_model_ref
    from study.registry import pull as _pull

    parse_model_ref(ref)  # a bad reference fails before any server starts
    # what an error calls the registry: not the port of a server started for this call
    given = _given_server(home, tracking_uri)
    where = f"at {given}" if given else f"of study home {home}"
    with tracking(home, tracking_uri) as uri:
        return _pull(ref, out, uri, where=where)


@_quiet
def report(home: str | Path, tracking_uri: str | None = None, log: bool = True) -> Path:
    """Build the study report (HTML + PNGs) into HOME/report, logged to the parent run."""
    from dashboards.report import report_study

    cfg = load(home)
    with tracking(home, tracking_uri) as uri:
        return report_study(cfg, uri, log=log)
