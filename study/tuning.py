"""The Tune side of a study: the trainable, the search's Tuner, its reconciliation with MLflow
and Optuna, the orphans of a killed driver, the best trials, and the confirmation phase.

Kept apart from the objective (:mod:`study.trial`) and from the orchestration
(:mod:`study.driver`). Exactly once: a restored Tuner continues the same experiment,
every Optuna trial is found by its Ray trial id, and nothing here creates a run twice.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from rank1.data import DataBundle
from study.config import StudyConfig
from study.console import progress_callback
from study.ends import complete_ends, drain, end_callback
from study.names import FINAL, TAG_ARM, TAG_REASON, TAG_ROLE, TAG_SEED, TAG_STATUS, TAG_TRIAL
from study.runs import trial_runs

__all__ = [
    "best_per_arm", "confirm_phase", "make_tuner", "reconcile", "release_orphans",
    "repair_experiment_state", "share_data", "Prefetch",
]

_STATE_PREFIX = "experiment_state-"  # Tune's saved experiment state: experiment_state-<session>.json
SNAPSHOT = ".rank1-last-complete-state"  # the keeper's copy of the newest complete set of state files


def make_tuner(cfg: StudyConfig, ctx: dict[str, Any], restore: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from study.searcher import OptunaRDBSearcher

    trainable = _trainable(cfg, ctx)
    path = str(Path(str(cfg.tune_path)) / "tune")
    if restore and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    searcher = OptunaRDBSearcher(cfg.storage_url, cfg.name, cfg.space, cfg.sampler, cfg.seed, cfg.objectives,
                                 cfg.cells)
    scheduler = None
    if cfg.scheduler == "asha":
        # Rungs by the epoch the trial reports, not Tune's count of its reports: a trial that went
        # on from a checkpoint Tune had not recorded (restore_state) counts its reports from one.
        # max_t one past the last epoch: ASHA stops a trial that reaches it, and the trial's final
        # report (decomposition, speed; the last epoch's number) comes after that epoch's.
        scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.base.epochs + 1,
                                  grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=cfg.n_trials, metric="objective", mode="max",
            max_concurrent_trials=cfg.max_concurrent, reuse_actors=True,
        ),
        run_config=_run_config(cfg, "tune"),
    )


def _run_config(cfg: StudyConfig, name: str):
    """Tune keeps every checkpoint folder; the trial empties all but its newest two itself
    (:data:`study.trial.KEEP_CHECKPOINTS`), so that none a saved experiment state names is gone."""
    from ray import tune

    return tune.RunConfig(name=name, storage_path=str(cfg.tune_path), verbose=0,
                          callbacks=_callbacks(str(Path(str(cfg.tune_path)) / name)),
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                          failure_config=tune.FailureConfig(max_failures=cfg.max_failures))


def _callbacks(experiment_path: str) -> list:
    """The live progress table, the keeper of the last complete experiment state, of Tune's own
    loggers only the JSON one (``result.json``: what Tune reads back for its results at the end of a
    fit), and the hand-over of each ended trial to the driver's writer of MLflow ends (study.ends).
    The CSV and TensorBoard copies of every result stay off (:data:`study.services.DRIVER_ENV`)."""
    from ray.tune.logger import JsonLoggerCallback

    return [progress_callback(), _state_keeper(experiment_path), JsonLoggerCallback(), end_callback()]


def _session_files(experiment_path: Path) -> list[Path]:
    """Tune's state files of its newest driver session (the experiment state, the search
    algorithm's, the searcher's, the callbacks'): ``*-<session>.json`` / ``.pkl``."""
    states = sorted(experiment_path.glob(f"{_STATE_PREFIX}*.json"))  # Tune restores from the newest name
    if not states:
        return []
    session = states[-1].name[len(_STATE_PREFIX):-len(".json")]
    return sorted(p for p in experiment_path.iterdir() if p.is_file() and p.stem.endswith(f"-{session}"))


def _whole(path: Path) -> bool:
    """A state file read in full: the experiment state parses as JSON, Tune's others unpickle (the
    searcher's own file is a line of text its ``restore`` does not read: the storage is its state)."""
    if path.name.startswith("searcher-state-"):
        return True
    try:
        data = path.read_bytes()
        if path.name.startswith(_STATE_PREFIX):
            json.loads(data)
        else:
            pickle.loads(data)
        return True
    except (OSError, ValueError, EOFError, pickle.UnpicklingError):  # torn (or unreadable)
        return False
    except Exception:  # noqa: BLE001 - whole, but not loadable here (e.g. a class this process lacks)
        return True


