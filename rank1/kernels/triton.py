"""A fused Triton kernel for the two depthwise 1-D passes of a decomposed rank-1 layer.

The chain runs ``kh x 1`` (``b``) and then ``1 x kw`` (``c``) as two depthwise
convolutions, so the activation crosses memory twice more than it needs to. Here one
program loads a block of output positions of a few channel planes, reads the input
window it needs (the tile and its halo, served from cache after the first touch),
applies the vertical taps and then the horizontal ones in registers with fp32
accumulation, adds the bias, and writes the output once: one read and one write of
the activation instead of two of each.

For **inference benchmarking only**: there is no backward kernel (under autograd the
module computes the same function with ``F.conv2d``), and the module is opaque to
``torch.jit``, ``torch.export`` and ONNX — export the ``chain`` or ``dw2d`` forms.

Triton is imported lazily: ``import rank1`` never needs triton or CUDA. The kernel
runs on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported), which the tests use.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import torch
from torch import nn

from rank1 import functional as R
from rank1.kernels.library import _pointwise, layer_cost
from rank1.kernels.registry import Geometry, Kernel, register_kernel

__all__ = [
    "TritonDepthwise1d", "available", "interpreter_enabled", "launch_plan", "rank1_depthwise", "unavailable_reason",
]

_BLOCK = 1024  # output elements per program (channel planes x positions)
_NUM_WARPS = 8  # 4 outputs per thread: k x k loads in flight without spilling registers


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks triton to run kernels on the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the kernel cannot run (on ``device``, or on any device when None); None when it can."""
    if not _triton_installed():
        return "triton is not installed"
    dev = None if device is None else torch.device(device)
    if dev is not None and dev.type not in ("cuda", "cpu"):
        return f"the triton kernel runs on cuda (or cpu under TRITON_INTERPRET=1), not {dev.type}"
    cpu_ok = interpreter_enabled()
    cuda_ok = torch.cuda.is_available()
    if dev is None:
        return None if (cpu_ok or cuda_ok) else "no CUDA device and TRITON_INTERPRET is not set"
    if dev.type == "cpu" and not cpu_ok:
        return "a cpu tensor needs Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)"
    if dev.type == "cuda" and not cuda_ok:
        return "CUDA is not available"
    return None


def available(device: torch.device | str | None = None) -> bool:
    """Whether the fused kernel can run (on ``device``, or anywhere when None)."""
    return unavailable_reason(device) is None


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    """The jitted kernel, built on first use (importing triton is deferred until then)."""
    import triton
    import triton.language as tl

    @triton.jit
    def rank1_dw_kernel(
        x_ptr, b_ptr, c_ptr, bias_ptr, y_ptr,
        NC, C, sxn, sxc, syn, syc,
        SXH: tl.constexpr, SXW: tl.constexpr, SYH: tl.constexpr, SYW: tl.constexpr,
        H: tl.constexpr, W: tl.constexpr, H_OUT: tl.constexpr, W_OUT: tl.constexpr,
        PAD_H: tl.constexpr, PAD_W: tl.constexpr,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        DH: tl.constexpr, DW: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_NC: tl.constexpr, BLOCK_HW: tl.constexpr,
    ):
        # A tile of BLOCK_NC channel planes (rows) x BLOCK_HW flattened output positions.
        nc = tl.program_id(0) * BLOCK_NC + tl.arange(0, BLOCK_NC)[:, None]  # BLOCK_NC x 1
        p = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, :]  # 1 x BLOCK_HW
        nc_ok = nc < NC
        p_ok = p < H_OUT * W_OUT
        oh = p // W_OUT
        ow = p % W_OUT
        ch = nc % C
        n = (nc // C).to(tl.int64)
        ih0 = oh * SH - PAD_H  # top-left input position of each output's window
        iw0 = ow * SW - PAD_W
        # One pointer per output; every tap is then base + a compile-time offset (the in-plane
        # strides are constexpr), which keeps the address arithmetic out of the tap loop.
        base = x_ptr + (n * sxn + ch.to(tl.int64) * sxc) + (ih0 * SXH + iw0 * SXW)  # BLOCK_NC x BLOCK_HW
        acc = tl.zeros([BLOCK_NC, BLOCK_HW], dtype=tl.float32)
        for j in tl.static_range(KW):
            iw = iw0 + j * DW
            col_ok = nc_ok & p_ok & (iw >= 0) & (iw < W)
            v = tl.zeros([BLOCK_NC, BLOCK_HW], dtype=tl.float32)
            for i in tl.static_range(KH):  # the vertical pass, at this horizontal tap
                ih = ih0 + i * DH
                ok = col_ok & (ih >= 0) & (ih < H)
                xv = tl.load(base + (i * DH * SXH + j * DW * SXW), mask=ok, other=0.0).to(tl.float32)
                bi = tl.load(b_ptr + ch * KH + i, mask=nc_ok, other=0.0).to(tl.float32)  # BLOCK_NC x 1
                v += bi * xv
            cj = tl.load(c_ptr + ch * KW + j, mask=nc_ok, other=0.0).to(tl.float32)
            acc += cj * v
        if HAS_BIAS:
            acc += tl.load(bias_ptr + ch, mask=nc_ok, other=0.0).to(tl.float32)
        y_off = (n * syn + ch.to(tl.int64) * syc) + (oh * SYH + ow * SYW)
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=nc_ok & p_ok)

    return rank1_dw_kernel


