"""The study driver: services, the Tuner, exactly-once bookkeeping, the champion.

``run_study`` and ``resume_study`` set up MLflow (the embedded server unless the
study names one), Ray (local unless ``--address``), the study's MLflow experiment
and parent run, and a Tuner over :func:`study.trial.run_trial` searched by
:class:`study.searcher.OptunaRDBSearcher`. When the trials are done it reconciles
the MLflow runs and the Optuna storage with what Tune saw, takes the best trial
from its checkpoint, checks the decomposed model, logs and registers it.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rank1.config import ConfigError
from rank1.train import ARM_CHOICES
from study.config import StudyConfig, load_study
from study.names import (
    FINAL,
    TAG_ARM,
    TAG_REASON,
    TAG_ROLE,
    TAG_SEED,
    TAG_STATUS,
    TAG_STUDY,
    TAG_TRIAL,
    batch_of,
    experiment_url,
)
from study.services import MlflowServer, check_storage, check_tracking_uri, start_ray
from study.trial import load_checkpoint

__all__ = ["StudyOutcome", "preflight", "resume_study", "run_study", "study_status"]

STATE_FILE = "state.json"
LOCATIONS = ("tracking_uri", "storage", "storage_path")  # where a study's state lives, fixed at its start
STUDY_FILE = "study.yaml"


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


# ------------------------------------------------------------------------------------ checks


def preflight(cfg: StudyConfig, address: str | None = None) -> None:
    """Everything that can be wrong before anything starts; raises ConfigError."""
    try:
        cfg.base.check_environment()
    except ConfigError as e:
        raise ConfigError(f"train.{e}") from None
    if cfg.resources.gpu > 0 and not address and not torch.cuda.is_available():
        raise ConfigError(
            f"resources.gpu: {cfg.resources.gpu} GPU per trial was asked for, but this machine has no GPU "
            "(allowed here: 0); trials would wait forever"
        )
    if cfg.tracking_uri:
        check_tracking_uri(cfg.tracking_uri)
    check_storage(cfg.storage_url)


def _is_loopback(uri: str | None) -> bool:
    """Unset (the embedded server on 127.0.0.1) or a loopback host."""
    if not uri:
        return True
    from urllib.parse import urlsplit

    host = urlsplit(uri).hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _fits(resources: dict, cfg: StudyConfig) -> bool:
    return resources.get("CPU", 0) >= cfg.resources.cpu and resources.get("GPU", 0) >= cfg.resources.gpu


def _node_groups_that_fit(cfg: StudyConfig) -> list[str] | None:
    """Autoscaler node groups (KubeRay, autoscaler v2) that could run a trial; None when the
    cluster does not publish them (a fixed cluster, or Ray's v1 autoscaler)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # a private API: its absence only means "unknown"
        return None
    if not config or not config.node_group_configs:
        return None
    return [g.name for g in config.node_group_configs if g.max_count != 0 and _fits(dict(g.resources), cfg)]


def _request_resources(bundles: list[dict[str, float]]) -> None:
    """Ask the cluster's autoscaler (if any) for these bundles; ``[]`` withdraws the ask."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as e:  # no autoscaler API here: waiting is all that is left
        print(f"note: could not ask the autoscaler for a node ({type(e).__name__}: {e})", flush=True)


def check_cluster_resources(cfg: StudyConfig, node_wait_s: float = 600.0) -> None:
    """On a cluster: stores every node can reach, and a node that can run a trial.

    Trials on other hosts need a tracking server and a trial storage they can reach:
    without them, an error before any trial starts. When no live node fits a trial, an
    autoscaler may still add one: the driver waits up to ``node_wait_s`` for it, then fails
    with what the cluster has; a cluster whose node groups (KubeRay, autoscaler v2) cannot
    fit a trial at all fails at once. Never a study that waits forever.
    """
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.util.get_node_ip_address()
    elsewhere = sorted({n["NodeManagerAddress"] for n in nodes} - {here})
    if elsewhere and not cfg.tracking_uri:
        raise ConfigError(
            f"tracking_uri: unset, so trials would log to an MLflow server on 127.0.0.1 of this machine, which the "
            f"cluster's other hosts ({', '.join(elsewhere)}) cannot reach; start `rank1 server --host ADDRESS` "
            "on the head and set tracking_uri: http://ADDRESS:5000"
        )
    if elsewhere and not cfg.storage_path:
        raise ConfigError(
            f"storage_path: unset, so trial checkpoints would go to {cfg.tune_path} on this machine, which the "
            f"cluster's other hosts ({', '.join(elsewhere)}) cannot write; set a shared path (NFS) or s3://bucket/path"
        )
    if not elsewhere and _is_loopback(cfg.tracking_uri):
        print("warning: the tracking server is on 127.0.0.1 of this machine; nodes on other hosts (an autoscaler's "
              "new ones included) cannot log to it: on a real cluster start `rank1 server --host ADDRESS` and set "
              "tracking_uri", flush=True)
    want = f"{cfg.resources.cpu:g} CPU and {cfg.resources.gpu:g} GPU"
    if any(_fits(n["Resources"], cfg) for n in nodes):
        return
    groups = _node_groups_that_fit(cfg)
    total = ray.cluster_resources()
    have = f"{total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU"
    if groups == []:
        raise ConfigError(
            f"resources: no node of this Ray cluster, and no node group its autoscaler may add, has {want} "
            f"for a trial (cluster now: {have}); lower resources.cpu / resources.gpu or add a node group"
        )
    print(f"waiting up to {node_wait_s:g} s for a node with {want} for a trial (cluster now: {have}; "
          f"{'node groups that fit: ' + ', '.join(groups) if groups else 'an autoscaler may add one'})", flush=True)
    # An autoscaler adds nodes for demand it sees: ask for one trial's bundle while waiting
    # (nothing else asks yet: the driver reserves nothing), and withdraw the ask either way.
    bundle = {k: v for k, v in (("CPU", cfg.resources.cpu), ("GPU", cfg.resources.gpu)) if v}
    _request_resources([bundle])
    try:
        deadline = time.monotonic() + node_wait_s
        while time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
            if any(_fits(n["Resources"], cfg) for n in ray.nodes() if n.get("Alive")):
                return
    finally:
        _request_resources([])
    raise ConfigError(
        f"resources: no node with {want} for a trial joined this Ray cluster within {node_wait_s:g} s "
        f"(cluster now: {have}); lower resources.cpu / resources.gpu, add such a node, or wait longer "
        "with --node-wait SECONDS"
    )


# ------------------------------------------------------------------------------------ services


@contextlib.contextmanager
def tracking(cfg: StudyConfig, keep_ui: bool = False) -> Iterator[str]:
    """The tracking URI: the study's server, or an embedded one over the study home."""
    if cfg.tracking_uri:
        yield cfg.tracking_uri
        return
    server = MlflowServer(cfg.home_path).start()
    try:
        yield server.url
    finally:
        if keep_ui:
            print(f"MLflow UI stays up at {server.url} (pid {server.proc.pid}); stop it with Ctrl-C")
            try:
                server.wait()
            except KeyboardInterrupt:
                pass
        server.stop()


# The MLflow UI opens an experiment of this kind on its runs (model training), not on
# GenAI traces; the description is the experiment page's text.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development",
                   "mlflow.note.content": "A rank1-study hyperparameter study: rank-1 filters (rank1) against "
                                          "consecutive 1-D filters (flat1d) and the dense control; one parent run per "
                                          "study, a child run per trial; the report is in the parent run's artifacts."}


