"""Networks for every arm, as a registry: the arms differ only in the conv layer.

Each builder takes ``arm``: ``"rank1"`` (:class:`Rank1Conv2d`, the paper),
``"flat1d"`` (:class:`Flat1dConv2d`, consecutive 1-D filters) or ``"dense"``
(``nn.Conv2d``, the unconstrained reference). Every spatial convolution is drawn
the same way for all three arms — rank-1 factors from the init scheme, in the same
order from the same RNG — so with the same seed all arms start as the identical
function (the dense arm holds the composed weight, free to leave rank-1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from rank1.layers import Flat1dConv2d, Rank1Conv2d, empty_conv

__all__ = ["ARMS_ALL", "FLAT1D_INITS", "MODELS", "build_model", "conv_layer", "model_for", "register_model"]

ARMS_ALL = ("rank1", "flat1d", "dense")

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: add a network family under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return deco


def build_model(name: str, arm: str = "rank1", **kwargs: Any) -> nn.Module:
    """A network of family ``name`` for ``arm``; kwargs go to the family's builder."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    if arm not in ARMS_ALL:
        raise ValueError(f"arm must be one of {ARMS_ALL}, got {arm!r}")
    return MODELS[name](arm=arm, **kwargs)


FLAT1D_INITS = ("shared", "torch", "he")


def model_for(config: Mapping[str, Any], arm: str, in_channels: int, num_classes: int) -> nn.Module:
    """The network a training config describes, for ``arm``: ``config`` holds
    :class:`rank1.train.TrainConfig`'s fields (the dataclass or its dict, e.g. from a model
    card). The one place a config becomes a model: training, the registry and serving."""
    get = config.get if isinstance(config, Mapping) else lambda k: getattr(config, k)
    return build_model(get("model"), arm=arm, depth=get("depth"), width=get("width"), stages=get("stages"),
                       batchnorm=get("batchnorm"), kernel_size=get("kernel_size"), in_channels=in_channels,
                       num_classes=num_classes, init=get("init"), projection_norm=get("projection_norm"),
                       flat1d_init=get("flat1d_init"), rank1_start=get("rank1_start"))


