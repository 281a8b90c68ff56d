"""``impl="auto"``: choose the decomposed form of a whole network, on its real input, by measuring.

Which kernel is fastest depends on the layer, the batch, the device, the threads and
the memory format, and a choice made per layer in isolation can lose on the network:
it ignores the layout each kernel leaves for the next layer and the conversions
between them. :func:`plan_model` therefore measures whole networks on the example
input, candidates being

* every single kernel for every layer (``chain``, ``dw2d``, ``dense``, and ``cpp`` on the
  CPU or ``triton`` on CUDA where they can run), with the input in NCHW or converted to
  channels-last once at the network's entry (the parameters converted with it);
* the greedy pick: per layer the fastest kernel on that layer's own input shape, in
  either layout;
* on CUDA, the two fastest of those captured in a CUDA graph for the example's shape
  (replayed for inputs of that shape; other shapes run eagerly);

and keeps the fastest: the finalists (up to six within 50% of the fastest single pass)
are timed again, paired round by round (:func:`rank1.measure.time_paired`), so that one
noisy pass does not decide; a greedy mix of kernels is kept over the best single form
only where it wins by 3% (in a first full run of the networks benchmark every plan that
lost to a single form by more than 5% was a greedy mix that had won its final narrowly), and
any finalist replaces the device's default form (:data:`DEFAULTS`, on average the best) only
where it wins by 3% too (:data:`DEFAULT_MARGIN`).
Every candidate computes the same function (each kernel is tested against
``F.conv2d``), so the choice never changes the outputs. On the CPU, deploying also keeps
freed memory in glibc's heap for the process (:func:`rank1.measure.keep_freed_memory`):
without it every activation is a fresh ``mmap`` and small layers run several times
slower, so the speed measured is the speed the deployed model then has. The plan is
cached in a JSON file keyed by device, threads, torch version, the candidate set, the
model's structure and the input's shape and dtype, so the next identical network decides
instantly. Without an example, ``auto`` uses :data:`DEFAULTS`, the form that was
fastest in this project's benchmarks on that device type, and says so.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rank1.kernels import KERNELS, Geometry
from rank1.layers import Flat1dConv2d, Rank1Conv2d
from rank1.measure import keep_freed_memory, machine_info, time_forward, time_paired

__all__ = [
    "DEFAULTS", "DEFAULT_MARGIN", "DENSE", "FORMATS", "DeployedModel", "Plan", "assemble", "cache_path", "candidate_impls",
    "default_form", "default_plan", "deploy", "device_key", "formatted", "fuse_relus", "greedy_pick", "in_format",
    "layer_times", "plan_model", "rank1_layer_table", "record_shapes",
]

DENSE = "dense"
# Without an example: the single form that was fastest on most whole networks in this
# project's benchmarks, per device type. CPU: `rank1 bench --networks` of 2026-12-05
# (benchmarks/results/networks.json): the fused kernel fed the input as given (it reads NCHW
# as it is) was the best single form on 50 of 96 networks and the closest to the best on
# average, 1.020x the best's time (geometric mean; at worst 1.16x), where in channels-last
# 1.041x and with the library's 1x1 (cpp_lib) 1.106x / 1.116x; without the kernel, dw2d in
# channels-last (faster than in NCHW on all 96). CUDA:
# benchmarks/results/gpu/h200_eager_*, eager dw2d in NCHW.
DEFAULTS: dict[str, tuple[tuple[str, str], ...]] = {
    "cpu": (("cpp", "nchw"), ("dw2d", "channels_last")),
    "cuda": (("dw2d", "nchw"),),
}
FORMATS = ("nchw", "channels_last")
# Re-timed: up to 6 candidates within 50% of the fastest first pass (at 20% and 4, the best form of
# vgg d8 w128 b32 32x32 was left out by one noisy first pass and auto chose one 1.24x slower).
FINAL_MARGIN, FINALISTS, FINAL_ROUNDS = 1.5, 6, 5
MIXED_MARGIN = 0.03  # a greedy per-layer mix must beat the best single finalist by 3% to be kept
# Another finalist replaces the device's default form (DEFAULTS: on average the best) only where it
# wins by 3%. Five paired rounds still move a candidate's ratio by 5-10% between plannings here (vgg
# depth 4 width 32, batch 32, 32x32, 1 thread, planned 5 times: `cpp` fed NCHW 0.95-1.11 against
# the winner), and a near-tie went to whichever form a noisy final favoured: in the last two runs of
# the 96-network benchmark, 3 of the 4 plans more than 5% behind the best single form were `cpp` in
# channels-last where `cpp` fed NCHW (the default) was the best.
DEFAULT_MARGIN = 0.03
# A single form whose layers, timed in isolation for the greedy pick, take more than this times the
# best form's is not timed as a whole network (it could not come within FINAL_MARGIN of the fastest:
# what the layers share, pooling and the head, only dilutes the ratio towards 1, and 2 x 0.5 of a
# network's time already makes 1.5x). Most planning time went to such forms (chain and dw2d at small
# shapes, 2-4x the fused kernel's layer time).
SKIP_MARGIN = 2.0
_LayerLike = (Rank1Conv2d, Flat1dConv2d)


def cache_path() -> Path:
    """``$RANK1_IMPL_CACHE``, else ``~/.cache/rank1/impl_cache.json``."""
    env = os.environ.get("RANK1_IMPL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rank1" / "impl_cache.json"


def device_key(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{machine_info('cpu').get('cpu', platform.processor())}, {torch.get_num_threads()} threads"
    return f"{device.type}:{name}:torch {torch.__version__}"


def candidate_impls(device: torch.device) -> tuple[str, ...]:
    """The kernels ``auto`` measures on ``device``: those registered for it that can run there
    (``triton`` only on CUDA, even under the interpreter: it exists there for tests, not
    speed; ``cpp`` on the CPU where a compiler can build it, the first use compiling it)."""
    return tuple(n for n, k in KERNELS.items() if k.auto_candidate(device))


@dataclass
class Plan:
    """The decomposed form ``auto`` chose for one network and input shape."""

    impls: dict[str, str]  # rank-1 layer name -> kernel
    memory_format: str = "nchw"  # the input is converted to this once, at the network's entry
    cuda_graph: bool = False  # replay a CUDA graph for inputs of ``shape``
    candidate: str = ""  # which candidate won, e.g. "cpp, channels_last" or "greedy, nchw"
    shape: list[int] = field(default_factory=list)
    times_ms: dict[str, float] = field(default_factory=dict)  # every candidate measured on the example
    measured: bool = True  # False: a device default, nothing measured
    final_ratios: dict[str, float] = field(default_factory=dict)  # the finalists re-timed, paired: time / the first pass's best
    # single forms not timed as networks: their layers in isolation took > SKIP_MARGIN x the best form's
    skipped: dict[str, float] = field(default_factory=dict)  # label -> that ratio

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """E.g. ``cpp x6, dense x2; channels_last`` (``+ CUDA graph``)."""
        counts: dict[str, int] = {}
        for v in self.impls.values():
            counts[v] = counts.get(v, 0) + 1
        s = ", ".join(f"{k} x{n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "no rank-1 layer"
        return s + f"; {self.memory_format}" + (" + CUDA graph" if self.cuda_graph else "")


class DeployedModel(nn.Module):
    """A decomposed network and its :class:`Plan`: the input converted once at entry (where
    the plan says channels-last), and on CUDA a captured graph replayed for the planned shape.

    Attributes it does not have come from the wrapped network (``deployed.features``...).
    """

    def __init__(self, net: nn.Module, plan: Plan) -> None:
        super().__init__()
        self.net = net
        self.plan = plan
        self._graph: _Graphed | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "net":  # a plain reference beside the registered one for forward: a registered
            # submodule is found by __getattr__ (this class's, then nn.Module's), which took the
            # wrapper from 1.3 to 3.5 us a call (4-5% of a 60-us network; AMD EPYC, 2026-12-06)
            self.__dict__["_net"] = value

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("net"), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plan.memory_format == "channels_last" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        g = self._graph
        if g is not None and g.fits(x) and not (x.requires_grad and torch.is_grad_enabled()):
            return g(x)
        return self._net(x)

    def capture(self, example: torch.Tensor) -> DeployedModel:
        """Capture the network in a CUDA graph for ``example``'s shape (CUDA only)."""
        if self.plan.memory_format == "channels_last":
            example = example.contiguous(memory_format=torch.channels_last)
        self._graph = _Graphed(self.net, example)
        self.plan.cuda_graph = True
        return self

    def extra_repr(self) -> str:
        return f"plan: {self.plan.summary()}"


