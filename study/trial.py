"""One study trial, run by Ray Tune in a worker: train the arms, log, checkpoint.

A trial trains every seed of its configuration in lockstep (rank1 and flat1d arms,
and dense if asked), one epoch at a time. After each epoch it sends the epoch to its
MLflow run (in the background, while the next epoch trains), then reports to Tune with
a checkpoint holding both arms of every seed, their optimiser states, the MLflow run id
and the epochs not yet known to be logged. A restarted trial — a killed worker, a
resumed driver — continues from that checkpoint and finds its MLflow run again (by the
note it left in Tune's trial storage, else by the ``rank1.trial_id`` tag), so every
trial has exactly one run and no epoch is logged twice or lost. The trial's end (final
numbers, files, status) goes to Tune in its final checkpoint; the driver writes it to the run
(:mod:`study.ends`) while this worker starts its next trial.

Kept apart from the Tuner setup (study/driver.py): this file is the objective.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import posixpath
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Param, RunTag

from rank1.data import from_shared, with_subsets
from rank1.train import PairTrainer, TrainConfig, data_for
from study.ends import END_FILE, log_metrics
from study.names import (
    TAG_ARM,
    TAG_CONFIRM_OF,
    TAG_NODE,
    TAG_PID,
    TAG_RESUMED,
    TAG_ROLE,
    TAG_SEED,
    TAG_STATUS,
    TAG_STUDY,
    TAG_TRIAL,
    epoch_metric,
    final_metric,
    run_name,
)

__all__ = ["CHECKPOINT_FILE", "KEEP_CHECKPOINTS", "SUPERSEDED_FILE", "aggregate_epoch", "end_report", "final_metrics",
           "restore_state", "run_trial", "trial_value", "tune_view"]

CHECKPOINT_FILE = "state.pt"
SUPERSEDED_FILE = "superseded.json"  # left in a checkpoint folder whose state a newer one replaced
_MAX_PARAMS = 100  # and at most 100 params
_FINAL_RENAME = {"val_acc": "shipped_val_acc", "val_loss": "shipped_val_loss"}


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.mean(values) if values else float("nan")


def aggregate_epoch(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """One epoch's metrics over seeds: the mean of each ``arm.key``, plus the objective."""
    out: dict[str, list[float]] = {}
    for metrics in per_seed:
        for arm, m in metrics.items():
            for k, v in m.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    out.setdefault(f"{arm}.{k}", []).append(float(v))
    agg = {k: _mean(v) for k, v in out.items()}
    if "rank1.val_acc" in agg and "flat1d.val_acc" in agg:
        agg["paired.val_acc_diff"] = agg["rank1.val_acc"] - agg["flat1d.val_acc"]
    return agg


def _numbers(prefix: str, d: dict[str, Any]) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def final_metrics(results: list[dict[str, Any]], latency_batch: int) -> dict[str, float]:
    """End-of-trial figures over seeds: accuracy, size, speed, paired difference, gradient
    flow at init / epoch 1 / end (``ARM.gradflow.WHEN.KEY``), effective ranks (``ARM.lowrank.KEY``)."""
    out: dict[str, list[float]] = {}
    for res in results:
        for arm, r in res["arms"].items():
            # val_acc / val_loss are also per-epoch keys: the shipped model's get their own name.
            flat = _numbers(f"{arm}.", {_FINAL_RENAME.get(k, k): v for k, v in {**r["final"], **r["inference"]}.items()})
            for when, g in r.get("gradflow", {}).items():
                flat.update(_numbers(f"{arm}.gradflow.{when}.", g))
            flat.update(_numbers(f"{arm}.lowrank.", r.get("lowrank", {})))
            flat[f"{arm}.epochs_run"] = float(r["epochs_run"])
            for k, v in flat.items():
                out.setdefault(k, []).append(v)
        for k, v in res["paired"].items():
            out.setdefault(f"paired.{k}", []).append(float(v))
    agg = {k: _mean(v) for k, v in out.items()}
    agg["latency_ms"] = agg.get(f"rank1.decomposed_latency_ms_b{latency_batch}", float("nan"))
    return agg


