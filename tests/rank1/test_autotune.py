"""``auto`` plans the whole network on its real input, caches the plan, never changes outputs;
the roofline's costs."""

from __future__ import annotations

import json

import pytest
import torch

from rank1 import Rank1Conv2d, autotune, decompose_model, dense_model, project_model_, rank1_layers
from rank1.autotune import (
    DEFAULT_MARGIN,
    DEFAULTS,
    FINAL_MARGIN,
    FORMATS,
    MIXED_MARGIN,
    SKIP_MARGIN,
    DeployedModel,
    candidate_impls,
    default_form,
    device_key,
)
from rank1.layers import available_impls
from rank1.models import build_model
from rank1.roofline import bound_ms, impl_cost, measure_peaks
from tests.conftest import rel_err


@pytest.fixture()
def vgg():
    model = build_model("vgg", arm="rank1", depth=3, width=8, in_channels=3).eval()
    project_model_(model)
    return model, torch.randn(4, 3, 16, 16)


def test_auto_measures_every_candidate_on_the_whole_network_and_keeps_the_fastest(vgg, tmp_path):
    model, x = vgg
    cache = tmp_path / "impl.json"
    fast = decompose_model(model, "auto", example=x, cache=cache)
    assert isinstance(fast, DeployedModel)
    plan = fast.plan
    cands = candidate_impls(x.device)
    assert "dense" in cands and "chain" in cands and "triton" not in cands  # triton: CUDA only
    expected = {f"{k}, {fmt}" for k in cands for fmt in FORMATS} | {f"greedy, {fmt}" for fmt in FORMATS}
    # every single form in both layouts and the greedy pick, timed as networks or skipped for layers
    # that took over SKIP_MARGIN x the best form's (never the greedy pick)
    assert set(plan.times_ms) | set(plan.skipped) == expected and not set(plan.times_ms) & set(plan.skipped)
    assert all(r > SKIP_MARGIN for r in plan.skipped.values()) and not any(k.startswith("greedy") for k in plan.skipped)
    # the finalists (within FINAL_MARGIN of the fastest first pass) re-timed paired; the lowest ratio wins
    first = min(plan.times_ms, key=plan.times_ms.get)
    assert first in plan.final_ratios or not plan.final_ratios
    assert all(plan.times_ms[k] <= FINAL_MARGIN * plan.times_ms[first] for k in plan.final_ratios)
    ratios = plan.final_ratios or {first: 1.0}
    order = list(plan.times_ms)  # the candidates in the order tried: a tie goes to the earlier one
    expected = min(ratios, key=lambda k: (ratios[k], order.index(k)))
    singles = [k for k in ratios if not k.startswith("greedy")]
    # a mix must win by MIXED_MARGIN over the best single finalist, where one is among them (a noisy
    # first pass can leave only the greedy picks within FINAL_MARGIN of the fastest)
    if singles and expected.startswith("greedy"):
        single = min(singles, key=lambda k: (ratios[k], order.index(k)))
        if ratios[expected] > (1 - MIXED_MARGIN) * ratios[single]:
            expected = single
    default = "{}, {}".format(*default_form(x.device))  # and anything must beat the default by DEFAULT_MARGIN
    if default in ratios and ratios[expected] > (1 - DEFAULT_MARGIN) * ratios[default]:
        expected = default
    assert plan.candidate == expected
    assert set(plan.impls) == {n for n, _ in rank1_layers(model)} and set(plan.impls.values()) <= set(cands)
    with torch.no_grad():
        assert rel_err(fast(x), dense_model(model)(x)) <= 1e-5
        assert rel_err(fast(x.contiguous(memory_format=torch.channels_last)), dense_model(model)(x)) <= 1e-5
    assert fast.features is fast.net.features  # the wrapped network's attributes
    assert plan.summary() in repr(fast)
    # forward calls the network it wraps now: a copy's own, or a replacement
    import copy

    twin = copy.deepcopy(fast)
    assert twin.net is not fast.net
    with torch.no_grad():
        twin.net.head.bias.add_(1.0)  # changes the copy's output, not the original's
        assert torch.allclose(twin(x), fast(x) + 1.0, atol=1e-5) and rel_err(fast(x), dense_model(model)(x)) <= 1e-5
        twin.net = dense_model(model).eval()
        # in the plan's layout, as forward hands the input on (the dense convs' sums differ in the
        # last bits between layouts: with a channels_last plan, comparing to `twin.net(x)` failed)
        layout = torch.channels_last if plan.memory_format == "channels_last" else torch.contiguous_format
        assert torch.equal(twin(x), twin.net(x.contiguous(memory_format=layout)))
    # Cached: keyed by device (threads, torch), candidates, the model's structure and the input.
    data = json.loads(cache.read_text())
    (key,) = data
    assert key.startswith(device_key(x.device)) and ",".join(cands) in key and str(tuple(x.shape)) in key
    doctored = dict(data[key], impls={k: "dw2d" for k in plan.impls}, memory_format="channels_last")
    cache.write_text(json.dumps({key: doctored}))
    again = decompose_model(model, "auto", example=x, cache=cache)  # nothing measured: the entry is used as is
    assert again.plan.impls == doctored["impls"] and again.plan.memory_format == "channels_last"
    assert type(again.features[0]).__name__ == "Sequential" and hasattr(again.features[0], "spatial")
    with torch.no_grad():
        assert rel_err(again(x), dense_model(model)(x)) <= 1e-5
    other = decompose_model(model, "auto", example=torch.randn(1, 3, 16, 16), cache=cache)
    assert other.plan.times_ms and len(json.loads(cache.read_text())) == 2  # another batch: planned anew