class _Graphed:
    """``net`` captured once for one input shape: copy in, replay, copy out."""

    def __init__(self, net: nn.Module, example: torch.Tensor) -> None:
        self.shape, self.dtype, self.device = tuple(example.shape), example.dtype, example.device
        self.static_in = example.clone()
        side = torch.cuda.Stream(example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(3):  # cuDNN's algorithm search and Triton's compile happen here, not in the graph
                net(self.static_in)
        torch.cuda.current_stream(example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.static_out = net(self.static_in)

    def fits(self, x: torch.Tensor) -> bool:
        return tuple(x.shape) == self.shape and x.dtype == self.dtype and x.device == self.device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out.clone()


# ----------------------------------------------------------------------------- assembling


@dataclass
class _Layer:
    name: str
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    bias: torch.Tensor | None
    geometry: Geometry
    in_shape: tuple[int, ...] | None = None


def rank1_layer_table(model: nn.Module) -> list[_Layer]:
    """Every rank-1 layer's factors (projected once, for a :class:`Rank1Conv2d`), bias and geometry."""
    out = []
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, _LayerLike):
                bias = None if m.bias is None else m.bias.detach()
                out.append(_Layer(name, m._current_factors(), bias,
                                  Geometry(m.stride, m.padding, m.dilation, m.padding_mode)))
    return out


def assemble(model: nn.Module, table: list[_Layer], impls: dict[str, str]) -> nn.Module:
    """A copy of ``model`` (eval mode) with each rank-1 layer built by its kernel in ``impls``."""
    out = copy.deepcopy(model)
    for layer in table:
        new = KERNELS[impls[layer.name]].build(*layer.factors, layer.bias, layer.geometry).eval()
        if not layer.name:  # the model is a single rank-1 layer
            return new
        parent, _, child = layer.name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, new)
    return fuse_relus(out).eval()


