"""How low-dimensional are a network's outputs? The paper's third claim, measured.

Kim et al. (2018): "convolution with rank-1 filters results in low-rank outputs,
constraining the final output of the CNN to a low-dimensional subspace". For every
convolution layer, the output feature maps of one image form a ``channels x pixels``
matrix; its singular values say how many directions the layer's output really uses:

* ``energy99``: the number of singular values that hold 99% of the energy
  (``sum sigma^2``) — an integer rank that ignores a noise floor;
* ``entropy``: the entropy-based effective rank ``exp(H(p))`` with
  ``p_i = sigma_i / sum sigma`` (Roy & Vetterli, 2007) — continuous, equal to ``r`` for
  ``r`` equal singular values.

Both are averaged over the images of a fixed batch, and also given as a fraction of
the largest possible rank ``min(channels, pixels)``. The network's penultimate
features (the input of its classifier) form one ``images x features`` matrix for the
whole batch. Pure tensor math plus forward hooks; nothing is trained.
"""

from __future__ import annotations

import torch
from torch import nn

from rank1.gradstats import conv_layers

__all__ = ["ENERGY", "energy_rank", "entropy_rank", "output_ranks", "rank_summary"]

ENERGY = 0.99


def energy_rank(s: torch.Tensor, energy: float = ENERGY) -> torch.Tensor:
    """Singular values needed to hold ``energy`` of ``sum s^2``, per row of ``s`` (``... x k``,
    any order); 0 for an all-zero row."""
    e = s.double().pow(2).sort(dim=-1, descending=True).values
    total = e.sum(dim=-1, keepdim=True)
    frac = e.cumsum(dim=-1) / total.clamp_min(1e-300)
    # The first index where the cumulative share reaches `energy` (a small slack for rounding).
    k = (frac < energy - 1e-12).sum(dim=-1) + 1
    return torch.where(total.squeeze(-1) > 0, k, torch.zeros_like(k))


def entropy_rank(s: torch.Tensor) -> torch.Tensor:
    """``exp`` of the entropy of ``s / sum s``, per row of ``s`` (``... x k``); 0 for a zero row."""
    s = s.double().clamp_min(0)
    total = s.sum(dim=-1, keepdim=True)
    p = s / total.clamp_min(1e-300)
    h = -(p * torch.log(p.clamp_min(1e-300))).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, torch.exp(h), torch.zeros_like(h))


def rank_summary(m: torch.Tensor) -> dict[str, float]:
    """Effective ranks of a batch of matrices ``N x rows x cols`` (or one ``rows x cols``),
    averaged over the batch."""
    if m.dim() == 2:
        m = m[None]
    s = torch.linalg.svdvals(m.double())  # N x min(rows, cols)
    dim = min(m.shape[-2:])
    e99 = energy_rank(s).double().mean().item()
    ent = entropy_rank(s).mean().item()
    return {"energy99": e99, "entropy": ent, "dim": float(dim), "energy99_frac": e99 / dim, "entropy_frac": ent / dim}


@torch.no_grad()
def output_ranks(model: nn.Module, x: torch.Tensor, head: nn.Module | None = None) -> dict[str, float]:
    """``{LNN.energy99, LNN.entropy, ..., penultimate.energy99, ...}`` for ``model`` on the batch
    ``x`` (eval mode). Layers are the spatial convolutions in module order
    (:func:`rank1.gradstats.conv_layers`, the same list for every arm); the penultimate
    features are the input of ``head`` (default: the model's ``head`` attribute, else its
    last ``nn.Linear``)."""
    outputs: dict[int, torch.Tensor] = {}
    layers = [m for _, m in conv_layers(model)]
    if head is None:
        head = getattr(model, "head", None) or next((m for m in reversed(list(model.modules()))
                                                      if isinstance(m, nn.Linear)), None)
    penult: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, i=i: outputs.setdefault(i, out.detach()))
             for i, m in enumerate(layers)]
    if head is not None:
        hooks.append(head.register_forward_hook(lambda mod, inp, out: penult.append(inp[0].detach())))
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    out: dict[str, float] = {}
    for i in range(len(layers)):
        y = outputs[i].float()
        s = rank_summary(y.flatten(2))  # N x channels x pixels
        out.update({f"L{i:02d}.{k}": v for k, v in s.items()})
    if penult:
        out.update({f"penultimate.{k}": v for k, v in rank_summary(penult[0].float().flatten(1)).items()})
    if layers:
        for k in ("energy99_frac", "entropy_frac"):
            out[f"mean.{k}"] = sum(out[f"L{i:02d}.{k}"] for i in range(len(layers))) / len(layers)
    return out
