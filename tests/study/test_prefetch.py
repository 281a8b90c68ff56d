"""The driver's prefetch: the study's dataset decoded on a thread while Ray starts, handed to
the trials as if loaded then, with any error of loading raised where it was raised before."""

from __future__ import annotations

import pytest
import torch

from rank1.config import ConfigError
from rank1.data import load_dataset
from study.config import load_study
from study.tuning import Prefetch
from tests.study.conftest import write_study


def test_the_prefetched_dataset_is_the_one_the_study_names(tmp_path):
    cfg = load_study(write_study(tmp_path, train={"val_fraction": 0.25, "split_seed": 3}))
    got = Prefetch(cfg).data()
    b = cfg.base
    assert (b.val_fraction, b.split_seed) == (0.25, 3)
    want = load_dataset(b.dataset, b.root, b.image_size, b.download, b.val_fraction, b.split_seed)
    assert (got.name, got.num_classes, got.mean, got.std) == (want.name, want.num_classes, want.mean, want.std)
    for split in ("train", "val", "test"):
        g, w = getattr(got, split), getattr(want, split)
        assert torch.equal(g.x, w.x) and torch.equal(g.y, w.y), split


def test_an_error_loading_the_dataset_is_raised_to_the_driver(tmp_path, monkeypatch):
    import rank1.train

    failure = ConfigError("dataset: nothing at the root")

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(rank1.train, "source_data", fail)
    prefetch = Prefetch(load_study(write_study(tmp_path)))
    with pytest.raises(ConfigError) as raised:
        prefetch.data()
    assert raised.value is failure


@pytest.mark.slow(seconds=15)
def test_the_prefetch_imports_nothing_the_driver_imports_meanwhile(tmp_path):
    """Two threads importing the same modules can fail one import ("deadlock detected"): what the
    prefetch imports and what the driver's own thread imports meanwhile (Ray's start, the search's
    setup) share no module. Each measured in a fresh interpreter after the driver's own imports."""
    import json
    import shutil
    import subprocess
    import sys

    from study.services import ray_temp_dir
    from study.tuning import _LATER

    head = "import sys, json, importlib, study.driver, ray\nb = set(sys.modules)\n"
    tail = "print(json.dumps(sorted(set(sys.modules) - b)))\n"
    driver = (head + f"ray.init(num_cpus=1, include_dashboard=False, _temp_dir={str(ray_temp_dir(tmp_path))!r}, "
              "configure_logging=False, log_to_driver=False)\n"
              "import ray.tune, ray.tune.schedulers, optuna, study.searcher\nray.shutdown()\n" + tail)
    prefetch = head + f"for n in {_LATER!r}: importlib.import_module(n)\n" + tail
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for code in (driver, prefetch)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        shutil.rmtree(ray_temp_dir(tmp_path), ignore_errors=True)
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    driver_new, prefetch_new = (set(json.loads(out.strip().splitlines()[-1])) for out, _ in outs)
    assert len(driver_new) > 100 and len(prefetch_new) > 100  # both did import what they name
    assert driver_new & prefetch_new == set()