def fuse_relus(net: nn.Module) -> nn.Module:
    """Fold each ``nn.ReLU`` that follows, in an ``nn.Sequential`` (past any ``nn.Identity``,
    e.g. an absent norm), a layer whose kernel can apply it in its output store (a module
    with ``fuse_relu()``, alone or last in its own ``nn.Sequential``) into that layer, and
    then the module after it (past ``nn.Identity``) where the layer's ``fuse_max_pool``
    takes it (a 2x2, stride-2 max pool); each folded module becomes ``nn.Identity``, so
    module names and state-dict keys stay. In place."""
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for i, name in enumerate(names):
            layer = seq._modules[name]
            if isinstance(layer, nn.Sequential) and len(layer):
                layer = layer[-1]
            if not callable(getattr(layer, "fuse_relu", None)):
                continue
            rest = [n for n in names[i + 1:] if not isinstance(seq._modules[n], nn.Identity)]
            if rest and isinstance(seq._modules[rest[0]], nn.ReLU) and layer.fuse_relu():
                seq._modules[rest.pop(0)] = nn.Identity()
            fuse_pool = getattr(layer, "fuse_max_pool", None)
            if rest and callable(fuse_pool) and fuse_pool(seq._modules[rest[0]]):
                seq._modules[rest[0]] = nn.Identity()
    return net


def formatted(net: nn.Module, fmt: str) -> nn.Module:
    return net.to(memory_format=torch.channels_last) if fmt == "channels_last" else net


