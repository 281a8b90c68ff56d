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
host synchronisation per step.
"""

from __future__ import annotations

import torch
from torch import nn

from rank1.layers import Flat1dConv2d, Rank1Conv2d

__all__ = ["GradientMonitor", "conv_layers"]


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