def _state_keeper(experiment_path: str):
    """A Tune callback that keeps a copy of Tune's newest complete set of state files. Tune writes
    them in a staging folder and copies them into the experiment folder in the background, in
    place, so a driver killed during that copy leaves torn files, and Tune, finding them on
    resume, logs "Failed to restore the run state" and starts the experiment anew: every trial it
    had, finished or half-way, forgotten (seen: a killed study whose resume ran 1 of its 4 trials).
    Tune asks its callbacks for their state at every save; this one then copies the files of the
    newest session, checks each copy is whole, and only then replaces its previous copy."""
    from ray import tune

    class _Keeper(tune.Callback):
        def __init__(self, path: str) -> None:
            self.path = path

        def get_state(self):
            here = Path(self.path)
            files = _session_files(here) if here.is_dir() else []
            if files:
                tmp, keep, old = here / f"{SNAPSHOT}.tmp", here / SNAPSHOT, here / f"{SNAPSHOT}.old"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                for f in files:
                    shutil.copyfile(f, tmp / f.name)
                if all(_whole(tmp / f.name) for f in files):
                    shutil.rmtree(old, ignore_errors=True)
                    if keep.exists():
                        keep.rename(old)
                    tmp.rename(keep)
                    shutil.rmtree(old, ignore_errors=True)
            return None  # nothing of its own to save

    return _Keeper(experiment_path)


def repair_experiment_state(experiment_path: str) -> bool:
    """Before a resume: if a file of Tune's newest saved state is torn (its driver was killed while
    Tune copied it), that session's files are moved aside and the keeper's last complete set put
    in their place, so that Tune restores the experiment instead of starting it anew. Returns
    whether it did; says so, or that it cannot."""
    here = Path(experiment_path)
    files = _session_files(here) if here.is_dir() else []
    torn = [f.name for f in files if not _whole(f)]
    if not torn:
        return False
    kept = next((d for d in (here / SNAPSHOT, here / f"{SNAPSHOT}.old")
                 if d.is_dir() and any(d.iterdir()) and all(_whole(f) for f in d.iterdir())), None)
    if kept is None:
        print(f"resume: Tune's saved state in {here} was cut off when its driver was killed ({', '.join(torn)}) "
              "and no complete copy is kept: Tune will start this experiment anew (its unfinished trials are "
              "marked orphaned)", flush=True)
        return False
    aside = here / f".rank1-torn-{int(time.time())}"
    aside.mkdir(exist_ok=True)
    for f in files:
        f.rename(aside / f.name)
    for f in kept.iterdir():
        shutil.copyfile(f, here / f.name)
    print(f"resume: Tune's saved state was cut off when its driver was killed ({', '.join(torn)}; kept in "
          f"{aside.name}); resuming from the last complete one", flush=True)
    return True


# What the driver imports after its search, for the champion's export (seconds of imports): done
# while ray.init waits for Ray's processes instead. Torch's own modules only, which nothing the
# driver's thread runs meanwhile imports (Ray's start, the MLflow calls, the search's setup: a test
# checks Ray's and the search's have no module in common with these), and the driver joins the
# thread before its search starts: two threads importing modules that import each other can each
# hold the lock the other needs, and Python then fails one of the imports ("deadlock detected").
_LATER = ("torch.export", "torch.export._trace", "torch._dynamo", "sympy")


class Prefetch:
    """The study's dataset decoded, and the modules the driver needs later imported, on a
    thread while ``ray.init`` waits for Ray's processes to come up (seconds in which the
    driver's own thread only polls). :func:`share_data` takes the dataset from here; an error
    loading it is raised there, as if loaded then."""

    def __init__(self, cfg: StudyConfig) -> None:
        self._cfg = cfg
        self._loaded = threading.Event()
        self._data: Any = None
        self._error: BaseException | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._work, name="rank1-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        import importlib

        from rank1.train import source_data

        t0 = time.perf_counter()
        try:
            self._data = source_data(self._cfg.base)
        except BaseException as e:  # raised by data(), on the driver's thread
            self._error = e
        self.seconds = time.perf_counter() - t0
        self._loaded.set()
        for name in _LATER:
            try:
                importlib.import_module(name)
            except Exception:  # an optional part missing here fails where it is used, as before
                pass

    def data(self) -> DataBundle:
        self._loaded.wait()
        if self._error is not None:
            raise self._error
        return self._data

    def join(self) -> None:
        """Until its imports are done: called before the search starts (Tune and the trials' results
        import more as they go), so that nothing is imported on two threads at once after that."""
        self._thread.join()