def study_description(cfg: StudyConfig, exp_id: str, run_id: str) -> str:
    """The parent run's description: what the study is, where its report is."""
    arms = ", ".join(sorted({a for arm in cfg.space.get("arm", [cfg.base.arm]) for a in ARM_CHOICES[arm]}))
    what = (f"a pre-registered grid of {cfg.n_trials} cells" if cfg.cells is not None else
            f"{cfg.n_trials} trials of an Optuna {cfg.sampler} search over {', '.join(sorted(cfg.space)) or 'nothing'}")
    return (f"**Study `{cfg.name}`**: {what}, each trial training {arms} on {cfg.base.dataset} "
            f"({cfg.base.model}, {cfg.base.epochs} epochs, {cfg.seeds_per_trial} seed(s) per trial"
            + (f"; then each arm's best configuration on {cfg.confirm_seeds} fresh seeds, scored on test" if
               cfg.confirm_seeds else "") + f"); objective {cfg.objective}.\n\n"
            f"- **Report**: [report/report.html](#/experiments/{exp_id}/runs/{run_id}/artifacts/report/report.html) "
            "in this run's artifacts (also `rank1 study report HOME`).\n"
            "- **Trials**: the child runs, named by their parameters; per-epoch curves are the unprefixed "
            "metrics, per-layer detail is under `layers/`, end-of-trial numbers under `final/`.\n"
            f"- **Model**: `{cfg.model_name}` in the registry (alias `champion`): `rank1 pull {cfg.model_name}@champion "
            "--out model/`.")


