"""The Python API: a study run from Python, read back as a table that equals what MLflow and
Optuna hold."""

from __future__ import annotations

import math
import os

import pytest

import study
from study.names import FINAL
from tests.study.conftest import mlflow_client, optuna_trials, trial_runs, write_study

pytestmark = pytest.mark.slow


@pytest.mark.slow(seconds=35)
def test_run_then_results_equal_mlflow_and_optuna(tmp_path, capfd):
    path = write_study(tmp_path, name="api", n_trials=3, seeds_per_trial=2, train={"arm": "all", "epochs": 1},
                       search={"depth": {"low": 1, "high": 2}, "init": ["kaiming", "dirac"]})
    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS",
                                             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    outcome = study.run(path, report=False)  # in this process, as a notebook would
    # not left at the study's stopped server, nor with the study's Tune settings
    assert {k: os.environ.get(k) for k in before} == before
    home = tmp_path / "home"
    # Of Tune's default loggers only the JSON one ran: no CSV or TensorBoard copy of every result
    assert not [*home.rglob("progress.csv"), *home.rglob("events.out.tfevents.*")] and [*home.rglob("result.json")]
    assert outcome.trials.get("finished") == 3 and outcome.model_uri == "models:/api-decomposed@champion"
    assert study.load(home).name == "api" and study.status(home)["states"] == {"finished": 3}
    # no report asked for: none built, and the study says how to build it later
    assert not (home / "report").exists()
    assert f"report: not built (asked not to); build it with `rank1 study report {home}`" in capfd.readouterr().out

    capfd.readouterr()
    df = study.results(home)
    # as quiet as the CLI: no progress bar per trial's downloaded results; the environment as it was
    assert "Downloading artifacts" not in "".join(capfd.readouterr())
    assert {k: os.environ.get(k) for k in before} == before
    assert len(df) == 3 * 2 * 3  # trials x seeds x arms
    assert set(df["arm"]) == {"rank1", "flat1d", "dense"} and set(df["phase"]) == {"search"}
    assert sorted(df["seed"].unique()) == [0, 1]

    optuna = {t.user_attrs["ray_trial_id"]: t for t in optuna_trials(home, "api")}
    with mlflow_client(home) as (client, _):
        runs = {r.data.tags["rank1.trial_id"]: r for r in trial_runs(client, "api")}
    assert set(df["trial_id"]) == set(runs) == set(optuna)
    for tid, rows in df.groupby("trial_id"):
        t, run = optuna[tid], runs[tid]
        assert set(rows["run_id"]) == {run.info.run_id} and set(rows["optuna_number"]) == {t.number}
        assert set(rows["optuna_state"]) == {"COMPLETE"} and set(rows["trial_status"]) == {"finished"}
        for name, value in t.params.items():
            assert set(rows[f"param.{name}"]) == {value}
        for arm, arm_rows in rows.groupby("arm"):
            # the arm's accuracy over seeds: MLflow's trial-level mean, and for rank1 Optuna's value
            mean = arm_rows["val_acc"].mean()
            m = run.data.metrics
            assert math.isclose(mean, m.get(f"{FINAL}{arm}.decomposed_val_acc", m.get(f"{FINAL}{arm}.shipped_val_acc")),
                                abs_tol=1e-9)
            if arm == "rank1":
                assert math.isclose(mean, t.value, abs_tol=1e-9)
            if arm != "dense":  # the decomposed arms' speed, as MLflow has it (mean over seeds)
                assert math.isclose(arm_rows["speedup_b8"].mean(), m[f"{FINAL}{arm}.speedup_b8"], rel_tol=1e-9)


@pytest.mark.slow(seconds=8)
def test_importing_the_service_turns_mlflow_telemetry_off_unless_the_user_chose():
    """Offline, MLflow's telemetry thread deletes an environment variable while other threads may
    be walking os.environ (a study's start died of it): the service's packages (``study``, and
    ``dashboards`` through it) turn it off before MLflow is imported, and leave a user's own
    setting alone. Run outside pytest and CI, where MLflow itself would turn it off."""
    import subprocess
    import sys

    ci = {"PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE", "JENKINS_URL", "TF_BUILD"}
    env = {k: v for k, v in os.environ.items() if k not in ci and k != "MLFLOW_DISABLE_TELEMETRY"}
    for package, user, expected in (("dashboards", None, "true True"), ("study", "false", "false False")):
        code = (f"import {package}, os, mlflow\nfrom mlflow.telemetry.utils import is_telemetry_disabled\n"
                "print(os.environ.get('MLFLOW_DISABLE_TELEMETRY'), is_telemetry_disabled())")
        run_env = env if user is None else {**env, "MLFLOW_DISABLE_TELEMETRY": user}
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env, timeout=120)
        assert p.returncode == 0 and p.stdout.split("\n")[-2] == expected, p.stdout + p.stderr[-2000:]