def arm_accuracy(arm_result: dict[str, Any], split: str = "val") -> float | None:
    """An arm's score: its shipped (decomposed) model's validation or test accuracy."""
    f = arm_result["final"]
    return f.get("decomposed_val_acc", f.get("val_acc")) if split == "val" else f.get("test_acc")


def trial_value(results: list[dict[str, Any]], arms: tuple[str, ...] = ("rank1",),
                split: str = "val") -> tuple[str, str | None, dict[str, float]]:
    """``(status, reason, {arm: mean accuracy over seeds})`` of the objective ``arms``: failed or
    diverged when one of them did in any seed (another arm's trouble does not fail the trial)."""
    for bad in ("failed", "diverged"):
        for arm in arms:
            reasons = [r["arms"][arm]["reason"] for r in results if r["arms"][arm]["status"] == bad]
            if reasons:
                return bad, f"{arm}: {reasons[0]}", {a: float("nan") for a in arms}
    return "finished", None, {a: _mean([arm_accuracy(r["arms"][a], split) for r in results]) for a in arms}


class _RunLogger:
    """The trial's one MLflow run, found by tag or created under the study's parent run.

    Finding the run of a restarted trial waits for the server; creating a new one, its params and
    each epoch go through one background thread in order, so that the server's replies overlap
    the training instead of holding it up (the run's end is the driver's: :mod:`study.ends`). At
    most one call is in flight, and each waits for the one before (whose error, if any, surfaces
    there). An epoch's metrics stay in the trial's
    checkpoint until they are known to be in MLflow (``unlogged``), so a trial restarted from
    that checkpoint sends what its predecessor may not have (``resend``)."""

    def __init__(self, ctx: dict[str, Any], trial_id: str, run_id: str | None, params: dict[str, Any],
                 config: TrainConfig, role: str = "trial", tags: dict[str, str] | None = None,
                 name: str | None = None) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(ctx["tracking_uri"])
        self.ctx = ctx
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rank1-mlflow")
        self._inflight: Future | None = None
        self.unlogged: dict[int, dict[str, float]] = {}
        live = {TAG_STATUS: "running", TAG_PID: str(os.getpid()), TAG_NODE: _node_id()}
        # Re-logging a param with the same value is allowed, so a restarted trial can do this again.
        logged = {**config.to_dict(), **{f"search.{k}": v for k, v in params.items()}}
        batch = [Param(k, str(v)[:6000]) for k, v in sorted(logged.items())]
        # A restarted trial finds its run by the note an earlier attempt left, else by its tag; the
        # first attempt of a trial of a study this driver started asks nothing (no run can exist
        # yet: a request per trial for nothing).
        memo = _RunMemo(ctx, trial_id)
        if run_id is None:
            run_id = memo.run_id()
        # Where the run's files go, when the run is in hand: the end's upload then asks nothing first.
        self.artifact_uri: str | None = None
        if run_id is None and not memo.first_attempt():
            found = self.client.search_runs(
                [ctx["experiment_id"]], filter_string=f"tags.`{TAG_TRIAL}` = '{trial_id}'", max_results=2
            )
            run_id = found[0].info.run_id if found else None
            self.artifact_uri = found[0].info.artifact_uri if found else None
        if run_id is None:
            # Created on the logging thread while the first epoch trains (the server may still be
            # writing the end of the trial this worker ran before); ``run_id`` waits for it.
            self._run_id: str | None = None
            self.last_logged = 0
            tags = {"mlflow.parentRunId": ctx["parent_run_id"], TAG_TRIAL: trial_id, TAG_ROLE: role,
                    TAG_STUDY: ctx["study"], **live, **(tags or {})}
            self._send(self._create, memo, name or trial_id, tags, batch)
            return
        self._run_id = run_id
        if memo.run_id() != run_id:  # found by its checkpoint or its tag: write it down
            memo.created(run_id)
        self.client.set_terminated(run_id, "RUNNING")
        self._send(self._log_params, batch, [RunTag(k, v) for k, v in live.items()])
        history = self.client.get_metric_history(run_id, "objective")
        self.last_logged = max((m.step for m in history), default=0)

    @property
    def run_id(self) -> str:
        """The run's id, once it is created (on the main thread only: the logging thread reads ``_run_id``)."""
        if self._run_id is None:
            self.wait()
        return self._run_id

    def _create(self, memo: _RunMemo, name: str, tags: dict[str, str], params: list[Param]) -> None:
        memo.creating()
        run = self.client.create_run(self.ctx["experiment_id"], run_name=name, tags=tags)
        self._run_id, self.artifact_uri = run.info.run_id, run.info.artifact_uri
        memo.created(self._run_id)
        self._log_params(params, [])

    def _send(self, fn, *args) -> None:
        """``fn(*args)`` on the logging thread, after the call before it has finished."""
        self.wait()
        self._inflight = self._pool.submit(fn, *args)

    def wait(self) -> None:
        """Until everything sent is in MLflow; raises what the last call raised."""
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            inflight.result()
            self.unlogged.clear()

    def _log_params(self, params: list[Param], tags: list[RunTag]) -> None:
        for i in range(0, max(len(params), 1), _MAX_PARAMS):  # MLflow takes 100 params per batch
            self.client.log_batch(self._run_id, params=params[i:i + _MAX_PARAMS], tags=tags if i == 0 else [])

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch <= self.last_logged:  # already there from before a restart
            return
        self._send(self.log, {epoch_metric(k): v for k, v in metrics.items()}, epoch)
        self.unlogged[epoch] = metrics
        self.last_logged = epoch

    def resend(self, unlogged: dict[int, dict[str, float]]) -> None:
        """The epochs a restarted trial's checkpoint holds as maybe not logged: those MLflow lacks."""
        for epoch in sorted(unlogged):
            self.log_epoch(epoch, unlogged[epoch])

    def log(self, metrics: dict[str, float], step: int = 0) -> None:
        log_metrics(self.client, self._run_id, metrics, step)

    def close(self) -> None:
        """Until every epoch sent is in MLflow; the logging thread goes. The run's end is the
        driver's to write (:mod:`study.ends`), from the trial's final checkpoint."""
        self.wait()
        self._pool.shutdown()


