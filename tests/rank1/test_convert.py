"""Model-level conversion, projection and decomposition; tracing, export and ONNX."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from rank1 import (
    Flat1dConv2d,
    Rank1Conv2d,
    convert_model,
    decompose_model,
    dense_model,
    project_model_,
    rank1_layers,
)
from tests.conftest import rel_err


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 1),  # 1x1: nothing to factorise, left alone
        nn.Conv2d(16, 32, (3, 5), stride=2, padding=(1, 2), padding_mode="reflect", bias=False),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),  # depthwise: left alone
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


def _standard_only(model: nn.Module) -> bool:
    return all(type(m).__module__.startswith("torch.nn") for m in model.modules())


@pytest.mark.parametrize("arm, cls", [("rank1", Rank1Conv2d), ("flat1d", Flat1dConv2d)])
def test_convert_replaces_spatial_convs_only(arm, cls):
    net = small_net()
    converted = convert_model(net, arm=arm)
    names = [name for name, _ in rank1_layers(converted)]
    assert names == ["0", "4"]
    assert all(isinstance(m, cls) for _, m in rank1_layers(converted))
    assert type(converted[3]) is nn.Conv2d and type(converted[6]) is nn.Conv2d
    assert type(net[0]) is nn.Conv2d  # not in place by default
    # Both arms start from the conv's own weights projected: the same function.
    x = torch.randn(2, 3, 12, 12)
    ref = convert_model(net, arm="rank1")
    assert rel_err(converted(x), ref(x)) <= 1e-5


def test_convert_with_init_and_bad_arm():
    net = convert_model(small_net(), arm="rank1", init="dirac", projection_norm="rescale")
    assert {m.init for _, m in rank1_layers(net)} == {"dirac"}
    assert {m.projection_norm for _, m in rank1_layers(net)} == {"rescale"}
    with pytest.raises(ValueError, match=r"arm must be one of \('rank1', 'flat1d'\), got 'dense'"):
        convert_model(small_net(), arm="dense")


def _trained_rank1_net() -> nn.Module:
    net = convert_model(small_net(), arm="rank1")
    with torch.no_grad():  # as after some SGD steps: off rank-1
        for _, layer in rank1_layers(net):
            layer.weight.add_(0.05 * torch.randn_like(layer.weight))
    return net


def test_project_model_reports_residuals():
    net = _trained_rank1_net()
    residuals = project_model_(net)
    assert set(residuals) == {"0", "4"} and all(r > 0.01 for r in residuals.values())
    assert all(r < 1e-5 for r in project_model_(net).values())


@pytest.mark.parametrize("arm", ["rank1", "flat1d"])
def test_decompose_model_gives_the_projected_models_logits(arm):
    net = _trained_rank1_net() if arm == "rank1" else convert_model(small_net(), arm="flat1d")
    project_model_(net)
    fast = decompose_model(net)
    assert _standard_only(fast) and not fast.training
    assert not list(rank1_layers(fast))
    x = torch.randn(5, 3, 16, 20)
    with torch.no_grad():
        assert rel_err(fast(x), net(x)) <= 1e-5
        assert rel_err(dense_model(net)(x), net(x)) <= 1e-5


def test_decomposed_model_traces_and_exports():
    net = _trained_rank1_net()
    project_model_(net)
    fast = decompose_model(net)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = fast(x)
        traced = torch.jit.trace(fast, x)
        assert rel_err(traced(x), expected) <= 1e-6
        exported = torch.export.export(fast, (x,))
        assert rel_err(exported.module()(x), expected) <= 1e-6


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")),
    reason="onnx, onnxscript and onnxruntime are test extras",
)
def test_decomposed_model_round_trips_through_onnx(tmp_path):
    import onnx
    import onnxruntime

    net = _trained_rank1_net()
    project_model_(net)
    fast = decompose_model(net)
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "fast.onnx"
    torch.onnx.export(fast, (x,), str(path), input_names=["x"], output_names=["logits"], dynamo=True)
    onnx.checker.check_model(onnx.load(str(path)))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(got), fast(x)) <= 1e-5
