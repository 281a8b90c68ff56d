"""Model-level conversions between dense, rank-1, flat 1-D and decomposed forms."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from rank1.autotune import deploy, fuse_relus
from rank1.kernels import get_kernel
from rank1.layers import ALL_IMPLS, Flat1dConv2d, Rank1Conv2d

__all__ = [
    "ARMS",
    "convert_model",
    "decompose_model",
    "dense_model",
    "project_model_",
    "rank1_layers",
]

ARMS = ("rank1", "flat1d")

_Rank1Like = (Rank1Conv2d, Flat1dConv2d)


def rank1_layers(model: nn.Module) -> Iterator[tuple[str, Rank1Conv2d | Flat1dConv2d]]:
    """``(name, layer)`` for every rank-1 or flat 1-D layer, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, _Rank1Like):
            yield name, m


def _replace(model: nn.Module, fn: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Replace every submodule for which ``fn`` returns a module (in place)."""
    for name, child in list(model.named_children()):
        new = fn(child)
        if new is not None:
            setattr(model, name, new)
        else:
            _replace(child, fn)
    root = fn(model)
    return root if root is not None else model


def _is_spatial_conv(m: nn.Module) -> bool:
    return (
        type(m) is nn.Conv2d
        and m.groups == 1
        and m.kernel_size[0] * m.kernel_size[1] > 1
    )


def convert_model(
    model: nn.Module,
    arm: str = "rank1",
    init: str | None = None,
    projection_norm: str = "keep",
    inplace: bool = False,
) -> nn.Module:
    """Replace every ``nn.Conv2d`` with a spatial kernel by the arm's layer.

    ``arm="rank1"`` gives :class:`Rank1Conv2d`, ``arm="flat1d"`` :class:`Flat1dConv2d`.
    Each layer starts from the conv's own weights projected to rank-1 (with
    ``projection_norm``), or from fresh factors of the scheme ``init`` when given.
    1x1 and grouped convolutions are left as they are. Returns a copy unless
    ``inplace``.
    """
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    if not inplace:
        model = copy.deepcopy(model)

    def fn(m: nn.Module) -> nn.Module | None:
        if not _is_spatial_conv(m):
            return None
        layer = Rank1Conv2d.from_conv(m, init=init, projection_norm=projection_norm)
        return layer if arm == "rank1" else Flat1dConv2d.from_rank1(layer)

    return _replace(model, fn)


@torch.no_grad()
def project_model_(model: nn.Module) -> dict[str, float]:
    """Project every :class:`Rank1Conv2d` of ``model`` in place.

    Returns each layer's residual just before its projection, keyed by module name.
    """
    return {
        name: float(layer.project_())
        for name, layer in rank1_layers(model)
        if isinstance(layer, Rank1Conv2d)
    }


def decompose_model(
    model: nn.Module,
    impl: str = "chain",
    example: torch.Tensor | None = None,
    cache: Path | None = None,
) -> nn.Module:
    """A copy of ``model`` with every rank-1 layer replaced by its 1-D form; ``model`` is not
    changed (a :class:`Rank1Conv2d` is decomposed from the rank-1 projection of its weight).

    ``impl``: a kernel of :data:`rank1.kernels.KERNELS` for every layer — ``"chain"`` (1x1,
    kx1, 1xk) or ``"dw2d"`` (1x1, one depthwise kxk), both standard torch modules that
    trace, export and convert to ONNX; ``"cpp"`` (a fused C++ CPU kernel), ``"cpp_lib"`` (the
    same kernel with the library's 1x1) or ``"triton"`` (a fused Triton kernel, CUDA),
    inference only — or ``"auto"``: the fastest form of *this
    network* on ``example`` (its device, dtype and shape), measured and cached
    (:func:`rank1.autotune.plan_model`), returned as a :class:`rank1.autotune.DeployedModel`
    that carries its plan (which kernel each layer got, the memory format, a CUDA graph).
    Without ``example``, "auto" uses the device's measured default (:data:`rank1.autotune.DEFAULTS`)
    and warns that it did. "auto" may pick kernels that do not export: pass ``"chain"`` or
    ``"dw2d"`` to export. Every choice computes the same function, in eval mode.
    """
    allowed = (*ALL_IMPLS, "auto")
    if impl not in allowed:
        raise ValueError(f"impl must be one of {allowed}, got {impl!r}")
    if impl == "auto":
        return deploy(model, example, cache)
    get_kernel(impl)  # unavailable here (triton without CUDA, cpp without a compiler): a ValueError
    out = copy.deepcopy(model)
    for name, layer in list(rank1_layers(out)):
        new = layer.decompose(impl=impl)
        if not name:  # the model is a single rank-1 layer
            return new.eval()
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, child, new)
    return fuse_relus(out).eval()  # cpp: each following ReLU in the layer's own store


def dense_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every rank-1 layer as an ``nn.Conv2d`` of its composed
    weight: the same function, in the dense form (the speed and FLOP reference)."""
    out = _replace(copy.deepcopy(model), lambda m: m.dense_conv() if isinstance(m, _Rank1Like) else None)
    return out.eval()