def conv_layer(
    arm: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    bias: bool = True,
    init: str = "kaiming",
    projection_norm: str = "keep",
    flat1d_init: str = "shared",
    rank1_start: str = "rank1",
) -> nn.Module:
    """One ``k x k`` "same"-padded convolution of the given arm.

    The rank1 layer is drawn first (``rank1_start``: rank-1 from ``init``, or a full-rank
    He filter); the dense arm copies its weight. The flat1d arm either copies its factors
    (``flat1d_init="shared"``: the same initial function when the rank1 layer starts
    rank-1; with ``rank1_start="full"``, what that layer's first projection gives) or
    initialises its three 1-D convolutions its own way (``"torch"``, ``"he"``: see
    :class:`Flat1dConv2d`), drawn from the same random stream in place of the rank1 layer.
    """
    if flat1d_init not in FLAT1D_INITS:
        raise ValueError(f"flat1d_init must be one of {FLAT1D_INITS}, got {flat1d_init!r}")
    padding = kernel_size // 2
    if arm == "flat1d" and flat1d_init != "shared":
        return Flat1dConv2d(in_channels, out_channels, kernel_size, stride, padding=padding, bias=bias, init=init,
                            factor_init=flat1d_init)
    layer = Rank1Conv2d(
        in_channels, out_channels, kernel_size, stride, padding=padding, bias=bias,
        init=init, projection_norm=projection_norm, start=rank1_start,
    )
    if arm == "rank1":
        return layer
    if arm == "flat1d":
        return Flat1dConv2d.from_rank1(layer)
    conv = empty_conv(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(layer.weight)
        if bias:
            conv.bias.copy_(layer.bias)
    return conv


def _norm(channels: int, batchnorm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()


def _check_sizes(width: int, stages: int, kernel_size: int) -> None:
    if width < 1 or stages < 1:
        raise ValueError(f"width and stages must be >= 1, got width={width}, stages={stages}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (1, 3, 5, ...) so padding keeps the size, got {kernel_size}")


def _stage_sizes(depth: int, stages: int) -> list[int]:
    """Split ``depth`` layers over ``stages`` as evenly as possible, early stages first."""
    stages = min(stages, depth)
    return [depth // stages + (1 if i < depth % stages else 0) for i in range(stages)]


class VGG(nn.Module):
    """A plain stack of ``k x k`` convolutions (Simonyan & Zisserman, 2015), sized for
    small images: ``depth`` conv layers over ``stages`` stages with 2x2 max pooling
    between them, width doubling per stage (up to ``max_width``), global average
    pooling and a linear head."""

    def __init__(
        self,
        arm: str = "rank1",
        depth: int = 8,
        width: int = 32,
        stages: int = 3,
        widen: float = 2.0,
        max_width: int = 512,
        batchnorm: bool = False,
        kernel_size: int = 3,
        in_channels: int = 1,
        num_classes: int = 10,
        init: str = "kaiming",
        projection_norm: str = "keep",
        flat1d_init: str = "shared",
        rank1_start: str = "rank1",
    ) -> None:
        super().__init__()
        if not 1 <= depth <= 32:
            raise ValueError(f"depth must be in 1..32 for vgg, got {depth}")
        _check_sizes(width, stages, kernel_size)
        kw = dict(init=init, projection_norm=projection_norm, flat1d_init=flat1d_init, rank1_start=rank1_start)
        layers: list[nn.Module] = []
        c_in = in_channels
        for s, n in enumerate(_stage_sizes(depth, stages)):
            if s > 0:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            c_out = min(max_width, int(round(width * widen**s)))
            for _ in range(n):
                layers += [
                    conv_layer(arm, c_in, c_out, kernel_size, bias=not batchnorm, **kw),
                    _norm(c_out, batchnorm),
                    nn.ReLU(inplace=True),
                ]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    """Two ``k x k`` convolutions with an identity (or 1x1 projection) shortcut
    (He et al., 2016). Without batch norm the sum is scaled by ``1/sqrt(2)`` so the
    activation variance stays put with depth instead of doubling per block."""

    def __init__(self, arm: str, c_in: int, c_out: int, stride: int, batchnorm: bool, kernel_size: int,
                 **layer_kw: str) -> None:
        super().__init__()
        kw = dict(layer_kw, bias=not batchnorm)
        self.conv1 = conv_layer(arm, c_in, c_out, kernel_size, stride, **kw)
        self.bn1 = _norm(c_out, batchnorm)
        self.conv2 = conv_layer(arm, c_out, c_out, kernel_size, **kw)
        self.bn2 = _norm(c_out, batchnorm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            # 1x1: the same dense layer in every arm (there is nothing to factorise).
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(c_out, batchnorm))
        self.scale = 1.0 if batchnorm else 1.0 / math.sqrt(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu((out + self.shortcut(x)) * self.scale)


class ResNet(nn.Module):
    """A ResNet of basic blocks for small images: a stem convolution, then ``depth``
    blocks over ``stages`` stages (stride 2 and doubled width at each new stage),
    global average pooling and a linear head. ``2 * depth + 1`` spatial convolutions."""

    def __init__(
        self,
        arm: str = "rank1",
        depth: int = 3,
        width: int = 16,
        stages: int = 3,
        batchnorm: bool = True,
        kernel_size: int = 3,
        in_channels: int = 1,
        num_classes: int = 10,
        init: str = "kaiming",
        projection_norm: str = "keep",
        max_width: int = 512,
        flat1d_init: str = "shared",
        rank1_start: str = "rank1",
    ) -> None:
        super().__init__()
        if not 1 <= depth <= 32:
            raise ValueError(f"depth (basic blocks) must be in 1..32 for resnet, got {depth}")
        _check_sizes(width, stages, kernel_size)
        kw = dict(init=init, projection_norm=projection_norm, flat1d_init=flat1d_init, rank1_start=rank1_start)
        self.stem = conv_layer(arm, in_channels, width, kernel_size, bias=not batchnorm, **kw)
        self.stem_norm = _norm(width, batchnorm)
        blocks: list[nn.Module] = []
        c_in = width
        for s, n in enumerate(_stage_sizes(depth, stages)):
            c_out = min(max_width, width * 2**s)
            for i in range(n):
                stride = 2 if (s > 0 and i == 0) else 1
                blocks.append(BasicBlock(arm, c_in, c_out, stride, batchnorm, kernel_size, **kw))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_norm(self.stem(x)))
        return self.head(self.pool(self.blocks(x)).flatten(1))


@register_model("vgg")
def vgg(arm: str = "rank1", **kwargs: Any) -> nn.Module:
    return VGG(arm=arm, **kwargs)


@register_model("resnet")
def resnet(arm: str = "rank1", **kwargs: Any) -> nn.Module:
    return ResNet(arm=arm, **kwargs)
