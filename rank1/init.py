"""Factor initialisation schemes for rank-1 filters, as a registry.

The best rank-1 part of a He-initialised kernel has a much smaller norm than the
kernel, so a network built from such parts loses its signal layer after layer.
Every scheme here therefore rescales each composed filter to the He (fan-in)
expected norm: ``||a[o] (x) b[o] (x) c[o]||^2 = gain^2`` for every filter, which
is exactly ``E||W[o]||^2`` of a He-normal kernel (variance ``gain^2 / fan_in``
over ``fan_in = C * kh * kw`` weights). The norm is split equally across the three
factors (see :func:`rank1.functional.normalize_factors`).

A scheme is a function ``(out_channels, in_channels, kh, kw) -> (a, b, c)`` that
returns directions (any scale); :func:`init_factors` applies the rescale. Register
a new one with :func:`register_init`; the tests exercise every registered scheme.
Schemes draw from torch's global generator, so ``torch.manual_seed`` fixes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from rank1.functional import hopm_rank1, normalize_factors

__all__ = ["INIT_SCHEMES", "InitScheme", "init_factors", "register_init"]

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
InitScheme = Callable[[int, int, int, int], Factors]

INIT_SCHEMES: dict[str, InitScheme] = {}


def register_init(name: str) -> Callable[[InitScheme], InitScheme]:
    """Decorator: add a factor initialisation scheme under ``name``."""

    def deco(fn: InitScheme) -> InitScheme:
        if name in INIT_SCHEMES:
            raise ValueError(f"init scheme {name!r} is already registered")
        INIT_SCHEMES[name] = fn
        return fn

    return deco


def init_factors(
    scheme: str,
    out_channels: int,
    in_channels: int,
    kh: int,
    kw: int,
    gain: float = math.sqrt(2.0),
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Factors:
    """Initial factors ``(a: O x C, b: O x kh, c: O x kw)`` from a registered scheme.

    Each composed filter gets Frobenius norm ``gain`` (He fan-in, ReLU gain by
    default), in the canonical sign/scale form.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {sorted(INIT_SCHEMES)}, got {scheme!r}")
    with torch.no_grad():
        a, b, c = (f.to(torch.float32) for f in INIT_SCHEMES[scheme](out_channels, in_channels, kh, kw))
        # Composed norm is the product of factor norms; rescale it to ``gain``.
        scale = torch.full((out_channels,), float(gain), dtype=torch.float32)
        a, b, c = normalize_factors(a, b, c, scale)
    dtype = dtype or torch.get_default_dtype()
    return tuple(f.to(device=device, dtype=dtype) for f in (a, b, c))  # type: ignore[return-value]


@register_init("kaiming")
def _kaiming(o: int, ch: int, kh: int, kw: int) -> Factors:
    """Independent Gaussian directions for every factor."""
    return torch.randn(o, ch), torch.randn(o, kh), torch.randn(o, kw)


@register_init("hosvd")
def _hosvd(o: int, ch: int, kh: int, kw: int) -> Factors:
    """The best rank-1 part of a He-normal kernel (then rescaled to the He norm)."""
    w = torch.randn(o, ch, kh, kw) * math.sqrt(2.0 / (ch * kh * kw))
    p = hopm_rank1(w)
    return p.a, p.b, p.c


@register_init("orthogonal")
def _orthogonal(o: int, ch: int, kh: int, kw: int) -> Factors:
    """Orthonormal channel factors across filters (as far as ``C`` allows)."""
    a = torch.empty(o, ch)
    torch.nn.init.orthogonal_(a)
    return a, torch.randn(o, kh), torch.randn(o, kw)


@register_init("uniform")
def _uniform(o: int, ch: int, kh: int, kw: int) -> Factors:
    """Factors uniform on ``[-1, 1]``."""
    return (torch.rand(o, ch) * 2 - 1, torch.rand(o, kh) * 2 - 1, torch.rand(o, kw) * 2 - 1)


@register_init("dirac")
def _dirac(o: int, ch: int, kh: int, kw: int) -> Factors:
    """Centred deltas as spatial factors: the layer starts as a 1x1 convolution.

    The centre is ``(k - 1) // 2``, the tap that "same" padding aligns with the
    output pixel for odd and even kernels alike.
    """
    b = torch.zeros(o, kh)
    b[:, (kh - 1) // 2] = 1.0
    c = torch.zeros(o, kw)
    c[:, (kw - 1) // 2] = 1.0
    return torch.randn(o, ch), b, c
