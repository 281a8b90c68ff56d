"""Rank-1 convolution layers: the paper's 3-D rank-1 filters and their 1-D twin.

* :class:`Rank1Conv2d` trains the full 3-D weight and is projected onto rank-1 on
  a schedule (``project_()``, called by the training loop); after training it
  ``decompose()``-s into three consecutive 1-D convolutions for fast inference.
* :class:`Flat1dConv2d` trains the three 1-D convolutions directly (Flattened CNNs,
  Jin et al. 2014): the same function class, different training dynamics.

Both take ``nn.Conv2d``'s constructor arguments (``groups=1`` only) plus the factor
initialisation scheme.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rank1 import functional as R
from rank1.init import INIT_SCHEMES, init_factors
from rank1.kernels import KERNELS, Geometry, available_kernels, get_kernel, kernel_names
from rank1.kernels.library import empty_conv

__all__ = [
    "ACCEL_IMPLS", "ALL_IMPLS", "FACTOR_INITS", "IMPLS", "STARTS", "Flat1dConv2d", "Rank1Conv2d", "available_impls",
    "decomposed_chain",
    "empty_conv",
]

_size_2 = int | tuple[int, int]


def _pair(name: str, value: Any, minimum: int) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum} on both axes, got {tuple(value)}")
    return int(value[0]), int(value[1])


class _Rank1ConvBase(nn.Module):
    """Argument handling shared by both arms: ``nn.Conv2d``'s, checked up front."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2,
        stride: _size_2 = 1,
        padding: str | _size_2 = 0,
        dilation: _size_2 = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        init: str = "kaiming",
        gain: float = math.sqrt(2.0),
    ) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if groups != 1:
            raise ValueError(
                f"groups must be 1 for rank-1 layers (allowed: 1), got {groups!r}; "
                "a grouped conv is already a different factorisation"
            )
        if padding_mode not in R.PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {R.PADDING_MODES}, got {padding_mode!r}")
        if init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {sorted(INIT_SCHEMES)}, got {init!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = _pair("stride", stride, 1)
        self.dilation = _pair("dilation", dilation, 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid' or int(s), got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride {self.stride}")
            self.padding: str | tuple[int, int] = padding
        else:
            self.padding = _pair("padding", padding, 0)
        self.groups = 1
        self.padding_mode = padding_mode
        self.init = init
        self.gain = float(gain)

    def _conv_kwargs(self) -> dict[str, Any]:
        return dict(
            stride=self.stride, padding=self.padding, dilation=self.dilation,
            padding_mode=self.padding_mode,
        )

    def _reset_bias(self) -> None:
        if self.bias is not None:  # nn.Conv2d's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
            nn.init.uniform_(self.bias, -bound, bound)

    def decompose(self, impl: str = "chain") -> nn.Sequential:  # pragma: no cover - overridden
        raise NotImplementedError

    def dense_conv(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing this layer's current rank-1 function."""
        bias = None if self.bias is None else self.bias.detach()
        return decomposed_chain(*self._current_factors(), bias, self.stride, self.padding, self.dilation,
                                self.padding_mode, "dense")

    def _current_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        s += R.settings_repr(self.stride, self.padding, self.dilation, self.bias is not None, self.padding_mode)
        return s + (f", init={self.init!r}" if self.init != "kaiming" else "")


STARTS = ("rank1", "full")  # Rank1Conv2d(start=...): rank-1 from the init scheme, or a full-rank He filter
FACTOR_INITS = ("scheme", "torch", "he")  # Flat1dConv2d(factor_init=...)

# The implementations of the decomposed form live in the kernel registry (rank1.kernels).
ALL_IMPLS = kernel_names(decomposed_only=True)
IMPLS = tuple(n for n in ALL_IMPLS if KERNELS[n].exportable)  # standard torch modules only: exportable
ACCEL_IMPLS = tuple(n for n in ALL_IMPLS if not KERNELS[n].exportable)  # fused kernels: inference only


def available_impls(device: torch.device | str | None = None) -> tuple[str, ...]:
    """The decomposed implementations that can run on ``device`` (None: any device this
    process has): the library ones everywhere, ``triton`` where triton and CUDA are (or the
    Triton interpreter is on), ``cpp`` on the CPU where the C++ kernel can be built. Never
    imports triton or builds the C++ kernel itself."""
    return available_kernels(device)


def decomposed_chain(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: str | tuple[int, int],
    dilation: tuple[int, int],
    padding_mode: str = "zeros",
    impl: str = "chain",
) -> nn.Module:
    """The inference module of these factors under implementation ``impl`` (a name in
    :data:`rank1.kernels.KERNELS`: ``chain``, ``dw2d``, ``cpp``, ``triton`` or ``dense``).

    ``chain`` and ``dw2d`` are standard ``nn.Conv2d`` modules (they trace, export and
    convert to ONNX); ``cpp`` (the whole layer in one call of a fused C++ CPU kernel) and
    ``triton`` (1x1, then both depthwise passes in one Triton kernel on CUDA) are for
    inference only. Every one computes the same function. One that cannot run where the
    factors are raises a ``ValueError`` naming why and what is allowed.
    """
    if impl not in KERNELS:
        raise ValueError(f"impl must be one of {ALL_IMPLS}, got {impl!r}")
    # Checked for any device of this process: factors built on the CPU may run on CUDA later.
    kernel = get_kernel(impl)
    return kernel.build(a, b, c, bias, Geometry(stride, padding, dilation, padding_mode))


class Rank1Conv2d(_Rank1ConvBase):
    """2-D convolution whose filters are trained as 3-D tensors and projected to rank-1.

    The trainable parameter is the full ``weight`` (``O x C x kh x kw``), exactly as
    in ``nn.Conv2d``, so gradient descent moves it freely. :meth:`project_` replaces
    every filter by its best rank-1 approximation ``a (x) b (x) c`` (Kim et al. 2018
    project once per epoch); the factors are kept as buffers and warm-start the next
    projection. After training, :meth:`decompose` gives the fast 1-D form.

    Args (beyond ``nn.Conv2d``'s):
        init: factor initialisation scheme, one of :data:`rank1.init.INIT_SCHEMES`.
        projection_norm: ``"keep"`` (plain best approximation) or ``"rescale"``
            (rank-1 direction, norm of the unprojected filter).
        gain: target filter norm of the initialisation (He: ``sqrt(2)`` for ReLU).
        n_iter: cap on power-method sweeps per projection.
        start: ``"rank1"`` (the weight starts as the outer product of the ``init``
            factors) or ``"full"`` (an ordinary full-rank He-normal filter with
            ``E||W[o]||^2 = gain^2``, left full rank until the first ``project_()``;
            the factors then hold its best rank-1 approximation, as warm start).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2,
        stride: _size_2 = 1,
        padding: str | _size_2 = 0,
        dilation: _size_2 = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        init: str = "kaiming",
        projection_norm: str = "keep",
        gain: float = math.sqrt(2.0),
        n_iter: int = 100,
        start: str = "rank1",
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, init, gain,
        )
        if start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {start!r}")
        self.start = start
        if projection_norm not in R.PROJECTION_NORMS:
            raise ValueError(
                f"projection_norm must be one of {R.PROJECTION_NORMS}, got {projection_norm!r}"
            )
        if n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}")
        self.projection_norm = projection_norm
        self.n_iter = n_iter
        kh, kw = self.kernel_size
        fk = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kh, kw, **fk))
        self.bias = nn.Parameter(torch.empty(out_channels, **fk)) if bias else None
        self.register_buffer("a", torch.empty(out_channels, in_channels, **fk))
        self.register_buffer("b", torch.empty(out_channels, kh, **fk))
        self.register_buffer("c", torch.empty(out_channels, kw, **fk))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``start="rank1"``: factors from the init scheme, the weight their outer product.
        ``start="full"``: a He-normal full-rank weight, its best rank-1 part as factors."""
        kh, kw = self.kernel_size
        if self.start == "full":
            with torch.no_grad():
                fan_in = self.in_channels * kh * kw
                self.weight.normal_(0.0, self.gain / math.sqrt(fan_in))  # E||W[o]||^2 = gain^2
                a, b, c = R.project_rank1(self.weight, norm=self.projection_norm)
                self.a.copy_(a)
                self.b.copy_(b)
                self.c.copy_(c)
            self._reset_bias()
            return
        a, b, c = init_factors(
            self.init, self.out_channels, self.in_channels, kh, kw, self.gain,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        with torch.no_grad():
            self.a.copy_(a)
            self.b.copy_(b)
            self.c.copy_(c)
            self.weight.copy_(R.compose(a, b, c))
        self._reset_bias()

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, b, c)`` from the last projection (or the initialisation)."""
        return self.a, self.b, self.c

    def _hopm(self) -> R.Projection:
        return R.hopm_rank1(self.weight, factors=self.factors, n_iter=self.n_iter)

    def _factors_of(self, p: R.Projection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Canonical factors of a projection, with this layer's projection norm."""
        scale = p.sigma
        if self.projection_norm == "rescale":
            norms = self.weight.detach().flatten(1).norm(dim=1).to(p.sigma.dtype)
            scale = torch.where(p.sigma > 0, norms, torch.zeros_like(p.sigma))
        return tuple(f.to(self.weight.dtype) for f in R.normalize_factors(p.a, p.b, p.c, scale))  # type: ignore[return-value]

    def _residual(self, p: R.Projection) -> torch.Tensor:
        # Computed directly, not as sqrt(||W||^2 - sigma^2): that cancels
        # catastrophically in float32 when W is (nearly) rank-1.
        w = self.weight.detach().to(p.sigma.dtype)
        approx = R.compose(p.a * p.sigma[:, None], p.b, p.c)
        return (w - approx).norm() / w.norm().clamp_min(1e-30)

    @torch.no_grad()
    def rank1_residual(self) -> torch.Tensor:
        """``||W - P(W)|| / ||W||``: how far the weight has drifted from rank-1.

        Measured against the plain best rank-1 approximation, without projecting.
        """
        return self._residual(self._hopm())

    @torch.no_grad()
    def project_(self) -> torch.Tensor:
        """Replace the weight by its rank-1 projection, in place; keep the factors.

        Returns :meth:`rank1_residual` as it was just before projecting, for logging
        (computed from the same power-method run, so it costs nothing extra).
        """
        p = self._hopm()
        residual = self._residual(p)
        a, b, c = self._factors_of(p)
        self.a.copy_(a)
        self.b.copy_(b)
        self.c.copy_(c)
        self.weight.copy_(R.compose(a, b, c))
        return residual

    def _current_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._factors_of(self._hopm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return R.conv2d(x, self.weight, self.bias, **self._conv_kwargs())

    @torch.no_grad()
    def decompose(self, impl: str = "chain") -> nn.Sequential:
        """The fast inference form: 1-D convolutions of standard torch modules.

        Uses the rank-1 projection of the *current* weight (the layer is not
        modified): after ``project_()`` that is exactly this layer's function.
        ``impl``: see :func:`decomposed_chain`.
        """
        a, b, c = self._current_factors()
        bias = None if self.bias is None else self.bias.detach()
        return decomposed_chain(a, b, c, bias, self.stride, self.padding, self.dilation, self.padding_mode, impl)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        init: str | None = None,
        projection_norm: str = "keep",
        **kwargs: Any,
    ) -> Rank1Conv2d:
        """A rank-1 layer with ``conv``'s geometry.

        Without ``init`` it starts from ``conv``'s own weights, projected to rank-1
        (with ``projection_norm``); with ``init`` it draws fresh factors from that scheme.
        """
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
            conv.padding, conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype, init=init or "kaiming",
            projection_norm=projection_norm, **kwargs,
        )
        if init is None:
            with torch.no_grad():
                layer.weight.copy_(conv.weight)
                a, b, c = R.project_rank1(conv.weight, norm=projection_norm)
                layer.a.copy_(a)
                layer.b.copy_(b)
                layer.c.copy_(c)
                layer.weight.copy_(R.compose(a, b, c))
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias)
        return layer

    def extra_repr(self) -> str:
        s = super().extra_repr()
        s += f", start={self.start!r}" if self.start != "rank1" else ""
        return s + (f", projection_norm={self.projection_norm!r}" if self.projection_norm != "keep" else "")


class Flat1dConv2d(_Rank1ConvBase):
    """Consecutive 1-D convolutions trained directly: the twin arm of :class:`Rank1Conv2d`.

    Parameters ``a`` (``O x C``, the 1x1 conv), ``b`` (``O x kh``, depthwise vertical)
    and ``c`` (``O x kw``, depthwise horizontal) are the trainable weights; the layer
    computes the same function class as a projected :class:`Rank1Conv2d`.

    ``factor_init`` says how the factors start (:data:`FACTOR_INITS`):

    * ``"scheme"``: from the ``init`` scheme, each composed filter rescaled to the He
      norm ``||W[o]||^2 = gain^2`` (what :meth:`from_rank1` copies from a rank-1 twin);
    * ``"torch"``: each of the three 1-D convolutions exactly as an ``nn.Conv2d`` of its
      shape initialises itself (Kaiming-uniform with ``a = sqrt(5)``, so every weight is
      ``U(+-1/sqrt(fan_in))``; the bias is the last conv's). A Flattened CNN built the
      ordinary way: ``E||W[o]||^2 = (1/3)^3 = 1/27``, 54x below He's 2;
    * ``"he"``: each 1-D convolution He-normal on its own fan-in (``N(0, 2/fan_in)``):
      ``E||W[o]||^2 = 2^3 = 8``, 4x He's.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2,
        stride: _size_2 = 1,
        padding: str | _size_2 = 0,
        dilation: _size_2 = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        init: str = "kaiming",
        gain: float = math.sqrt(2.0),
        factor_init: str = "scheme",
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, init, gain,
        )
        if factor_init not in FACTOR_INITS:
            raise ValueError(f"factor_init must be one of {FACTOR_INITS}, got {factor_init!r}")
        self.factor_init = factor_init
        kh, kw = self.kernel_size
        fk = dict(device=device, dtype=dtype)
        self.a = nn.Parameter(torch.empty(out_channels, in_channels, **fk))
        self.b = nn.Parameter(torch.empty(out_channels, kh, **fk))
        self.c = nn.Parameter(torch.empty(out_channels, kw, **fk))
        self.bias = nn.Parameter(torch.empty(out_channels, **fk)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        kh, kw = self.kernel_size
        o, ch = self.out_channels, self.in_channels
        if self.factor_init != "scheme":
            # The three 1-D convolutions as nn.Conv2d builds them, drawn in chain order.
            fk = dict(device=self.a.device, dtype=self.a.dtype)
            convs = (nn.Conv2d(ch, o, 1, bias=False, **fk), nn.Conv2d(o, o, (kh, 1), groups=o, bias=False, **fk),
                     nn.Conv2d(o, o, (1, kw), groups=o, bias=self.bias is not None, **fk))
            if self.factor_init == "he":
                for conv in convs:
                    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
            with torch.no_grad():
                for dst, conv in zip((self.a, self.b, self.c), convs):
                    dst.copy_(conv.weight.reshape(dst.shape))
                if self.bias is not None:
                    self.bias.copy_(convs[2].bias)
            return
        a, b, c = init_factors(self.init, o, ch, kh, kw, self.gain, device=self.a.device, dtype=self.a.dtype)
        with torch.no_grad():
            self.a.copy_(a)
            self.b.copy_(b)
            self.c.copy_(c)
        self._reset_bias()

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.a, self.b, self.c

    def _current_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.a.detach(), self.b.detach(), self.c.detach()

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", factor_init={self.factor_init!r}" if self.factor_init != "scheme" else "")

    def dense_weight(self) -> torch.Tensor:
        """The composed 3-D weight ``a (x) b (x) c`` (differentiable)."""
        return R.compose(self.a, self.b, self.c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return R.conv2d_chain(x, self.a, self.b, self.c, self.bias, **self._conv_kwargs())

    @torch.no_grad()
    def decompose(self, impl: str = "chain") -> nn.Sequential:
        """The same function as standard torch modules (for export); ``impl``: see
        :func:`decomposed_chain`."""
        bias = None if self.bias is None else self.bias.detach()
        return decomposed_chain(
            *self._current_factors(), bias, self.stride, self.padding, self.dilation, self.padding_mode, impl
        )

    @classmethod
    def from_rank1(cls, layer: Rank1Conv2d) -> Flat1dConv2d:
        """A twin starting from ``layer``'s factors and bias: the identical function
        when ``layer`` is rank-1 (after initialisation or ``project_()``)."""
        if not isinstance(layer, Rank1Conv2d):
            raise ValueError(f"from_rank1 needs a Rank1Conv2d, got {type(layer).__name__}")
        # The twin's own initial draw is overwritten: keep it off the global RNG so a
        # flat1d network draws exactly the factors its rank1 twin drew, layer by layer.
        with torch.random.fork_rng(devices=[]):
            twin = cls(
                layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                layer.dilation, 1, layer.bias is not None, layer.padding_mode,
                device=layer.weight.device, dtype=layer.weight.dtype, init=layer.init, gain=layer.gain,
            )
        with torch.no_grad():
            for dst, src in zip(twin.factors, layer.factors):
                dst.copy_(src)
            if layer.bias is not None:
                twin.bias.copy_(layer.bias)
        return twin
