"""Measuring tools, a leaf that training, autotuning and every benchmark import.

Timing follows the usual rules: warm-up first, many repeats, the median with the
10th-90th percentile spread, and on CUDA every call between CUDA events (host time is
not device time); the thread count is recorded with every result. FLOPs and
parameters are counted with forward hooks. Nothing here asserts a speed: it measures.
"""

from __future__ import annotations

import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from rank1.layers import Flat1dConv2d, Rank1Conv2d

__all__ = [
    "Timing",
    "batch_of",
    "batched",
    "count_flops",
    "count_params",
    "keep_freed_memory",
    "layer_flops",
    "machine_info",
    "time_forward",
    "time_paired",
    "time_side_by_side",
]


_BATCH = re.compile(r"_b(\d+)$")


def batched(key: str, batch: int) -> str:
    """A latency key for one batch size: ``speedup`` -> ``speedup_b32``."""
    return f"{key}_b{batch}"


def batch_of(key: str) -> int | None:
    """The batch size of a latency key (``rank1.speedup_b32`` -> 32); None without one."""
    m = _BATCH.search(key)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Timing:
    """Latency of one forward pass in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_forward(
    fn: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    warmup: int = 3,
    repeats: int = 20,
    min_time_s: float = 0.0,
) -> Timing:
    """Median and 10/90 percentiles of ``fn(x)`` over ``repeats`` calls after warm-up.

    With ``min_time_s`` the repeats grow until that much time was measured (fast
    calls get more samples), capped at 100x ``repeats``. On CUDA each call is timed
    between CUDA events on the current stream (the device's time, launches included).
    """
    for _ in range(warmup):
        fn(x)
    _sync(x.device)
    cuda = x.device.type == "cuda"
    times: list[float] = []
    total = 0.0
    while len(times) < repeats or (total < min_time_s and len(times) < 100 * repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn(x)
            dt = time.perf_counter() - t0
        times.append(dt * 1e3)
        total += dt
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return Timing(statistics.median(times), q[0], q[-1], len(times))


def time_side_by_side(fns: dict[str, Callable[[torch.Tensor], Any]], xs: dict[str, torch.Tensor],
                      rounds: int = 3, min_time_s: float = 0.1) -> dict[str, float]:
    """Median over ``rounds`` of each function's median time, the functions interleaved round
    by round so that a drifting machine (frequency, other load) touches them alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(time_forward(fn, xs[k], warmup=2, repeats=5, min_time_s=min_time_s).median_ms)
    return {k: statistics.median(v) for k, v in samples.items()}


def time_paired(fns: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, reference: str,
                rounds: int = 7, min_time_s: float = 0.05) -> dict[str, tuple[float, float, float]]:
    """Each function's time as a ratio to ``reference``'s, paired round by round.

    Every round times all functions back to back (the order rotating, so no function is
    always first after another), and a ratio is taken within the round: drift between
    rounds cancels, which on a shared 2-core machine is most of the noise. Returns per
    function the median ratio over the rounds and its min and max (the reference: 1, 1, 1).
    """
    names = list(fns)
    ratios: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        t = {k: time_forward(fns[k], x, warmup=1, repeats=3, min_time_s=min_time_s).median_ms for k in order}
        for k in names:
            ratios[k].append(t[k] / t[reference])
    return {k: (statistics.median(v), min(v), max(v)) for k, v in ratios.items()}


_ALLOCATOR_NOTE = "glibc default"


def keep_freed_memory() -> str:
    """Stop glibc from returning freed tensors to the OS on every call.

    glibc serves blocks over its mmap threshold with fresh ``mmap`` pages and
    unmaps them on free, so every forward pass pays page faults for its
    activations. On this project's 2-core VMs that multiplied the time of two
    consecutive small depthwise convolutions by 10 (1.0 ms instead of 0.2 ms).
    Raising the mmap and trim thresholds to their maximum (32 MiB) keeps freed
    blocks in the heap, as jemalloc/tcmalloc would. Returns what was done (it is
    recorded next to benchmark results).
    """
    global _ALLOCATOR_NOTE
    if _ALLOCATOR_NOTE != "glibc default":  # done already in this process
        return _ALLOCATOR_NOTE
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_threshold, limit = -1, -3, 32 * 1024 * 1024
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(m_mmap_threshold, limit) == 1 and libc.mallopt(m_trim_threshold, 2 * limit) == 1
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        ok = False
    if ok:
        _ALLOCATOR_NOTE = "glibc, mmap/trim thresholds raised to 32/64 MiB"
    return _ALLOCATOR_NOTE


def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` (buffers such as kept factors are not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on ``x``.

    Counts convolutions (any groups; a :class:`Rank1Conv2d` as the dense conv it
    trains, a :class:`Flat1dConv2d` as its three 1-D passes) and linear layers,
    which dominate every network here; elementwise work is ignored.
    """
    total = 0

    def conv(m: nn.Module, inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // getattr(m, "groups", 1)) * kh * kw

    def flat1d(m: Flat1dConv2d, inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal total
        n, _, h_in, w_in = inp[0].shape
        h_out, w_out = out.shape[-2:]
        # 1x1 at input resolution, vertical pass to (h_out x w_in), horizontal to the output.
        total += n * m.out_channels * (
            m.in_channels * h_in * w_in + m.kernel_size[0] * h_out * w_in + m.kernel_size[1] * h_out * w_out
        )

    def linear(m: nn.Module, inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    hooks = {nn.Conv2d: conv, Rank1Conv2d: conv, Flat1dConv2d: flat1d, nn.Linear: linear}
    handles = [
        m.register_forward_hook(hooks[type(m)]) for m in model.modules() if type(m) in hooks
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def layer_flops(
    in_channels: int, out_channels: int, kernel: int, height: int, width: int, batch: int = 1
) -> tuple[int, int]:
    """``(dense, decomposed)`` multiply-accumulates of one stride-1 "same" layer."""
    pixels = batch * height * width
    dense = pixels * in_channels * out_channels * kernel * kernel
    decomposed = pixels * (in_channels * out_channels + 2 * kernel * out_channels)
    return dense, decomposed


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What a benchmark number depends on: processor, threads, torch, device."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "allocator": _ALLOCATOR_NOTE,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