def _parent_run(client, cfg: StudyConfig, study_text: str) -> tuple[str, str]:
    """The study's experiment and its one parent run (found again on resume)."""
    import rank1

    home = cfg.home_path
    exp = client.get_experiment_by_name(cfg.name)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.name, tags=EXPERIMENT_TAGS)
    if exp and exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp_id)
    for k, v in EXPERIMENT_TAGS.items():  # an experiment made before these tags existed gets them too
        client.set_experiment_tag(exp_id, k, v)
    state_path = home / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    run_id = state.get("parent_run_id")
    if run_id:
        try:
            client.get_run(run_id)
        except Exception:
            run_id = None
    if run_id is None:
        run = client.create_run(exp_id, run_name=f"{cfg.name} (study)", tags={
            TAG_ROLE: "parent", TAG_STUDY: cfg.name, "rank1.home": str(home),
            "rank1.version": rank1.__version__, "rank1.fingerprint": cfg.fingerprint(),
        })
        run_id = run.info.run_id
        client.set_tag(run_id, "mlflow.note.content", study_description(cfg, exp_id, run_id))
        from mlflow.entities import Param

        flat = {"n_trials": cfg.n_trials, "sampler": cfg.sampler, "objective": cfg.objective,
                "scheduler": cfg.scheduler, "seeds_per_trial": cfg.seeds_per_trial,
                "search": ",".join(sorted(cfg.space)), **{f"train.{k}": v for k, v in cfg.train.items()}}
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])
        client.log_text(run_id, study_text, STUDY_FILE)
        import yaml

        client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "resolved.yaml")
        client.log_text(run_id, yaml.safe_dump(cfg.base.to_dict(), sort_keys=False), "resolved_train.yaml")
    state_path.write_text(json.dumps({"parent_run_id": run_id, "experiment_id": exp_id,
                                      "fingerprint": cfg.fingerprint()}, indent=2))
    client.set_terminated(run_id, "RUNNING")
    return exp_id, run_id


# ------------------------------------------------------------------------------------ progress


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


def _f3(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else ""


def _progress_callback():
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
                row.update({k: result.get(k) for k in ("rank1.val_acc", "flat1d.val_acc", "epoch")
                            if result.get(k) is not None})
                if result.get("final"):  # the shipped (decomposed) models' accuracy, not the last epoch's
                    row["value"] = result.get("objective")
                    row["status"] = result.get("trial_status", status)
                    for arm in ("rank1", "flat1d"):
                        if f"{arm}.decomposed_val_acc" in result:
                            row[f"{arm}.val_acc"] = result[f"{arm}.decomposed_val_acc"]
            if self._live is not None:
                self._live.update(self._render())
            elif status != "running":
                print(f"trial {trial.trial_id} {row['status']}: {row['params']}  val acc "
                      f"rank1 {_f3(row.get('rank1.val_acc'))} flat1d {_f3(row.get('flat1d.val_acc'))}", flush=True)

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


# ------------------------------------------------------------------------------------ the run


def _tuner(cfg: StudyConfig, ctx: dict[str, Any], restore: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from study.searcher import OptunaRDBSearcher

    trainable = _trainable(cfg, ctx)
    path = str(Path(str(cfg.tune_path)) / "tune")
    can_restore = restore and tune.Tuner.can_restore(path)
    if restore:
        release_orphans(cfg, _tune_trial_ids(path) if can_restore else set())
    if can_restore:
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    searcher = OptunaRDBSearcher(cfg.storage_url, cfg.name, cfg.space, cfg.sampler, cfg.seed, cfg.objectives,
                                 cfg.cells)
    scheduler = None
    if cfg.scheduler == "asha":
        # max_t one past the last epoch: the trial's final report (decomposition, speed)
        # comes after it, and must not be cut off.
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.base.epochs + 1,
                                  grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=cfg.n_trials, metric="objective", mode="max",
            max_concurrent_trials=cfg.max_concurrent, reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(cfg.tune_path), verbose=0, callbacks=[_progress_callback()],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
        ),
    )


