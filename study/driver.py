"""The study driver: services, the search, the confirmation, the champion, the report.

``run_study`` and ``resume_study`` start the services (a local Ray instance unless
``--address``; the embedded MLflow server unless the study names one), write the home,
create or find the study's experiment and parent run, run the search's Tuner
(:mod:`study.tuning`) and the confirmation phase, reconcile MLflow and Optuna with what
Tune saw, register the best decomposed model and build the report. Checks before any
of it: :mod:`study.checks`; the home: :mod:`study.home`; MLflow: :mod:`study.runs`;
what it prints: :mod:`study.console`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rank1.config import ConfigError
from rank1.measure import machine_info
from study.checks import check_cluster_resources, preflight
from study.config import StudyConfig, load_study
from study.console import print_summary
from study.ends import writing_ends
from study.home import OUTCOME_FILE, STATE_FILE, STUDY_FILE, home_locations, load_home, write_home
from study.names import TAG_CHAMPION
from study.runs import parent_run, tracking
from study.services import MlflowServer, driver_env, start_ray
from study.states import count_states, pick_best
from study.trial import end_report, load_checkpoint
from study.tuning import (
    Prefetch,
    confirm_phase,
    make_tuner,
    reconcile,
    release_orphans,
    repair_experiment_state,
    share_data,
)

__all__ = ["StudyOutcome", "load_home", "preflight", "resume_study", "run_study"]


@dataclass
class StudyOutcome:
    """What a finished study produced (also printed as its summary)."""

    name: str
    home: str
    tracking_uri: str
    parent_run_id: str
    trials: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)
    model_uri: str | None = None
    model_version: str | None = None
    alias: str | None = None
    confirm: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)  # the driver's machine (the trials' on one machine)
    started: str = ""  # when the run (or this resume) began, UTC


def run_study(study_file: str | Path, address: str | None = None, keep_ui: bool = False,
              overrides: dict[str, Any] | None = None, resume: bool = False,
              node_wait_s: float = 600.0, env_fallback: bool = True, report: bool = True) -> StudyOutcome:
    """Run (or with ``resume``, continue) the study described by ``study_file``; ``report``:
    build the study report at the end (seconds of figures; `rank1 study report` builds it later)."""
    study_text = Path(study_file).read_text()
    cfg = load_study(study_file, overrides, env_fallback)
    preflight(cfg, address)
    home = cfg.home_path
    state_path = home / STATE_FILE
    if state_path.exists():
        old = json.loads(state_path.read_text())
        if old.get("fingerprint") != cfg.fingerprint():
            raise ConfigError(
                f"home: {str(home)!r} holds a different study (its search or settings differ); "
                "use another home, or `rank1 study resume` with the original file"
            )
        if not resume and (home / OUTCOME_FILE).exists():
            raise ConfigError(f"home: {str(home)!r} already holds this study, which finished: read it with "
                              f"`rank1 study status {home}` or `rank1 study report {home}`, or give --home "
                              "another folder to run it again")
        if not resume:
            raise ConfigError(f"home: {str(home)!r} already holds this study; continue it with "
                              f"`rank1 study resume {home}`")
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # On one machine the embedded MLflow server starts while Ray does (each takes seconds). On a
    # cluster Ray comes first: what its nodes can reach is checked before the home is written.
    early = MlflowServer(home).launch() if not (address or cfg.tracking_uri) else None
    prefetch = Prefetch(cfg)  # the dataset and torch.export's imports, while Ray starts
    try:
        with driver_env(), start_ray(home, address):
            if address:
                check_cluster_resources(cfg, node_wait_s)
            write_home(cfg, study_text)
            outcome = _run(cfg, home, study_text, address, keep_ui, resume, early, t0, started, prefetch,
                           report)
    finally:
        if early is not None:
            early.stop()  # signalled at the study's end, it exited while Ray shut down: waited for here
    return outcome


def _run(cfg: StudyConfig, home: Path, study_text: str, address: str | None, keep_ui: bool, resume: bool,
         early: MlflowServer | None, t0: float, started: str, prefetch: Prefetch | None = None,
         report: bool = True) -> StudyOutcome:
    """The study inside its services: the search, the confirmation, the champion, the report."""
    from mlflow import MlflowClient

    with tracking(cfg, keep_ui, early) as uri, writing_ends(uri):
        client = MlflowClient(uri)
        exp_id, parent_id = parent_run(client, cfg, study_text)
        ctx = {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent_id, "study": cfg.name,
               "study_config": cfg.to_dict(), "data": share_data(cfg, prefetch),
               "fresh": not resume}  # no trial of a study started from nothing can have a run yet
        if resume:
            search_path = str(Path(str(cfg.tune_path)) / "tune")
            repair_experiment_state(search_path)  # before anything reads it
            release_orphans(cfg, tune_path=search_path)
        tuner = make_tuner(cfg, ctx, restore=resume)
        if prefetch is not None:
            prefetch.join()
        t_fit = time.perf_counter()
        results = tuner.fit()
        t_end = time.perf_counter()
        outcome = finish_study(cfg, client, uri, exp_id, parent_id, results)
        if cfg.confirm_seeds:
            outcome.confirm = confirm_phase(cfg, client, exp_id, parent_id, ctx)
        if report:
            _report(cfg, uri)
        else:
            print(f"report: not built (asked not to); build it with `rank1 study report {home}`")
        outcome.timings = {"startup_s": t_fit - t0, "fit_s": t_end - t_fit,
                           "finish_s": time.perf_counter() - t_end, "total_s": time.perf_counter() - t0}
        outcome.machine = {**machine_info("cpu"), "cluster": bool(address)}
        outcome.started = started
        (home / OUTCOME_FILE).write_text(json.dumps(outcome.__dict__, indent=2, default=str))
        for k, v in outcome.timings.items():
            client.log_metric(parent_id, f"study.{k}", v)
        client.set_terminated(parent_id, "FINISHED")
        print_summary(outcome, keep_ui)
    return outcome


def _report(cfg: StudyConfig, uri: str) -> None:
    """The study report, logged to the parent run; a report failure never fails the study."""
    try:
        from dashboards.report import report_study

        path = report_study(cfg, uri)
        print(f"report: {path} (also in the MLflow UI: the parent run's artifacts, report/report.html)")
    except Exception as e:  # pragma: no cover - reported, not raised
        print(f"report: could not be built ({type(e).__name__}: {e}); retry with `rank1 study report {cfg.home_path}`")


def resume_study(home: str | Path, address: str | None = None, keep_ui: bool = False,
                 node_wait_s: float = 600.0, report: bool = True) -> StudyOutcome:
    """Continue a stopped or killed study from its home."""
    home, overrides, env_fallback = home_locations(home)
    return run_study(home / STUDY_FILE, address, keep_ui, overrides=overrides, resume=True,
                     node_wait_s=node_wait_s, env_fallback=env_fallback, report=report)


def finish_study(cfg: StudyConfig, client, uri: str, exp_id: str, parent_id: str, results) -> StudyOutcome:
    """Reconcile MLflow and Optuna with Tune's view; register the best decomposed model."""
    import optuna

    by_trial, orphans = reconcile(cfg, client, exp_id, results)
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    counts, _ = count_states(study)
    outcome = StudyOutcome(cfg.name, str(cfg.home_path), uri, parent_id, trials=counts)
    for k, v in counts.items():
        client.log_metric(parent_id, f"trials.{k}", float(v))
    if orphans:
        client.set_tag(parent_id, "rank1.orphaned_optuna_trials", str(orphans))
    best = pick_best(cfg, study)
    if best is None:
        client.set_tag(parent_id, TAG_CHAMPION, "none: no trial finished")
        return outcome
    if cfg.shipped_arm is None:
        client.set_tag(parent_id, TAG_CHAMPION, "none: the study tunes the dense arm only")
        return outcome
    tid = best.user_attrs.get("ray_trial_id")
    res = by_trial.get(tid)
    if res is None or res.checkpoint is None:
        client.set_tag(parent_id, TAG_CHAMPION, f"none: no checkpoint for trial {tid}")
        return outcome
    with res.checkpoint.as_directory() as d:
        state = load_checkpoint(d)
    from study.registry import register_champion

    # Tune has the final report's short view (study.trial.tune_view); the checkpoint, all of it
    metrics = {**dict(res.metrics), **(end_report(state) or {})}
    outcome.best = {"trial_id": tid, "optuna_number": best.number, "params": dict(best.params), "arm": cfg.shipped_arm,
                    "value": best.values[0], "run_id": state["run_id"], "metrics": metrics}
    reg = register_champion(cfg, client, uri, state, outcome.best)
    outcome.model_uri, outcome.model_version, outcome.alias = reg["model_uri"], reg["version"], reg["alias"]
    client.set_tag(parent_id, TAG_CHAMPION, f"{cfg.model_name} v{reg['version']} ({reg['alias']}) from {tid}")
    return outcome