def _trial_storage():
    """``(filesystem, folder)`` of this trial in Tune's trial storage; ``(None, None)`` outside Tune
    (tests of the objective alone) or on a Ray without it."""
    try:
        from ray import tune

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = tune.get_context().get_storage()
        if storage is not None:
            return storage.storage_filesystem, storage.trial_fs_path
    except Exception:
        pass
    return None, None


class _RunMemo:
    """Which MLflow run a trial made, written down in its folder of Tune's trial storage (shared
    by a cluster's nodes, kept across a resumed driver), so that a retried attempt finds the run
    without asking the server. ``first_attempt``: the driver started this study from nothing
    (``ctx["fresh"]``) and no attempt of this trial has asked for a run, so none can exist."""

    NAME = "rank1-mlflow-run.json"

    def __init__(self, ctx: dict[str, Any], trial_id: str) -> None:
        self.fresh = bool(ctx.get("fresh"))
        # Not the server's URL: a resumed study's embedded server listens on another port.
        self.key = [ctx["experiment_id"], ctx["parent_run_id"], trial_id]
        self.fs, self.dir = _trial_storage()

    def _read(self) -> dict[str, Any] | None:
        """The note, read once (on a cluster the storage may be remote: each read is a request)."""
        if self.fs is None:
            return None
        if not hasattr(self, "_memo"):
            try:
                with self.fs.open_input_stream(f"{self.dir}/{self.NAME}") as f:
                    memo = json.loads(f.read())
            except (OSError, ValueError):  # none yet (FileNotFoundError is an OSError)
                memo = None
            self._memo = memo if isinstance(memo, dict) and memo.get("key") == self.key else None
        return self._memo

    def run_id(self) -> str | None:
        memo = self._read()
        return memo.get("run_id") if memo else None

    def first_attempt(self) -> bool:
        # A memo without a run id: an attempt died between asking for its run and writing it down.
        return self.fresh and self.fs is not None and self._read() is None

    def _write(self, run_id: str | None) -> None:
        if self.fs is not None:
            self.fs.create_dir(self.dir, recursive=True)
            tmp = f"{self.dir}/{self.NAME}.{os.getpid()}.tmp"
            memo = {"key": self.key, "run_id": run_id}
            with self.fs.open_output_stream(tmp) as f:
                f.write(json.dumps(memo).encode())
            self.fs.move(tmp, f"{self.dir}/{self.NAME}")
            self._memo = memo

    def creating(self) -> None:
        self._write(None)

    def created(self, run_id: str) -> None:
        self._write(run_id)


