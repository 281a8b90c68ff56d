"""Everything a report shows, read from MLflow (runs, artifacts, registry) and Optuna.

Read only: nothing here writes to either store.
"""

from __future__ import annotations

import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study.names import TAG_REASON, TAG_ROLE, TAG_STATUS, TAG_TRIAL, TRIAL_RESULT

__all__ = ["StudyData", "TrialRecord", "load_study_data"]


@dataclass
class TrialRecord:
    """One trial: its MLflow run, its per-seed results (when it ended), its Optuna entry."""

    trial_id: str
    run_id: str
    status: str
    reason: str | None
    params: dict[str, Any]  # the searched parameters
    config: dict[str, str]  # every training option, as MLflow params
    metrics: dict[str, float]  # the run's latest metrics (means over seeds)
    results: list[dict[str, Any]] | None = None  # per seed: the full PairResult, from trial_result.json
    optuna_state: str | None = None
    values: list[float] | None = None
    intermediate: dict[int, float] = field(default_factory=dict)
    optuna_number: int | None = None

    def cfg(self, key: str, default: Any = None) -> Any:
        v = self.params.get(key, self.config.get(key, default))
        if isinstance(v, str):
            for cast in (int, float):
                try:
                    return cast(v)
                except ValueError:
                    continue
            if v in ("True", "False"):
                return v == "True"
        return v


@dataclass
class StudyData:
    name: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    trials: list[TrialRecord]
    n_trials_planned: int
    seeds_per_trial: int
    model_name: str
    champion: dict[str, Any] | None
    optuna_order: list[tuple[int, str, list[float] | None]]  # (number, state, values) in ask order
    importances: dict[str, float] | None
    importance_note: str = ""
    confirms: list[TrialRecord] = field(default_factory=list)  # the confirmation phase's runs
    confirm_seeds: int | None = None

    @property
    def finished(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.status == "finished" and t.results]


def _champion(client, model_name: str) -> dict[str, Any] | None:
    for alias in ("champion", "challenger"):
        try:
            mv = client.get_model_version_by_alias(model_name, alias)
        except Exception:
            continue
        card = None
        try:
            with tempfile.TemporaryDirectory() as d:
                p = client.download_artifacts(mv.run_id, "decomposed_model_card/model_card.json", d)
                card = json.loads(Path(p).read_text())
        except Exception:
            pass
        return {"name": model_name, "version": mv.version, "alias": alias, "run_id": mv.run_id,
                "tags": dict(mv.tags), "card": card}
    return None


def load_study_data(tracking_uri: str, cfg) -> StudyData:
    """The study ``cfg`` (a StudyConfig) as recorded in MLflow and its Optuna storage."""
    import optuna
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(cfg.name)
    if exp is None:
        raise ValueError(f"no MLflow experiment named {cfg.name!r} at {tracking_uri}")
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'parent'")
    if not parents:
        raise ValueError(f"experiment {cfg.name!r} has no study parent run")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'trial'", max_results=10000)
    confirm_runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'confirm'",
                                      max_results=10000)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
        otrials = study.get_trials(deepcopy=False)
    except KeyError:
        study, otrials = None, []
    by_ray = {t.user_attrs.get("ray_trial_id"): t for t in otrials}
    results = _trial_results(tracking_uri, [*runs, *confirm_runs])
    trials = [_record(r, by_ray, results) for r in runs]
    confirms = sorted((_record(r, {}, results) for r in confirm_runs),
                      key=lambda t: (t.config.get("arm", ""), int(t.config.get("seed", 0))))
    trials.sort(key=lambda t: (by_ray[t.trial_id].number if t.trial_id in by_ray else 1 << 30, t.trial_id))
    importances, note = None, ""
    complete = [t for t in otrials if t.state.name == "COMPLETE"]
    if study is not None and len(complete) >= 3 and len(study.directions) == 1:
        try:
            importances = dict(optuna.importance.get_param_importances(study))
        except Exception as e:  # e.g. a parameter that never varied
            note = f"importances unavailable: {e}"
    else:
        note = f"importances need at least 3 completed trials of a single-objective study ({len(complete)} completed)"
    champion = _champion(client, cfg.model_name)
    if champion is not None:  # how a reader of the report gets it: from the study's store
        from study.registry import pull_command

        champion["pull"] = pull_command(cfg, f"{champion['name']}@{champion['alias']}")
    return StudyData(
        cfg.name, exp.experiment_id, parents[0].info.run_id, tracking_uri, trials, cfg.n_trials,
        cfg.seeds_per_trial, cfg.model_name, champion,
        [(t.number, t.state.name, t.values) for t in otrials], importances, note, confirms, cfg.confirm_seeds,
    )


def _ended(r) -> bool:
    return r.data.tags.get(TAG_STATUS) in ("finished", "diverged", "failed")


def _trial_results(tracking_uri: str, runs: list, workers: int = 4) -> dict[str, list[dict[str, Any]] | None]:
    """``trial_result.json`` of every ended run, by run id (None where it cannot be read).

    Each file is fetched from its run's own artifact location (known from the search: no
    lookup of the run first, two requests a file where a run id costs five), a few at a time,
    so a study of hundreds of trials reports in seconds; nothing is fetched for a running one."""
    from mlflow.artifacts import download_artifacts

    def one(r) -> list[dict[str, Any]] | None:
        try:
            with tempfile.TemporaryDirectory() as d:
                path = download_artifacts(artifact_uri=f"{r.info.artifact_uri.rstrip('/')}/{TRIAL_RESULT}",
                                          dst_path=d, tracking_uri=tracking_uri)
                return json.loads(Path(path).read_text())
        except Exception:  # noqa: BLE001 - a missing or unreadable file: the report says the trial has no results
            return None

    ended = [r for r in runs if _ended(r)]
    if not ended:
        return {}
    with ThreadPoolExecutor(min(workers, len(ended)), thread_name_prefix="rank1-report") as pool:
        return dict(zip((r.info.run_id for r in ended), pool.map(one, ended)))


def _record(r, by_ray: dict, results: dict[str, list[dict[str, Any]] | None]) -> TrialRecord:
    """A trial (or confirmation) run as a record, with its per-seed results once it ended."""
    tid = r.data.tags.get(TAG_TRIAL, r.info.run_id)
    params = {k[len("search."):]: v for k, v in r.data.params.items() if k.startswith("search.")}
    rec = TrialRecord(tid, r.info.run_id, r.data.tags.get(TAG_STATUS, "unknown"),
                      r.data.tags.get(TAG_REASON), params, dict(r.data.params), dict(r.data.metrics))
    ot = by_ray.get(tid)
    if ot is not None:
        rec.params = dict(ot.params)  # typed
        rec.optuna_state, rec.optuna_number, rec.values = ot.state.name, ot.number, ot.values
        rec.intermediate = dict(ot.intermediate_values)
    rec.results = results.get(r.info.run_id)
    return rec
