"""Every name the service writes into MLflow, built and parsed here and nowhere else.

Tags say what a run is (``rank1.role``: parent, trial or confirm) and how it went.
Metrics come in three kinds, and the MLflow UI draws one chart section per prefix
before a ``/``:

* per-epoch curves of each arm, unprefixed: ``rank1.val_acc``, ``flat1d.train_loss``,
  ``paired.val_acc_diff``, ``objective`` — the charts that matter;
* per-epoch per-layer detail under ``layers/``: ``layers/rank1.grad.out.L03``,
  ``layers/dense.weight.L00``, ``layers/rank1.residual.L02`` ...;
* end-of-trial numbers under ``final/``: ``final/rank1.decomposed_val_acc``,
  ``final/flat1d.speedup_b32``, ``final/rank1.gradflow.epoch1.out.ratio`` ...
  (the trial's value stays ``objective``).

Latency keys carry their batch size as a ``_bN`` suffix (``speedup_b32``), built by
:func:`batched` and parsed by :func:`batch_of` (both from :mod:`rank1.measure`, where
training makes them).
"""

from __future__ import annotations

import re

from rank1.measure import batch_of, batched

__all__ = [
    "DEPLOY_PLAN", "FINAL", "LAYERS", "TRIAL_RESULT", "TAG_ARM", "TAG_CHAMPION", "TAG_CONFIRM_OF", "TAG_NODE", "TAG_PID", "TAG_REASON", "TAG_RESUMED", "TAG_ROLE",
    "TAG_SEED", "TAG_STATUS", "TAG_STUDY", "TAG_TRIAL", "batch_of", "batched", "counted", "epoch_metric", "final_metric",
    "experiment_url", "run_name",
]

TAG_ROLE = "rank1.role"  # parent | trial | confirm
TAG_STUDY = "rank1.study"
TAG_TRIAL = "rank1.trial_id"  # the Ray trial id: how a restarted trial finds its run again
TAG_STATUS = "rank1.status"  # running | finished | diverged | failed | pruned
TAG_REASON = "rank1.reason"
TAG_PID = "rank1.pid"
TAG_NODE = "rank1.node_id"
TAG_RESUMED = "rank1.resumed_from_epoch"
TAG_ARM = "rank1.arm"  # a confirmation run's arm
TAG_SEED = "rank1.seed"
TAG_CONFIRM_OF = "rank1.confirm_of"  # the search trial whose configuration it retrains
TAG_CHAMPION = "rank1.champion"  # on the parent run: the registered version, or why there is none

TRIAL_RESULT = "trial_result.json"  # a trial run's artifact: every seed's full result
DEPLOY_PLAN = "deploy_plan.json"  # a trial run's artifact: the kernel each layer got as deployed

FINAL = "final/"
LAYERS = "layers/"
_LAYER = re.compile(r"\.L\d\d")  # a per-layer key: rank1.grad.out.L03, dense.weight.L00, ...


def epoch_metric(key: str) -> str:
    """The MLflow name of a per-epoch metric ``ARM.KEY``: per-layer detail goes under ``layers/``."""
    return LAYERS + key if _LAYER.search(key) else key


def final_metric(key: str) -> str:
    """The MLflow name of an end-of-trial number (the trial's ``objective`` keeps its name)."""
    return key if key == "objective" else FINAL + key


_SHORT = {"depth": "d", "width": "w", "lr": "lr", "batchnorm": "bn", "rank1_lr": "r1lr", "flat1d_lr": "f1lr",
          "dense_lr": "dlr", "weight_decay": "wd", "momentum": "m", "epochs": "ep"}


def run_name(params: dict[str, object], prefix: str = "") -> str:
    """A trial run's name from its parameters, e.g. ``d8 hosvd epoch:1 keep``: numbers and booleans
    with a short key, choices as they are, in the search's key order."""
    parts = []
    for k, v in params.items():
        if isinstance(v, bool):
            parts.append(f"{_SHORT.get(k, k)}{'+' if v else '-'}")
        elif isinstance(v, float):
            parts.append(f"{_SHORT.get(k, k)}{v:.3g}")
        elif isinstance(v, int):
            parts.append(f"{_SHORT.get(k, k)}{v}")
        else:
            parts.append(str(v))
    return (prefix + " ".join(parts)).strip()[:250] or "trial"


def experiment_url(tracking_url: str, experiment_id: str) -> str:
    """The experiment's page in the MLflow UI, in its model-training view (the runs table):
    MLflow 3 opens experiments in its GenAI view (traces) unless told otherwise."""
    return f"{tracking_url.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def counted(n, noun: str) -> str:
    """``1 thread``, ``2 threads``, ``0 other trials``; ``? threads`` for a missing count."""
    if n is None or n != n:
        return f"? {noun}s"
    return f"{n:.0f} {noun}" + ("" if round(n) == 1 else "s")


def measured_inside_trial(threads, others) -> str:
    """Where a latency measured in a trial was timed: a latency timed beside other trials on
    shared cores is not what a user gets alone, so every place that quotes one says so."""
    where = f"inside the trial: {counted(threads, 'thread')}"
    return where if others is None else f"{where}, {counted(others, 'other trial')} running beside it"
