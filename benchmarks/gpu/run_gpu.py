"""GPU benchmark for issue #7: the layer grid and whole networks against cuDNN, fp32 and bf16.

One self-contained script for a GPU machine that has torch (and triton) but none of
the study stack: it imports only torch-only ``rank1`` modules (layers, models,
convert, roofline, triton_dw), never ``rank1.cli``, yaml, rich, ray, optuna or mlflow.

    python benchmarks/gpu/run_gpu.py --out DIR                   # CUDA, < 4 min on an H100/H200
    python benchmarks/gpu/run_gpu.py --out DIR --device cpu --quick   # a dry run anywhere

What it measures, in this order, writing ``DIR/gpu_bench.json`` and ``DIR/gpu_bench.md``
after every step (a crash or a kill leaves everything measured so far):

1. peaks: GEMM throughput in fp32 (under the stated TF32 setting), TF32 and bf16, and
   copy bandwidth;
2. the layer grid (C=O in 64..512, H=W in 8..56, kernel 3 and 5, batch 32 first, then 1),
   in fp32 and bf16, with dense cuDNN (NCHW and channels-last), the chain (NCHW and
   channels-last), dw2d (NCHW and channels-last) and the fused Triton kernel; each checked
   against an fp32 dense reference (max relative error) and timed; plus the depthwise
   stage alone (two 1-D convs vs one kxk vs the fused kernel) on the 1x1 conv's output;
3. whole ``vgg`` networks (depth 8/16, width 64/128, batch 32, 32x32) dense vs decomposed;
4. with ``--deploy-s``: a pair trained for one epoch through the trial's code path (fp32 and
   bf16 autocast), and the deployed form (``decompose_model(model, "auto", example=x)``: the
   whole-network plan, CUDA graphs included) of vgg depth 8/16 width 64/128 at batch 32, 256
   and 1 against cuDNN eager and cuDNN in a CUDA graph, outputs checked against fp32 dense.

Timing: warm-up (the first call, which includes cuDNN's algorithm search and Triton's
compile, is recorded separately), then ``--repeats`` samples of back-to-back calls
between CUDA events (each sample at least ``--sample-ms`` long), median and p10/p90.
L2 is not flushed between calls. ``--budget-s`` bounds the whole run: grid points stop
being added once the grid's share is spent, and what was skipped is recorded.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the budget counts from here, torch's import and CUDA start-up included

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from rank1.convert import decompose_model, dense_model  # noqa: E402
from rank1.kernels import KERNELS  # noqa: E402
from rank1.kernels import triton as triton_dw  # noqa: E402
from rank1.layers import Flat1dConv2d  # noqa: E402
from rank1.measure import count_flops  # noqa: E402
from rank1.models import build_model  # noqa: E402
from rank1.roofline import Peaks, bound_ms, impl_cost, measure_peaks  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _impls() -> dict[str, tuple[str, bool, bool]]:
    """name -> (kernel, channels_last, TF32 on), from the registry: dense in both layouts, with
    TF32 too ("dense-tf32*" run only for fp32 with --tf32 off: PyTorch's own default lets cuDNN
    use TF32 for fp32 convs, so they show what an untouched setup gets; the speedups use true-fp32
    "dense"/"dense-cl"), then every decomposed kernel registered for CUDA in NCHW and channels-last
    (a channels-last kernel in its own layout only)."""
    out = {"dense": ("dense", False, False), "dense-cl": ("dense", True, False),
           "dense-tf32": ("dense", False, True), "dense-tf32-cl": ("dense", True, True)}
    for name, k in KERNELS.items():
        if k.decomposed and "cuda" in k.devices:
            if k.layout != "channels_last":
                out[name] = (name, False, False)
            out[f"{name}-cl" if k.layout != "channels_last" else name] = (name, True, False)
    return out


IMPLS = _impls()
DENSE = ("dense", "dense-cl")
DENSE_TF32 = ("dense-tf32", "dense-tf32-cl")
DECOMPOSED = tuple(n for n, (impl, _, _) in IMPLS.items() if impl != "dense")
FULL = dict(channels=(64, 128, 256, 512), sizes=(8, 16, 32, 56), kernels=(3, 5), batches=(32, 1),
            networks=[(8, 64), (8, 128), (16, 64), (16, 128)], net_batch=32, net_size=32,
            deploy_networks=[(8, 64), (8, 128), (16, 64), (16, 128)], deploy_batches=(32, 256, 1))
QUICK = dict(channels=(8, 16), sizes=(8, 12), kernels=(3, 5), batches=(2, 1),
             networks=[(4, 8)], net_batch=2, net_size=16, deploy_networks=[(2, 8)], deploy_batches=(2,))


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


# After one of these the CUDA context is gone: every later call fails, so the run stops there.
_FATAL = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address")


def _fatal(record: dict[str, Any]) -> str | None:
    return next((e for e in record.get("errors", {}).values() if any(f in e for f in _FATAL)), None)


def _tolerance(name: str, dname: str, tf32_flag: bool) -> float:
    """Max relative error against the fp32 reference above which the log shouts (it is recorded anyway)."""
    if dname != "fp32":
        return 5e-2
    return 2e-2 if tf32_flag or IMPLS[name][2] else 1e-3


def _rate(gflops: float) -> str:
    return f"{gflops / 1e3:.1f} TFLOP/s" if gflops >= 1e3 else f"{gflops:.0f} GFLOP/s"


class Recorder:
    """The results dict, written atomically to JSON and markdown after every step."""

    def __init__(self, out: Path, data: dict[str, Any]) -> None:
        self.out, self.data = out, data
        out.mkdir(parents=True, exist_ok=True)

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - T0, 2)
        self._put("gpu_bench.json", json.dumps(self.data, indent=1, default=str))
        try:  # the JSON is the record; a table that fails to render must not cost it
            md = markdown(self.data)
        except Exception as e:
            md = f"# markdown failed: {_err(e)}\n\n```\n{traceback.format_exc()}```\n"
        self._put("gpu_bench.md", md)

    def _put(self, name: str, text: str) -> None:
        tmp = self.out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(self.out / name)


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --cuda-graphs: every timed call is the replay of a CUDA graph captured from it, so what is
# measured is the kernels alone, without the per-launch CPU cost (what a deployed model
# captured with CUDA graphs or torch.compile(mode="reduce-overhead") pays).
CUDA_GRAPHS = False


def _graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # cuDNN's algorithm search and Triton's compile happen here, not in the graph
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@torch.inference_mode()
def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, sample_ms: float) -> dict[str, float]:
    """First-call time, then the median/p10/p90 per call over ``repeats`` samples of
    back-to-back calls (CUDA events on GPU, perf_counter on CPU)."""
    t = time.perf_counter()
    fn()
    _sync(device)
    first_ms = (time.perf_counter() - t) * 1e3
    if CUDA_GRAPHS and device.type == "cuda":
        fn = _graphed(fn)
    fn()
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    est_ms = max((time.perf_counter() - t) * 1e3, 1e-3)
    inner = int(min(1000, max(1, math.ceil(sample_ms / est_ms))))
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / inner)
        else:
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t) * 1e3 / inner)
    q = statistics.quantiles(samples, n=10) if len(samples) > 1 else samples * 9
    return {"median_ms": statistics.median(samples), "p10_ms": q[0], "p90_ms": q[-1], "first_call_ms": first_ms,
            "calls_per_sample": inner, "samples": len(samples)}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().float(), ref.detach().float()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


class tf32_mode:
    """Context: TF32 on or off for matmuls and cuDNN (off: true fp32, as for the references)."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.on

    def __exit__(self, *exc: Any) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


