"""Both arms' layers against torch's own nn.Conv2d, over the whole geometry grid."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from rank1 import Flat1dConv2d, Rank1Conv2d, compose
from rank1.functional import PADDING_MODES
from tests.conftest import rel_err

KERNELS = [1, 3, 5, (3, 5), (1, 7)]
STRIDES = [1, 2, (2, 1)]
PADDINGS = [0, 1, (2, 1), "same", "valid"]
DILATIONS = [1, 2]
INPUTS = [(1, 17, 15), (4, 16, 19)]  # (batch, H, W): non-square, odd and even sides


def _reference(layer, weight: torch.Tensor) -> nn.Conv2d:
    """torch's own conv with the composed weight: the ground truth for every mode."""
    ref = nn.Conv2d(
        layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
        layer.dilation, bias=layer.bias is not None, padding_mode=layer.padding_mode,
    )
    with torch.no_grad():
        ref.weight.copy_(weight)
        if layer.bias is not None:
            ref.bias.copy_(layer.bias)
    return ref


@pytest.mark.parametrize(
    "kernel, stride, padding",
    [c for c in itertools.product(KERNELS, STRIDES, PADDINGS) if not (c[2] == "same" and c[1] != 1)],
)
def test_decomposition_is_exact_over_the_grid(kernel, stride, padding):
    for dilation, mode, bias, (n, h, w) in itertools.product(DILATIONS, PADDING_MODES, (True, False), INPUTS):
        x = torch.randn(n, 5, h, w)
        rank1 = Rank1Conv2d(5, 6, kernel, stride, padding, dilation, bias=bias, padding_mode=mode)
        with torch.no_grad():  # move off rank-1, as training does, then project
            rank1.weight.add_(0.1 * torch.randn_like(rank1.weight))
        rank1.project_()
        ref = _reference(rank1, compose(*rank1.factors))
        with torch.no_grad():
            expected = ref(x)
            assert rel_err(rank1(x), expected) <= 1e-5, (dilation, mode, bias)
            assert rel_err(rank1.decompose()(x), expected) <= 1e-5, (dilation, mode, bias)

            flat = Flat1dConv2d(5, 6, kernel, stride, padding, dilation, bias=bias, padding_mode=mode)
            expected = _reference(flat, flat.dense_weight())(x)
            assert rel_err(flat(x), expected) <= 1e-5, (dilation, mode, bias)
            assert rel_err(flat.decompose()(x), expected) <= 1e-5, (dilation, mode, bias)


def test_decompose_uses_only_standard_modules():
    seq = Rank1Conv2d(4, 8, 3, padding=1).decompose()
    assert [type(m) for m in seq] == [nn.Conv2d, nn.Conv2d, nn.Conv2d]
    assert [m.groups for m in seq] == [1, 8, 8]
    assert [m.kernel_size for m in seq] == [(1, 1), (3, 1), (1, 3)]


def test_decompose_projects_a_copy_and_leaves_the_layer_alone():
    layer = Rank1Conv2d(4, 8, 3, padding=1)
    with torch.no_grad():
        layer.weight.add_(0.2 * torch.randn_like(layer.weight))
    before = layer.weight.detach().clone()
    x = torch.randn(2, 4, 9, 9)
    y = layer.decompose()(x)
    assert torch.equal(layer.weight, before)
    layer.project_()
    assert rel_err(y, layer(x).detach()) <= 1e-5


def test_project_returns_residual_keeps_factors_and_makes_weight_rank1():
    layer = Rank1Conv2d(6, 10, 3, padding=1, init="hosvd")
    assert float(layer.rank1_residual()) < 1e-5  # starts exactly rank-1
    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn_like(layer.weight))
    expected = float(layer.rank1_residual())
    assert expected > 0.05
    got = float(layer.project_())
    assert got == pytest.approx(expected, rel=1e-4)
    torch.testing.assert_close(layer.weight.detach(), compose(*layer.factors))
    assert float(layer.rank1_residual()) < 1e-5
    # The factors travel in the state dict, so a resumed run warm-starts identically.
    assert {"weight", "bias", "a", "b", "c"} <= set(layer.state_dict())


