"""FLOP counting against hand counts; the bench command end to end."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rank1 import Flat1dConv2d, Rank1Conv2d, decompose_model, measure
from rank1.cli import main
from rank1.measure import count_flops, count_params, layer_flops, time_forward, time_paired


def test_count_flops_matches_hand_counts():
    x = torch.randn(2, 8, 10, 10)
    dense = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 100, 5))
    assert count_flops(dense, x) == 2 * 100 * 16 * 8 * 9 + 2 * 5 * 1600
    rank1 = Rank1Conv2d(8, 16, 3, padding=1)
    d, f = layer_flops(8, 16, 3, 10, 10, batch=2)
    assert count_flops(rank1, x) == d
    assert count_flops(rank1.decompose(), x) == f
    assert count_flops(Flat1dConv2d.from_rank1(rank1), x) == f
    strided = Flat1dConv2d(8, 16, 3, stride=2, padding=1)
    assert count_flops(strided, x) == count_flops(decompose_model(strided), x)


def test_count_params_and_timing_are_sane():
    layer = Rank1Conv2d(8, 16, 3)
    assert count_params(layer) == 16 * 8 * 9 + 16
    assert count_params(layer.decompose()) == 16 * 8 + 16 * 3 + 16 * 3 + 16
    t = time_forward(layer, torch.randn(1, 8, 6, 6), warmup=1, repeats=5)
    assert t.repeats >= 5 and 0 < t.p10_ms <= t.median_ms <= t.p90_ms


def test_paired_timing_cancels_drift_between_rounds(monkeypatch):
    """A virtual clock: ``b`` costs twice ``a``, and every other round the machine is 5x slower.
    Paired within rounds the ratio is exactly 2 in every round; unpaired medians would mix rounds."""
    clock, calls = [0.0], [0]
    per_round = 2 * (1 + 3)  # two functions, warm-up 1 + 3 repeats each

    def cost(units):
        def fn(x):
            drift = 5.0 if (calls[0] // per_round) % 2 else 1.0
            calls[0] += 1
            clock[0] += units * drift * 1e-3
        return fn

    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])
    r = time_paired({"a": cost(1), "b": cost(2)}, torch.zeros(1), "a", rounds=4, min_time_s=0.0)
    assert r["a"] == (1.0, 1.0, 1.0) and r["b"] == pytest.approx((2.0, 2.0, 2.0))


def test_bench_smoke_prints_a_table_and_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal: rich cuts cells at pytest's default of 80
    assert main(["bench", "--smoke", "--batch", "2", "--repeats", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "speedup, paired" in out
    data = json.loads((tmp_path / "layers.json").read_text())
    assert data["machine"]["threads"] >= 1 and len(data["layers"]) == 3
    for row in data["layers"]:
        assert row["flop_ratio"] > 1 and row["speedup"] > 0
        assert abs(row["fraction_of_flop_ratio"] - row["speedup"] / row["flop_ratio"]) < 1e-12
        # what the table prints: dense / auto paired round by round, the median within its range
        lo, hi = row["speedup_paired_range"]
        assert 0 < lo <= row["speedup_paired"] <= hi
        assert row["fraction_of_flop_ratio_paired"] == pytest.approx(row["speedup_paired"] / row["flop_ratio"])
        assert f"{row['speedup_paired']:.2f}x [{lo:.2f}, {hi:.2f}]" in out


def test_bench_bad_options_exit_2(capsys):
    assert main(["bench", "--repeats", "1"]) == 2
    assert "--repeats must be >= 2" in capsys.readouterr().err