def share_data(cfg: StudyConfig) -> dict[str, Any]:
    """Decode the study's dataset once (or read its cache), put it in Ray's object store, and
    hand the trials its reference: one copy per node, mapped by every trial, never decoded there."""
    import ray

    from rank1.data import load_dataset, to_shared

    b = cfg.base
    t0 = time.perf_counter()
    data = load_dataset(b.dataset, b.root, b.image_size, b.download, b.val_fraction, b.split_seed)
    ref = ray.put(to_shared(data))
    print(f"data: {b.dataset} ({len(data.train)} train, {len(data.val)} val, {len(data.test)} test images) loaded in "
          f"{time.perf_counter() - t0:.1f} s and shared with the trials through Ray's object store", flush=True)
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
    for tid, runs in _trial_runs(client, exp_id).items():
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
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, param_space=param_space, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=cfg.max_concurrent, reuse_actors=True,
                                        metric="objective", mode="max"),
            run_config=tune.RunConfig(name="confirm", storage_path=str(cfg.tune_path), verbose=0,
                                      callbacks=[_progress_callback()],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures)),
        )
    print(f"confirmation: the best configuration of {', '.join(best)} retrained with seeds "
          f"{cfg.confirm_seed_list}, scored on test ({len(cells)} runs)", flush=True)
    results = tuner.fit()
    runs = {r.data.tags.get(TAG_TRIAL): r for r in client.search_runs(
        [exp_id], filter_string=f"tags.`{TAG_ROLE}` = 'confirm'", max_results=5000)}
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


def _write_home(cfg: StudyConfig, study_text: str) -> None:
    home = cfg.home_path
    home.mkdir(parents=True, exist_ok=True)
    import yaml

    (home / STUDY_FILE).write_text(study_text)
    (home / "resolved.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def run_study(study_file: str | Path, address: str | None = None, keep_ui: bool = False,
              overrides: dict[str, Any] | None = None, resume: bool = False,
              node_wait_s: float = 600.0, env_fallback: bool = True) -> StudyOutcome:
    """Run (or with ``resume``, continue) the study described by ``study_file``."""
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
        if not resume:
            raise ConfigError(f"home: {str(home)!r} already holds this study; continue it with "
                              f"`rank1 study resume {home}`")
    from mlflow import MlflowClient

    t0 = time.perf_counter()
    # Ray first: on a cluster, what its nodes can reach is checked before the home is written.
    with start_ray(home, address):
        if address:
            check_cluster_resources(cfg, node_wait_s)
        _write_home(cfg, study_text)
        with tracking(cfg, keep_ui) as uri:
            client = MlflowClient(uri)
            exp_id, parent_id = _parent_run(client, cfg, study_text)
            ctx = {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent_id, "study": cfg.name,
                   "study_config": cfg.to_dict(), "data": share_data(cfg)}
            tuner = _tuner(cfg, ctx, restore=resume)
            t_fit = time.perf_counter()
            results = tuner.fit()
            t_end = time.perf_counter()
            outcome = finish_study(cfg, client, uri, exp_id, parent_id, results)
            if cfg.confirm_seeds:
                outcome.confirm = confirm_phase(cfg, client, exp_id, parent_id, ctx)
            _report(cfg, uri)
            outcome.timings = {"startup_s": t_fit - t0, "fit_s": t_end - t_fit,
                               "finish_s": time.perf_counter() - t_end, "total_s": time.perf_counter() - t0}
            (home / "outcome.json").write_text(json.dumps(outcome.__dict__, indent=2, default=str))
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
                 node_wait_s: float = 600.0) -> StudyOutcome:
    """Continue a stopped or killed study from its home."""
    home, overrides, env_fallback = _home_locations(home)
    return run_study(home / STUDY_FILE, address, keep_ui, overrides=overrides, resume=True,
                     node_wait_s=node_wait_s, env_fallback=env_fallback)


