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
    want = load_dataset(b.dataset, b.root, b.image_size, b.download, b.val_fraction, b.split_seed)
    assert (got.name, got.num_classes, got.mean, got.std) == (want.name, want.num_classes, want.mean, want.std)
    for split in ("train", "val", "test"):
        g, w = getattr(got, split), getattr(want, split)
        assert torch.equal(g.x, w.x) and torch.equal(g.y, w.y), split


def test_an_error_loading_the_dataset_is_raised_to_the_driver(tmp_path, monkeypatch):
    import rank1.data

    failure = ConfigError("dataset: nothing at the root")

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(rank1.data, "load_dataset", fail)
    prefetch = Prefetch(load_study(write_study(tmp_path)))
    with pytest.raises(ConfigError) as raised:
        prefetch.data()
    assert raised.value is failure
