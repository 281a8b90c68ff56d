"""What a user waits for at the prompt: ``rank1 --help`` and ``rank1 study status`` in a fresh
process, as they run them, load none of the frameworks they do not need (torch alone took 3-5 s
to import on 2 cores; MLflow and Ray 3 s more), and the status says what the storage holds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rank1.config import ConfigError, from_dict, registries_unchecked
from rank1.train_config import TrainConfig
from study.config import StudyConfig, load_study
from study.home import write_home
from tests.study.conftest import REPO, write_study

HEAVY = ("torch", "mlflow", "ray", "optuna", "pandas")


def _rank1(*commands: list[str]) -> list[tuple[int, str, set[str]]]:
    """Each of ``commands`` (``rank1`` ARGS) in turn in one fresh interpreter: for each, its exit
    status, its output and which of HEAVY had been imported by its end (what one imported, the
    next starts with)."""
    code = ("import contextlib, io, json, sys\nfrom study.cli import main\nout = []\n"
            f"for args in {list(commands)!r}:\n"
            "    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf):\n"
            "        try:\n            code = main(args)\n        except SystemExit as e:\n            code = e.code\n"
            f"    out.append([code, buf.getvalue(), sorted(m for m in {HEAVY!r} if m in sys.modules)])\n"
            "print(json.dumps(out))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return [(code, text, set(imported)) for code, text, imported in json.loads(p.stdout.strip().splitlines()[-1])]


def test_the_help_imports_no_framework():
    helps = (["--help"], ["study", "--help"], ["study", "status", "--help"])
    # `train --help` last: the registries' names are read where they are shown (their modules import torch)
    *light, (code, text, imported) = _rank1(*helps, ["train", "--help"])
    for args, (code_, text_, imported_) in zip(helps, light):
        assert code_ == 0 and "usage: rank1" in text_, (args, text_[-2000:])
        assert imported_ == set(), (args, imported_)
    assert code == 0 and "torch" in imported
    assert "one of cifar10, cifar100, digits," in " ".join(text.split())
    assert "init INIT" in text and "hosvd" in text


def test_status_counts_the_storage_without_torch_ray_or_mlflow(tmp_path):
    """A home whose Optuna study holds trials with known states and values: the status counts
    them by the state the service recorded and names the best, reading only the storage (and
    not the registries, whose modules import torch)."""
    import optuna

    path = write_study(tmp_path, name="known")
    cfg = load_study(path)
    write_home(cfg, path.read_text())
    study = optuna.create_study(study_name=cfg.name, storage=cfg.storage_url, direction="maximize")
    for i, (status, value) in enumerate([("finished", 0.7), ("finished", 0.9), ("pruned", None), (None, None)]):
        trial = study.ask()
        trial.suggest_int("depth", 1, 2)
        trial.set_user_attr("ray_trial_id", f"t{i}")
        if status:
            trial.set_user_attr("status", status)
        if status == "finished":
            study.tell(trial, value)
        elif status == "pruned":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    ((code, text, imported),) = _rank1(["study", "status", str(cfg.home_path), "--json"])
    assert code == 0, text[-2000:]
    assert imported == {"optuna"}, imported
    s = json.loads(text)
    assert (s["name"], s["n_trials"]) == ("known", cfg.n_trials)
    assert s["states"] == {"finished": 2, "pruned": 1, "running": 1}
    assert [t["trial_id"] for t in s["trials"]] == ["t0", "t1", "t2", "t3"]
    assert (s["best"]["number"], s["best"]["trial_id"], s["best"]["values"]) == (1, "t1", [0.9])
    assert s["value_names"] == ["rank1 val acc"]


def test_a_config_read_back_without_its_registries_is_still_checked_for_everything_else():
    """Within ``registries_unchecked`` (how the status reads a home) a value no registry holds
    passes, e.g. a model a notebook registered; fixed choices, types and ranges are checked as
    always; outside, the registry is read again."""
    with registries_unchecked():
        assert from_dict(TrainConfig, {"model": "notebook_net", "init": "mine"}).model == "notebook_net"
        assert from_dict(StudyConfig, {"name": "s", "sampler": "mine"}).sampler == "mine"
        for bad, match in (({"arm": "both"}, "arm: 'both' is not allowed"), ({"depth": "8"}, "depth"),
                           ({"lr": float("nan")}, "lr: nan is not allowed")):
            with pytest.raises(ConfigError, match=match):
                from_dict(TrainConfig, {"model": "notebook_net", **bad})
    with pytest.raises(ConfigError, match="model: 'notebook_net' is not allowed"):
        from_dict(TrainConfig, {"model": "notebook_net"})


def test_every_name_of_the_packages_is_what_it_says_with_every_module_imported():
    """``rank1``'s names load on first use, and ``study``'s are its API functions: each resolves,
    and none is hidden by a submodule of the same name (importing ``study.status`` would replace
    the function ``study.status`` with the module)."""
    import importlib
    import pkgutil
    import types

    import rank1
    import study

    for package in (rank1, study):
        for m in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{m.name}")
        for name in package.__all__:
            value = getattr(package, name)
            assert not isinstance(value, types.ModuleType), f"{package.__name__}.{name} is a module"
    assert all(callable(getattr(study, name)) for name in study.__all__)
    assert rank1.Rank1Conv2d is importlib.import_module("rank1.layers").Rank1Conv2d
    assert set(rank1.__all__) == {*rank1._EXPORTS, "__version__"} and set(dir(rank1)) >= set(rank1.__all__)
