"""Pure tensor math of rank-1 convolution: projection, composition, the 1-D chain.

A rank-1 filter is ``W[o] = a[o] (x) b[o] (x) c[o]`` with ``a[o]`` over input
channels, ``b[o]`` over kernel rows and ``c[o]`` over kernel columns (Kim et al.,
"Rank-1 Convolutional Neural Network", 2018). Convolving with it equals a 1x1
convolution, a depthwise ``kh x 1`` convolution and a depthwise ``1 x kw``
convolution in a row, which is what :func:`conv2d_chain` computes.

Everything here takes tensors and returns tensors: no modules, no state, no I/O.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "PADDING_MODES",
    "PROJECTION_NORMS",
    "Projection",
    "compose",
    "conv2d",
    "conv2d_chain",
    "depthwise_chain",
    "hopm_rank1",
    "normalize_factors",
    "pad_amounts",
    "project_rank1",
    "tangent_project",
]

PROJECTION_NORMS = ("keep", "rescale")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

_EPS = 1e-30
# Cold starts per spatial mode: HOPM from the truncated HOSVD alone lands in a local
# optimum for a few percent of random filters; all pairs of the top-3 vertical and
# horizontal HOSVD vectors (9 starts) matched the best of 30 random restarts on
# every random tensor we tried (tests/rank1/test_functional.py checks it).
_COLD_STARTS = 3


class Projection(NamedTuple):
    """Result of the higher-order power method on a batch of filters."""

    a: torch.Tensor  # O x C, unit norm
    b: torch.Tensor  # O x kh, unit norm
    c: torch.Tensor  # O x kw, unit norm
    sigma: torch.Tensor  # O, the rank-1 weight <W[o], a (x) b (x) c> >= 0
    n_iter: int  # iterations run until every filter converged (or the cap)


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(
            f"weight must be a 4-D tensor of shape (out_channels, in_channels, kh, kw), got {shape}"
        )
    if weight.numel() == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def _leading_vectors(m: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` leading left singular vectors of each matrix in a batch ``O x n x m``.

    Uses the eigenvectors of the small Gram matrix ``M M^T`` (n is a kernel side,
    so at most a few dozen): cheaper than a batched SVD and exact up to sign.
    Returns ``O x n x k``, leading vector first.
    """
    gram = m @ m.transpose(-1, -2)  # O x n x n
    _, vecs = torch.linalg.eigh(gram)  # eigenvalues ascend
    return vecs.flip(-1)[..., :k]