class _Clock:
    """Wall time by what the trial spent it on (``overhead.*_s`` in its final metrics): what
    the service adds to training is everything but ``build``, ``train`` and ``finish``."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, what: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.spent[what] = self.spent.get(what, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"overhead.{k}_s": v for k, v in self.spent.items()}


def _data(config: TrainConfig, ctx: dict[str, Any]):
    """The trial's data: the decoded splits the driver put in Ray's object store once (mapped,
    not copied, not decoded again) when this trial trains on them; else loaded here (cached)."""
    shared = ctx.get("data")
    if shared is not None and tuple(shared["key"]) == tuple(config.source_key):
        import ray

        return with_subsets(from_shared(ray.get(shared["ref"])), config.train_subset, config.val_subset,
                            config.split_seed)
    return data_for(config)


def _busy_trials() -> int:
    """Other trial workers of this node in the middle of a trial (Ray titles a busy function
    trainable's process ``ray::ImplicitFunc.train``): the load a latency measured now shares the CPU with."""
    import psutil

    me, n = os.getpid(), 0
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if p.info["pid"] != me and cmd and cmd[0].startswith("ray::") and cmd[0].endswith(".train"):
            n += 1
    return n


def _node_id() -> str:
    import ray

    if not ray.is_initialized():  # outside Ray (tests of the objective alone): asking would start one
        return "local"
    return ray.get_runtime_context().get_node_id()


@contextlib.contextmanager
def _staged_checkpoint(state: dict[str, Any]) -> Iterator[Any]:
    """``state`` as a Tune checkpoint in a local folder that lives as long as the ``with`` block:
    ``tune.report`` copies it to the trial's storage before it returns, so the folder goes after
    it (kept, they had filled /tmp: ~1 MB a report for the smallest networks, every epoch)."""
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="rank1-ckpt-") as d:
        torch.save(state, os.path.join(d, CHECKPOINT_FILE))
        if "end" in state:  # a final checkpoint: its end also on its own, for the driver (study.ends)
            Path(d, END_FILE).write_text(state["end"])
        yield tune.Checkpoint.from_directory(d)


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    """A trial checkpoint, loaded safely (tensors and plain data only)."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


# Why Tune keeps every checkpoint folder (``num_to_keep=None``) and the trial empties the old ones
# itself: Tune deleted a trial's older checkpoints as soon as a newer one came in, while the
# experiment state the driver saves every ~10 s still named the older one, so a driver killed in
# between left a resume that could not restore that trial ("does not exist on storage anymore").
# Here every folder Tune may have recorded stays; all but the newest KEEP_CHECKPOINTS lose their
# state file, and a trial restored from an emptied one continues from its newest that loads.
KEEP_CHECKPOINTS = 2
_LOAD_ERRORS = (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError)


def _stored_states(fs, folder: str) -> list[str]:
    """The state files of the trial's checkpoints in ``folder`` that still hold one, newest first."""
    from pyarrow import fs as pafs

    dirs = [i.path for i in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
            if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]
    files = [f for f in fs.get_file_info([posixpath.join(d, CHECKPOINT_FILE) for d in dirs])
             if f.type == pafs.FileType.File]
    return [f.path for f in sorted(files, key=lambda f: (f.mtime_ns or 0, f.path), reverse=True)]


