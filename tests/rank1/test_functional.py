"""Projection math against independent references (SVD-based HOSVD, random restarts)."""

from __future__ import annotations

import pytest
import torch

from rank1 import functional as R

SHAPES = [(16, 8, 3, 3), (12, 3, 5, 5), (10, 16, 3, 5), (8, 4, 1, 7), (6, 32, 1, 1), (20, 64, 3, 3)]


def _rank1_tensor(o, ch, kh, kw, dtype=torch.float64):
    a, b, c = torch.randn(o, ch, dtype=dtype), torch.randn(o, kh, dtype=dtype), torch.randn(o, kw, dtype=dtype)
    return R.compose(a, b, c)


def _filter_err(w: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    return (w - approx).flatten(1).norm(dim=1) / w.flatten(1).norm(dim=1)


def _hosvd_reference(w: torch.Tensor) -> torch.Tensor:
    """Truncated rank-(1,1,1) HOSVD, written independently with full SVDs."""
    o, ch, kh, kw = w.shape
    u1 = torch.linalg.svd(w.reshape(o, ch, kh * kw), full_matrices=False)[0][..., 0]
    u2 = torch.linalg.svd(w.permute(0, 2, 1, 3).reshape(o, kh, ch * kw), full_matrices=False)[0][..., 0]
    u3 = torch.linalg.svd(w.permute(0, 3, 1, 2).reshape(o, kw, ch * kh), full_matrices=False)[0][..., 0]
    core = torch.einsum("ochw,oc,oh,ow->o", w, u1, u2, u3)
    return R.compose(u1 * core[:, None], u2, u3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_on_rank1_tensors(shape, dtype):
    w = _rank1_tensor(*shape, dtype=dtype)
    approx = R.compose(*R.project_rank1(w))
    assert approx.dtype == dtype
    assert float((approx - w).norm() / w.norm()) <= 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", R.PROJECTION_NORMS)
def test_idempotent(shape, norm):
    w = torch.randn(*shape, dtype=torch.float64)
    p1 = R.compose(*R.project_rank1(w, norm=norm))
    factors = R.project_rank1(p1, norm=norm)
    p2 = R.compose(*factors)
    assert float((p2 - p1).norm() / p1.norm()) <= 1e-6
    # Canonical form is a fixed point too: the factors themselves come back.
    again = R.project_rank1(p2, factors=factors, norm=norm)
    for f, g in zip(factors, again):
        torch.testing.assert_close(f, g, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_never_worse_than_truncated_hosvd(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    ours = _filter_err(w, R.compose(*R.project_rank1(w)))
    hosvd = _filter_err(w, _hosvd_reference(w))
    assert bool((ours <= hosvd + 1e-12).all()), (ours - hosvd).max()


@pytest.mark.parametrize("shape", SHAPES)
def test_near_best_of_random_restarts(shape):
    """Within 1e-3 relative of the best of 30 randomly started power methods."""
    w = torch.randn(*shape, dtype=torch.float64)
    ours = _filter_err(w, R.compose(*R.project_rank1(w, n_iter=500, tol=1e-12)))
    best = torch.full_like(ours, float("inf"))
    o, ch, kh, kw = shape
    for _ in range(30):
        init = (torch.randn(o, ch, dtype=w.dtype), torch.randn(o, kh, dtype=w.dtype), torch.randn(o, kw, dtype=w.dtype))
        best = torch.minimum(best, _filter_err(w, R.compose(*R.project_rank1(w, init, n_iter=500, tol=1e-12))))
    assert bool((ours <= best * (1 + 1e-3) + 1e-12).all()), (ours / best).max()


def test_optimality_against_exhaustive_search_for_matrices():
    """kh = kw = 1 reduces to a vector; C x kh x 1 to a matrix: the SVD is the optimum."""
    w = torch.randn(9, 6, 5, 1, dtype=torch.float64)
    approx = R.compose(*R.project_rank1(w, n_iter=500, tol=1e-14))
    s = torch.linalg.svdvals(w[..., 0])  # O x min(C, kh)
    best = (s[:, 1:].pow(2).sum(1)).sqrt() / s.pow(2).sum(1).sqrt()
    torch.testing.assert_close(_filter_err(w, approx), best, rtol=1e-6, atol=1e-9)


def test_warm_start_converges_faster_than_cold():
    w = torch.randn(64, 32, 3, 3, dtype=torch.float64)
    p = R.hopm_rank1(w, n_iter=1000, tol=1e-10)
    # One SGD-sized step away from the converged point, as between two projections.
    w2 = w + 1e-3 * torch.randn_like(w)
    warm = R.hopm_rank1(w2, factors=(p.a, p.b, p.c), n_iter=1000, tol=1e-10)
    cold = R.hopm_rank1(w2, n_iter=1000, tol=1e-10)
    assert warm.n_iter < cold.n_iter
    torch.testing.assert_close(warm.sigma, cold.sigma, rtol=1e-6, atol=1e-9)


def test_rescale_keeps_filter_norm_and_direction():
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    keep = R.compose(*R.project_rank1(w, norm="keep"))
    rescaled = R.compose(*R.project_rank1(w, norm="rescale"))
    torch.testing.assert_close(rescaled.flatten(1).norm(dim=1), w.flatten(1).norm(dim=1))
    assert bool((keep.flatten(1).norm(dim=1) < w.flatten(1).norm(dim=1)).all())
    cos = torch.nn.functional.cosine_similarity(keep.flatten(1), rescaled.flatten(1))
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_canonical_sign_and_scale():
    w = torch.randn(32, 8, 3, 3, dtype=torch.float64)
    for sign in (1.0, -1.0):
        a, b, c = R.project_rank1(sign * w)
        for f in (a, b):
            assert bool((f.gather(1, f.abs().argmax(1, keepdim=True)) > 0).all())
        torch.testing.assert_close(a.norm(dim=1), b.norm(dim=1))
        torch.testing.assert_close(a.norm(dim=1), c.norm(dim=1))
    # Deterministic: the same input gives bit-identical factors.
    for f, g in zip(R.project_rank1(w), R.project_rank1(w.clone())):
        assert torch.equal(f, g)


def test_zero_filters_stay_zero_and_warm_start_recovers():
    w = torch.randn(4, 3, 3, 3)
    w[1] = 0
    a, b, c = R.project_rank1(w)
    assert float(R.compose(a, b, c)[1].abs().max()) == 0.0
    w[1] = torch.randn(3, 3, 3)  # the filter comes back to life
    a2, b2, c2 = R.project_rank1(w, factors=(a, b, c))
    assert float(R.compose(a2, b2, c2)[1].norm()) > 0


def test_low_precision_inputs_come_back_in_their_dtype():
    w = torch.randn(8, 4, 3, 3).to(torch.bfloat16)
    a, b, c = R.project_rank1(w)
    assert a.dtype == b.dtype == c.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "weight, kwargs, match",
    [
        (torch.randn(3, 3, 3), {}, "weight must be a 4-D tensor"),
        (torch.randn(2, 3, 3, 3, 1), {}, "weight must be a 4-D tensor"),
        (torch.randn(2, 3, 3, 3), {"norm": "l2"}, r"norm must be one of \('keep', 'rescale'\)"),
        (torch.randn(2, 3, 3, 3), {"n_iter": 0}, "n_iter must be >= 1"),
        (torch.randn(0, 3, 3, 3), {}, "non-empty"),
    ],
)
def test_bad_input_is_a_clear_value_error(weight, kwargs, match):
    with pytest.raises(ValueError, match=match):
        R.project_rank1(weight, **kwargs)
