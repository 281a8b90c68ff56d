"""A roofline for every layer shape: what each implementation could reach on this machine.

The machine's peak is measured in the same run (a large GEMM for arithmetic, a large
copy for memory bandwidth); each implementation's lower-bound time is
``max(FLOPs / peak, bytes moved / bandwidth)``, counting every pass over the
activations (a read and a write per convolution) and the weights once. The fraction
of that bound a measurement reaches says how much is left to gain — and, for the
memory-bound decomposed layers at large images, that fewer passes over memory, not
fewer FLOPs, is the way forward.

At small shapes a second floor dominates: every convolution call costs a fixed few
microseconds of dispatch and allocation (:func:`measure_call_floor`), which the
decomposed form pays two or three times; :func:`bound_with_calls_ms` adds it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from rank1.kernels import KERNELS

__all__ = ["CALLS", "Peaks", "bound_with_calls_ms", "impl_cost", "measure_call_floor", "measure_peaks"]


@dataclass(frozen=True)
class Peaks:
    gflops: float  # fp32 multiply-add throughput, counted as 2 FLOPs per MAC
    gbytes_per_s: float  # copy bandwidth, bytes read + written
    call_ms: float = 0.0  # the fixed cost of one conv call that does almost no work

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# Framework calls per forward of each implementation (the registry's), and of the
# tensorly-torch CP peer the grid compares with (1x1, two depthwise 1-D, 1x1).
CALLS = {**{name: k.calls for name, k in KERNELS.items()}, "cp": 4}


def _best_time(fn, repeats: int, device: torch.device) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


@torch.inference_mode()
def measure_peaks(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  gemm: int = 2048, copy_mb: int = 256, repeats: int = 5) -> Peaks:
    """Best-of-``repeats`` GEMM throughput and copy bandwidth on ``device``."""
    device = torch.device(device)
    a = torch.randn(gemm, gemm, device=device, dtype=dtype)
    b = torch.randn(gemm, gemm, device=device, dtype=dtype)
    t = _best_time(lambda: torch.mm(a, b), repeats, device)
    flops = 2 * gemm**3 / t
    n = copy_mb * 1024 * 1024 // torch.finfo(dtype).bits * 8
    src = torch.randn(n, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), repeats, device)
    bw = 2 * src.numel() * src.element_size() / t
    return Peaks(flops / 1e9, bw / 1e9, measure_call_floor(device))


@torch.inference_mode()
def measure_call_floor(device: torch.device | str = "cpu", calls: int = 200, repeats: int = 5) -> float:
    """Milliseconds per call of a 1x1 conv on a 1x1x1x1 input: the dispatch, allocation
    and launch cost every convolution pays however small, which the roofline ignores."""
    device = torch.device(device)
    conv = torch.nn.Conv2d(1, 1, 1).to(device).eval()
    x = torch.randn(1, 1, 1, 1, device=device)

    def many() -> None:
        for _ in range(calls):
            conv(x)

    return 1e3 * _best_time(many, repeats, device) / calls


def bound_with_calls_ms(impl: str, bound: float, peaks: Peaks) -> float:
    """The roofline bound plus the fixed cost of the implementation's calls: a floor no
    framework-level implementation of the layer gets under."""
    return bound + CALLS[impl] * peaks.call_ms


def impl_cost(impl: str, c_in: int, c_out: int, k: int, h: int, w: int, batch: int,
              bytes_per: int = 4) -> tuple[float, float]:
    """``(FLOPs, bytes moved)`` of one stride-1 "same" layer under ``impl``: a registered
    kernel's own cost (:attr:`rank1.kernels.Kernel.cost`), or ``cp``, tensorly-torch's
    factorized CP convolution at rank ``c_out`` (1x1 in, two depthwise 1-D passes, 1x1 out)."""
    if impl in KERNELS:
        return KERNELS[impl].cost(c_in, c_out, k, h, w, batch, bytes_per)
    if impl == "cp":
        px, r = batch * h * w, c_out
        macs = px * (c_in * r + 2 * k * r + r * c_out)
        acts, weights = px * c_in + 6 * px * r + px * c_out, r * (c_in + 2 * k + c_out)
        return 2.0 * macs, float((acts + weights) * bytes_per)
    raise ValueError(f"impl must be one of {', '.join([*KERNELS, 'cp'])}; got {impl!r}")


def bound_ms(flops: float, nbytes: float, peaks: Peaks) -> float:
    """The roofline lower bound in milliseconds."""
    return 1e3 * max(flops / (peaks.gflops * 1e9), nbytes / (peaks.gbytes_per_s * 1e9))
