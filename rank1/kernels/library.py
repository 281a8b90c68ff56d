"""The library implementations: standard ``nn.Conv2d`` modules only, so they trace, export
and convert to ONNX, on any device and dtype torch supports.

* ``chain``: 1x1 (C->O) -> depthwise ``kh x 1`` -> depthwise ``1 x kw``: the fewest FLOPs.
* ``dw2d``: 1x1 -> one depthwise ``kh x kw`` carrying the rank-1 spatial kernel ``b (x) c``:
  ``kh*kw`` instead of ``kh+kw`` multiply-adds per output, one pass over the activation
  instead of two, which wins where the layer is memory-bound.
* ``dense``: the composed kernel as one ``kh x kw`` conv: where per-call overhead
  dominates (few channels, small images, batch 1) it beats every 1-D form.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rank1.functional import compose
from rank1.kernels.registry import Geometry, Kernel, register_kernel

__all__ = ["empty_conv", "layer_cost"]


def empty_conv(*args: Any, device: Any = None, dtype: Any = None, **kwargs: Any) -> nn.Conv2d:
    """An ``nn.Conv2d`` with uninitialised weights, built without touching the RNG.

    Building on the meta device skips ``reset_parameters``, so converting or
    decomposing a model mid-training never shifts the random stream of the run.
    """
    with torch.random.fork_rng(devices=[]):
        conv = nn.Conv2d(*args, device="meta", **kwargs)
    return conv.to_empty(device=device or "cpu").to(dtype=dtype)


def _pointwise(a: torch.Tensor) -> nn.Conv2d:
    o, ch = a.shape
    conv = empty_conv(ch, o, 1, bias=False, device=a.device, dtype=a.dtype)
    with torch.no_grad():
        conv.weight.copy_(a.reshape(o, ch, 1, 1))
    return conv


def _seq(**modules: nn.Module) -> nn.Sequential:
    seq = nn.Sequential()
    for name, m in modules.items():
        seq.add_module(name, m)
    return seq


def build_chain(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None,
                g: Geometry) -> nn.Module:
    o, kh, kw = a.shape[0], b.shape[1], c.shape[1]
    kw_args = dict(device=a.device, dtype=a.dtype)
    if isinstance(g.padding, str):
        ph = pw = g.padding
    else:
        ph, pw = (g.padding[0], 0), (0, g.padding[1])
    vertical = empty_conv(o, o, (kh, 1), stride=(g.stride[0], 1), padding=ph, dilation=(g.dilation[0], 1), groups=o,
                          bias=False, padding_mode=g.padding_mode, **kw_args)
    horizontal = empty_conv(o, o, (1, kw), stride=(1, g.stride[1]), padding=pw, dilation=(1, g.dilation[1]),
                            groups=o, bias=bias is not None, padding_mode=g.padding_mode, **kw_args)
    with torch.no_grad():
        vertical.weight.copy_(b.reshape(o, 1, kh, 1))
        horizontal.weight.copy_(c.reshape(o, 1, 1, kw))
        if bias is not None:
            horizontal.bias.copy_(bias)
    return _seq(pointwise=_pointwise(a), vertical=vertical, horizontal=horizontal)


def build_dw2d(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None,
               g: Geometry) -> nn.Module:
    o, kh, kw = a.shape[0], b.shape[1], c.shape[1]
    spatial = empty_conv(o, o, (kh, kw), stride=g.stride, padding=g.padding, dilation=g.dilation, groups=o,
                         bias=bias is not None, padding_mode=g.padding_mode, device=a.device, dtype=a.dtype)
    with torch.no_grad():
        spatial.weight.copy_(torch.einsum("oh,ow->ohw", b, c).reshape(o, 1, kh, kw))
        if bias is not None:
            spatial.bias.copy_(bias)
    return _seq(pointwise=_pointwise(a), spatial=spatial)


def build_dense(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None,
                g: Geometry) -> nn.Module:
    o, ch, kh, kw = a.shape[0], a.shape[1], b.shape[1], c.shape[1]
    conv = empty_conv(ch, o, (kh, kw), g.stride, g.padding, g.dilation, bias=bias is not None,
                      padding_mode=g.padding_mode, device=a.device, dtype=a.dtype)
    with torch.no_grad():
        conv.weight.copy_(compose(a, b, c))
        if bias is not None:
            conv.bias.copy_(bias)
    return conv.eval()


def layer_cost(passes: int, separable: bool, dense: bool = False):
    """The roofline cost of a stride-1 "same" layer: the 1x1's multiply-adds plus the spatial
    ones (``2k`` separable, ``k^2`` as one kxk; all of ``C*O*k^2`` dense), bytes of
    ``passes`` reads and writes of the ``O``-channel activation after the input's read
    (a pass = one write then one read of it), and the weights once."""

    def cost(c_in: int, c_out: int, k: int, h: int, w: int, batch: int, bytes_per: int = 4) -> tuple[float, float]:
        px = batch * h * w
        if dense:
            macs, acts, weights = px * c_in * c_out * k * k, px * (c_in + c_out), c_in * c_out * k * k
        else:
            spatial = 2 * k if separable else k * k
            macs = px * (c_in * c_out + spatial * c_out)
            acts, weights = px * c_in + (1 + 2 * passes) * px * c_out, c_out * (c_in + spatial)
        return 2.0 * macs, float((acts + weights) * bytes_per)

    return cost


_ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
register_kernel(Kernel("chain", build_chain, ("cpu", "cuda"), _ALL_DTYPES, exportable=True, calls=3,
                       cost=layer_cost(passes=2, separable=True),  # three reads, three writes
                       doc="1x1 -> depthwise kh x 1 -> depthwise 1 x kw: the fewest FLOPs"))
register_kernel(Kernel("dw2d", build_dw2d, ("cpu", "cuda"), _ALL_DTYPES, exportable=True, calls=2,
                       cost=layer_cost(passes=1, separable=False),
                       doc="1x1 -> one depthwise kh x kw (b (x) c): one pass over the activation fewer"))
register_kernel(Kernel("dense", build_dense, ("cpu", "cuda"), _ALL_DTYPES, exportable=True, calls=1,
                       cost=layer_cost(passes=0, separable=False, dense=True), decomposed=False,
                       doc="the composed kernel as one kh x kw conv: the dense FLOPs in one call"))