def _block_hw(positions: int, block: int = _BLOCK) -> int:
    """The widest power-of-two run of positions per plane (<= block) wasting <= 1/8 of it.

    Narrow planes (8x8) get several planes per program; 56x56 = 3136 positions get 256
    (13 runs, 6% masked) rather than 1024 (4 runs, 23% masked).
    """
    width = 16
    while width < block and width < positions:
        width *= 2
    while width > 16:
        padded = -(-positions // width) * width
        if (padded - positions) * 8 <= padded:
            return width
        width //= 2
    return width


def rank1_depthwise(
    x: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: str | tuple[int, int],
    dilation: tuple[int, int],
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """:func:`rank1.functional.depthwise_chain` in one fused kernel (no autograd).

    ``x``: ``N x O x H x W`` (any strides, fp32/bf16/fp16); ``b``: ``O x kh``;
    ``c``: ``O x kw``. The output has ``x``'s dtype and memory format. Zero padding
    is done by masking inside the kernel; the other padding modes pad with ``F.pad``
    first (one extra pass, as ``nn.Conv2d`` does too).
    """
    if not (x.is_cuda and _triton_installed()):  # the per-call check stays cheap on the fast path
        reason = unavailable_reason(x.device)
        if reason is not None:
            raise RuntimeError(f"the fused triton depthwise kernel cannot run: {reason}")
    y, grid, args, meta = launch_plan(x, b, c, bias, stride, padding, dilation, padding_mode)
    if y.numel():
        _kernel()[grid](*args, **meta, num_warps=_NUM_WARPS)
    return y


def launch_plan(
    x: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: str | tuple[int, int],
    dilation: tuple[int, int],
    padding_mode: str = "zeros",
) -> tuple[torch.Tensor, tuple[int, int], tuple[Any, ...], dict[str, Any]]:
    """``(output, grid, runtime args, constexprs)`` of one launch, checked, without launching
    (the tests also compile the kernel for a GPU from it, on a machine without one)."""
    if x.dim() != 4:
        raise ValueError(f"x must be N x C x H x W, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    o, kh, kw = b.shape[0], b.shape[1], c.shape[1]
    if x.shape[1] != o or c.shape[0] != o:
        raise ValueError(f"x has {x.shape[1]} channels, b {o} and c {c.shape[0]}: they must match")
    (top, bottom), (left, right) = R.pad_amounts((kh, kw), padding, dilation)
    if padding_mode != "zeros" and (top or bottom or left or right):
        x = torch.nn.functional.pad(x, (left, right, top, bottom), mode=padding_mode)
        top = bottom = left = right = 0
    n, _, h, w = x.shape
    sh, sw = stride
    dh, dw = dilation
    h_out = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(f"input {h}x{w} is too small for kernel {kh}x{kw} with these padding/dilation")
    # In-plane offsets stay in int32: fine below 2**31 elements per plane.
    if max(abs(s) for s in x.stride()[2:]) * max(h, w) >= 2**31:
        raise ValueError("a single channel plane is too large for the fused kernel")
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    y = torch.empty((n, o, h_out, w_out), device=x.device, dtype=x.dtype, memory_format=fmt)
    # Factors go in as they are (the kernel widens them to fp32): no conversion launches per call.
    b, c = b.detach().to(x.device).contiguous(), c.detach().to(x.device).contiguous()
    bias = None if bias is None else bias.detach().to(x.device).contiguous()
    block_hw = _block_hw(h_out * w_out)
    block_nc = max(1, _BLOCK // block_hw)
    grid = (-(-n * o // block_nc), -(-h_out * w_out // block_hw))
    args = (x, b, c, b if bias is None else bias, y, n * o, o, x.stride(0), x.stride(1), y.stride(0), y.stride(1))
    meta = dict(SXH=x.stride(2), SXW=x.stride(3), SYH=y.stride(2), SYW=y.stride(3),
                H=h, W=w, H_OUT=h_out, W_OUT=w_out, PAD_H=top, PAD_W=left,
                KH=kh, KW=kw, SH=sh, SW=sw, DH=dh, DW=dw, HAS_BIAS=bias is not None,
                BLOCK_NC=block_nc, BLOCK_HW=block_hw)
    return y, grid, args, meta


class TritonDepthwise1d(nn.Module):
    """The depthwise stage of a decomposed rank-1 layer as one fused Triton kernel.

    Replaces the ``vertical`` (``kh x 1``, ``b``) and ``horizontal`` (``1 x kw``, ``c``,
    bias) depthwise convolutions of ``decompose(impl="chain")``; same stride, padding,
    dilation and padding mode semantics as ``nn.Conv2d``. Inference benchmarking
    only (see the module docstring): under autograd it falls back to ``F.conv2d``.
    """

    def __init__(
        self,
        b: torch.Tensor,
        c: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride: tuple[int, int] = (1, 1),
        padding: str | tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if b.dim() != 2 or c.dim() != 2 or b.shape[0] != c.shape[0]:
            raise ValueError(f"b and c must be O x kh and O x kw, got {tuple(b.shape)} and {tuple(c.shape)}")
        if padding_mode not in R.PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {R.PADDING_MODES}, got {padding_mode!r}")
        self.channels, self.kernel_size = b.shape[0], (b.shape[1], c.shape[1])
        self.stride, self.padding, self.dilation = tuple(stride), padding, tuple(dilation)
        self.padding_mode = padding_mode
        # Buffers, not parameters: nothing here is trained, and .to(dtype) still converts them.
        self.register_buffer("b", b.detach().clone())
        self.register_buffer("c", c.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (self.b, self.c, self.bias, self.stride, self.padding, self.dilation, self.padding_mode)
        if torch.is_grad_enabled() and x.requires_grad:  # no backward kernel: stay differentiable
            return R.depthwise_chain(x, *args)
        return rank1_depthwise(x, *args)

    def extra_repr(self) -> str:
        s = f"{self.channels}, kernel_size={self.kernel_size}"
        return s + R.settings_repr(self.stride, self.padding, self.dilation, self.bias is not None, self.padding_mode)


def _build(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, g: Geometry) -> nn.Module:
    seq = nn.Sequential()
    seq.add_module("pointwise", _pointwise(a))
    seq.add_module("spatial", TritonDepthwise1d(b, c, bias, g.stride, g.padding, g.dilation, g.padding_mode))
    return seq


register_kernel(Kernel(
    "triton", _build, devices=("cuda", "cpu"), dtypes=(torch.float32, torch.bfloat16, torch.float16),
    exportable=False, calls=2, cost=layer_cost(passes=1, separable=True),  # the chain's FLOPs, dw2d's bytes
    unavailable=lambda device: unavailable_reason(device),
    auto_devices=("cuda",),  # on the CPU it runs only under the interpreter: for tests, not for speed
    doc="1x1, then both depthwise 1-D passes in one fused Triton kernel (CUDA); inference only",
))
