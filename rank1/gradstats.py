"""Gradient-flow statistics per convolution layer: the paper's central claim, measured.

Two views per layer, averaged over the batches of an epoch:

* ``grad.out.LNN`` — the norm of the loss gradient with respect to the layer's
  *output*. Both arms compute the same function class, so this is comparable across
  arms: it is the signal that reaches the layer from above.
* ``grad.param.LNN`` — the norm of the parameter gradient (``weight`` for rank1 and
  dense; ``a``, ``b``, ``c`` separately for flat1d as ``grad.param.LNN.a`` ...).

Plus ``weight.LNN`` (the norm of the layer's effective 3-D filter bank) and the
summaries ``grad.out.ratio`` (first / last layer: far below 1 means the gradient
vanishes on its way down) and ``grad.out.min`` (the weakest layer). Norms are kept
as device tensors while training and read once per epoch, so the monitor adds no
host synchronisation per step. These are raw sums over a tensor (they grow with its
size) of the weights being trained (unprojected for rank1 between projections).

:func:`measure_gradient_flow` is the comparable measurement: per-element (RMS)
norms, on a copy of the network an arm is *evaluated* as (projected, for rank1), on
fixed batches that are the same for every arm. Training calls it at initialisation,
after epoch 1 and at the end.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from rank1.layers import Flat1dConv2d, Rank1Conv2d

__all__ = ["GradientMonitor", "conv_layers", "flow_summary", "measure_gradient_flow"]


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The arm's spatial convolutions in module order — the same list, in the same
    order, for the rank1, flat1d and dense versions of a network."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (Rank1Conv2d, Flat1dConv2d))
        or (type(m) is nn.Conv2d and m.groups == 1 and m.kernel_size[0] * m.kernel_size[1] > 1)
    ]


def _params(m: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(m, Flat1dConv2d):
        return {".a": m.a, ".b": m.b, ".c": m.c}
    return {"": m.weight}


def _weight(m: nn.Module) -> torch.Tensor:
    return m.dense_weight() if isinstance(m, Flat1dConv2d) else m.weight


class GradientMonitor:
    """Accumulates per-layer gradient norms of one model over an epoch."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = conv_layers(model)
        self.names = [f"L{i:02d}" for i in range(len(self.layers))]
        self._handles = [m.register_forward_hook(self._forward_hook(i)) for i, (_, m) in enumerate(self.layers)]
        self.reset()

    def reset(self) -> None:
        self._out: list[torch.Tensor | float] = [0.0] * len(self.layers)
        self._param: dict[str, torch.Tensor | float] = {}
        self._n_out = [0] * len(self.layers)
        self._n_param = 0

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _forward_hook(self, i: int):
        def hook(module: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if module.training and out.requires_grad:
                out.register_hook(lambda g: self._add_out(i, g))

        return hook

    def _add_out(self, i: int, grad: torch.Tensor) -> None:
        self._out[i] = self._out[i] + grad.detach().float().norm()
        self._n_out[i] += 1

    def after_backward(self) -> None:
        """Record parameter gradient norms; call between ``backward()`` and ``step()``."""
        for name, (_, m) in zip(self.names, self.layers):
            for suffix, p in _params(m).items():
                if p.grad is not None:
                    key = f"grad.param.{name}{suffix}"
                    self._param[key] = self._param.get(key, 0.0) + p.grad.detach().float().norm()
        self._n_param += 1

    @torch.no_grad()
    def summary(self) -> dict[str, float]:
        """This epoch's means, weight norms and the two summaries; then reset."""
        out: dict[str, float] = {}
        grads = []
        for i, name in enumerate(self.names):
            if self._n_out[i]:
                g = float(self._out[i]) / self._n_out[i]
                out[f"grad.out.{name}"] = g
                grads.append(g)
        for key, total in self._param.items():
            out[key] = float(total) / max(1, self._n_param)
        for name, (_, m) in zip(self.names, self.layers):
            out[f"weight.{name}"] = float(_weight(m).detach().float().norm())
        if grads:
            out["grad.out.ratio"] = grads[0] / grads[-1] if grads[-1] > 0 else float("inf")
            out["grad.out.min"] = min(grads)
        self.reset()
        return out


def flow_summary(out: dict[str, float], prefix: str = "out.") -> dict[str, float]:
    """``ratio`` (first / last layer) and ``min`` of the per-layer values ``{prefix}LNN``."""
    layers = sorted(k for k in out if k.startswith(prefix) and k[len(prefix):].startswith("L"))
    vals = [out[k] for k in layers]
    if not vals:
        return {}
    return {f"{prefix}ratio": vals[0] / vals[-1] if vals[-1] > 0 else math.inf, f"{prefix}min": min(vals)}


def measure_gradient_flow(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> dict[str, float]:
    """Per-element (RMS) gradient norms of ``model`` over ``batches``, without touching it.

    ``out.LNN``: ``sqrt(mean(g^2))`` of the loss gradient with respect to conv layer
    ``LNN``'s output, over every element of every batch; ``param.LNN`` (``.a .b .c`` for
    flat1d): the same for the parameter gradients, one backward per batch. Plus
    ``out.ratio`` (first / last layer) and ``out.min``. Runs on a deep copy in train mode
    (batch statistics, as in training), so the model, its running statistics and the
    optimiser are left as they were.
    """
    net = copy.deepcopy(model)
    for m in net.modules():  # the training monitor's hooks travel with a deep copy: drop them
        m._forward_hooks.clear()
    net.train()
    layers = conv_layers(net)
    names = [f"L{i:02d}" for i in range(len(layers))]
    sq = [0.0] * len(layers)
    count = [0] * len(layers)
    psq: dict[str, float] = {}
    pcount: dict[str, int] = {}

    def hook(i: int):
        def fwd(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            def grad_hook(g: torch.Tensor) -> None:
                sq[i] += float(g.detach().double().pow(2).sum())
                count[i] += g.numel()

            out.register_hook(grad_hook)

        return fwd

    handles = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(layers)]
    try:
        for x, y in batches:
            net.zero_grad(set_to_none=True)
            loss_fn(net(x).float(), y).backward()
            for name, (_, m) in zip(names, layers):
                for suffix, p in _params(m).items():
                    if p.grad is not None:
                        key = f"param.{name}{suffix}"
                        psq[key] = psq.get(key, 0.0) + float(p.grad.detach().double().pow(2).sum())
                        pcount[key] = pcount.get(key, 0) + p.grad.numel()
    finally:
        for h in handles:
            h.remove()
    out = {f"out.{n}": math.sqrt(sq[i] / count[i]) for i, n in enumerate(names) if count[i]}
    out.update({k: math.sqrt(v / pcount[k]) for k, v in psq.items()})
    out.update(flow_summary(out))
    return out
