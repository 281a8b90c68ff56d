"""The training loop: correctness, determinism, schedules, divergence, resume."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rank1.config import ConfigError, from_dict
from rank1.data import load_dataset
from rank1.train import PairTrainer, TrainCallback, TrainConfig, lr_factor, train_arm, train_pair

FAST = dict(depth=2, width=8, epochs=2, measure_latency=False)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _strip_times(obj):
    """Result without wall-clock fields, which legitimately differ between runs."""
    if isinstance(obj, dict):
        return {k: _strip_times(v) for k, v in obj.items()
                if not (k.endswith("_s") or "latency" in k or k.startswith("speedup"))}
    if isinstance(obj, list):
        return [_strip_times(v) for v in obj]
    return obj


class Recorder(TrainCallback):
    def __init__(self, stop_after: int | None = None):
        self.epochs, self.projections, self.ended, self.states = [], [], {}, {}
        self.stop_after = stop_after

    def on_epoch_end(self, epoch, metrics, trainer):
        self.epochs.append((epoch, {a: dict(m) for a, m in metrics.items()}))
        self.states[epoch] = trainer.state_dict()
        return self.stop_after is not None and epoch >= self.stop_after

    def on_projection(self, arm, epoch, step, residuals):
        self.projections.append((arm, epoch, step, residuals))

    def on_arm_end(self, arm, result):
        self.ended[arm] = result.status


@pytest.mark.slow
def test_shallow_vgg_rank1_arm_learns_digits(digits):
    """A correctness check of the loop, not a speed test."""
    res = train_arm(TrainConfig(depth=4, epochs=8, measure_latency=False), "rank1")
    assert res.status == "finished"
    assert res.final["decomposed_val_acc"] >= 0.90, res.history[-1]
    assert res.final["max_logit_diff"] <= 1e-4
    assert res.final["decomposed_val_acc"] == res.final["projected_val_acc"]


def test_same_seed_twice_gives_identical_metrics(digits):
    cfg = TrainConfig(**FAST, arm="all", projection="step:7")
    a = train_pair(cfg, data=digits).to_dict()
    b = train_pair(cfg, data=digits).to_dict()
    assert _strip_times(a) == _strip_times(b)
    c = train_pair(dataclasses.replace(cfg, seed=1), data=digits).to_dict()
    assert _strip_times(a)["arms"]["rank1"]["history"] != _strip_times(c)["arms"]["rank1"]["history"]


@pytest.mark.parametrize(
    "projection, expected",
    [
        ("step:5", lambda steps, epochs: steps * epochs // 5),
        ("step:1", lambda steps, epochs: steps * epochs),
        ("epoch:1", lambda steps, epochs: epochs),
        ("epoch:2", lambda steps, epochs: epochs // 2),
        ("end", lambda steps, epochs: 0),
    ],
)
def test_projection_follows_the_schedule(digits, projection, expected):
    cfg = TrainConfig(**{**FAST, "epochs": 3}, projection=projection, batch_size=128)
    rec = Recorder()
    res = train_pair(cfg, [rec], data=digits)
    steps = math.ceil(len(digits.train) / 128)
    during = [p for p in rec.projections if p[0] == "rank1"]
    assert len(during) == expected(steps, 3)
    assert res.arms["rank1"].n_projections == expected(steps, 3) + 1  # + the final projection
    assert not [p for p in rec.projections if p[0] != "rank1"]  # only the rank1 arm projects
    if projection.startswith("step"):
        n = int(projection.split(":")[1])
        assert [p[2] for p in during] == [n * (i + 1) for i in range(len(during))]
    assert all(set(p[3]) == {"L00", "L01"} and all(v >= 0 for v in p[3].values()) for p in during)


def test_metrics_reach_the_callback(digits):
    rec = Recorder()
    res = train_pair(TrainConfig(**FAST, arm="all"), [rec], data=digits)
    assert [e for e, _ in rec.epochs] == [1, 2]
    m = rec.epochs[-1][1]
    for arm in ("rank1", "flat1d", "dense"):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "grad.out.L00",
                    "grad.out.L01", "grad.out.ratio", "grad.out.min", "weight.L00"):
            assert key in m[arm], (arm, key)
        assert m[arm]["grad.out.ratio"] == pytest.approx(m[arm]["grad.out.L00"] / m[arm]["grad.out.L01"])
    assert "grad.param.L00" in m["rank1"] and "grad.param.L00.a" in m["flat1d"] and "grad.param.L01.c" in m["flat1d"]
    assert "residual.L00" in m["rank1"] and "residual.L00" not in m["flat1d"]
    assert rec.ended == {"rank1": "finished", "flat1d": "finished", "dense": "finished"}
    assert "val_acc_diff" in res.paired


def test_end_of_training_measures_size_and_speed(digits):
    res = train_pair(TrainConfig(**{**FAST, "measure_latency": True, "latency_repeats": 2, "latency_batch": 4}),
                     data=digits)
    inf = res.arms["rank1"].inference
    assert inf["decomposed_params"] < inf["dense_params"] and inf["flop_ratio"] > 1
    for key in ("dense_latency_ms_b1", "decomposed_latency_ms_b1", "dense_latency_ms_b4", "speedup_b4"):
        assert inf[key] > 0
    assert inf["dense_latency_spread_ms_b1"][0] <= inf["dense_latency_spread_ms_b1"][1]


def test_divergence_is_a_status_not_an_exception(digits):
    rec = Recorder()
    res = train_pair(TrainConfig(**FAST, lr=1e6, momentum=0.0, weight_decay=0.0, arm="all"), [rec], data=digits)
    statuses = {a: r.status for a, r in res.arms.items()}
    assert "diverged" in statuses.values(), statuses
    for r in res.arms.values():
        if r.status == "diverged":
            assert r.diverged_epoch == 1 and "loss became" in r.reason
    assert rec.ended == statuses


def test_resume_from_a_checkpoint_is_bit_identical(digits):
    cfg = TrainConfig(**{**FAST, "epochs": 3}, projection="step:10", projection_momentum="reset")
    full = train_pair(cfg, data=digits)
    stopper = Recorder(stop_after=1)
    partial = train_pair(cfg, [stopper], data=digits)
    assert {r.status for r in partial.arms.values()} == {"stopped"}
    state = stopper.states[1]
    resumed_rec = Recorder()
    resumed = train_pair(cfg, [resumed_rec], state=state, data=digits)
    assert [e for e, _ in resumed_rec.epochs] == [2, 3]  # continued, not restarted
    assert _strip_times(resumed.to_dict()["arms"]) == _strip_times(full.to_dict()["arms"])


def test_resume_refuses_a_checkpoint_of_another_config(digits):
    rec = Recorder(stop_after=1)
    train_pair(TrainConfig(**FAST), [rec], data=digits)
    trainer = PairTrainer(TrainConfig(**{**FAST, "lr": 0.01}), data=digits)
    with pytest.raises(ValueError, match="different configuration"):
        trainer.load_state_dict(rec.states[1])


def test_lr_schedules():
    cfg = TrainConfig(epochs=10, schedule="cosine", warmup_epochs=1)
    f = [lr_factor(s, 10, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[-1] < 0.01
    step = TrainConfig(epochs=10, schedule="step", step_epochs=3, gamma=0.5)
    assert [lr_factor(s * 10, 10, step) for s in (0, 2, 3, 6, 9)] == [1, 1, 0.5, 0.25, 0.125]
    assert lr_factor(55, 10, TrainConfig(schedule="constant")) == 1


@pytest.mark.parametrize(
    "data, match",
    [
        ({"depth": 0}, r"depth: 0 must be >= 1"),
        ({"depth": "8"}, r"depth: expected int, got '8' \(str\)"),
        ({"lr": 0}, r"lr: 0.0 must be > 0"),
        ({"init": "he"}, r"init: 'he' is not allowed \(allowed: 'dirac', 'hosvd', 'kaiming'"),
        ({"projection": "weekly"}, r"projection: 'weekly' is not allowed"),
        ({"projection_norm": "l2"}, r"projection_norm: 'l2' is not allowed"),
        ({"arm": "both"}, r"arm: 'both' is not allowed \(allowed: 'pair', 'all'"),
        ({"dataset": "imagenet"}, r"dataset: 'imagenet' is not allowed"),
        ({"epochs": 2.5}, r"epochs: expected int"),
        ({"batchnorm": "yes"}, r"batchnorm: expected bool"),
        ({"learning_rate": 0.1}, r"learning_rate: unknown key \(allowed: arm, augment, batch_size"),
        ({"kernel_size": 2}, r"kernel_size: 2 must be odd"),
    ],
)
def test_bad_config_names_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(TrainConfig, data)


def test_environment_checks(tmp_path):
    with pytest.raises(ConfigError, match=r"root: cifar10: .*does not exist"):
        TrainConfig(dataset="cifar10", root=str(tmp_path)).check_environment()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device: 'cuda' was asked for but no CUDA device"):
            TrainConfig(device="cuda").check_environment()
        with pytest.raises(ConfigError, match=r"bf16: bf16 autocast needs a CUDA device"):
            TrainConfig(bf16=True).check_environment()
