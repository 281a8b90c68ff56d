"""study: the hyperparameter-study service around rank1 (Ray Tune + Optuna + MLflow).

The Python face of it (:mod:`study.api`): ``run``, ``resume``, ``status``, ``results`` (a
DataFrame of every trial, seed and arm), ``export``, ``report`` and ``pull``. Importing
this package loads none of Ray, Optuna or MLflow; the functions do, when called.
"""

from __future__ import annotations

from study.api import export, load, pull, records, report, results, resume, run, status, tracking

__all__ = ["export", "load", "pull", "records", "report", "results", "resume", "run", "status", "tracking"]