def share_data(cfg: StudyConfig, prefetch: Prefetch | None = None) -> dict[str, Any]:
    """Decode the study's dataset once (or read its cache), put it in Ray's object store, and
    hand the trials its reference: one copy per node, mapped by every trial, never decoded there."""
    import ray

    from rank1.data import to_shared
    from rank1.train import source_data

    b = cfg.base
    t0 = time.perf_counter()
    if prefetch is not None:
        data, took = prefetch.data(), prefetch.seconds  # the load's own time on its thread, not the wait for it
    else:
        data = source_data(b)
        took = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = ray.put(to_shared(data))
    print(f"data: {b.dataset} ({len(data.train)} train, {len(data.val)} val, {len(data.test)} test images) loaded in "
          f"{took + time.perf_counter() - t0:.1f} s and shared with the trials through Ray's object store", flush=True)
    return {"key": list(b.source_key), "ref": ref}


def _trainable(cfg: StudyConfig, ctx: dict[str, Any]):
    from ray import tune

    from study.trial import run_trial

    return tune.with_resources(
        tune.with_parameters(run_trial, ctx=ctx), {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu}
    )


def best_per_arm(cfg: StudyConfig, client, exp_id: str) -> dict[str, dict[str, Any]]:
    """Each trained arm's best search trial by that arm's own validation accuracy (mean over
    seeds; ties: the earlier Optuna trial): ``{arm: {trial_id, number, params, val_acc}}``."""
    import optuna

    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    by_ray = {t.user_attrs.get("ray_trial_id"): t for t in study.get_trials(deepcopy=False)}
    best: dict[str, dict[str, Any]] = {}
    for tid, runs in trial_runs(client, exp_id).items():
        t = by_ray.get(tid)
        if t is None or t.state.name != "COMPLETE":
            continue
        m = runs[0].data.metrics
        for arm in ("rank1", "flat1d", "dense"):
            acc = m.get(f"{FINAL}{arm}.decomposed_val_acc", m.get(f"{FINAL}{arm}.shipped_val_acc"))
            if acc is None or not math.isfinite(acc):
                continue
            key = (acc, -t.number)
            if arm not in best or key > best[arm]["key"]:
                best[arm] = {"trial_id": tid, "number": t.number, "params": dict(t.params), "val_acc": acc, "key": key}
    return {arm: {k: v for k, v in b.items() if k != "key"} for arm, b in sorted(best.items())}


def confirm_phase(cfg: StudyConfig, client, exp_id: str, parent_id: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """Best versus best: each arm's best configuration retrained with ``confirm_seeds`` fresh
    seeds, that arm alone, scored on the test split. A Tune experiment of its own (``confirm``
    under the trial storage), so a killed driver resumes it like the search: every run once."""
    from ray import tune

    best = best_per_arm(cfg, client, exp_id)
    cells = [{"arm": arm, "params": b["params"], "seed": seed, "source": b["trial_id"]}
             for arm, b in best.items() for seed in cfg.confirm_seed_list]
    summary: dict[str, Any] = {"best": best, "seeds": cfg.confirm_seed_list, "runs": {}}
    if not cells:
        return summary
    path = str(Path(str(cfg.tune_path)) / "confirm")
    param_space = {"confirm": tune.grid_search(cells)}
    trainable = _trainable(cfg, ctx)
    repair_experiment_state(path)
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, param_space=param_space, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=cfg.max_concurrent, reuse_actors=True,
                                        metric="objective", mode="max"),
            run_config=_run_config(cfg, "confirm"),
        )
    print(f"confirmation: the best configuration of {', '.join(best)} retrained with seeds "
          f"{cfg.confirm_seed_list}, scored on test ({len(cells)} runs)", flush=True)
    results = tuner.fit()
    drain()
    found = client.search_runs([exp_id], filter_string=f"tags.`{TAG_ROLE}` = 'confirm'", max_results=5000)
    complete_ends(client, results, {r.data.tags.get(TAG_TRIAL): [r] for r in found})
    runs = {r.data.tags.get(TAG_TRIAL): r for r in found}
    for res in results:
        tid = (res.metrics or {}).get("trial_id")
        run = runs.get(tid)
        if run is not None and res.error is not None and run.data.tags.get(TAG_STATUS) != "failed":
            client.set_tag(run.info.run_id, TAG_STATUS, "failed")
            client.set_tag(run.info.run_id, TAG_REASON, str(res.error)[:5000])
            client.set_terminated(run.info.run_id, "FAILED")
    for run in client.search_runs([exp_id], filter_string=f"tags.`{TAG_ROLE}` = 'confirm'", max_results=5000):
        arm = run.data.tags.get(TAG_ARM)
        summary["runs"].setdefault(arm, []).append({
            "seed": int(run.data.tags.get(TAG_SEED, -1)), "status": run.data.tags.get(TAG_STATUS),
            "test_acc": run.data.metrics.get(f"{FINAL}{arm}.test_acc"), "run_id": run.info.run_id})
    for arm_runs in summary["runs"].values():
        arm_runs.sort(key=lambda r: r["seed"])
    client.log_text(parent_id, json.dumps(summary, indent=2), "confirm.json")
    (cfg.home_path / "confirm.json").write_text(json.dumps(summary, indent=2))
    return summary