def _home_locations(home: str | Path) -> tuple[Path, dict[str, Any], bool]:
    """A study home, the overrides that put its study back where it ran, and whether
    ``$MLFLOW_TRACKING_URI`` may still fill an unset tracking URI.

    The locations are the ones the study started with (flags and ``$MLFLOW_TRACKING_URI``
    included), not today's: another tracking server or trial storage would start the study
    over beside the old one.
    """
    home = Path(home).expanduser().resolve()
    if not (home / STUDY_FILE).exists():
        raise ConfigError(f"home: {str(home)!r} is not a study home (no {STUDY_FILE} in it)")
    resolved = home / "resolved.yaml"
    where: dict[str, Any] = {}
    if resolved.exists():
        import yaml

        data = yaml.safe_load(resolved.read_text()) or {}
        where = {k: data.get(k) for k in LOCATIONS}
    return home, {"home": str(home), **where}, not resolved.exists()


def load_home(home: str | Path) -> StudyConfig:
    """The study of a home, with the locations it ran with."""
    home, overrides, env_fallback = _home_locations(home)
    return load_study(home / STUDY_FILE, overrides, env_fallback)


# ------------------------------------------------------------------------------------ the end


def _trial_runs(client, exp_id: str) -> dict[str, Any]:
    runs = client.search_runs([exp_id], filter_string=f"tags.`{TAG_ROLE}` = 'trial'", max_results=5000)
    out: dict[str, Any] = {}
    for r in runs:
        out.setdefault(r.data.tags.get(TAG_TRIAL), []).append(r)
    return out


def finish_study(cfg: StudyConfig, client, uri: str, exp_id: str, parent_id: str, results) -> StudyOutcome:
    """Reconcile MLflow and Optuna with Tune's view; register the best decomposed model."""
    import optuna

    runs = _trial_runs(client, exp_id)
    by_trial: dict[str, Any] = {}
    for res in results:
        last = res.metrics or {}
        tid = last.get("trial_id")  # Tune adds it to every result
        by_trial[tid or res.path] = res
        mine = runs.get(tid, [])
        for run in mine:
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
    orphans = _fail_orphans(study, {t for t in by_trial if t})
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("status") or t.state.name.lower()
        counts[key] = counts.get(key, 0) + 1
    outcome = StudyOutcome(cfg.name, str(cfg.home_path), uri, parent_id, trials=counts)
    for k, v in counts.items():
        client.log_metric(parent_id, f"trials.{k}", float(v))
    if orphans:
        client.set_tag(parent_id, "rank1.orphaned_optuna_trials", str(orphans))
    best = pick_best(cfg, study)
    if best is None:
        client.set_tag(parent_id, "rank1.champion", "none: no trial finished")
        return outcome
    if cfg.shipped_arm is None:
        client.set_tag(parent_id, "rank1.champion", "none: the study tunes the dense arm only")
        return outcome
    tid = best.user_attrs.get("ray_trial_id")
    res = by_trial.get(tid)
    if res is None or res.checkpoint is None:
        client.set_tag(parent_id, "rank1.champion", f"none: no checkpoint for trial {tid}")
        return outcome
    with res.checkpoint.as_directory() as d:
        state = load_checkpoint(d)
    from study.registry import register_champion

    outcome.best = {"trial_id": tid, "optuna_number": best.number, "params": dict(best.params),
                    "value": best.values[0], "run_id": state["run_id"], "metrics": dict(res.metrics)}
    reg = register_champion(cfg, client, uri, state, outcome.best)
    outcome.model_uri, outcome.model_version, outcome.alias = reg["model_uri"], reg["version"], reg["alias"]
    client.set_tag(parent_id, "rank1.champion", f"{cfg.model_name} v{reg['version']} ({reg['alias']}) from {tid}")
    (cfg.home_path / "outcome.json").write_text(json.dumps(outcome.__dict__, indent=2, default=str))
    return outcome


