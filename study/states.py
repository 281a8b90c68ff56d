"""What a study's Optuna storage says: its trials by state and the best so far.

Light on purpose: ``rank1 study status`` (and :func:`study.status`) read a home's Optuna storage
without importing torch, Ray or MLflow (the home's study file is read back without the registries
of datasets, models and init schemes, whose modules import torch). The driver counts the same
states and picks its champion through the same functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rank1.config import registries_unchecked
from study.config import StudyConfig
from study.home import load_home

__all__ = ["count_states", "pick_best", "study_status", "value_names"]


def study_status(home: str | Path) -> dict[str, Any]:
    """Trials by state and the best so far, read from the study's Optuna storage."""
    import optuna

    with registries_unchecked():  # checked when the study ran; reading them would import torch
        cfg = load_home(home)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    except KeyError:
        return {"name": cfg.name, "n_trials": cfg.n_trials, "states": {}, "trials": [], "best": None}
    states, trials = count_states(study)
    best = pick_best(cfg, study)
    ids = {t["number"]: t["trial_id"] for t in trials}
    return {"name": cfg.name, "n_trials": cfg.n_trials, "states": states, "trials": trials,
            "value_names": value_names(cfg),
            "best": None if best is None else {"number": best.number, "trial_id": ids.get(best.number),
                                               "params": best.params, "values": best.values}}


def value_names(cfg: StudyConfig) -> list[str]:
    """What each of a trial's Optuna values is, in order: ``rank1 val acc``, ``flat1d val acc``
    (pair), ``latency ms`` (multi); ``val acc`` where each trial scores its own arm."""
    arms = cfg.objective_arms
    names = {"objective": f"{arms[0]} val acc" if arms else "val acc", "objective.flat1d": "flat1d val acc",
             "latency_ms": "latency ms"}
    return [names[key] for key, _ in cfg.objectives]


def count_states(study) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """``({status: count}, [each trial])`` of an Optuna study: a trial's status is the one this
    service recorded (finished, pruned, diverged, failed, orphaned), else its Optuna state."""
    counts: dict[str, int] = {}
    trials = []
    for t in study.get_trials(deepcopy=False):
        s = t.user_attrs.get("status") or t.state.name.lower()
        counts[s] = counts.get(s, 0) + 1
        trials.append({"number": t.number, "trial_id": t.user_attrs.get("ray_trial_id"), "status": s,
                       "params": t.params, "values": t.values})
    return counts, trials


def pick_best(cfg: StudyConfig, study):
    """Single objective: the highest value. Multi: on the Pareto front of (accuracy,
    latency), the fastest trial whose accuracy is within ``pareto_tolerance`` of the
    most accurate Pareto trial."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if not done:
        return None
    if cfg.objective != "multi":  # the first objective's arm (pair: rank1) ships
        return max(done, key=lambda t: (t.values[0], -t.number))
    front = study.best_trials
    top = max(t.values[0] for t in front)
    near = [t for t in front if t.values[0] >= top - cfg.pareto_tolerance]
    return min(near, key=lambda t: (t.values[1], -t.values[0], t.number))