def reconcile(cfg: StudyConfig, client, exp_id: str, results) -> tuple[dict[str, Any], int]:
    """After the search's ``fit``: each trial run's end and status as Tune saw it (the end of one
    that ended, where MLflow lacks it; an errored trial is ``failed``; one stopped before its final
    report, by ASHA, is ``pruned``), and Optuna trials asked for Ray trials that never ran marked
    FAIL. Returns ``({trial id: Tune result}, orphans)``."""
    import optuna

    drain()
    runs = trial_runs(client, exp_id)
    complete_ends(client, results, runs)  # ends Tune has and MLflow lacks (a driver killed before writing them)
    by_trial: dict[str, Any] = {}
    for res in results:
        last = res.metrics or {}
        tid = last.get("trial_id")  # Tune adds it to every result
        by_trial[tid or res.path] = res
        for run in runs.get(tid, []):
            status = run.data.tags.get(TAG_STATUS)
            if res.error is not None and status != "failed":
                client.set_tag(run.info.run_id, TAG_STATUS, "failed")
                client.set_tag(run.info.run_id, TAG_REASON, str(res.error)[:5000])
                client.set_terminated(run.info.run_id, "FAILED")
            elif res.error is None and not last.get("final") and status != "pruned":
                client.set_tag(run.info.run_id, TAG_STATUS, "pruned")
                client.set_tag(run.info.run_id, TAG_REASON, f"stopped early by ASHA after epoch {last.get('epoch')}")
                client.set_terminated(run.info.run_id, "KILLED")
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    return by_trial, _fail_orphans(study, {t for t in by_trial if t})


def _tune_trial_ids(path: str) -> set[str]:
    """The trials a Tune experiment knows (from its saved state)."""
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id for t in ExperimentAnalysis(path).trials}
    except Exception:  # no readable state yet: Tune knows none
        return set()


def release_orphans(cfg: StudyConfig, tune_path: str) -> int:
    """Before a resumed search starts: Optuna trials asked for Ray trials that the Tune experiment
    at ``tune_path`` never saved (the driver died between the two) become FAIL (``orphaned``),
    and a grid design gets their cells back, so the resumed study runs every cell once.
    Returns how many."""
    import optuna
    from ray import tune

    known = _tune_trial_ids(tune_path) if tune.Tuner.can_restore(tune_path) else set()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    except KeyError:  # the search never started
        return 0
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("ray_trial_id") in known:
            continue
        if "grid_id" in t.system_attrs:  # GridSampler counts a cell by its trials' search space: release it
            study._storage.set_trial_system_attr(t._trial_id, "search_space", {"released": [t.number]})
        optuna.trial.Trial(study, t._trial_id).set_user_attr("status", "orphaned")
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        n += 1
    if n:
        print(f"resume: {n} Optuna trial(s) asked just before the driver stopped never started: marked FAIL "
              "(orphaned)" + (", their grid cells run again" if cfg.cells is not None else ""), flush=True)
    return n


def _fail_orphans(study, known: set[str]) -> int:
    import optuna

    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("ray_trial_id") not in known:
            optuna.trial.Trial(study, t._trial_id).set_user_attr("status", "orphaned")
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            n += 1
    return n
