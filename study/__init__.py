"""study: the hyperparameter-study service around rank1 (Ray Tune + Optuna + MLflow).

The Python face of it (:mod:`study.api`): ``run``, ``resume``, ``status``, ``results`` (a
DataFrame of every trial, seed and arm), ``export``, ``report`` and ``pull``. Importing
this package loads none of Ray, Optuna or MLflow; the functions do, when called.
"""

from __future__ import annotations

import os

# MLflow's usage telemetry is off unless the user says otherwise. On import MLflow starts a thread
# that fetches its telemetry config from the internet; offline (a cluster, CI) that fails, and the
# thread then deletes an environment variable: a request another thread made at that moment died
# walking os.environ (KeyError: '_MLFLOW_TELEMETRY_SESSION_ID', a study's start seen to fail so).
# Set here, before anything of the study imports MLflow; its server and Ray's workers inherit it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from study.api import export, load, pull, records, report, results, resume, run, status, tracking

__all__ = ["export", "load", "pull", "records", "report", "results", "resume", "run", "status", "tracking"]
