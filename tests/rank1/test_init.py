"""Every registered factor initialisation keeps the He fan-in filter norm."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rank1 import INIT_SCHEMES, Rank1Conv2d, compose, init_factors, register_init
from tests.conftest import rel_err

SHAPES = [(64, 3, 3, 3), (128, 64, 3, 3), (32, 256, 5, 5), (48, 16, 1, 7), (16, 8, 3, 5)]


@pytest.mark.parametrize("scheme", sorted(INIT_SCHEMES))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gain", [1.0, math.sqrt(2.0)])
def test_filter_norm_matches_he_fan_in(scheme, shape, gain):
    a, b, c = init_factors(scheme, *shape, gain=gain)
    w = compose(a, b, c)
    assert w.shape == shape
    mean_sq = float(w.flatten(1).norm(dim=1).pow(2).mean())
    assert mean_sq == pytest.approx(gain**2, rel=0.10)
    # He-normal's own E||W[o]||^2 over fan_in weights of variance gain^2 / fan_in:
    he = torch.empty(shape)
    nn.init.kaiming_normal_(he, a=math.sqrt(2.0 / gain**2 - 1) if gain < math.sqrt(2) else 0.0)
    assert float(he.flatten(1).norm(dim=1).pow(2).mean()) == pytest.approx(gain**2, rel=0.10)


@pytest.mark.parametrize("scheme", sorted(INIT_SCHEMES))
def test_schemes_are_seeded_and_canonical(scheme):
    torch.manual_seed(3)
    first = init_factors(scheme, 16, 8, 3, 3)
    torch.manual_seed(3)
    again = init_factors(scheme, 16, 8, 3, 3)
    for f, g in zip(first, again):
        assert torch.equal(f, g)
    a, b, _ = first
    assert bool((a.gather(1, a.abs().argmax(1, keepdim=True)) > 0).all())
    assert bool((b.gather(1, b.abs().argmax(1, keepdim=True)) > 0).all())


@pytest.mark.parametrize("scheme", sorted(INIT_SCHEMES))
def test_deep_stacks_keep_their_signal(scheme):
    """DESIGN.md: without the He rescale, a deep rank-1 stack loses its signal.

    16 rank-1 3x3 layers with ReLU keep the mean square activation within two
    orders of magnitude; the plain rank-1 projection of He kernels loses ~1e-11.
    """
    x0 = torch.randn(4, 32, 12, 12)
    x, xp = x0, x0
    with torch.no_grad():
        for _ in range(16):
            x = torch.relu(Rank1Conv2d(32, 32, 3, padding=1, bias=False, init=scheme)(x))
            he = nn.Conv2d(32, 32, 3, padding=1, bias=False)
            nn.init.kaiming_normal_(he.weight)
            xp = torch.relu(Rank1Conv2d.from_conv(he)(xp))
    kept = float(x.pow(2).mean() / x0.pow(2).mean())
    lost = float(xp.pow(2).mean() / x0.pow(2).mean())
    assert 1e-2 < kept < 1e2
    assert lost < 1e-6


def test_orthogonal_channel_factors_are_orthogonal():
    a, _, _ = init_factors("orthogonal", 16, 64, 3, 3)
    gram = (a / a.norm(dim=1, keepdim=True)) @ (a / a.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(gram, torch.eye(16), atol=1e-5, rtol=0)


def test_dirac_starts_as_a_1x1_conv():
    layer = Rank1Conv2d(6, 8, 3, padding=1, init="dirac")
    a, b, c = layer.factors
    one_by_one = nn.Conv2d(6, 8, 1)
    with torch.no_grad():
        one_by_one.weight.copy_((a * b[:, 1:2] * c[:, 1:2])[:, :, None, None])
        one_by_one.bias.copy_(layer.bias)
    x = torch.randn(2, 6, 9, 7)
    assert rel_err(layer(x), one_by_one(x)) <= 1e-6
    # Even kernels too, with "same" padding: the delta sits where "same" aligns it.
    even = Rank1Conv2d(6, 8, 4, padding="same", init="dirac", bias=False)
    a, b, c = even.factors
    ref = torch.einsum("oc,nchw->nohw", a * b[:, 1:2] * c[:, 1:2], x)
    assert rel_err(even(x), ref) <= 1e-6


def test_a_newly_registered_scheme_is_picked_up_and_rescaled():
    name = "test_ones"
    try:
        register_init(name)(lambda o, ch, kh, kw: (torch.ones(o, ch), torch.ones(o, kh), torch.ones(o, kw)))
        w = compose(*init_factors(name, 8, 4, 3, 3))
        torch.testing.assert_close(w.flatten(1).norm(dim=1), torch.full((8,), math.sqrt(2.0)))
        with pytest.raises(ValueError, match="already registered"):
            register_init(name)(lambda *a: None)
    finally:
        INIT_SCHEMES.pop(name, None)


def test_unknown_scheme_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"init must be one of \['dirac', 'hosvd', 'kaiming', 'orthogonal', 'uniform'\]"):
        init_factors("he", 4, 4, 3, 3)