# --------------------------------------------------------------------------- environment and peaks


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "device": str(device),
        "machine": platform.machine(), "threads": torch.get_num_threads(),
        "cudnn": {"enabled": torch.backends.cudnn.enabled, "benchmark": torch.backends.cudnn.benchmark,
                  "deterministic": torch.backends.cudnn.deterministic,
                  "allow_tf32": torch.backends.cudnn.allow_tf32},
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "triton_interpret": triton_dw.interpreter_enabled(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # recorded, the triton impl is then skipped
        env["triton"] = f"unavailable ({_err(e)})"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn_version=torch.backends.cudnn.version(), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}")
    else:
        try:
            with open("/proc/cpuinfo") as f:
                env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        except OSError:
            pass
    return env


def peaks(device: torch.device, quick: bool, tf32: bool) -> dict[str, Any]:
    gemm, copy_mb = (512, 32) if quick else (8192, 1024)
    out: dict[str, Any] = {"gemm_n": gemm, "copy_mb": copy_mb}
    with tf32_mode(False):
        out["fp32"] = measure_peaks(device, torch.float32, gemm, copy_mb).to_dict()  # true fp32
    if device.type == "cuda":
        with tf32_mode(True):
            out["tf32"] = measure_peaks(device, torch.float32, gemm, copy_mb).to_dict()
    out["bf16"] = measure_peaks(device, torch.bfloat16, gemm, copy_mb).to_dict()
    # The roofline of each dtype: fp32 layers use the fp32 GEMM peak of the TF32 state in force.
    out["roofline"] = {"fp32": out["tf32" if tf32 and "tf32" in out else "fp32"], "bf16": out["bf16"]}
    return out


# --------------------------------------------------------------------------- layer grid


def impl_available(name: str, device: torch.device) -> str | None:
    """None if ``name`` can run on ``device``, else why not (the registry says)."""
    return KERNELS[IMPLS[name][0]].unavailable_reason(device)


def impls_for(dname: str, tf32_flag: bool, device: torch.device) -> list[str]:
    """The implementations measured for a dtype: the TF32 dense pair only on CUDA, for fp32 with TF32 off."""
    extra = device.type == "cuda" and dname == "fp32" and not tf32_flag
    return [n for n in IMPLS if extra or n not in DENSE_TF32]