def in_format(x: torch.Tensor, fmt: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" and x.dim() == 4 else x


def record_shapes(model: nn.Module, table: list[_Layer], example: torch.Tensor) -> None:
    modules = dict(model.named_modules())
    hooks = []

    def record(layer: _Layer) -> Callable[..., None]:
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if layer.in_shape is None:
                layer.in_shape = tuple(inp[0].shape)

        return hook

    for layer in table:
        hooks.append(modules[layer.name].register_forward_hook(record(layer)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        lines = str(e).strip().splitlines()
        raise ValueError(f"example: a batch of shape {tuple(example.shape)} ({example.dtype}, {example.device}) "
                         f"does not fit the model ({lines[0] if lines else type(e).__name__})") from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()


# ----------------------------------------------------------------------------- measuring


def _time(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, budget_s: float) -> float:
    return time_forward(fn, x, warmup=2, repeats=5, min_time_s=budget_s).median_ms


@torch.inference_mode()
def layer_times(table: list[_Layer], candidates: tuple[str, ...], fmt: str, device: torch.device,
                dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Per layer, each kernel's time (ms) on that layer's own input shape in layout ``fmt``
    (layers of one shape measured once; a kernel that fails to build here is left out)."""
    by_shape: dict[tuple, dict[str, float]] = {}
    out = {}
    for layer in table:
        key = (layer.in_shape, layer.geometry, tuple(f.shape for f in layer.factors), layer.bias is None)
        if key not in by_shape:
            x = in_format(torch.randn(*layer.in_shape, device=device, dtype=dtype), fmt)
            times = {}
            for name in candidates:
                try:
                    m = formatted(KERNELS[name].build(*layer.factors, layer.bias, layer.geometry).eval(), fmt)
                    times[name] = _time(m, x, 0.02)
                except Exception:  # an accelerator kernel that fails to build here is just not picked
                    if KERNELS[name].exportable:
                        raise
            by_shape[key] = times
        out[layer.name] = by_shape[key]
    return out


def greedy_pick(table: list[_Layer], candidates: tuple[str, ...], fmt: str, device: torch.device,
                dtype: torch.dtype, times: dict[str, dict[str, float]] | None = None) -> dict[str, str]:
    """Per layer, the fastest kernel on that layer's own input shape in layout ``fmt`` (from
    ``times``, :func:`layer_times`, when the caller has them)."""
    times = times if times is not None else layer_times(table, candidates, fmt, device, dtype)
    return {layer.name: min(times[layer.name], key=times[layer.name].get) for layer in table}


def _signature(model: nn.Module, example: torch.Tensor, candidates: tuple[str, ...]) -> str:
    """The cache key: device (threads and torch version included), candidates, the model's
    structure (its repr: every layer's shape and settings, no weights), the input."""
    structure = hashlib.sha1(repr(model).encode()).hexdigest()[:16]
    layout = "nchw" if example.is_contiguous() else "strided"
    return (f"{device_key(example.device)}|{','.join(candidates)}|{type(model).__name__}:{structure}|"
            f"{tuple(example.shape)}|{example.dtype}|{layout}")


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(path: Path, key: str, plan: Plan) -> None:
    try:
        cache = _load(path)
        cache[key] = plan.to_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:  # a read-only home only costs the next run a re-measurement
        pass


@torch.inference_mode()
def plan_model(model: nn.Module, example: torch.Tensor, path: Path | None = None,
               budget_s: float = 0.2) -> tuple[Plan, list[_Layer]]:
    """Measure the candidate forms of ``model`` on ``example`` (its device and dtype) and
    return the fastest :class:`Plan` (from the cache when this network was planned before)
    with the layers' factors. ``budget_s``: minimum measured time per candidate network."""
    table = rank1_layer_table(model)
    record_shapes(model, table, example)
    device = example.device
    candidates = candidate_impls(device)
    path = path or cache_path()
    key = _signature(model, example, candidates)
    cached = _load(path).get(key)
    if isinstance(cached, dict):
        try:
            plan = Plan(**cached)
            if set(plan.impls) == {t.name for t in table} and set(plan.impls.values()) <= set(candidates):
                return plan, table
        except TypeError:  # an entry of another version: measured again
            pass
    per_layer = {fmt: layer_times(table, candidates, fmt, device, example.dtype) for fmt in FORMATS}
    layer_sums = {f"{name}, {fmt}": sum(per_layer[fmt][t.name].get(name, float("inf")) for t in table)
                  for name in candidates for fmt in FORMATS}
    fastest_layers = min(layer_sums.values())
    skipped = {k: v / fastest_layers for k, v in layer_sums.items() if v > SKIP_MARGIN * fastest_layers}
    options: dict[str, tuple[dict[str, str], str]] = {}
    for name in candidates:
        for fmt in FORMATS:
            if f"{name}, {fmt}" not in skipped:
                options[f"{name}, {fmt}"] = ({t.name: name for t in table}, fmt)
    for fmt in FORMATS:
        options[f"greedy, {fmt}"] = (greedy_pick(table, candidates, fmt, device, example.dtype, per_layer[fmt]), fmt)
    times: dict[str, float] = {}
    built: dict[str, nn.Module] = {}
    for label, (impls, fmt) in options.items():
        try:
            net = formatted(assemble(model, table, impls), fmt).to(device)
            # timed as deployed: on the input as given, converted at the entry where the
            # candidate is channels-last (the conversion is part of what it costs)
            times[label] = _time(DeployedModel(net, Plan(impls, fmt)), example, budget_s)
            built[label] = net
        except Exception:  # an accelerator kernel that fails here is just not picked
            if all(KERNELS[v].exportable for v in impls.values()):
                raise
    # One pass over a dozen candidates is at the mercy of a noisy machine (identical networks
    # timed minutes apart differ by 10-20% on a shared 2-core VM): the finalists, those within
    # FINAL_MARGIN of the fastest, are timed again paired round by round, and the lowest
    # median ratio wins. Ties go to the earlier option (library forms before fused kernels).
    first = min(times, key=times.get)
    finalists = [k for k in sorted(times, key=times.get) if times[k] <= FINAL_MARGIN * times[first]][:FINALISTS]
    final: dict[str, float] = {}
    if len(finalists) > 1:
        deployed = {k: DeployedModel(built[k], Plan(*options[k])) for k in finalists}
        final = {k: r[0] for k, r in time_paired(deployed, example, first, rounds=FINAL_ROUNDS,
                                                  min_time_s=budget_s / 4).items()}
    best = min(final, key=lambda k: (final[k], list(options).index(k))) if final else first
    # The lowest of several noisy ratios is biased low too: a mixed (greedy) plan is kept only
    # where it beats the best single form among the finalists by MIXED_MARGIN, else that form is.
    singles = [k for k in final if not k.startswith("greedy")]
    if best.startswith("greedy") and singles:
        single = min(singles, key=lambda k: (final[k], list(options).index(k)))
        if final[best] > (1 - MIXED_MARGIN) * final[single]:
            best = single
    # And any plan is kept over the device's default form only where it beats it by DEFAULT_MARGIN.
    default = "{}, {}".format(*default_form(device))
    if default in final and final[best] > (1 - DEFAULT_MARGIN) * final[default]:
        best = default
    plan = Plan(options[best][0], options[best][1], False, best, list(example.shape))
    best_ms = times[best]
    if device.type == "cuda":  # launches cost more than small kernels: a graph replays them all at once
        for label in sorted(times, key=times.get)[:2]:
            graphed = DeployedModel(built[label], Plan(*options[label])).capture(example)
            t = times[f"{label} + CUDA graph"] = _time(graphed, example, budget_s)
            if t < best_ms:
                best_ms, plan = t, Plan(options[label][0], options[label][1], True, label, list(example.shape))
    plan.times_ms = times
    plan.final_ratios = final
    plan.skipped = {k: v for k, v in skipped.items() if v != float("inf")}
    _store(path, key, plan)
    return plan, table


def default_form(device: torch.device) -> tuple[str, str]:
    """``(kernel, memory format)``: the first of the device's :data:`DEFAULTS` that runs here."""
    for name, fmt in DEFAULTS.get(device.type, ()) + (("dw2d", "nchw"),):
        if name in KERNELS and KERNELS[name].available(device):
            return name, fmt
    raise AssertionError("dw2d is always available")  # pragma: no cover


def default_plan(model: nn.Module, device: torch.device) -> tuple[Plan, list[_Layer]]:
    """The device's :data:`DEFAULTS` form, nothing measured (``auto`` without an example)."""
    table = rank1_layer_table(model)
    name, fmt = default_form(device)
    return Plan({t.name: name for t in table}, fmt, False, f"{name}, {fmt} (default)", measured=False), table


def deploy(model: nn.Module, example: torch.Tensor | None = None, cache: Path | None = None,
           device: torch.device | None = None) -> DeployedModel:
    """``model``'s fastest decomposed form on ``example`` (or the device default, said in a
    warning), as a :class:`DeployedModel`. ``model`` is not changed."""
    if example is None:
        dev = device or next((p.device for p in model.parameters()), torch.device("cpu"))
        plan, table = default_plan(model, dev)
        warnings.warn(
            f"decompose_model(impl='auto') without example=: using {plan.candidate.replace(' (default)', '')} for "
            f"every layer, the fastest single form on {dev.type} in rank1's benchmarks; pass example= (a batch of "
            "the real input) to measure this network", stacklevel=3)
        net = formatted(assemble(model, table, plan.impls), plan.memory_format)
        return DeployedModel(net, plan)
    if example.device.type == "cpu":
        keep_freed_memory()  # what the measurements assume: see rank1.measure.keep_freed_memory
    plan, table = plan_model(model, example, cache)
    net = formatted(assemble(model, table, plan.impls), plan.memory_format).to(example.device)
    deployed = DeployedModel(net, plan)
    if plan.cuda_graph:
        deployed.capture(example)
    return deployed
