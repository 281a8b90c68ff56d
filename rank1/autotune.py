"""Pick the fastest decomposed implementation per layer shape, by measuring once.

Which of ``chain`` (1x1, kx1, 1xk: fewest FLOPs) and ``dw2d`` (1x1, one depthwise kxk:
fewest passes over memory), on CUDA with triton installed ``triton`` (1x1, then one
fused kernel for both 1-D passes), on the CPU ``cpp`` (the whole layer in one fused C++
call) and ``dense`` (the composed kernel as one conv), is fastest depends on the shape, the batch and the
device. :func:`pick_impls` times each candidate for every rank-1 layer of a model on
its real input shape, and caches the choice in a JSON file keyed by device and shape,
so the next model with the same shapes decides instantly. Every implementation
computes the same function, so the choice never changes the outputs.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch
from torch import nn

from rank1.layers import IMPLS, Flat1dConv2d, Rank1Conv2d, available_impls

__all__ = ["DENSE", "build_impl", "cache_path", "candidate_impls", "device_key", "layer_key", "pick_impls"]

DEFAULT_IMPL = "chain"
# The layer's own function as one dense conv of the composed kernel: where per-call
# overhead dominates (few channels, small images, batch 1) it beats every 1-D form, and
# "auto" is then never slower than the dense model.
DENSE = "dense"


def cache_path() -> Path:
    """``$RANK1_IMPL_CACHE``, else ``~/.cache/rank1/impl_cache.json``."""
    env = os.environ.get("RANK1_IMPL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rank1" / "impl_cache.json"


def device_key(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        from rank1.bench import machine_info

        name = f"{machine_info('cpu').get('cpu', platform.processor())}, {torch.get_num_threads()} threads"
    return f"{device.type}:{name}:torch {torch.__version__}"


def layer_key(layer: Rank1Conv2d | Flat1dConv2d, shape: tuple[int, ...], dtype: torch.dtype) -> str:
    return (f"C{layer.in_channels}-O{layer.out_channels}-k{layer.kernel_size}-s{layer.stride}-p{layer.padding}"
            f"-d{layer.dilation}-{layer.padding_mode}-in{tuple(shape)}-{dtype}".replace(" ", ""))


def _load(path: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def candidate_impls(device: torch.device) -> tuple[str, ...]:
    """What :func:`pick_impls` measures on ``device``: the portable :data:`IMPLS` and
    ``"dense"`` (the composed kernel as one conv), plus ``"triton"`` on CUDA where triton
    is installed (never on CPU, even under the interpreter: it exists there for tests,
    not speed), and ``"cpp"`` on the CPU where a compiler can build it (the first
    measurement compiles it, once per machine)."""
    base = (*IMPLS, DENSE)
    if device.type == "cuda" and "triton" in available_impls(device):
        return (*base, "triton")
    if device.type == "cpu" and "cpp" in available_impls(device):
        return (*base, "cpp")
    return base


def build_impl(layer: Rank1Conv2d | Flat1dConv2d, impl: str) -> nn.Module:
    """The inference module of ``layer`` for one of :func:`candidate_impls`."""
    return layer.dense_conv().eval() if impl == DENSE else layer.decompose(impl=impl)


def _measure(layer, shape, device, dtype, repeats: int) -> str:
    from rank1.bench import time_forward

    x = torch.randn(*shape, device=device, dtype=dtype)
    times = {}
    for impl in candidate_impls(device):
        try:
            m = build_impl(layer, impl).to(device=device, dtype=dtype).eval()
            times[impl] = time_forward(m, x, warmup=2, repeats=repeats).median_ms
        except Exception:  # an accelerator impl that fails to compile here is just not picked
            if impl in (*IMPLS, DENSE):
                raise
    return min(times, key=times.get)


@torch.no_grad()
def pick_impls(model: nn.Module, example: torch.Tensor, path: Path | None = None,
               repeats: int = 10) -> dict[str, str]:
    """``{layer name: impl}`` for every rank-1 layer, measured on ``example``'s shapes."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []

    def record(name: str):
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            shapes.setdefault(name, tuple(inp[0].shape))  # returns None: the output is untouched

        return hook

    for name, m in model.named_modules():
        if isinstance(m, (Rank1Conv2d, Flat1dConv2d)):
            hooks.append(m.register_forward_hook(record(name)))
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    path = path or cache_path()
    cache = _load(path)
    # The candidate set is part of the key: a choice made among fewer candidates is made again.
    dev = f"{device_key(example.device)}|{','.join(candidate_impls(example.device))}"
    entry = cache.setdefault(dev, {})
    choices = {}
    changed = False
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        key = layer_key(modules[name], shape, example.dtype)
        if entry.get(key) not in candidate_impls(example.device):
            entry[key] = _measure(modules[name], shape, example.device, example.dtype, repeats)
            changed = True
        choices[name] = entry[key]
    if changed:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            tmp.replace(path)
        except OSError:  # a read-only home only costs the next run a re-measurement
            pass
    return choices
