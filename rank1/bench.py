"""Inference measurement: FLOPs, parameters and latency of dense vs decomposed forms.

Timing follows the usual rules: warm-up first, many repeats, the median with the
10th-90th percentile spread, CUDA synchronised around each call, and the thread
count recorded with every result. Nothing here asserts a speed: it measures.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from rank1 import cpp_conv
from rank1.layers import Flat1dConv2d, Rank1Conv2d

__all__ = [
    "Timing",
    "bench_layer",
    "count_flops",
    "count_params",
    "layer_flops",
    "keep_freed_memory",
    "machine_info",
    "time_forward",
]


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
    calls get more samples), capped at 100x ``repeats``.
    """
    for _ in range(warmup):
        fn(x)
    _sync(x.device)
    times: list[float] = []
    total = 0.0
    while len(times) < repeats or (total < min_time_s and len(times) < 100 * repeats):
        t0 = time.perf_counter()
        fn(x)
        _sync(x.device)
        dt = time.perf_counter() - t0
        times.append(dt * 1e3)
        total += dt
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return Timing(statistics.median(times), q[0], q[-1], len(times))


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


def bench_layer(
    in_channels: int,
    out_channels: int,
    kernel: int,
    size: int,
    batch: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 20,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Dense ``nn.Conv2d`` vs the decomposed 1-D chain for one stride-1 "same" layer."""
    device = torch.device(device)
    layer = Rank1Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, device=device, dtype=dtype)
    dense, fast = layer.dense_conv().eval(), layer.decompose().eval()
    x = torch.randn(batch, in_channels, size, size, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        dense = dense.to(memory_format=torch.channels_last)
        fast = fast.to(memory_format=torch.channels_last)
    t_dense = time_forward(dense, x, repeats=repeats, min_time_s=0.2)
    t_fast = time_forward(fast, x, repeats=repeats, min_time_s=0.2)
    f_dense, f_fast = layer_flops(in_channels, out_channels, kernel, size, size, batch)
    speedup = t_dense.median_ms / t_fast.median_ms
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "kernel": kernel,
        "size": size,
        "batch": batch,
        "memory_format": "channels_last" if channels_last else "nchw",
        "dense": t_dense.to_dict(),
        "decomposed": t_fast.to_dict(),
        "speedup": speedup,
        "flop_ratio": f_dense / f_fast,
        "fraction_of_flop_ratio": speedup / (f_dense / f_fast),
    }


GRID_CHANNELS = (32, 64, 128, 256, 512)
GRID_SIZES = (8, 16, 32, 56)
GRID_KERNELS = (3, 5)
GRID_BATCHES = (1, 32)


def _variants(layer: Rank1Conv2d, compile_: bool, peer: bool) -> dict[str, tuple[nn.Module, bool]]:
    """``{name: (module, channels_last)}``: the implementations compared at one shape."""
    dense = layer.dense_conv().eval()
    out: dict[str, tuple[nn.Module, bool]] = {"dense": (dense, False), "dense-cl": (dense, True)}
    for impl in ("chain", "dw2d"):
        m = layer.decompose(impl=impl).eval()
        out[impl] = (m, False)
        out[f"{impl}-cl"] = (m, True)
    if cpp_conv.available(dense.weight.device):  # the fused C++ kernel works in channels-last
        out["cpp"] = (layer.decompose(impl="cpp").eval(), True)
    if compile_:
        out["chain-compiled"] = (torch.compile(layer.decompose(impl="chain").eval()), False)
        out["dw2d-compiled"] = (torch.compile(layer.decompose(impl="dw2d").eval()), False)
    if peer:
        try:
            import tltorch
        except ImportError:
            pass
        else:
            # Built directly (random CP factors): speed does not depend on the values, and
            # from_conv would first run a CP decomposition at full rank, minutes per shape.
            cp = tltorch.FactorizedConv(layer.in_channels, layer.out_channels, layer.kernel_size, order=2,
                                        padding=layer.padding, bias=True, factorization="cp",
                                        rank=layer.out_channels, implementation="factorized",
                                        device=dense.weight.device).eval()
            cp.weight.normal_(0.0, 0.02)
            out["tltorch-cp"] = (cp, False)
    return out


def bench_grid_point(c: int, k: int, size: int, batch: int, peaks, device: torch.device | str = "cpu",
                     compile_: bool = False, peer: bool = True, repeats: int = 5) -> dict[str, Any]:
    """Every implementation at one (C=O, k, size, batch), with roofline bounds."""
    from rank1.roofline import bound_ms, bound_with_calls_ms, impl_cost

    device = torch.device(device)
    layer = Rank1Conv2d(c, c, k, padding=k // 2, device=device)
    x = torch.randn(batch, c, size, size, device=device)
    times: dict[str, float] = {}
    for name, (m, cl) in _variants(layer, compile_, peer).items():
        m = m.to(device)
        xi = x
        if cl:
            m = m.to(memory_format=torch.channels_last)
            xi = x.contiguous(memory_format=torch.channels_last)
        times[name] = time_forward(m, xi, warmup=3 if "compiled" not in name else 2, repeats=repeats,
                                   min_time_s=0.3).median_ms
    costs = {impl: impl_cost(impl, c, c, k, size, size, batch) for impl in ("dense", "chain", "dw2d", "cpp", "cp")}
    bounds = {impl: bound_ms(*costs[impl], peaks) for impl in costs}
    dense_best = min(times["dense"], times["dense-cl"])
    decomposed = {n: t for n, t in times.items() if n.startswith(("chain", "dw2d", "cpp"))}
    best_name = min(decomposed, key=decomposed.get)
    best_impl = best_name.split("-")[0]
    flop_ratio = costs["dense"][0] / costs["chain"][0]
    speedup = dense_best / decomposed[best_name]
    row = {
        "channels": c, "kernel": k, "size": size, "batch": batch, "times_ms": times,
        "bound_ms": bounds, "dense_ms": dense_best, "best": best_name, "best_ms": decomposed[best_name],
        "speedup": speedup, "flop_ratio": flop_ratio, "fraction_of_flop_ratio": speedup / flop_ratio,
        "fraction_of_bound": bounds[best_impl] / decomposed[best_name],
        "dense_fraction_of_bound": bounds["dense"] / dense_best,
        "fraction_of_bound_with_calls": bound_with_calls_ms(best_impl, bounds[best_impl], peaks) / decomposed[best_name],
        "dense_fraction_of_bound_with_calls": bound_with_calls_ms("dense", bounds["dense"], peaks) / dense_best,
    }
    if "tltorch-cp" in times:
        row["vs_tltorch"] = times["tltorch-cp"] / decomposed[best_name]
    return row


def grid_markdown(rows: list[dict[str, Any]], info: dict[str, Any], peaks) -> str:
    head = ("| C=O | k | HxW | batch | dense ms | best 1-D impl | 1-D ms | speedup | FLOP ratio | of FLOP ratio "
            "| roofline ms | of roofline | of roofline + calls | tltorch CP ms |\n|" + "---|" * 14)
    lines = [head]
    for r in rows:
        cp = r["times_ms"].get("tltorch-cp")
        lines.append(
            f"| {r['channels']} | {r['kernel']} | {r['size']}x{r['size']} | {r['batch']} | {r['dense_ms']:.3f} "
            f"| {r['best']} | {r['best_ms']:.3f} | {r['speedup']:.2f}x | {r['flop_ratio']:.2f}x "
            f"| {r['fraction_of_flop_ratio']:.0%} | {r['bound_ms'][r['best'].split('-')[0]]:.3f} "
            f"| {r['fraction_of_bound']:.0%} | {r.get('fraction_of_bound_with_calls', float('nan')):.0%} "
            f"| {'—' if cp is None else f'{cp:.3f}'} |")
    lines.append("")
    lines.append(f"{info.get('cpu', info.get('gpu', info['device']))}, {info['threads']} threads, torch {info['torch']}; "
                 f"measured peak {peaks.gflops:.0f} GFLOP/s (fp32 GEMM), {peaks.gbytes_per_s:.1f} GB/s (copy), "
                 f"{1e3 * peaks.call_ms:.1f} µs per conv call (a 1x1 conv on one pixel). "
                 "speedup: best dense (NCHW or channels-last) / best decomposed; "
                 "of roofline: the decomposed implementation's lower bound / its measured time; "
                 "+ calls: the bound plus the fixed cost of its calls (3 chain, 2 dw2d, 1 cpp).")
    return "\n".join(lines)


def projection_cost(depth: int = 16, width: int = 128, repeats: int = 3) -> dict[str, float]:
    """Time to project every layer of a ``vgg`` (warm start, as in training) vs one
    training epoch of its rank1 arm on ``digits`` (the paper projects once per epoch)."""
    from rank1.data import load_dataset
    from rank1.train import ArmTrainer, TrainConfig

    cfg = TrainConfig(depth=depth, width=width, epochs=1, projection="end", measure_latency=False)
    data = load_dataset("digits")
    trainer = ArmTrainer(cfg, "rank1", data, torch.device("cpu"))
    t0 = time.perf_counter()
    trainer.train_epoch([])
    epoch_s = time.perf_counter() - t0
    layers = trainer.rank1_layers
    best = float("inf")
    for _ in range(repeats):
        with torch.no_grad():  # one SGD-sized step off rank-1 before each projection
            for m in layers:
                m.weight.add_(1e-3 * torch.randn_like(m.weight))
        t0 = time.perf_counter()
        for m in layers:
            m.project_()
        best = min(best, time.perf_counter() - t0)
    return {"depth": depth, "width": width, "layers": len(layers), "projection_s": best, "epoch_s": epoch_s,
            "fraction_of_epoch": best / epoch_s}