def _empty_old_checkpoints(keep: int = KEEP_CHECKPOINTS) -> None:
    """After a report (its checkpoint is on storage by then): the state file of every checkpoint
    but the newest ``keep`` is replaced by a note saying which one superseded it."""
    fs, folder = _trial_storage()
    if fs is None:
        return
    states = _stored_states(fs, folder)
    for path in states[keep:]:
        note = {"superseded_by": posixpath.basename(posixpath.dirname(states[0]))}
        with fs.open_output_stream(posixpath.join(posixpath.dirname(path), SUPERSEDED_FILE)) as f:
            f.write(json.dumps(note).encode())
        fs.delete_file(path)


def restore_state(checkpoint) -> tuple[dict[str, Any] | None, str | None]:
    """``(state, None)`` of the checkpoint Tune restores the trial from; where that one no longer
    holds its state (emptied, or torn by a kill), ``(state, folder)`` of the trial's newest
    checkpoint that loads. ``checkpoint`` None (Tune recorded none: a driver killed between the
    trial's first checkpoint and its next saved state): the newest in the trial's own folder that
    loads, or ``(None, None)`` where there is none (the trial starts from nothing)."""
    error = None
    if checkpoint is not None:
        try:
            with checkpoint.as_directory() as d:
                return load_checkpoint(d), None
        except _LOAD_ERRORS as e:
            error = e
        fs, folder = checkpoint.filesystem, posixpath.dirname(checkpoint.path.rstrip("/"))
    else:
        fs, folder = _trial_storage()
        if fs is None:
            return None, None
    from ray import tune

    for path in _stored_states(fs, folder):
        try:
            with tune.Checkpoint(posixpath.dirname(path), fs).as_directory() as d:
                return load_checkpoint(d), posixpath.dirname(path)
        except _LOAD_ERRORS:
            continue
    if checkpoint is None:
        return None, None
    raise RuntimeError(f"no checkpoint of this trial beside {checkpoint.path} loads") from error