def test_the_finalists_are_retimed_and_the_paired_winner_kept_not_the_first_pass_one(vgg, tmp_path, monkeypatch):
    """A first pass that a noisy machine got wrong: "chain, nchw" looked 10% faster, re-timed
    paired "dw2d, channels_last" is faster; a candidate beyond FINAL_MARGIN is not a finalist."""
    model, x = vgg
    first = {"chain, nchw": 1.0, "dw2d, channels_last": 1.1}
    monkeypatch.setattr(autotune, "_time", lambda fn, x, budget: first.get(_label(fn), 1.1 * FINAL_MARGIN))
    monkeypatch.setattr(autotune, "greedy_pick", lambda table, *a: {t.name: "dense" for t in table})
    _equal_layer_times(monkeypatch)
    seen = []

    def paired(fns, x, reference, rounds, min_time_s):
        seen.append((set(fns), reference))
        return {k: ((0.9, 0.8, 1.0) if k == "dw2d, channels_last" else (1.0, 1.0, 1.0)) for k in fns}

    monkeypatch.setattr(autotune, "time_paired", paired)
    plan = decompose_model(model, "auto", example=x, cache=tmp_path / "c.json").plan
    assert seen == [({"chain, nchw", "dw2d, channels_last"}, "chain, nchw")]
    assert plan.candidate == "dw2d, channels_last" and plan.memory_format == "channels_last"
    assert set(plan.impls.values()) == {"dw2d"} and plan.final_ratios["dw2d, channels_last"] == 0.9


@pytest.mark.parametrize("greedy_ratio, kept", [(0.99, "dw2d, nchw"), (0.95, "greedy, nchw")])
def test_a_greedy_mix_is_kept_only_where_it_beats_the_best_single_form_by_a_margin(vgg, tmp_path, monkeypatch,
                                                                                   greedy_ratio, kept):
    model, x = vgg
    monkeypatch.setattr(autotune, "_time", lambda fn, x, budget: {"dw2d, nchw": 1.0, "mixed": 1.05}.get(_label(fn),
                                                                                           1.1 * FINAL_MARGIN))
    monkeypatch.setattr(autotune, "greedy_pick", lambda table, *a: {t.name: ("dense", "chain")[i % 2]
                                                                   for i, t in enumerate(table)})
    _equal_layer_times(monkeypatch)
    monkeypatch.setattr(autotune, "time_paired", lambda fns, x, ref, rounds, min_time_s: {
        k: ((greedy_ratio,) * 3 if k == "greedy, nchw" else (1.0,) * 3) for k in fns})
    plan = decompose_model(model, "auto", example=x, cache=tmp_path / "c.json").plan
    assert set(plan.final_ratios) == {"dw2d, nchw", "greedy, nchw", "greedy, channels_last"}
    assert plan.candidate == kept