def _tune_trial_ids(path: str) -> set[str]:
    """The trials a Tune experiment knows (from its saved state)."""
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id for t in ExperimentAnalysis(path).trials}
    except Exception:  # no readable state yet: Tune knows none
        return set()


def release_orphans(cfg: StudyConfig, known: set[str]) -> int:
    """Before a resumed search starts: Optuna trials asked for Ray trials that Tune never saved
    (the driver died between the two) become FAIL (``orphaned``), and a grid design gets their
    cells back, so the resumed study runs every cell once. Returns how many."""
    import optuna

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


def print_summary(outcome: StudyOutcome, keep_ui: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"study {outcome.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(outcome.trials.items())))
    t.add_column("")
    t.add_column("")
    b = outcome.best
    if b:
        m = b.get("metrics", {})
        t.add_row("best trial", f"{b['trial_id']} (Optuna #{b['optuna_number']})")
        t.add_row("best config", " ".join(f"{k}={v}" for k, v in sorted(b["params"].items())))
        t.add_row("rank1 decomposed val acc", _f3(m.get("rank1.decomposed_val_acc")))
        t.add_row("flat1d decomposed val acc", _f3(m.get("flat1d.decomposed_val_acc")))
        if "dense.shipped_val_acc" in m:
            t.add_row("dense val acc (the control)", _f3(m.get("dense.shipped_val_acc")))
        for key, label in (("rank1.speedup_b1", "speedup vs dense, batch 1"),):
            if key in m:
                t.add_row(label, f"{m[key]:.2f}x")
        speedups = sorted((k for k in m if k.startswith("rank1.speedup_b") and k != "rank1.speedup_b1"), key=batch_of)
        for key in speedups:
            t.add_row(f"speedup vs dense, batch {batch_of(key)}", f"{m[key]:.2f}x")
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
                          f"{v.diff:+.3f} (95% CI [{v.ci_low:+.3f}, {v.ci_high:+.3f}]; {a} {v.mean_a:.3f}, {b} "
                          f"{v.mean_b:.3f}; {v.n_a} + {v.n_b} fresh seeds)" if v.diff is not None else v.sentence)
    t.add_row("study home", outcome.home)
    ui = outcome.tracking_uri if keep_ui else f"rank1 ui --home {outcome.home}"
    t.add_row("MLflow UI", ui)
    state = Path(outcome.home) / STATE_FILE
    if state.exists():
        exp = json.loads(state.read_text()).get("experiment_id")
        t.add_row("the study's runs", experiment_url(outcome.tracking_uri if keep_ui else "http://127.0.0.1:5000", exp))
    console.print(t)
    if not keep_ui:
        console.print(f"Open the MLflow UI with: [bold]rank1 ui --home {outcome.home}[/] (then http://127.0.0.1:5000)")


# ------------------------------------------------------------------------------------ status


def study_status(home: str | Path) -> dict[str, Any]:
    """Trials by state and the best so far, read from the study's Optuna storage."""
    import optuna

    cfg = load_home(home)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    except KeyError:
        return {"name": cfg.name, "n_trials": cfg.n_trials, "states": {}, "trials": [], "best": None}
    trials = []
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        s = t.user_attrs.get("status") or ("running" if t.state.name == "RUNNING" else t.state.name.lower())
        states[s] = states.get(s, 0) + 1
        trials.append({"number": t.number, "trial_id": t.user_attrs.get("ray_trial_id"), "status": s,
                       "params": t.params, "values": t.values})
    best = pick_best(cfg, study)
    return {"name": cfg.name, "n_trials": cfg.n_trials, "states": states, "trials": trials,
            "best": None if best is None else {"number": best.number, "params": best.params, "values": best.values}}