def test_rescale_projection_keeps_filter_norms():
    layer = Rank1Conv2d(6, 10, 3, padding=1, projection_norm="rescale")
    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn_like(layer.weight))
    norms = layer.weight.detach().flatten(1).norm(dim=1)
    layer.project_()
    torch.testing.assert_close(layer.weight.detach().flatten(1).norm(dim=1), norms)


def test_from_conv_on_a_rank1_conv_is_the_same_function():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect")
    with torch.no_grad():
        conv.weight.copy_(compose(torch.randn(6, 4), torch.randn(6, 3), torch.randn(6, 3)))
    layer = Rank1Conv2d.from_conv(conv)
    x = torch.randn(2, 4, 11, 13)
    assert rel_err(layer(x).detach(), conv(x).detach()) <= 1e-5
    assert (layer.stride, layer.padding, layer.padding_mode) == ((2, 2), (1, 1), "reflect")


def test_from_conv_with_init_draws_fresh_factors():
    conv = nn.Conv2d(4, 6, 3)
    layer = Rank1Conv2d.from_conv(conv, init="dirac")
    assert layer.init == "dirac"
    assert float(layer.b[:, 1].abs().min()) > 0 and float(layer.b[:, [0, 2]].abs().max()) == 0


def test_flat1d_twin_starts_as_the_identical_function():
    rank1 = Rank1Conv2d(5, 7, (3, 5), padding="same", padding_mode="circular", init="orthogonal")
    flat = Flat1dConv2d.from_rank1(rank1)
    x = torch.randn(3, 5, 12, 10)
    assert rel_err(flat(x).detach(), rank1(x).detach()) <= 1e-5
    assert [n for n, _ in flat.named_parameters()] == ["a", "b", "c", "bias"]
    assert [n for n, _ in rank1.named_parameters()] == ["weight", "bias"]


@pytest.mark.parametrize("cls", [Rank1Conv2d, Flat1dConv2d])
def test_gradcheck_float64(cls):
    layer = cls(3, 4, (3, 2), stride=(2, 1), padding=1, padding_mode="reflect", dtype=torch.float64)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("cls", [Rank1Conv2d, Flat1dConv2d])
def test_device_dtype_and_repr(cls):
    layer = cls(3, 4, 3, padding=1, bias=False, dtype=torch.float64, init="uniform")
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    text = repr(layer)
    assert "3, 4, kernel_size=(3, 3)" in text and "bias=False" in text and "init='uniform'" in text
    assert "stride" not in text  # defaults are not shown


@pytest.mark.parametrize("cls", [Rank1Conv2d, Flat1dConv2d])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"groups": 2}, r"groups must be 1 .*allowed: 1.*got 2"),
        ({"kernel_size": (0, 3)}, r"kernel_size must be >= 1 on both axes, got \(0, 3\)"),
        ({"kernel_size": (3, 0)}, r"kernel_size must be >= 1"),
        ({"init": "xavier"}, r"init must be one of \[.*'dirac'.*'kaiming'.*\], got 'xavier'"),
        ({"padding_mode": "mirror"}, r"padding_mode must be one of .*'reflect'.*got 'mirror'"),
        ({"padding": "full"}, r"padding must be 'same', 'valid' or int\(s\), got 'full'"),
        ({"padding": "same", "stride": 2}, r"padding='same' needs stride 1"),
        ({"stride": 0}, r"stride must be >= 1"),
        ({"in_channels": 0}, r"in_channels must be a positive int"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(cls, kwargs, match):
    args = {"in_channels": 3, "out_channels": 4, "kernel_size": 3} | kwargs
    with pytest.raises(ValueError, match=match):
        cls(**args)


def test_unknown_projection_norm_is_a_clear_error():
    with pytest.raises(ValueError, match=r"projection_norm must be one of \('keep', 'rescale'\), got 'l1'"):
        Rank1Conv2d(3, 4, 3, projection_norm="l1")
