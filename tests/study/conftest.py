"""Helpers for the study tests: real processes, a real Ray, a real MLflow server."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def write_study(tmp_path: Path, name: str = "smoke", base: str = "smoke.yaml", **overrides) -> Path:
    """A copy of a shipped study file with overrides, its home under ``tmp_path``."""
    data = yaml.safe_load((REPO / "studies" / base).read_text())
    train = overrides.pop("train", {})
    data["train"].update(train)
    data.update(overrides)
    data["name"] = name
    data.setdefault("home", str(tmp_path / "home"))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``rank1 ARGS`` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "study.cli", *args], capture_output=True, text=True, timeout=timeout,
        cwd=REPO, env={**os.environ, **(env or {})},
    )


@contextlib.contextmanager
def mlflow_client(home: Path):
    """A real MLflow server over a study home, and a client of it."""
    from mlflow import MlflowClient

    from study.services import MlflowServer

    server = MlflowServer(home).start()
    try:
        yield MlflowClient(server.url), server.url
    finally:
        server.stop()


def trial_runs(client, name: str):
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], filter_string="tags.`rank1.role` = 'trial'", max_results=1000)


def optuna_trials(home: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{home / 'optuna.db'}").get_trials()


@pytest.fixture(autouse=True)
def _no_leftover_ray():
    yield
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
