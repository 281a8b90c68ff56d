from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same RNG state; CPU tests stay on the CPU."""
    torch.manual_seed(0)
    yield


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute difference relative to the reference's largest magnitude."""
    y, ref = y.detach(), ref.detach()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