def _hosvd_starts(w: torch.Tensor, k: int = _COLD_STARTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Cold starts from the HOSVD of the two spatial modes of ``w`` (O x C x kh x kw).

    Every pair of the ``k`` leading vectors of the vertical and horizontal
    unfoldings; the first pair is the truncated-HOSVD start. Returns ``b: S x O x kh``
    and ``c: S x O x kw`` with ``S`` starts.
    """
    o, ch, kh, kw = w.shape
    vb = _leading_vectors(w.permute(0, 2, 1, 3).reshape(o, kh, ch * kw), min(k, kh))  # O x kh x kb
    vc = _leading_vectors(w.permute(0, 3, 1, 2).reshape(o, kw, ch * kh), min(k, kw))  # O x kw x kc
    b = vb.permute(2, 0, 1).repeat_interleave(vc.shape[-1], dim=0)  # S x O x kh
    c = vc.permute(2, 0, 1).repeat(vb.shape[-1], 1, 1)  # S x O x kw
    return b, c


def _power_iterations(
    w: torch.Tensor, b: torch.Tensor, c: torch.Tensor, n_iter: int, tol: float
) -> Projection:
    o, ch, kh, kw = w.shape
    wf = w.reshape(o, ch, kh * kw)
    sigma = torch.zeros(o, dtype=w.dtype, device=w.device)
    a = torch.zeros_like(w[:, :, 0, 0])
    it = 0
    # Batched matmuls rather than three-operand einsums: 4x faster on the CPU, and
    # each sweep reads W twice (for a, then for a^T W) instead of three times.
    for it in range(1, n_iter + 1):  # noqa: B007 - the count is returned
        a = _unit(torch.bmm(wf, (b[:, :, None] * c[:, None, :]).reshape(o, kh * kw, 1)).squeeze(-1))
        m = torch.bmm(a[:, None, :], wf).view(o, kh, kw)  # a^T W[o]: O x kh x kw
        b = _unit(torch.bmm(m, c[:, :, None]).squeeze(-1))
        c_raw = torch.bmm(b[:, None, :], m).squeeze(1)
        new_sigma = c_raw.norm(dim=-1)  # = <W, a(x)b(x)c> once c is the LS update
        c = _unit(c_raw)
        done = (new_sigma - sigma).abs() <= tol * new_sigma.clamp_min(_EPS)
        sigma = new_sigma
        if bool(done.all()):
            break
    return Projection(a, b, c, sigma, it)


def hopm_rank1(
    weight: torch.Tensor,
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    n_iter: int = 100,
    tol: float = 1e-6,
) -> Projection:
    """Best rank-1 approximation of every ``weight[o]`` by the higher-order power method.

    Alternating least squares for rank 1, batched over filters with einsum. Starts
    from ``factors`` (warm start; only their directions matter) or, without them,
    from every pair of the three leading HOSVD vectors of the two spatial modes,
    keeping each filter's best (cold start). The channel factor is always the exact
    least-squares update, and the first cold start is the truncated HOSVD, so the
    result is never worse than the truncated HOSVD. Stops when the rank-1 weight ``sigma`` of every filter changes
    by less than ``tol`` relative, or after ``n_iter`` sweeps. Works in float32 at
    least (float64 stays float64); returns unit factors in that precision.
    """
    _check_weight(weight)
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    w = weight.detach()
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    # Below a few ulps the change in sigma is rounding noise, not progress.
    tol = max(tol, 4 * torch.finfo(w.dtype).eps)
    o = w.shape[0]
    if factors is None:
        bs, cs = _hosvd_starts(w)
        n_starts = bs.shape[0]
        # All starts in one batch: S*O filters, then keep each filter's best start.
        p = _power_iterations(w.repeat(n_starts, 1, 1, 1), bs.flatten(0, 1), cs.flatten(0, 1), n_iter, tol)
        best = p.sigma.view(n_starts, o).argmax(dim=0)  # O
        pick = best * o + torch.arange(o, device=w.device)
        return Projection(p.a[pick], p.b[pick], p.c[pick], p.sigma[pick], p.n_iter)
    _, b, c = (f.detach().to(w.dtype) for f in factors)
    if b.shape != (o, w.shape[2]) or c.shape != (o, w.shape[3]):
        raise ValueError(
            f"factors do not match weight {tuple(w.shape)}: b {tuple(b.shape)}, c {tuple(c.shape)}"
        )
    # A zero factor (a filter that was zero at the last projection) has no
    # direction to start from: fall back to the HOSVD start for those filters.
    dead = (b.norm(dim=-1) < 1e-12) | (c.norm(dim=-1) < 1e-12)
    if bool(dead.any()):
        cold_b, cold_c = _hosvd_starts(w, k=1)
        b = torch.where(dead[:, None], cold_b[0], b)
        c = torch.where(dead[:, None], cold_c[0], c)
    return _power_iterations(w, _unit(b), _unit(c), n_iter, tol)


def normalize_factors(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Put unit factors and a per-filter scale into the canonical form.

    Convention (makes projection deterministic): the largest-magnitude entry of
    ``a[o]`` and of ``b[o]`` is positive (the sign goes to ``c[o]``), and the three
    factors share the scale equally, ``||a|| = ||b|| = ||c|| = |scale|^(1/3)``.
    """
    sa = torch.sign(a.gather(1, a.abs().argmax(dim=1, keepdim=True)))
    sb = torch.sign(b.gather(1, b.abs().argmax(dim=1, keepdim=True)))
    sa = torch.where(sa == 0, torch.ones_like(sa), sa)
    sb = torch.where(sb == 0, torch.ones_like(sb), sb)
    r = scale.abs().pow(1.0 / 3.0)[:, None]
    sign = torch.sign(scale)[:, None]
    return _unit(a) * sa * r, _unit(b) * sb * r, _unit(c) * sa * sb * sign * r


def project_rank1(
    weight: torch.Tensor,
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    n_iter: int = 100,
    norm: str = "keep",
    tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factors ``(a, b, c)`` of the best rank-1 approximation of every filter.

    ``weight``: ``O x C x kh x kw``; returns ``a: O x C``, ``b: O x kh``, ``c: O x kw``
    in the canonical form of :func:`normalize_factors` and in ``weight``'s dtype.

    ``norm="keep"`` returns the plain best approximation (its norm is smaller than
    the filter's); ``norm="rescale"`` keeps the rank-1 direction but gives each
    composed filter the Frobenius norm of the original filter, so that repeated
    projection does not shrink the network's signal.
    """
    if norm not in PROJECTION_NORMS:
        raise ValueError(f"norm must be one of {PROJECTION_NORMS}, got {norm!r}")
    p = hopm_rank1(weight, factors=factors, n_iter=n_iter, tol=tol)
    scale = p.sigma
    if norm == "rescale":
        w = weight.detach().to(p.sigma.dtype)
        scale = torch.where(p.sigma > 0, w.flatten(1).norm(dim=1), torch.zeros_like(p.sigma))
    a, b, c = normalize_factors(p.a, p.b, p.c, scale)
    return a.to(weight.dtype), b.to(weight.dtype), c.to(weight.dtype)


def compose(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The 3-D filters ``W[o] = a[o] (x) b[o] (x) c[o]``: shape ``O x C x kh x kw``."""
    return torch.einsum("oc,oh,ow->ochw", a, b, c)


def tangent_project(m: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of ``m`` (``O x C x kh x kw``) onto the tangent space of the
    rank-1 tensors at ``a (x) b (x) c``, filter by filter.

    The tangent space at ``u (x) v (x) w`` (unit factors) is spanned by the moves of one
    factor at a time, ``x (x) v (x) w + u (x) y (x) w + u (x) v (x) z``; its projection is the
    three partial contractions of ``m`` minus twice the shared core term (counted three
    times). Used on optimiser momentum after a projection: it keeps the part of the
    momentum that moves along rank-1 filters and drops the part the next projection
    would undo.
    """
    u, v, w = _unit(a.to(m.dtype)), _unit(b.to(m.dtype)), _unit(c.to(m.dtype))
    mu = torch.einsum("ochw,oh,ow->oc", m, v, w)  # m contracted with v and w: O x C
    mv = torch.einsum("ochw,oc,ow->oh", m, u, w)  # O x kh
    mw = torch.einsum("ochw,oc,oh->ow", m, u, v)  # O x kw
    core = torch.einsum("oc,oc->o", mu, u)  # <m, u (x) v (x) w>
    return (compose(mu, v, w) + compose(u, mv, w) + compose(u, v, mw)
            - 2.0 * compose(u * core[:, None], v, w))


def settings_repr(
    stride: tuple[int, int],
    padding: str | tuple[int, int],
    dilation: tuple[int, int],
    bias: bool,
    padding_mode: str,
) -> str:
    """The non-default settings of a convolution, as ``nn.Conv2d.extra_repr`` lists them
    (``", stride=(2, 2), bias=False"``; empty when all are defaults)."""
    s = ""
    if stride != (1, 1):
        s += f", stride={stride}"
    if padding not in ((0, 0), "valid"):
        s += f", padding={padding!r}"
    if dilation != (1, 1):
        s += f", dilation={dilation}"
    if not bias:
        s += ", bias=False"
    if padding_mode != "zeros":
        s += f", padding_mode={padding_mode!r}"
    return s


def pad_amounts(
    kernel_size: tuple[int, int],
    padding: str | tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((top, bottom), (left, right))`` padding, resolving ``"same"``/``"valid"``.

    ``"same"`` splits the total ``d * (k - 1)`` as torch does: the extra row or
    column of an even kernel goes to the bottom / right.
    """
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        out = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out[0], out[1]
    ph, pw = padding
    return (ph, ph), (pw, pw)


def _padded_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int],
    padding_mode: str,
    groups: int = 1,
) -> torch.Tensor:
    (top, bottom), (left, right) = pads
    if padding_mode == "zeros" and top == bottom and left == right:
        return F.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    x = F.pad(x, (left, right, top, bottom), mode=mode)
    return F.conv2d(x, weight, bias, stride, 0, dilation, groups)


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: str | tuple[int, int],
    dilation: tuple[int, int],
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Dense 2-D convolution with ``nn.Conv2d``'s padding semantics (all padding modes)."""
    pads = pad_amounts(tuple(weight.shape[2:]), padding, dilation)
    return _padded_conv(x, weight, bias, stride, pads, dilation, padding_mode)


def conv2d_chain(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: str | tuple[int, int],
    dilation: tuple[int, int],
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Convolution with rank-1 filters as three consecutive 1-D convolutions.

    ``1x1 (a) -> depthwise kh x 1 (b, H stride/padding/dilation) -> depthwise
    1 x kw (c, W stride/padding/dilation, + bias)``. Equal to :func:`conv2d` with
    ``compose(a, b, c)`` for every padding mode: a bias-free 1x1 convolution
    commutes with padding, and each 1-D pass pads only its own axis.
    """
    o, ch = a.shape
    y = F.conv2d(x, a.reshape(o, ch, 1, 1))
    return depthwise_chain(y, b, c, bias, stride, padding, dilation, padding_mode)


def depthwise_chain(
    x: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: str | tuple[int, int],
    dilation: tuple[int, int],
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """The two depthwise 1-D passes of the chain: ``kh x 1`` with ``b`` (O x kh), then
    ``1 x kw`` with ``c`` (O x kw) and the bias, on an ``N x O x H x W`` input."""
    o, kh, kw = b.shape[0], b.shape[1], c.shape[1]
    (ph, pw) = pad_amounts((kh, kw), padding, dilation)
    y = _padded_conv(
        x, b.reshape(o, 1, kh, 1), None, (stride[0], 1), (ph, (0, 0)), (dilation[0], 1),
        padding_mode, groups=o,
    )
    return _padded_conv(
        y, c.reshape(o, 1, 1, kw), bias, (1, stride[1]), ((0, 0), pw), (1, dilation[1]),
        padding_mode, groups=o,
    )