def test_greedy_mixes_alone_in_the_final_keep_the_faster_one(vgg, tmp_path, monkeypatch):
    """A first pass where every single form took over FINAL_MARGIN x the greedy mixes' time (a
    noisy machine can time it so): the final is the two mixes alone, and the faster one is kept."""
    model, x = vgg
    monkeypatch.setattr(autotune, "_time", lambda fn, x, budget: {"mixed": 1.0}.get(_label(fn), 1.1 * FINAL_MARGIN))
    monkeypatch.setattr(autotune, "greedy_pick", lambda table, *a: {t.name: ("dense", "chain")[i % 2]
                                                                   for i, t in enumerate(table)})
    _equal_layer_times(monkeypatch)
    monkeypatch.setattr(autotune, "time_paired", lambda fns, x, ref, rounds, min_time_s: {
        k: ((0.97,) * 3 if k == "greedy, channels_last" else (1.0,) * 3) for k in fns})
    plan = decompose_model(model, "auto", example=x, cache=tmp_path / "c.json").plan
    assert set(plan.final_ratios) == {"greedy, nchw", "greedy, channels_last"}
    assert plan.candidate == "greedy, channels_last" and plan.memory_format == "channels_last"
    assert set(plan.impls.values()) == {"dense", "chain"}


@pytest.mark.parametrize("other_ratio, kept", [(0.98, "default"), (0.95, "other")])
def test_another_form_replaces_the_devices_default_only_where_it_beats_it_by_a_margin(vgg, tmp_path, monkeypatch,
                                                                                     other_ratio, kept):
    """Two finalists within noise of each other: the device's default form (on average the best)
    stays unless the other wins the paired final by DEFAULT_MARGIN."""
    model, x = vgg
    name, fmt = default_form(x.device)
    default = f"{name}, {fmt}"
    other = f"{name}, {'nchw' if fmt == 'channels_last' else 'channels_last'}"  # the same kernel, other layout
    monkeypatch.setattr(autotune, "_time", lambda fn, x, budget: {default: 1.0, other: 1.02}.get(_label(fn),
                                                                                            1.1 * FINAL_MARGIN))
    _equal_layer_times(monkeypatch)
    monkeypatch.setattr(autotune, "time_paired", lambda fns, x, ref, rounds, min_time_s: {
        k: ((other_ratio,) * 3 if k == other else (1.0,) * 3) for k in fns})
    plan = decompose_model(model, "auto", example=x, cache=tmp_path / "c.json").plan
    assert set(plan.final_ratios) >= {default, other}
    assert plan.candidate == (default if kept == "default" else other)
    assert plan.memory_format == plan.candidate.split(", ")[1] and set(plan.impls.values()) == {name}


def _equal_layer_times(monkeypatch) -> None:
    """Every kernel as fast as every other on every layer: no single form is skipped."""
    monkeypatch.setattr(autotune, "layer_times", lambda table, cands, *a: {t.name: dict.fromkeys(cands, 1.0)
                                                                           for t in table})


def test_a_form_whose_layers_take_over_the_margin_is_not_timed_as_a_network(vgg, tmp_path, monkeypatch):
    """Layers in isolation: chain 3x and dw2d 1.5x the fastest kernel's; chain's networks are
    skipped (recorded with their ratio), dw2d's timed; the plan still computes the dense function."""
    model, x = vgg
    speed = {"chain": 3.0, "dw2d": 1.5}
    monkeypatch.setattr(autotune, "layer_times", lambda table, cands, *a: {
        t.name: {c: speed.get(c, 1.0) for c in cands} for t in table})
    timed = []
    real_time = autotune._time
    monkeypatch.setattr(autotune, "_time", lambda fn, x, budget: timed.append(_label(fn)) or real_time(fn, x, budget))
    plan = decompose_model(model, "auto", example=x, cache=tmp_path / "c.json")
    assert set(plan.plan.skipped) == {"chain, nchw", "chain, channels_last"}
    assert all(r == pytest.approx(3.0) for r in plan.plan.skipped.values())
    assert not any(k.startswith("chain") for k in plan.plan.times_ms) and "dw2d, nchw" in plan.plan.times_ms
    assert not {"chain, nchw", "chain, channels_last"} & set(timed)
    with torch.no_grad():
        assert rel_err(plan(x), dense_model(model)(x)) <= 1e-5


def _label(deployed) -> str:
    """The candidate label of a network timed in the first pass (its kernels and layout)."""
    kinds = set(deployed.plan.impls.values())
    return f"{kinds.pop()}, {deployed.plan.memory_format}" if len(kinds) == 1 else "mixed"


