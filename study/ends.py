"""A trial's end in MLflow, written by the driver while the trial's worker goes on to the next trial.

A trial ends with its final report to Tune, whose checkpoint holds the end as the trial measured it
(:data:`END_FILE`: status, reason, final numbers, the per-seed results, the time it ended). The
final numbers, tags, files and status of its MLflow run are then written here, in the driver, by
one background thread (:class:`EndWriter`, fed by :func:`end_callback` when Tune completes the
trial): a trial's worker used to spend ~0.2 s of every trial on them (the server storing ~200
numbers, the files, the run's status), now spent by the driver beside the next trial's training.

Exactly once: writing an end is idempotent (the metrics carry the trial's own end time, so a second
write adds no history entry; tags, files and status are overwritten with the same), and after each
``fit`` :func:`complete_ends` writes every end Tune has and MLflow lacks (a driver killed between a
trial's completion and its end's write; a study started by a version without the callback).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import posixpath
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from study.names import DEPLOY_PLAN, TAG_REASON, TAG_STATUS, TRIAL_RESULT

__all__ = ["END_FILE", "EndWriter", "complete_ends", "drain", "end_callback", "hand_over", "log_metrics", "read_end",
           "write_end", "writing_ends"]

log = logging.getLogger(__name__)

END_FILE = "end.json"  # beside the state in a trial's final checkpoint: its end, read without the weights
_MAX_BATCH = 900  # MLflow takes at most 1000 metrics per log_batch
# An end is written this long after Tune completed its trial: by then Tune has handed the worker to
# the next trial (65-95 ms, 1 at a time on 2 cores), which the end's writing (the driver encoding ~200
# numbers, the server storing them) would otherwise slow down on the core they share with Tune's loop.
HANDOVER_S = 0.2


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int = 0, tags: list | None = None,
                time_ms: int | None = None) -> None:
    """The finite numbers of ``metrics`` (and ``tags``) in as few ``log_batch`` calls as MLflow allows."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000) if time_ms is None else time_ms
    items = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())
             if isinstance(v, (int, float)) and math.isfinite(float(v))]
    for i in range(0, max(len(items), 1), _MAX_BATCH):
        client.log_batch(run_id, metrics=items[i:i + _MAX_BATCH], tags=(tags or []) if i == 0 else [])


def _log_files(client, run_id: str, folder: str, artifact_uri: str | None) -> None:
    """The folder's files into the run's artifacts: straight to its artifact location when known
    (the client would look the run up first: one request more per trial)."""
    if artifact_uri is None:
        client.log_artifacts(run_id, folder)
        return
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    get_artifact_repository(artifact_uri, tracking_uri=client.tracking_uri).log_artifacts(folder)


def write_end(client, ended: dict[str, Any]) -> None:
    """The end of a trial's run (``ended``: a trial's end record, :data:`END_FILE`): its final
    numbers and tags, and its files, side by side (the server's database write and its file write
    overlap), then its status and end time (when the trial ended, not when this ran). Idempotent:
    MLflow keeps one row per (key, value, step, time) of a metric, and the time is the record's."""
    from mlflow.entities import RunTag

    run_id, status, results = ended["report"]["run_id"], ended["status"], ended["results"]
    tags = {TAG_STATUS: status}
    if ended.get("reason"):
        tags[TAG_REASON] = ended["reason"][:5000]
    # Which kernel each layer got in the deployed form, per arm and batch size (first seed).
    plans = {arm: {k: v for k, v in r.get("inference", {}).items() if k.startswith("deploy_")}
             for arm, r in results[0]["arms"].items()} if results else {}
    tags.update({f"rank1.{arm}.{k}": v for arm, plan in plans.items() for k, v in plan.items() if isinstance(v, str)})
    # The pool is left (waiting for the upload) before the folder is removed.
    with tempfile.TemporaryDirectory() as d, ThreadPoolExecutor(1, thread_name_prefix="rank1-files") as pool:
        (Path(d) / TRIAL_RESULT).write_text(json.dumps(results, indent=1, default=str))
        if any(plans.values()):
            (Path(d) / DEPLOY_PLAN).write_text(json.dumps(plans, indent=1))
        files = pool.submit(_log_files, client, run_id, d, ended.get("artifact_uri"))
        log_metrics(client, run_id, ended["metrics"], step=ended["step"],
                    tags=[RunTag(k, v) for k, v in sorted(tags.items())], time_ms=ended["time_ms"])
        files.result()
    client.set_terminated(run_id, "FINISHED" if status == "finished" else "FAILED", end_time=ended["time_ms"])


