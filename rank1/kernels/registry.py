"""One record per implementation of a decomposed rank-1 layer, and one way to find them.

A rank-1 layer ``W[o] = a[o] (x) b[o] (x) c[o]`` can run as library convolutions in two
arrangements, as a fused C++ CPU kernel, as a fused Triton kernel, or as the composed
dense conv. Each is a :class:`Kernel`: how to build its module from the factors, where
and in which dtypes it is fast, whether it can run here (and why not), whether it
exports, how many framework calls a forward costs and its roofline cost. The layer
builder, ``auto``, the roofline, the benchmark grid and the GPU script all read
:data:`KERNELS`; a new kernel is one file that calls :func:`register_kernel`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "KERNELS", "Geometry", "Kernel", "available_kernels", "get_kernel", "kernel_names", "register_kernel",
]


class Geometry(NamedTuple):
    """A layer's ``nn.Conv2d`` geometry, as every kernel's builder takes it."""

    stride: tuple[int, int]
    padding: str | tuple[int, int]
    dilation: tuple[int, int]
    padding_mode: str = "zeros"


Builder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", Geometry], nn.Module]
# (c_in, c_out, k, h, w, batch, bytes_per_element) -> (FLOPs, bytes moved) of a stride-1 "same" layer
Cost = Callable[[int, int, int, int, int, int, int], tuple[float, float]]


@dataclass(frozen=True)
class Kernel:
    """What one implementation is and can do."""

    name: str
    build: Builder  # (a: O x C, b: O x kh, c: O x kw, bias, geometry) -> the inference module
    devices: tuple[str, ...]  # device types it runs on
    dtypes: tuple[torch.dtype, ...]  # dtypes it runs fast (others compute the same function more slowly)
    exportable: bool  # standard torch modules only: jit.trace, torch.export and ONNX work
    calls: int  # framework calls (kernel launches from Python) per forward
    cost: Cost
    unavailable: Callable[[torch.device | None], str | None] = lambda device: None  # why not here; None: it can
    layout: str = "any"  # "channels_last": computes in and returns channels-last whatever it is given
    auto_devices: tuple[str, ...] | None = None  # where `auto` measures it (default: ``devices``)
    decomposed: bool = True  # False for the composed dense conv (one kxk conv, the dense FLOPs)
    doc: str = ""

    def unavailable_reason(self, device: torch.device | str | None = None) -> str | None:
        """Why this kernel cannot run on ``device`` (None: any device this process has); None when it can."""
        dev = None if device is None else torch.device(device)
        if dev is not None and dev.type not in self.devices:
            return f"{self.name} runs on {' or '.join(self.devices)}, not {dev.type}"
        return self.unavailable(dev)

    def available(self, device: torch.device | str | None = None) -> bool:
        return self.unavailable_reason(device) is None

    def auto_candidate(self, device: torch.device) -> bool:
        """Whether ``auto`` measures this kernel on ``device``."""
        return device.type in (self.auto_devices or self.devices) and self.available(device)


KERNELS: dict[str, Kernel] = {}


def register_kernel(kernel: Kernel) -> Kernel:
    """Add ``kernel`` to :data:`KERNELS` (its name must be new)."""
    if kernel.name in KERNELS:
        raise ValueError(f"kernel {kernel.name!r} is already registered")
    KERNELS[kernel.name] = kernel
    return kernel


def kernel_names(decomposed_only: bool = False) -> tuple[str, ...]:
    """Every registered name, in registration order (``decomposed_only``: without ``dense``)."""
    return tuple(n for n, k in KERNELS.items() if k.decomposed or not decomposed_only)


def get_kernel(name: str, device: torch.device | str | None = None) -> Kernel:
    """The kernel ``name``, checked to run on ``device``; a ``ValueError`` naming what is allowed otherwise."""
    if name not in KERNELS:
        raise ValueError(f"impl must be one of {kernel_names(decomposed_only=True)}, got {name!r}")
    k = KERNELS[name]
    reason = k.unavailable_reason(device)
    if reason is not None:
        raise ValueError(f"impl={name!r} is unavailable here ({reason}); allowed: {available_kernels(device)}")
    return k


def available_kernels(device: torch.device | str | None = None, decomposed_only: bool = True) -> tuple[str, ...]:
    """The names that can run on ``device`` (None: any device this process has)."""
    return tuple(n for n, k in KERNELS.items() if (k.decomposed or not decomposed_only) and k.available(device))


def describe() -> list[dict[str, Any]]:
    """The registry as plain data (for docs and result files)."""
    return [{"name": k.name, "devices": list(k.devices), "dtypes": [str(d).replace("torch.", "") for d in k.dtypes],
             "exportable": k.exportable, "calls": k.calls, "layout": k.layout, "decomposed": k.decomposed,
             "available_here": k.available(), "why_not": k.unavailable_reason(), "doc": k.doc}
            for k in KERNELS.values()]