def test_a_plan_where_the_composed_dense_conv_wins_is_that_conv(vgg, tmp_path):
    model, x = vgg
    cache = tmp_path / "impl.json"
    plan = decompose_model(model, "auto", example=x, cache=cache).plan
    (key,) = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: dict(plan.to_dict(), impls={k: "dense" for k in plan.impls})}))
    as_dense = decompose_model(model, "auto", example=x, cache=cache)
    assert type(as_dense.features[0]) is torch.nn.Conv2d
    with torch.no_grad():
        assert rel_err(as_dense(x), dense_model(model)(x)) <= 1e-5


def test_auto_without_an_example_uses_the_device_default_and_says_so(vgg):
    model, x = vgg
    name, fmt = DEFAULTS["cpu"][0] if "cpp" in candidate_impls(torch.device("cpu")) else DEFAULTS["cpu"][1]
    with pytest.warns(UserWarning, match=rf"without example=: using {name}, {fmt} for every layer"):
        fast = decompose_model(model, "auto")
    assert set(fast.plan.impls.values()) == {name} and fast.plan.memory_format == fmt and not fast.plan.measured
    with torch.no_grad():
        assert rel_err(fast(x), dense_model(model)(x)) <= 1e-5


def test_bad_input_is_a_clear_error_and_builds_nothing(vgg, tmp_path):
    model, x = vgg
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"impl must be one of \('chain', 'dw2d', 'triton', 'cpp', 'cpp_lib', 'auto'\), got 'fastest'"):
        decompose_model(model, "fastest")
    with pytest.raises(ValueError, match=r"example: a batch of shape \(4, 1, 16, 16\) \(torch.float32, cpu\) does not "
                                         r"fit the model \(.*channels"):
        decompose_model(model, "auto", example=torch.randn(4, 1, 16, 16), cache=tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()
    if "triton" not in available_impls():
        with pytest.raises(ValueError, match=r"impl='triton' is unavailable here \(.*\); allowed: \('chain', 'dw2d'"):
            decompose_model(model, "triton")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched


def test_auto_on_a_single_layer_and_a_resnet(tmp_path):
    layer = Rank1Conv2d(6, 8, 3, padding=1)
    x = torch.randn(2, 6, 9, 9)
    fast = decompose_model(layer, "auto", example=x, cache=tmp_path / "c.json")
    with torch.no_grad():
        assert rel_err(fast(x), layer.dense_conv()(x)) <= 1e-5
    net = build_model("resnet", arm="flat1d", depth=2, width=8, in_channels=3).eval()
    x = torch.randn(3, 3, 16, 16)
    fast = decompose_model(net, "auto", example=x, cache=tmp_path / "c.json")
    with torch.no_grad():
        assert rel_err(fast(x), dense_model(net)(x)) <= 1e-5


def test_roofline_costs_and_peaks():
    flops_d, bytes_d = impl_cost("dense", 64, 64, 3, 16, 16, 2)
    flops_c, bytes_c = impl_cost("chain", 64, 64, 3, 16, 16, 2)
    flops_w, bytes_w = impl_cost("dw2d", 64, 64, 3, 16, 16, 2)
    assert flops_d == 2 * 2 * 256 * 64 * 64 * 9 and flops_c < flops_w < flops_d
    assert bytes_w < bytes_c  # one pass over the activation fewer
    peaks = measure_peaks(gemm=256, copy_mb=16, repeats=2)
    assert peaks.gflops > 0.1 and peaks.gbytes_per_s > 0.1 and 0 < peaks.call_ms < 10
    assert bound_ms(flops_d, bytes_d, peaks) > 0
    from rank1.roofline import bound_with_calls_ms

    b = bound_ms(flops_c, bytes_c, peaks)
    assert bound_with_calls_ms("chain", b, peaks) == pytest.approx(b + 3 * peaks.call_ms)


@pytest.mark.slow
def test_bench_grid_smoke(tmp_path):
    from rank1.cli import main

    assert main(["bench", "--grid", "--smoke", "--no-peer", "--repeats", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "grid.json").read_text())
    assert len(data["layers"]) == 2 and data["peaks"]["gflops"] > 0
    row = data["layers"][0]
    assert {"dense", "dense-cl", "chain", "chain-cl", "dw2d", "dw2d-cl", "cpp"} <= set(row["times_ms"])
    assert 0 < row["fraction_of_bound"] < row["fraction_of_bound_with_calls"] and row["flop_ratio"] > 1
    assert data["projection"]["fraction_of_epoch"] > 0
    assert "| C=O | k | HxW |" in (tmp_path / "grid.md").read_text()
