"""Every registered network x arm: shapes, gradients, identical starts across arms."""

from __future__ import annotations

import pytest
import torch

from rank1 import Flat1dConv2d, Rank1Conv2d
from rank1.gradstats import conv_layers
from rank1.models import ARMS_ALL, MODELS, build_model

CONFIGS = [dict(depth=3, width=8, batchnorm=False), dict(depth=5, width=4, batchnorm=True, stages=2)]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("arm", ARMS_ALL)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_backward_every_parameter_gets_a_gradient(name, arm, cfg):
    model = build_model(name, arm=arm, in_channels=3, num_classes=7, **cfg)
    x = torch.randn(4, 3, 16, 12)
    out = model(x)
    assert out.shape == (4, 7) and bool(torch.isfinite(out).all())
    out.logsumexp(1).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), pname
        assert float(p.grad.abs().sum()) > 0, pname
    kinds = {type(m) for _, m in conv_layers(model)}
    assert kinds == {{"rank1": Rank1Conv2d, "flat1d": Flat1dConv2d, "dense": torch.nn.Conv2d}[arm]}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("cfg", CONFIGS)
def test_all_arms_start_as_the_identical_function(name, cfg):
    x = torch.randn(3, 1, 16, 16)
    logits = {}
    for arm in ARMS_ALL:
        torch.manual_seed(11)
        model = build_model(name, arm=arm, **cfg).eval()
        with torch.no_grad():
            logits[arm] = model(x)
    torch.testing.assert_close(logits["flat1d"], logits["rank1"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits["dense"], logits["rank1"], rtol=1e-5, atol=1e-6)
    # ...and a different seed is a different function.
    torch.manual_seed(12)
    with torch.no_grad():
        other = build_model(name, arm="rank1", **cfg).eval()(x)
    assert not torch.allclose(other, logits["rank1"])


def test_vgg_depth_and_stages():
    model = build_model("vgg", depth=7, width=8, stages=3)
    assert len(conv_layers(model)) == 7
    widths = [m.out_channels for _, m in conv_layers(model)]
    assert widths == [8, 8, 8, 16, 16, 32, 32]
    assert len(conv_layers(build_model("resnet", depth=4, width=8))) == 2 * 4 + 1


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("vgg", {"depth": 0}, r"depth must be in 1..32"),
        ("vgg", {"depth": 33}, r"depth must be in 1..32"),
        ("resnet", {"depth": 0}, r"depth \(basic blocks\) must be in 1..32"),
        ("vgg", {"kernel_size": 4}, r"kernel_size must be odd"),
        ("alexnet", {}, r"model must be one of \['resnet', 'vgg'\]"),
    ],
)
def test_bad_model_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, **kwargs)


def test_bad_arm():
    with pytest.raises(ValueError, match=r"arm must be one of \('rank1', 'flat1d', 'dense'\)"):
        build_model("vgg", arm="cp")
