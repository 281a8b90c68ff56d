"""Every decomposed implementation computes the same function; auto measures once and caches."""

from __future__ import annotations

import json

import pytest
import torch

from rank1 import Rank1Conv2d, decompose_model, dense_model, project_model_
from rank1.autotune import candidate_impls, device_key, pick_impls
from rank1.layers import IMPLS
from rank1.models import build_model
from rank1.roofline import bound_ms, impl_cost, measure_peaks
from tests.conftest import rel_err


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 5), stride=2, padding=(1, 2),
                                                                         padding_mode="reflect"),
                                    dict(kernel_size=5, padding="same", dilation=2, bias=False)])
def test_every_impl_equals_the_dense_conv(impl, kwargs):
    layer = Rank1Conv2d(6, 8, **kwargs)
    x = torch.randn(3, 6, 17, 15)
    with torch.no_grad():
        assert rel_err(layer.decompose(impl=impl)(x), layer.dense_conv()(x)) <= 1e-5


def test_auto_picks_per_layer_caches_and_never_changes_outputs(tmp_path):
    model = build_model("vgg", arm="rank1", depth=3, width=8, in_channels=3).eval()
    project_model_(model)
    x = torch.randn(4, 3, 16, 16)
    cache = tmp_path / "impl.json"
    fast = decompose_model(model, "auto", example=x, cache=cache)
    data = json.loads(cache.read_text())
    key = f"{device_key(x.device)}|{','.join(candidate_impls(x.device))}"
    assert list(data) == [key]
    entry = data[key]
    assert len(entry) == 3 and set(entry.values()) <= set(candidate_impls(x.device))  # three distinct layer shapes
    with torch.no_grad():
        assert rel_err(fast(x), dense_model(model)(x)) <= 1e-5
    # The second time nothing is measured: a doctored cache entry is used as is.
    forced = {k: "dw2d" for k in entry}
    cache.write_text(json.dumps({key: forced}))
    choices = pick_impls(model, x, cache)
    assert set(choices.values()) == {"dw2d"}
    assert decompose_model(model, "auto").features[0].pointwise is not None  # no example: the safe default
    # A layer where the dense conv of the composed kernel is fastest becomes that conv.
    cache.write_text(json.dumps({key: {k: "dense" for k in entry}}))
    as_dense = decompose_model(model, "auto", example=x, cache=cache)
    assert type(as_dense.features[0]) is torch.nn.Conv2d
    with torch.no_grad():
        assert rel_err(as_dense(x), dense_model(model)(x)) <= 1e-5
    with pytest.raises(ValueError, match=r"impl must be one of \('chain', 'dw2d', 'triton', 'cpp', 'auto'\)"):
        decompose_model(model, "fastest")


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