@torch.inference_mode()
def grid_point(c: int, k: int, s: int, batch: int, dname: str, device: torch.device, pk: Peaks,
               repeats: int, sample_ms: float, skip: dict[str, str], impls: list[str],
               tf32_flag: bool) -> dict[str, Any]:
    """Every implementation at one (C=O, k, HxW, batch, dtype): error vs fp32 dense, timing."""
    dtype = DTYPES[dname]
    torch.manual_seed(1000 * c + 100 * k + s + batch)
    # Flat1dConv2d holds the factors directly: decompose() needs no power method.
    layer = Flat1dConv2d(c, c, k, padding=k // 2, device=device)
    x32 = torch.randn(batch, c, s, s, device=device)
    x = x32.to(dtype)
    with tf32_mode(False):
        ref = layer.dense_conv()(x.float())  # the same (rounded) input, fp32 weights, true fp32
    bpe = torch.finfo(dtype).bits // 8
    costs = {impl: impl_cost(impl, c, c, k, s, s, batch, bytes_per=bpe) for impl in {i for i, _, _ in IMPLS.values()}}
    row: dict[str, Any] = {"channels": c, "kernel": k, "size": s, "batch": batch, "dtype": dname,
                           "flop_ratio": costs["dense"][0] / costs["chain"][0],
                           "bound_ms": {i: bound_ms(*costs[i], pk) for i in costs},
                           "times": {}, "max_rel_err": {}, "errors": {}}
    modules: dict[str, nn.Module] = {}
    for name in impls:
        impl, cl, tf = IMPLS[name]
        if name in skip:
            row["errors"][name] = f"skipped: {skip[name]}"
            continue
        try:
            m = (layer.dense_conv() if impl == "dense" else layer.decompose(impl=impl)).to(dtype=dtype).eval()
            xi = x
            if cl:
                m, xi = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            with tf32_mode(tf or tf32_flag):
                row["max_rel_err"][name] = rel_err(m(xi), ref)
                row["times"][name] = time_call(lambda m=m, xi=xi: m(xi), device, repeats, sample_ms)
            if not cl and impl != "dense":
                modules[impl] = m
        except Exception as e:  # one failing impl is a recorded error, not a crash
            row["errors"][name] = _err(e)
            if isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
    # The depthwise stage alone, on the 1x1 conv's output: what fusing the two 1-D passes buys.
    stage: dict[str, Any] = {}
    if "chain" in modules:
        try:
            y = modules["chain"].pointwise(x)
            parts = {"chain": nn.Sequential(modules["chain"].vertical, modules["chain"].horizontal)}
            if "dw2d" in modules:
                parts["dw2d"] = modules["dw2d"].spatial
            if "triton" in modules:
                parts["triton"] = modules["triton"].spatial
            for name, part in parts.items():
                try:
                    stage[name] = time_call(lambda part=part: part(y), device, repeats, sample_ms)["median_ms"]
                except Exception as e:
                    stage[name + "_error"] = _err(e)
            # One read and one write of the activation: the bound of any depthwise stage.
            stage["bound_ms"] = 1e3 * 2 * y.numel() * bpe / (pk.gbytes_per_s * 1e9)
        except Exception as e:
            stage["error"] = _err(e)
    row["stage_ms"] = stage
    _summarise(row)
    return row


def _summarise(row: dict[str, Any]) -> None:
    t = {n: v["median_ms"] for n, v in row["times"].items()}
    dense = {n: v for n, v in t.items() if n in DENSE}
    dec = {n: v for n, v in t.items() if n in DECOMPOSED}
    if not dense or not dec:
        return
    best_dense, best = min(dense, key=dense.get), min(dec, key=dec.get)
    row.update(best_dense=best_dense, dense_ms=dense[best_dense], best=best, best_ms=dec[best],
               speedup=dense[best_dense] / dec[best])
    dense_tf32 = [v for n, v in t.items() if n in DENSE_TF32]
    if dense_tf32:
        row["speedup_vs_tf32"] = min(dense_tf32) / dec[best]
    if "bound_ms" in row:  # layers; networks have neither a roofline nor a closed-form FLOP ratio
        row["fraction_of_flop_ratio"] = row["speedup"] / row["flop_ratio"]
        row["fraction_of_bound"] = row["bound_ms"][IMPLS[best][0]] / dec[best]
    row["speedup_by_impl"] = {n: dense[best_dense] / v for n, v in dec.items()}
    torch_dec = {n: v for n, v in dec.items() if n != "triton"}
    if "triton" in dec and torch_dec:
        row["triton_gain"] = min(torch_dec.values()) / dec["triton"]  # > 1: the fused kernel is faster


def grid_plan(cfg: dict[str, Any], dtypes: list[str]) -> list[tuple[int, int, int, int, str]]:
    # Batch 32 first (the question is about large batch), then 1; both dtypes per shape,
    # so a budget cut drops whole shapes, not one dtype.
    return [(c, k, s, b, d) for b in cfg["batches"] for k in cfg["kernels"] for c in cfg["channels"]
            for s in cfg["sizes"] for d in dtypes]


# --------------------------------------------------------------------------- networks


@torch.inference_mode()
def network(depth: int, width: int, batch: int, size: int, dname: str, device: torch.device, repeats: int,
            sample_ms: float, skip: dict[str, str], impls: list[str], tf32_flag: bool) -> dict[str, Any]:
    dtype = DTYPES[dname]
    torch.manual_seed(depth * 1000 + width)
    # The flat1d arm holds its factors directly (no power method); same FLOPs as rank1.
    model = build_model("vgg", arm="flat1d", depth=depth, width=width, in_channels=3).eval()
    x = torch.randn(batch, 3, size, size).to(device)
    dense32 = dense_model(model).to(device)
    with tf32_mode(False):
        ref = dense32(x.to(dtype).float())
    chain32 = decompose_model(model, "chain").to(device)
    res: dict[str, Any] = {"model": "vgg", "depth": depth, "width": width, "batch": batch, "size": size,
                           "dtype": dname, "flop_ratio": count_flops(dense32, x) / count_flops(chain32, x),
                           "times": {}, "max_rel_err": {}, "errors": {}}
    for name in impls:
        impl, cl, tf = IMPLS[name]
        if name in skip:
            res["errors"][name] = f"skipped: {skip[name]}"
            continue
        try:
            m = copy.deepcopy(dense32) if impl == "dense" else decompose_model(model, impl).to(device)
            m = m.to(dtype=dtype)
            xi = x.to(dtype)
            if cl:
                m, xi = m.to(memory_format=torch.channels_last), xi.contiguous(memory_format=torch.channels_last)
            with tf32_mode(tf or tf32_flag):
                res["max_rel_err"][name] = rel_err(m(xi), ref)
                res["times"][name] = time_call(lambda m=m, xi=xi: m(xi), device, repeats, sample_ms)
        except Exception as e:
            res["errors"][name] = _err(e)
    _summarise(res)
    return res


# --------------------------------------------------------------------------- markdown


def _ms(row: dict[str, Any], name: str) -> str:
    if name in row.get("times", {}):
        return f"{row['times'][name]['median_ms']:.3f}"
    return "err" if name in row.get("errors", {}) and not row["errors"][name].startswith("skipped") else "—"


def _cols(rows: list[dict[str, Any]]) -> list[str]:
    """The implementations that appear (measured, failed or skipped) in these rows, in IMPLS order."""
    seen = {n for r in rows for n in (*r.get("times", {}), *r.get("errors", {}))}
    return [n for n in IMPLS if n in seen]


def _geo(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def markdown(d: dict[str, Any]) -> str:
    env, cfg, lines = d.get("environment", {}), d.get("config", {}), []
    lines.append(f"# rank-1 layers vs cuDNN: {env.get('gpu', env.get('cpu', env.get('device', '?')))}")
    lines.append("")
    cud = env.get("cudnn", {})
    lines.append(f"Status: **{d.get('status')}** after {d.get('elapsed_s', 0):.0f} s. torch {env.get('torch')}, "
                 f"CUDA {env.get('cuda', '—')}, cuDNN {env.get('cudnn_version', '—')}, triton {env.get('triton')}. "
                 f"cudnn.benchmark={cud.get('benchmark')}, cudnn.deterministic={cud.get('deterministic')}, "
                 f"cudnn.allow_tf32={cud.get('allow_tf32')}, matmul.allow_tf32={env.get('matmul_allow_tf32')}: "
                 + ("**Times are CUDA-graph replays** (--cuda-graphs: kernels only, no launch cost). "
                    if cfg.get("cuda_graphs") and cfg.get("device") == "cuda" else
                    "Times are eager calls (launch cost included). ")
                 + ("**fp32 rows use TF32** tensor cores (--tf32)." if cfg.get("tf32") else
                    "**fp32 rows are true fp32 (TF32 off)**; dense-tf32 columns show cuDNN with TF32 on "
                    "(PyTorch's default for convolutions), for reference."))
    pk = d.get("peaks", {})
    if pk.get("fp32"):
        parts = [f"{k} GEMM {_rate(pk[k]['gflops'])}" for k in ("fp32", "tf32", "bf16") if k in pk]
        lines.append(f"\nMeasured peaks: {', '.join(parts)}; copy {pk['fp32']['gbytes_per_s']:.0f} GB/s "
                     f"(GEMM n={pk.get('gemm_n')}, copy {pk.get('copy_mb')} MiB).")
    lines.append(f"\nCommand: `{d.get('command')}`, {d.get('date')}.")
    rows = d.get("grid", [])
    for dname in DTYPES:
        rs = [r for r in rows if r["dtype"] == dname]
        if not rs:
            continue
        cols = _cols(rs)
        has_tf32 = any("speedup_vs_tf32" in r for r in rs)
        head = (["C=O", "k", "HxW", "batch", *cols, "best 1-D", "speedup"] + (["vs TF32 dense"] if has_tf32 else [])
                + ["FLOP ratio", "of FLOP ratio", "of roofline", "triton vs best torch 1-D",
                   "dw stage chain / dw2d / triton (bound)", "worst rel err"])
        lines += ["", f"## Layer grid, {dname}: ms per forward (median)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rs:
            st = r.get("stage_ms", {})
            stage = " / ".join(f"{st[n]:.3f}" if n in st else "—" for n in ("chain", "dw2d", "triton"))
            if "bound_ms" in st:
                stage += f" ({st['bound_ms']:.4f})"
            errs = r.get("max_rel_err", {})
            cells = [str(r["channels"]), str(r["kernel"]), f"{r['size']}x{r['size']}", str(r["batch"]),
                     *(_ms(r, n) for n in cols)]
            if "speedup" in r:
                cells += [r["best"], f"{r['speedup']:.2f}x"]
                if has_tf32:
                    cells.append(f"{r['speedup_vs_tf32']:.2f}x" if "speedup_vs_tf32" in r else "—")
                cells += [f"{r['flop_ratio']:.1f}x", f"{r['fraction_of_flop_ratio']:.0%}", f"{r['fraction_of_bound']:.0%}",
                          f"{r['triton_gain']:.2f}x" if "triton_gain" in r else "—"]
            else:
                cells += ["—", "—"] + (["—"] if has_tf32 else []) + [f"{r['flop_ratio']:.1f}x", "—", "—", "—"]
            cells += [stage, f"{max(errs.values()):.1e}" if errs else "—"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        loses = [r for r in rs if r.get("speedup", 2.0) < 1.0]
        if loses:
            lines.append(f"**Where the decomposed form loses to cuDNN ({dname}, best decomposed vs best dense):** "
                         + "; ".join(f"C={r['channels']} k={r['kernel']} {r['size']}x{r['size']} batch {r['batch']} "
                                     f"({r['speedup']:.2f}x: {r['best']} vs {r['best_dense']})" for r in loses) + ".")
        elif any("speedup" in r for r in rs):
            lines.append(f"The best decomposed form beats cuDNN at every measured {dname} point.")
        if has_tf32:
            lt = [r for r in rs if r.get("speedup_vs_tf32", 2.0) < 1.0]
            lines.append(f"\nAgainst cuDNN with TF32 on, the decomposed form loses at {len(lt)} of "
                         f"{sum('speedup_vs_tf32' in r for r in rs)} points" + (": " + "; ".join(
                             f"C={r['channels']} k={r['kernel']} {r['size']}x{r['size']} b{r['batch']} "
                             f"({r['speedup_vs_tf32']:.2f}x)" for r in lt) if lt else "") + ".")
        lines.append("")
        for b in sorted({r["batch"] for r in rs}, reverse=True):
            sp = [r["speedup"] for r in rs if r["batch"] == b and "speedup" in r]
            if sp:
                lines.append(f"- batch {b}: best decomposed vs best cuDNN, geometric mean {_geo(sp):.2f}x over "
                             f"{len(sp)} points (range {min(sp):.2f}x-{max(sp):.2f}x).")
            gains = [r["triton_gain"] for r in rs if r["batch"] == b and "triton_gain" in r]
            if gains:
                lines.append(f"- batch {b}: Triton fused layer vs the best torch decomposed form, geometric mean "
                             f"{_geo(gains):.2f}x over {len(gains)} points (faster at {sum(g > 1 for g in gains)}), "
                             f"range {min(gains):.2f}x-{max(gains):.2f}x.")
            sg = [r["stage_ms"]["chain"] / r["stage_ms"]["triton"] for r in rs if r["batch"] == b
                  and "triton" in r.get("stage_ms", {}) and "chain" in r.get("stage_ms", {})]
            if sg:
                lines.append(f"- batch {b}: depthwise stage alone, fused kernel vs the two 1-D convs, geometric "
                             f"mean {_geo(sg):.2f}x (range {min(sg):.2f}x-{max(sg):.2f}x).")
    nets = d.get("networks", [])
    if nets:
        cols = _cols(nets)
        head = ["dtype", "depth", "width", "batch", "HxW", *cols, "best 1-D", "speedup", "FLOP ratio"]
        lines += ["", "## Whole networks (vgg, flat1d factors; ms per forward)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for n in nets:
            cells = [n["dtype"], str(n["depth"]), str(n["width"]), str(n["batch"]), f"{n['size']}x{n['size']}",
                     *(_ms(n, i) for i in cols)]
            cells += [n["best"], f"{n['speedup']:.2f}x"] if "speedup" in n else ["—", "—"]
            cells.append(f"{n['flop_ratio']:.1f}x" if "flop_ratio" in n else "—")
            lines.append("| " + " | ".join(cells) + " |")
    for t in d.get("training", []):
        lines += ["", f"Training through the trial's code path, one epoch on digits, bf16 autocast {t['bf16']}: "
                  + "; ".join(f"{a} {r['status']}, decomposed val acc {r['decomposed_val_acc']}, epoch "
                              f"{r['epoch_s']:.1f} s, deployed {r.get('deploy_b32', '?')} at batch 32 "
                              f"({r.get('speedup_b32', float('nan')):.2f}x over dense)" for a, r in t["arms"].items())]
    dep = d.get("deployed", [])
    if dep:
        head = ["dtype", "depth", "width", "batch", "cuDNN eager ms", "cuDNN graph ms", "auto ms", "auto plan",
                "vs eager", "vs graph", "rel err auto"]
        lines += ["", "## The deployed form (decompose_model 'auto') against cuDNN", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in dep:
            t = r.get("times", {})
            ms = [f"{t[k]['median_ms']:.3f}" if k in t else "—" for k in ("cudnn", "cudnn-graph", "auto")]
            lines.append("| " + " | ".join([r["dtype"], str(r["depth"]), str(r["width"]), str(r["batch"]), *ms,
                                             r.get("plan", "—"), f"{r.get('speedup_vs_eager', float('nan')):.2f}x",
                                             f"{r.get('speedup_vs_graph', float('nan')):.2f}x",
                                             f"{r.get('max_rel_err', {}).get('auto', float('nan')):.1e}"]) + " |")
    errors = [(f"C={r['channels']} k={r['kernel']} {r['size']}x{r['size']} b{r['batch']} {r['dtype']}"
               if "channels" in r else f"vgg {r['depth']}/{r['width']} {r['dtype']}", n, e)
              for r in rows + nets for n, e in r.get("errors", {}).items() if not e.startswith("skipped")]
    if errors:
        lines += ["", f"## Errors ({len(errors)})", ""] + [f"- {w} {n}: {e}" for w, n, e in errors[:40]]
    skipped = d.get("skipped", [])
    if skipped:
        lines += ["", f"## Skipped ({len(skipped)})", ""] + [f"- {s}" for s in skipped[:80]]
    notes = d.get("notes", [])
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "Columns: *speedup* = best true-fp32/bf16 dense (NCHW or channels-last) / best decomposed; "
              "*of FLOP ratio* = speedup / (dense MACs / chain MACs); *of roofline* = the best decomposed impl's "
              "bound max(FLOPs / GEMM peak, bytes / copy bandwidth) over its time; *triton vs best torch 1-D* = "
              "best of chain/dw2d (NCHW or channels-last) over the Triton layer's time (> 1: Triton is faster); "
              "*dw stage* = the depthwise part alone on the 1x1 conv's output, bound = one read + one write at copy "
              "bandwidth; *worst rel err* = max |y - ref| / max |ref| over all impls, ref = fp32 dense with TF32 "
              "off on the same (rounded) input. `err`: see Errors; `—`: not run. Back-to-back calls, L2 not "
              "flushed; the first call (cuDNN search, Triton compile) is in the JSON as first_call_ms.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for gpu_bench.json and gpu_bench.md")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where to run (cpu: a dry run)")
    p.add_argument("--quick", action="store_true", help="a tiny grid and network, for a dry run")
    p.add_argument("--budget-s", type=float, default=210.0,
                   help="wall-clock budget of the whole run, from start; the grid gets it minus --network-s")
    p.add_argument("--network-s", type=float, default=30.0, help="share of the budget kept for the networks")
    p.add_argument("--repeats", type=int, default=7, help="timed samples per implementation")
    p.add_argument("--sample-ms", type=float, default=2.0, help="minimum length of one sample (back-to-back calls)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 for fp32 convs and matmuls (default: off, so fp32 is true fp32)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="time CUDA-graph replays (kernels only, no per-launch CPU cost)")
    p.add_argument("--max-dense-ms", type=float, default=200.0,
                   help="skip a grid point whose dense fp32 conv would take longer than this at the fp32 peak")
    p.add_argument("--max-mem-gb", type=float, default=8.0, help="skip a grid point needing more activation memory")
    p.add_argument("--deploy-s", type=float, default=0.0,
                   help="after the networks: seconds for training a pair on the device (fp32, bf16) and timing the "
                        "deployed form (decompose_model 'auto') of vgg d8/16 w64/128 at batch 32/256/1 against cuDNN "
                        "eager and in a CUDA graph (0: skip)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: use --device cpu --quick for a dry run", file=sys.stderr)
        return 2
    # Stated settings: cuDNN picks its fastest algorithm per shape (benchmark mode); TF32 as asked.
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    global CUDA_GRAPHS
    CUDA_GRAPHS = args.cuda_graphs
    cfg = QUICK if args.quick else FULL
    rec = Recorder(args.out, {
        "status": "running", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "config": {**vars(args), "out": str(args.out), **cfg},
        "environment": environment(device), "grid": [], "networks": [], "skipped": [], "notes": [],
    })

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        run(args, device, cfg, rec)
        rec.data["status"] = "complete"
    except BaseException as e:  # whatever stops the run, what was measured is written
        rec.data["status"] = f"stopped: {_err(e)}"
        rec.data["traceback"] = traceback.format_exc()[-4000:]
        log(f"stopped: {_err(e)}")
    finally:
        rec.write()
        log(f"wrote {args.out / 'gpu_bench.json'} and {args.out / 'gpu_bench.md'} ({rec.data['status']})")
    return 0 if rec.data["status"] == "complete" else 1


def run(args: argparse.Namespace, device: torch.device, cfg: dict[str, Any], rec: Recorder) -> None:
    d = rec.data
    log(f"device {d['environment'].get('gpu', device)}, torch {torch.__version__}, triton "
        f"{d['environment']['triton']}, TF32 {'on' if args.tf32 else 'off'}, cudnn.benchmark on, "
        f"CUDA graphs {'on' if args.cuda_graphs else 'off'}")
    try:
        d["peaks"] = peaks(device, args.quick, args.tf32)
        pk = d["peaks"]
        log("peaks: " + ", ".join(f"{k} {_rate(pk[k]['gflops'])}" for k in ("fp32", "tf32", "bf16") if k in pk)
            + f", copy {pk['fp32']['gbytes_per_s']:.0f} GB/s")
    except Exception as e:  # no roofline then, but everything else still runs
        d["peaks_error"] = _err(e)
        d["peaks"] = {}
        log(f"peaks failed: {_err(e)}")
    rec.write()
    roof = {k: Peaks(**v) for k, v in d["peaks"].get("roofline", {}).items()}
    skip = {n: why for n in IMPLS if (why := impl_available(n, device))}
    if device.type == "cpu" and "triton" not in skip:
        d["notes"].append("triton runs on the CPU interpreter here: its times mean nothing, only its errors do")
    for n, why in skip.items():
        d["notes"].append(f"{n} skipped everywhere: {why}")
        log(f"{n} skipped: {why}")

    grid_deadline = args.budget_s - args.network_s
    plan = grid_plan(cfg, args.dtypes)
    log(f"layer grid: {len(plan)} points (shapes x dtypes), budget {grid_deadline:.0f} s")
    for i, (c, k, s, b, dname) in enumerate(plan):
        where = f"C={c} k={k} {s}x{s} batch {b} {dname}"
        elapsed = time.perf_counter() - T0
        if elapsed > grid_deadline:
            d["skipped"].append(f"{where}: budget ({elapsed:.1f} s > {grid_deadline:.1f} s)")
            continue
        pk = roof.get(dname) or Peaks(1.0, 1.0)
        dense_flops = 2.0 * b * s * s * c * c * k * k
        est_ms = 1e3 * dense_flops / (roof["fp32"].gflops * 1e9) if "fp32" in roof else 0.0
        mem_gb = 8 * b * c * s * s * 4 / 1e9  # input, intermediates, outputs and the fp32 reference
        if est_ms > args.max_dense_ms or mem_gb > args.max_mem_gb:
            d["skipped"].append(f"{where}: cap (dense fp32 ~{est_ms:.0f} ms, ~{mem_gb:.1f} GB)")
            continue
        try:
            row = grid_point(c, k, s, b, dname, device, pk, args.repeats, args.sample_ms, skip,
                             impls_for(dname, args.tf32, device), args.tf32)
        except Exception as e:  # a whole point failing (e.g. OOM building it) is recorded
            row = {"channels": c, "kernel": k, "size": s, "batch": b, "dtype": dname,
                   "flop_ratio": c * k * k / (c + 2 * k), "times": {}, "errors": {"point": _err(e)}}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        d["grid"].append(row)
        rec.write()
        if fatal := _fatal(row):
            raise RuntimeError(f"the CUDA context is lost at {where} ({fatal}); results so far are written")
        msg = (f"{i + 1}/{len(plan)} {where}: dense {row['dense_ms']:.3f} ms, best {row['best']} "
               f"{row['best_ms']:.3f} ms ({row['speedup']:.2f}x)" if "speedup" in row else f"{i + 1}/{len(plan)} "
               f"{where}: no comparison ({'; '.join(f'{n}: {e}' for n, e in row['errors'].items())})")
        if "triton_gain" in row:
            msg += f", triton {row['times']['triton']['median_ms']:.3f} ms ({row['triton_gain']:.2f}x vs torch 1-D)"
        bad = [n for n, e in row.get("max_rel_err", {}).items() if e > _tolerance(n, dname, args.tf32)]
        if bad:
            msg += f"  LARGE ERROR in {bad}"
        log(msg)
    if d["skipped"]:
        log(f"skipped {len(d['skipped'])} grid points (budget or cap), listed in the JSON")

    for depth, width in cfg["networks"]:
        for dname in args.dtypes:
            where = f"vgg depth {depth} width {width} {dname}"
            elapsed = time.perf_counter() - T0
            if elapsed > args.budget_s:
                d["skipped"].append(f"{where}: budget ({elapsed:.1f} s > {args.budget_s:.1f} s)")
                continue
            try:
                n = network(depth, width, cfg["net_batch"], cfg["net_size"], dname, device, args.repeats,
                            args.sample_ms, skip, impls_for(dname, args.tf32, device), args.tf32)
            except Exception as e:
                n = {"model": "vgg", "depth": depth, "width": width, "batch": cfg["net_batch"],
                     "size": cfg["net_size"], "dtype": dname, "times": {}, "errors": {"network": _err(e)}}
            d["networks"].append(n)
            rec.write()
            if fatal := _fatal(n):
                raise RuntimeError(f"the CUDA context is lost at {where} ({fatal}); results so far are written")
            log(f"{where}: dense {n['dense_ms']:.2f} ms, best {n['best']} {n['best_ms']:.2f} ms "
                f"({n['speedup']:.2f}x)" if "speedup" in n else f"{where}: errors {n['errors']}")
    if args.deploy_s > 0:
        deploy_phase(args, device, cfg, rec)


# --------------------------------------------------------------------------- training and the deployed form


def train_phase(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    """A pair (rank1, flat1d) for one epoch on digits through the trial's own code path
    (``rank1.train.train_pair``), in fp32 and with bf16 autocast: statuses, accuracy, time,
    and the deployed form the end-of-training measurement chose."""
    from rank1.train import TrainConfig, train_pair

    out = []
    for bf16 in ((False,) if device.type != "cuda" else (False, True)):
        cfg = TrainConfig(depth=2 if quick else 8, width=8 if quick else 32, epochs=1, device=device.type, bf16=bf16,
                          latency_batch=32, latency_repeats=5)
        t = time.perf_counter()
        res = train_pair(cfg)
        arms = {a: {"status": r.status, "reason": r.reason, "decomposed_val_acc": r.final.get("decomposed_val_acc"),
                    "epoch_s": r.train_time_s, **{k: v for k, v in r.inference.items() if isinstance(v, (int, float, str))}}
                for a, r in res.arms.items()}
        out.append({"bf16": bf16, "time_s": time.perf_counter() - t, "arms": arms})
        log(f"train pair, bf16 {bf16}: " + ", ".join(f"{a} {r['status']} {r['decomposed_val_acc']}" for a, r in arms.items()))
    return out


@torch.inference_mode()
def deployed_network(depth: int, width: int, batch: int, size: int, dname: str, device: torch.device, repeats: int,
                     sample_ms: float) -> dict[str, Any]:
    """``decompose_model(model, "auto", example=x)`` (what a user deploys) against cuDNN eager and
    cuDNN in a CUDA graph, every output checked against the fp32 dense form."""
    dtype = DTYPES[dname]
    torch.manual_seed(depth * 1000 + width + batch)
    model = build_model("vgg", arm="flat1d", depth=depth, width=width, in_channels=3).eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    dense32 = dense_model(model).to(device)
    with tf32_mode(False):
        ref = dense32(x.to(dtype).float())
    xd = x.to(dtype)
    row: dict[str, Any] = {"depth": depth, "width": width, "batch": batch, "size": size, "dtype": dname, "times": {},
                           "max_rel_err": {}, "errors": {}}
    dense = copy.deepcopy(dense32).to(dtype)
    global CUDA_GRAPHS
    for name, graphs in (("cudnn", False), ("cudnn-graph", True)):
        if graphs and device.type != "cuda":
            continue
        saved, CUDA_GRAPHS = CUDA_GRAPHS, graphs
        try:
            row["max_rel_err"][name] = rel_err(dense(xd), ref)
            row["times"][name] = time_call(lambda: dense(xd), device, repeats, sample_ms)
        except Exception as e:
            row["errors"][name] = _err(e)
        finally:
            CUDA_GRAPHS = saved
    try:
        t = time.perf_counter()
        auto = decompose_model(model.to(dtype), "auto", example=xd)
        row["plan_s"] = time.perf_counter() - t
        row["plan"] = auto.plan.summary()
        row["max_rel_err"]["auto"] = rel_err(auto(xd), ref)
        saved, CUDA_GRAPHS = CUDA_GRAPHS, False  # the plan decides on graphs itself
        try:
            row["times"]["auto"] = time_call(lambda: auto(xd), device, repeats, sample_ms)
        finally:
            CUDA_GRAPHS = saved
    except Exception as e:
        row["errors"]["auto"] = _err(e)
    t = {k: v["median_ms"] for k, v in row["times"].items()}
    if "auto" in t and "cudnn" in t:
        row["speedup_vs_eager"] = t["cudnn"] / t["auto"]
        if "cudnn-graph" in t:
            row["speedup_vs_graph"] = t["cudnn-graph"] / t["auto"]
    return row


def deploy_phase(args: argparse.Namespace, device: torch.device, cfg: dict[str, Any], rec: Recorder) -> None:
    d = rec.data
    deadline = time.perf_counter() - T0 + args.deploy_s
    try:
        d["training"] = train_phase(device, args.quick)
    except Exception as e:
        d["training_error"] = _err(e)
        log(f"training failed: {_err(e)}")
    rec.write()
    d.setdefault("deployed", [])
    plan = [(dep, w, b, dt) for dep, w in cfg["deploy_networks"] for b in cfg["deploy_batches"] for dt in args.dtypes]
    for dep, w, b, dname in plan:
        where = f"deployed vgg d{dep} w{w} batch {b} {dname}"
        if time.perf_counter() - T0 > deadline:
            d["skipped"].append(f"{where}: budget")
            continue
        try:
            r = deployed_network(dep, w, b, cfg["net_size"], dname, device, args.repeats, args.sample_ms)
        except Exception as e:
            r = {"depth": dep, "width": w, "batch": b, "dtype": dname, "errors": {"network": _err(e)}}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        d["deployed"].append(r)
        rec.write()
        log(f"{where}: {r.get('plan', '?')}, vs cuDNN eager {r.get('speedup_vs_eager', float('nan')):.2f}x, "
            f"vs cuDNN graph {r.get('speedup_vs_graph', float('nan')):.2f}x, errors {r.get('max_rel_err', {})}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
