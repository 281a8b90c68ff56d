"""Study files: every shipped one validates; bad input fails before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rank1.config import ConfigError
from study.config import Range, load_study
from tests.study.conftest import REPO, cli, write_study


@pytest.mark.parametrize("path", sorted((REPO / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_study_file_validates(path):
    cfg = load_study(path)
    assert cfg.space and cfg.n_trials >= 1
    for key, spec in cfg.space.items():
        assert isinstance(spec, (list, Range)), key
    cfg.trial_config({k: (v[0] if isinstance(v, list) else (int(v.low) if v.is_int else v.low))
                      for k, v in cfg.space.items()})


def test_space_is_typed():
    cfg = load_study(REPO / "studies" / "demo.yaml")
    assert cfg.space["depth"] == Range(2, 8) and cfg.space["depth"].is_int
    assert cfg.space["init"] == ["kaiming", "hosvd", "orthogonal", "dirac"]
    assert cfg.model_name == "demo-decomposed"
    assert cfg.storage_url.startswith("sqlite:///") and cfg.storage_url.endswith("runs/demo/optuna.db")


BAD = [
    ("unknown key", {"n_trails": 3}, "n_trails: unknown key (allowed:"),
    ("wrong type", {"n_trials": "many"}, "n_trials: expected int or null, got 'many' (str)"),
    ("empty choice list", {"search": {"init": []}}, "search.init: empty choice list"),
    ("depth < 1", {"search": {"depth": {"low": 0, "high": 4}}}, "search.depth: 0 must be >= 1"),
    ("unknown init scheme", {"search": {"init": ["kaiming", "xavier"]}},
     "search.init: 'xavier' is not allowed (allowed: 'dirac', 'hosvd', 'kaiming', 'orthogonal', 'uniform')"),
    ("unknown dataset", {"train": {"dataset": "imagenet"}}, "train.dataset: 'imagenet' is not allowed"),
    ("dataset root missing", {"train": {"dataset": "cifar10", "root": "/nonexistent/cifar"}},
     "/nonexistent/cifar/cifar-10-batches-py/data_batch_1' does not exist"),
    ("GPU on a machine without one", {"resources": {"cpu": 1, "gpu": 0.5}},
     "resources.gpu: 0.5 GPU per trial was asked for, but this machine has no GPU"),
    ("tracking URI unreachable", {"tracking_uri": "http://127.0.0.1:9"}, "tracking_uri: cannot reach the MLflow server"),
    ("n_trials < 1", {"n_trials": 0}, "n_trials: 0 must be >= 1"),
    ("unknown search option", {"search": {"learning_rate": [0.1]}}, "search.learning_rate: unknown option"),
    ("unsearchable option", {"search": {"seed": [1, 2]}}, "search.seed: cannot be searched"),
    ("range of a string option", {"search": {"init": {"low": 1, "high": 2}}}, "search.init: a range needs a numeric"),
    ("bad sampler", {"sampler": "cmaes"}, "sampler: 'cmaes' is not allowed (allowed: 'gp', 'grid', 'nsga2', 'random', 'tpe')"),
    ("unknown convention", {"train": {"flat1d_init": "xavier"}},
     "train.flat1d_init: 'xavier' is not allowed (allowed: 'shared', 'torch', 'he')"),
    ("per-arm field of an arm not trained", {"train": {"dense_lr": 0.1}},
     "train.dense_lr: set to 0.1 for the dense arm, which is not trained (arm: 'pair' trains rank1, flat1d)"),
    ("searched per-arm field of an arm not trained", {"search": {"dense_lr": [0.1, 0.2]}},
     "search.dense_lr: set to 0.1 for the dense arm, which is not trained"),
    ("confirm_seeds < 1", {"confirm_seeds": 0}, "confirm_seeds: 0 must be >= 1"),
    ("two objectives, one arm", {"objective": "pair", "train": {"arm": "rank1"}},
     "objective: 'pair' needs two arms, rank1 and flat1d trained in every trial, but train.arm is 'rank1'"),
    ("objective of an arm not trained", {"objective": "dense"},
     "objective: 'dense' needs the dense arm trained in every trial, but train.arm is 'pair'"),
    ("asha with two objectives", {"objective": "pair", "scheduler": "asha"}, "scheduler: 'asha' stops trials on one"),
    ("non-finite number", {"pareto_tolerance": float("nan")}, "pareto_tolerance: nan is not allowed (allowed: a finite"),
    ("a grid with a range", {"sampler": "grid", "n_trials": None, "search": {"depth": {"low": 1, "high": 2}}},
     "search.depth: a grid takes a list of values, not a range (sampler: grid)"),
    ("an empty grid", {"sampler": "grid", "n_trials": None, "search": {}}, "search: an empty grid"),
    ("an empty design", {"sampler": "grid", "n_trials": None, "search": []}, "search: an empty design"),
    ("grid size vs n_trials", {"sampler": "grid", "n_trials": 3, "search": {"depth": [1, 2]}},
     "n_trials: 3 does not match the grid's 2 cells (allowed: 2, or leave n_trials out)"),
    ("a design without the grid sampler", {"search": [{"depth": [1]}]},
     "search: a list of grids is a design for sampler: grid"),
    ("a repeated cell", {"sampler": "grid", "n_trials": None, "search": [{"depth": [1]}, {"depth": [1, 2]}]},
     "search[1]: the cell {'depth': 1} is already in search[0]"),
    ("an invalid cell", {"sampler": "grid", "n_trials": None, "objective": "arm",
                         "search": [{"arm": ["rank1"], "flat1d_init": ["torch"]}]},
     "search[0]: the cell {'arm': 'rank1', 'flat1d_init': 'torch'} is not a valid run: flat1d_init: set to 'torch'"),
    ("a design whose cells do not all train the objective's arm", {"sampler": "grid", "n_trials": None,
                                                                     "search": [{"arm": ["rank1", "flat1d"]}]},
     "objective: 'rank1' needs the rank1 arm trained in every trial, but some cells train only"),
    ("bad name", {"name": "my study!"}, "name: 'my study!' is not allowed"),
]


def _bad_file(tmp_path, overrides):
    overrides = dict(overrides)
    name = overrides.pop("name", "bad")
    path = write_study(tmp_path, name="placeholder", **overrides)
    data = yaml.safe_load(path.read_text())
    data["name"] = name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("what, overrides, message", BAD, ids=[b[0] for b in BAD])
def test_bad_study_files_exit_2_before_anything_starts(tmp_path, what, overrides, message, capsys):
    """In-process, as `rank1 study run` parses and checks a file (one real process: below)."""
    import torch

    from study.cli import main

    if what.startswith("GPU") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["study", "run", str(_bad_file(tmp_path, overrides))]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.startswith("rank1 study run: error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "home").exists()  # nothing started: no home, no server, no Ray


def test_a_bad_study_file_exits_2_from_a_real_process(tmp_path):
    p = cli("study", "run", str(_bad_file(tmp_path, BAD[0][1])), timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("rank1 study run: error: ") and BAD[0][2] in p.stderr
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("argv, message", [
    (["study", "run", "nowhere.yaml"], "STUDY: 'nowhere.yaml' does not exist"),
    (["study", "resume", "/nonexistent/home", "--node-wait", "nan"], "--node-wait: nan is not allowed"),
    (["ui", "--home", ".", "--port", "70000"], "--port: 70000 is not allowed (allowed: 1-65535)"),
    (["server", "--home", "/tmp/x", "--port", "0"], "--port: 0 is not allowed (allowed: 1-65535)"),
    (["server", "--home", "/tmp/x", "--auth", "--auth-cache", "-1"], "--auth-cache: -1 is not allowed (allowed: whole "
                                                                     "seconds 0-86400"),
    (["server", "--home", "/tmp/x", "--auth-cache", "60"], "--auth-cache: only with --auth"),
    (["pull", "a@", "--out", "/tmp/x", "--home", "."], "model: 'a@' is not allowed (allowed: NAME, NAME@ALIAS"),
    (["study", "status", "/nonexistent/home"], "is not a study home"),
])
def test_bad_study_options_exit_2_with_one_line(argv, message, capsys):
    from study.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_grid_design_is_its_cells_in_order():
    from rank1.config import from_dict
    from study.config import StudyConfig

    cfg = from_dict(StudyConfig, {"name": "g", "sampler": "grid", "objective": "arm", "search": [
        {"arm": ["all"], "depth": [2, 4], "lr": [0.1]}, {"arm": ["rank1"], "projection": ["step:1"], "depth": [2]}]})
    assert cfg.n_trials == 3 and cfg.cells == [{"arm": "all", "depth": 2, "lr": 0.1}, {"arm": "all", "depth": 4, "lr": 0.1},
                                               {"arm": "rank1", "depth": 2, "projection": "step:1"}]
    assert cfg.space == {"arm": ["all", "rank1"], "depth": [2, 4], "lr": [0.1], "projection": ["step:1"]}
    assert cfg.trial_config(cfg.cells[2]).arms == ("rank1",)


def test_resuming_a_home_that_is_not_a_study(tmp_path):
    p = cli("study", "resume", str(tmp_path), timeout=60)
    assert p.returncode == 2 and "is not a study home" in p.stderr


def test_yaml_is_never_executed(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['touch " + str(tmp_path / "pwned") + "']\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_study(path)
    assert not Path(tmp_path / "pwned").exists()


@pytest.mark.parametrize("objective, names", [
    ("rank1", ["rank1 val acc"]), ("flat1d", ["flat1d val acc"]), ("dense", ["dense val acc"]),
    ("pair", ["rank1 val acc", "flat1d val acc"]), ("multi", ["rank1 val acc", "latency ms"]),
])
def test_each_optuna_value_has_a_name(tmp_path, objective, names):
    """`rank1 study status` heads its value columns with these, one per Optuna objective, in order."""
    from study.states import value_names

    cfg = load_study(write_study(tmp_path, objective=objective, train={"arm": "all"}))
    assert value_names(cfg) == names and len(names) == len(cfg.objectives)


def test_running_a_study_again_in_its_home_says_what_to_do(tmp_path):
    """A home that holds the same study: `resume` continues an unfinished one; a finished one is
    read with `status` / `report`, not continued. Refused before anything starts."""
    import json

    from study.driver import run_study

    path = write_study(tmp_path)
    cfg = load_study(path)
    cfg.home_path.mkdir(parents=True)
    (cfg.home_path / "state.json").write_text(json.dumps({"fingerprint": cfg.fingerprint()}))
    with pytest.raises(ConfigError, match=r"already holds this study; continue it with `rank1 study resume "):
        run_study(path)
    (cfg.home_path / "outcome.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"which finished: read it with `rank1 study status .*` or "
                                          r"`rank1 study report .*`, or give --home another folder"):
        run_study(path)
    assert sorted(p.name for p in cfg.home_path.iterdir()) == ["outcome.json", "state.json"]  # nothing started


def test_rank1_study_help_names_every_study_command():
    """`rank1 study --help` says what each study command is for; a command added later is listed."""
    import argparse
    import re

    from study.cli import STUDY_HELP, build_parser

    parser = build_parser()
    top = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = next(a for a in top.choices["study"]._actions if isinstance(a, argparse._SubParsersAction))
    assert {"run", "resume", "status", "report", "export", "submit"} <= set(sub.choices)
    missing = [name for name in sub.choices if not re.search(rf"rank1 study ({name}|\S+ / {name}|.* / {name})\b", STUDY_HELP)]
    assert not missing, missing
