"""Pre-registered grid designs (``sampler: grid``) on real Ray, MLflow and SQLite: every cell
runs once, a killed driver resumes without repeating or skipping one, and the decoded
dataset reaches the trials through Ray's object store, decoded once by the first driver."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest

from tests.rank1.test_data import write_imagefolder
from tests.study.conftest import cli, mlflow_client, optuna_trials, trial_runs, write_study
from tests.study.test_exactly_once import _checkpoints, _start, _wait_for

pytestmark = pytest.mark.slow

# rank1 + flat1d + dense side by side; rank1 at another period alone; flat1d at torch's init alone.
DESIGN = [
    {"arm": ["all"], "depth": [1, 2]},
    {"arm": ["rank1"], "projection": ["step:5"], "depth": [1, 2]},
    {"arm": ["flat1d"], "flat1d_init": ["torch"], "depth": [1, 2]},
]
CELLS = [{"arm": "all", "depth": 1}, {"arm": "all", "depth": 2},
         {"arm": "rank1", "depth": 1, "projection": "step:5"}, {"arm": "rank1", "depth": 2, "projection": "step:5"},
         {"arm": "flat1d", "depth": 1, "flat1d_init": "torch"}, {"arm": "flat1d", "depth": 2, "flat1d_init": "torch"}]


def _cells_run(home, name):
    """(Optuna COMPLETE cells, MLflow finished cells), each as sorted reprs."""
    done = sorted(repr(sorted(t.params.items())) for t in optuna_trials(home, name) if t.state.name == "COMPLETE")
    with mlflow_client(home) as (client, _):
        runs = trial_runs(client, name)
        mlflow_cells = sorted(repr(sorted((k[len("search."):], _typed(v)) for k, v in r.data.params.items()
                                          if k.startswith("search."))) for r in runs)
        statuses = [r.data.tags["rank1.status"] for r in runs]
    return done, mlflow_cells, statuses


def _typed(v: str):
    return int(v) if v.isdigit() else v


@pytest.mark.slow(seconds=60)
def test_a_grid_design_runs_every_cell_once_resumes_without_repeating_or_skipping_and_decodes_once(tmp_path):
    """A grid on image files, its driver SIGKILLed mid-study and resumed: every cell once; the
    images decoded once, by the first driver (the resumed one reads its cache), and reaching the
    trials through Ray's object store, never decoded by a trial."""
    root = tmp_path / "images"
    write_imagefolder(root, n_train=24, n_test=6, size=(12, 12))
    decodes = tmp_path / "decodes.log"
    env = {"RANK1_DECODE_LOG": str(decodes), "RANK1_DATA_CACHE": str(tmp_path / "cache")}
    path = write_study(tmp_path, name="grid", sampler="grid", objective="arm", n_trials=None, search=DESIGN,
                       train={"dataset": "imagefolder", "root": str(root), "image_size": 8, "epochs": 4, "width": 16,
                              "arm": "all", "measure_latency": False}, max_concurrent=2)
    home = tmp_path / "home"
    log = tmp_path / "run.log"
    proc = _start(path, log, env=env)
    _wait_for(lambda: _checkpoints(home, 1), proc, log)  # some trial is two epochs in
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    status = json.loads(cli("study", "status", str(home), "--json").stdout)
    assert status["n_trials"] == len(CELLS) and status["states"].get("finished", 0) < len(CELLS)
    p = cli("study", "resume", str(home), env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    expected = sorted(repr(sorted(c.items())) for c in CELLS)
    done, mlflow_cells, statuses = _cells_run(home, "grid")
    assert done == expected  # every cell of the design once in Optuna: none repeated, none skipped
    assert mlflow_cells == expected and set(statuses) == {"finished"}  # and one finished MLflow run each
    others = [t for t in optuna_trials(home, "grid") if t.state.name != "COMPLETE"]
    assert all(t.user_attrs.get("status") == "orphaned" for t in others)  # asked just before the kill, never run
    with mlflow_client(home) as (client, _):  # the champion is the best cell's own arm, named by its own metric
        mv = client.get_model_version_by_alias("grid-decomposed", "champion")
        assert mv.tags["arm"] in ("rank1", "flat1d") and mv.tags["metric"] == f"{mv.tags['arm']}.decomposed_val_acc"
        runs = trial_runs(client, "grid")

    # Both drivers shared the decoded images (the same counts); only the first decoded them.
    said = [re.findall(r"data: imagefolder \((\d+ train, \d+ val, \d+ test) images\) loaded in [\d.]+ s and "
                       r"shared with the trials through Ray's object store", out) for out in (log.read_text(), p.stdout)]
    assert len(said[0]) == 1 and said[0] == said[1], said
    lines = decodes.read_text().splitlines()
    pids = {line.split()[0] for line in lines}
    assert len(lines) == 2 and len(pids) == 1  # the train and test folders, once, by one process (the first driver)
    assert {r.data.tags["rank1.pid"] for r in runs}.isdisjoint(pids)  # not by a trial