def run_trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The Tune function trainable: ``params`` from the searcher, ``ctx`` from the driver.

    A search trial trains its configuration with the study's seeds and is scored on
    validation. A confirmation trial (``params = {"confirm": {arm, params, seed, source}}``,
    from the driver's confirmation phase) retrains the best configuration of one arm
    with one fresh seed, that arm alone, and is scored on test.
    """
    clock = _Clock()
    with clock("setup"):
        from ray import tune

        from rank1.config import from_dict
        from study.config import StudyConfig

        study = from_dict(StudyConfig, ctx["study_config"])
    trial_id = tune.get_context().get_trial_id()
    torch.set_num_threads(max(1, int(study.resources.cpu)))
    confirm = params.get("confirm")
    if confirm is not None:
        configs = [study.confirm_config(confirm["arm"], confirm["params"], confirm["seed"])]
        arms, split, role = (confirm["arm"],), "test", "confirm"
        logged_params = dict(confirm["params"])
        tags = {TAG_ARM: confirm["arm"], TAG_CONFIRM_OF: confirm["source"], TAG_SEED: str(confirm["seed"])}
        name = run_name(confirm["params"], prefix=f"confirm {confirm['arm']} seed {confirm['seed']}: ")
    else:
        seeds = [study.base.seed + i for i in range(study.seeds_per_trial)]
        configs = [study.trial_config(params, seed=s) for s in seeds]
        arms, split, role, logged_params, tags = study.value_arms(configs[0]), "val", "trial", params, None
        name = run_name(params)
    with clock("setup"):
        ckpt = tune.get_checkpoint()
        state, instead = restore_state(ckpt)
        if instead is not None:
            why = ("no checkpoint was recorded for it (its driver was killed first)" if ckpt is None
                   else f"{ckpt.path} holds no state any more (superseded)")
            print(f"{trial_id}: {why}; continuing from {instead}, epoch {state['epoch']}", flush=True)
    # A trial restored from its final checkpoint had ended (its driver was killed before it recorded
    # that): its end was measured once and is reported again as it was, not evaluated and timed anew.
    ended = json.loads(state["end"]) if state is not None and "end" in state else None
    if ended is None:
        with clock("data"):
            data = _data(configs[0], ctx)
        with clock("build"):  # the models, optimisers and gradient flow at init: trial work, a plain loop does it too
            pairs = [PairTrainer(c, data=data) for c in configs]
        if state is not None:
            for p, s in zip(pairs, state["seeds"]):
                p.load_state_dict(s)
    with clock("mlflow"):
        logger = _RunLogger(ctx, trial_id, state["run_id"] if state else None, logged_params, configs[0], role, tags,
                            name)
        started_at = state["epoch"] if state else 0
        if started_at:
            if ended is None:
                logger.client.set_tag(logger.run_id, TAG_RESUMED, str(started_at))
            logger.resend(state.get("unlogged", {}))
    if ended is not None:
        print(f"{trial_id}: it had ended ({ended['status']}) before its driver recorded that; its end is "
              f"reported again as measured", flush=True)
        with _staged_checkpoint(state) as checkpoint:
            _report_end(logger, ended, checkpoint)
        return

    epoch = started_at
    while not all(p.done() for p in pairs):
        with clock("train"):
            per_seed = [p.train_epoch([]) for p in pairs]
        epoch = max(p.epoch for p in pairs)
        metrics = aggregate_epoch([m for m in per_seed if m])
        metrics["objective"] = metrics.get(f"{arms[0]}.val_acc", float("nan"))
        with clock("mlflow"):
            logger.log_epoch(epoch, metrics)
        report = {k: v for k, v in metrics.items() if not (".grad" in k or ".weight." in k or ".residual." in k
                                                            or ".lowrank." in k)}
        report.update({"epoch": epoch, "run_id": logger.run_id, "final": False, "resumed_from": started_at})
        with contextlib.ExitStack() as staged:
            with clock("checkpoint"):
                checkpoint = staged.enter_context(_staged_checkpoint({
                    "epoch": epoch, "run_id": logger.run_id, "trial_id": trial_id,
                    "seeds": [p.state_dict() for p in pairs], "unlogged": dict(logger.unlogged),
                }))
            with clock("report"):
                tune.report(report, checkpoint=checkpoint)
        with clock("checkpoint"):
            _empty_old_checkpoints()

    busy = _busy_trials()  # the latencies below are measured with these other trials running on the node
    with clock("finish"):  # final evaluation, gradient flow, effective ranks, the latency measurement
        results = [p.finish([]).to_dict() for p in pairs]
    busy = max(busy, _busy_trials())
    status, reason, values = trial_value(results, arms, split)
    value = values[arms[0]]
    final = final_metrics(results, study.latency_batch)
    final["objective"] = value
    if any(r["arms"][a].get("inference", {}).get("threads") for r in results for a in r["arms"]):
        final["latency.threads"] = float(torch.get_num_threads())
        final["latency.other_trials_running"] = float(busy)
    # The shipped arm's trained weights of every seed: the driver registers the best.
    shipped = study.shipped_arm_of(configs[0]) if confirm is None else None
    models = {shipped: [p.trainers[shipped].model.state_dict() for p in pairs]} if status == "finished" and shipped else {}
    final.update(clock.metrics())  # what follows is not in it: the benchmark counts it as outside the trial
    logger.close()  # every epoch in MLflow: the final checkpoint holds none as unlogged
    extra = {f"objective.{a}": v for a, v in values.items() if a != arms[0] and math.isfinite(v)}
    ended = {
        "status": status, "reason": reason, "results": results, "step": epoch, "time_ms": int(time.time() * 1000),
        "artifact_uri": logger.artifact_uri,
        "metrics": {final_metric(k): v for k, v in {**final, "epochs_trained_here": float(epoch - started_at)}.items()},
        "report": {**{k: v for k, v in final.items() if math.isfinite(v)}, **extra,
                   "objective": value if math.isfinite(value) else 0.0,
                   "latency_ms": final["latency_ms"] if math.isfinite(final["latency_ms"]) else 1e9,
                   "final": True, "trial_status": status, "trial_reason": reason or "", "epoch": epoch,
                   "run_id": logger.run_id, "resumed_from": started_at},
    }
    record = _end_record(ended)  # sent as kept: a restarted attempt's report of it is the same
    with _staged_checkpoint({
        "epoch": epoch, "run_id": logger.run_id, "trial_id": trial_id, "final": True,
        "seeds": [p.state_dict() for p in pairs], "unlogged": dict(logger.unlogged), "models": models,
        "val_acc": {a: [arm_accuracy(r["arms"][a]) for r in results] for a in models},
        "params": params, "end": record,
    }) as checkpoint:
        _report_end(logger, json.loads(record), checkpoint)


def _end_record(ended: dict[str, Any]) -> str:
    """A trial's end as the final checkpoint keeps it: JSON text (checkpoints load with
    ``weights_only``; numbers that are not Python's own become theirs, anything else text)."""
    def plain(v: Any) -> Any:
        try:
            return v.item()  # a numpy or torch scalar
        except (AttributeError, ValueError, RuntimeError):
            return str(v)

    return json.dumps(ended, default=plain)


# Of a trial's end, what Tune gets: what its searcher, scheduler and the live table read, and the
# driver's reconciliation. The full set (~230 numbers) stays in the final checkpoint's end record,
# where the driver reads the champion's (:func:`end_report`). Tune keeps, per trial and for every key
# of every result, running statistics that its experiment state saves every ~10 s and each trial's
# state carries for good: with the full set, 185 kB of JSON per trial (2.4 MB for a 12-trial study,
# encoded and written at every save, and copied by the state keeper), now 25 kB.
_TUNE_END = frozenset({"objective", "latency_ms", "final", "trial_status", "trial_reason", "epoch", "run_id",
                       "resumed_from"})
_TUNE_END_SUFFIXES = (".decomposed_val_acc", ".shipped_val_acc")


def tune_view(report: dict[str, Any]) -> dict[str, Any]:
    """The part of a trial's final report that goes to Tune (see :data:`_TUNE_END`)."""
    return {k: v for k, v in report.items()
            if k in _TUNE_END or k.startswith("objective.") or k.endswith(_TUNE_END_SUFFIXES)}


def end_report(state: dict[str, Any]) -> dict[str, Any] | None:
    """A final checkpoint's full final report (every final number, as the trial measured it)."""
    return json.loads(state["end"])["report"] if "end" in state else None


def _report_end(logger: _RunLogger, ended: dict[str, Any], checkpoint) -> None:
    """The trial's end to Tune: its last report, the end in its checkpoint. The driver writes it to
    the trial's MLflow run (:mod:`study.ends`) while this worker goes on to its next trial."""
    from ray import tune

    logger.close()
    tune.report(tune_view(ended["report"]), checkpoint=checkpoint)
    _empty_old_checkpoints()