def read_end(checkpoint) -> dict[str, Any] | None:
    """The end record in a Tune checkpoint (a trial's final one); None in any other."""
    try:
        with checkpoint.filesystem.open_input_stream(posixpath.join(checkpoint.path, END_FILE)) as f:
            return json.loads(f.read())
    except (OSError, ValueError):  # an epoch's checkpoint (FileNotFoundError is an OSError), or torn
        return None


class EndWriter:
    """The driver's writer of trial ends: one background thread, in the order trials completed."""

    def __init__(self, tracking_uri: str) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rank1-ends")
        self._pending: list[tuple[str, Future]] = []

    def submit(self, trial_id: str, checkpoint) -> None:
        self._pending.append((trial_id, self._pool.submit(self._write, checkpoint, time.monotonic())))

    def _write(self, checkpoint, completed: float) -> None:
        time.sleep(max(0.0, completed + HANDOVER_S - time.monotonic()))
        ended = read_end(checkpoint)
        if ended is not None:
            write_end(self.client, ended)

    def drain(self) -> None:
        """Until every end handed over is written. One that failed is logged, not raised: the trial's
        run still says ``running``, and :func:`complete_ends` writes it again after the ``fit``."""
        pending, self._pending = self._pending, []
        for trial_id, f in pending:
            try:
                f.result()
            except Exception as e:  # noqa: BLE001
                log.warning("the end of trial %s is not in MLflow yet (%s: %s); written again after the search",
                            trial_id, type(e).__name__, e)

    def close(self) -> None:
        self.drain()
        self._pool.shutdown()


_writer: EndWriter | None = None  # this driver's, while a study runs (see writing_ends)


@contextlib.contextmanager
def writing_ends(tracking_uri: str) -> Iterator[EndWriter]:
    """This process's :class:`EndWriter` for the ``with`` block. Module-level, not the callback's:
    a resumed study's Tuner brings back the callbacks pickled when it was made, and this run's
    server (a resumed study's embedded server listens on another port) is known only now."""
    global _writer
    _writer = EndWriter(tracking_uri)
    try:
        yield _writer
    finally:
        writer, _writer = _writer, None
        writer.close()


def drain() -> None:
    """Until every end this driver's writer was handed is written (nothing without a writer)."""
    if _writer is not None:
        _writer.drain()


def end_callback():
    """A Tune callback that hands each trial Tune completes after its final report to this
    driver's writer (looked up when called: the callback itself is pickled with the Tuner)."""
    from ray import tune

    class _Ends(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
            from study import ends

            ends.hand_over(trial)

    return _Ends()


def hand_over(trial) -> None:
    """``trial`` (completed by Tune) to the writer, if it ended with its final report."""
    last = trial.last_result or {}
    if _writer is not None and last.get("final") and trial.checkpoint is not None:
        _writer.submit(trial.trial_id, trial.checkpoint)


def complete_ends(client, results, runs: dict[str, list]) -> int:
    """After a ``fit`` (the writer drained): the end of every trial Tune completed after its final
    report whose run MLflow still has running (``runs``: trial id -> its runs). Returns how many."""
    written = 0
    for res in results:
        last = res.metrics or {}
        if res.error is not None or not last.get("final") or res.checkpoint is None:
            continue
        for run in runs.get(last.get("trial_id"), []):
            if run.data.tags.get(TAG_STATUS) == "running" or run.info.status == "RUNNING":
                ended = read_end(res.checkpoint)
                if ended is not None:
                    write_end(client, ended)
                    written += 1
    if written:
        print(f"MLflow lacked the end of {written} trial(s) (their driver stopped before writing it): "
              "written from their final checkpoints", flush=True)
    return written
