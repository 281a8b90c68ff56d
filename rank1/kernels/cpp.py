"""A fused C++ CPU kernel for a whole decomposed rank-1 layer, for inference.

At small shapes a decomposed layer run as two or three framework convolutions pays
each call's fixed cost (~7 µs here), and the library's depthwise kernels run far
below the machine's speed on short channel rows: at 32 channels, 8x8, batch 32, the
depthwise conv of ``dw2d`` alone took longer than the 1x1. This kernel
(``rank1/kernels/csrc/rank1_cpu.cpp``) does the layer in one call, fp32, its output
channels-last (with the ReLU that follows it, where ``fuse_relu`` folded one in, and a 2x2
max pool after that, where ``fuse_max_pool`` did); its
input channels-last or NCHW, read as it is (a user's NCHW input is not converted first):
for layers up to 512 x 512 weights and 8 MB of 1x1 output per image (:func:`fused_path`)
each thread takes whole images, computes an image's 1x1 in vector registers (its weights
packed once per module, :func:`pack`) into a buffer that stays in cache, then both
depthwise 1-D passes and the bias; larger layers use one library call for the 1x1
(:data:`LIBRARY_CONV_ROWS`) and the same fused passes, the threads splitting output
rows. The factors sit in vector registers and every load of the depthwise passes is a
contiguous vector of channels (16 floats with AVX-512, 8 with AVX2). It is registered twice:
``cpp`` chooses the 1x1's path by the layer's size, ``cpp_lib`` always takes the library's
1x1; which is faster depends on the input's layout, the threads and the shape (2026-12-06,
AMD EPYC, batch 32, channels-last input: the in-register path 7-36% faster at 64-256
channels on 1 and 2 threads, level at 512 channels 8x8; at batch 1 on 2 threads both take
the library), so ``impl="auto"`` measures both on the network it is given.

It is compiled on first use with ``torch.utils.cpp_extension`` (a C++ compiler and
``ninja`` needed; 25 s to a minute once per machine, cached under ``$RANK1_CPP_CACHE``, else
``~/.cache/rank1/cpp``) for this CPU's vector width. Where it cannot be built,
:func:`unavailable_reason` says why and ``impl="auto"`` simply never picks it.

For **inference only**, like the Triton kernel: fp32 CPU tensors without autograd
run the kernel; anything else (a tensor that needs a gradient, another dtype or
device) computes the same function with ``F.conv2d``. The module is opaque to
``torch.export`` and ONNX: export the ``chain`` or ``dw2d`` forms.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rank1 import functional as R
from rank1.kernels.library import layer_cost
from rank1.kernels.registry import Geometry, Kernel, register_kernel

__all__ = [
    "FUSED_PLANE", "FUSED_WEIGHTS", "LIBRARY_CONV_ROWS", "MAX_KERNEL", "CppRank1Conv2d", "available", "build",
    "cache_dir", "fused_path", "unavailable_reason",
]

_SOURCE = Path(__file__).with_name("csrc") / "rank1_cpu.cpp"
# Vector flags per the CPU capability torch detected: the binary is built for this
# machine, and its name carries the capability so a shared home never mixes them.
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_build_error: str | None = None
# Where the kernel computes the 1x1 itself, in registers, image by image (its output goes
# to a per-thread buffer that stays in L2/L3, never to memory for the whole batch): weights up
# to C x O floats and one image's 1x1 output up to H x W x O floats, with at least as many
# images as threads. Other layers take the library's 1x1 and write its output to memory.
# Since its register tile was reworked (2026-12-06, AMD EPYC, batch 32 unless named, fused
# path / library path, paired): 2 threads, 256 channels 16x16 NCHW 6.2 / 8.3 ms, 128 channels
# 56x56 36 / 60 ms, 64 channels 112x112 batch 8 8.1 / 11.1 ms, 512 channels 8x8 NCHW 6.9 /
# 8.1 ms, 512 channels 8x8 channels-last 6.9 / 6.9 ms, 4x4 2.35 / 2.11 ms; 1024 channels 4x4:
# 9.0 / 7.9 ms (2 threads), 13.0 / 12.7 ms (1 thread). `cpp_lib` (always the library's 1x1)
# is measured by `auto` beside it wherever the two differ.
FUSED_WEIGHTS = 512 * 512
FUSED_PLANE = 2048 * 1024
# Other layers compute the 1x1 with one library call over the whole batch: for a
# channels-last input of at least this many pixels in all, the library's 1x1 convolution
# (oneDNN: 8-21% faster than its GEMM at batch 32 on the AMD EPYC, 256 channels 8x8 to 128
# channels 32x32), else the GEMM (the convolution was slower at batch 1, e.g. 0.26 vs
# 0.19 ms at 256 channels 16x16); an NCHW input, one batched GEMM reading it as it is.
LIBRARY_CONV_ROWS = 2048
MAX_KERNEL = 64  # kMaxTaps in the C++ source


def fused_path(c_in: int, c_out: int, h: int, w: int, batch: int, threads: int | None = None) -> bool:
    """Whether a layer of this shape takes the fully fused path (see :data:`FUSED_WEIGHTS`)."""
    threads = torch.get_num_threads() if threads is None else threads
    return batch >= threads and c_in * c_out <= FUSED_WEIGHTS and h * w * c_out <= FUSED_PLANE


def cache_dir() -> Path:
    """``$RANK1_CPP_CACHE``, else ``~/.cache/rank1/cpp``."""
    env = os.environ.get("RANK1_CPP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rank1" / "cpp"


def _capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def _build_name() -> str:
    return f"rank1_cpu_{_capability().lower()}"


def _cflags() -> list[str]:
    # -fopenmp: at::parallel_for is an OpenMP region compiled into this file (without it the
    # rows run on one thread); the process already holds torch's libgomp, which the loader reuses.
    return ["-O3", "-fopenmp", *_ARCH_FLAGS.get(_capability(), [])]


def _build_dir() -> Path:
    """The build's folder, named by everything its compile command depends on: the source's
    content, torch's installation and the flags. The command names the source's path and
    torch's headers, so a copy of rank1 elsewhere (one packed into a logged model, which
    `mlflow models serve` imports, or another checkout) sharing one folder changed it, and the
    two rebuilt the kernel in turn (25-35 s each, over a library another process may have loaded)."""
    key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), str(Path(torch.__file__).parent).encode(),
                                      " ".join(_cflags()).encode()])).hexdigest()[:12]
    return (cache_dir() / f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
            / f"{_build_name()}-{key}")


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the kernel cannot run (on ``device``, or on the CPU when None); None when it can
    (or may: a compiler is there and no build has failed yet)."""
    if device is not None and torch.device(device).type != "cpu":
        return f"the C++ kernel runs on cpu tensors, not {torch.device(device).type}"
    if _build_error is not None:
        return f"building it failed: {_build_error}"
    if _module.cache_info().currsize:  # built and loaded in this process
        return None
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler: {cxx!r} is not on PATH (set CXX or install g++)"
    if shutil.which("ninja") is None:
        return "ninja is not on PATH (apt install ninja-build, or pip install ninja)"
    if not _SOURCE.is_file():
        return f"its source {_SOURCE} is missing from this installation"
    return None


def available(device: torch.device | str | None = None) -> bool:
    """Whether the kernel can run (on ``device``, or on the CPU when None)."""
    return unavailable_reason(device) is None


def build() -> Any:
    """Compile (once per machine, then load from the cache) and return the kernel's
    function ``conv``; raises ``RuntimeError`` naming why it cannot."""
    return _module().conv


def pack() -> Any:
    """The kernel's function ``pack``: a layer's 1x1 weights as its in-register path reads
    them, computed once per module and passed to ``conv`` as ``packed``."""
    return _module().pack


@functools.lru_cache(maxsize=1)
def _module() -> Any:
    global _build_error
    reason = unavailable_reason("cpu")
    if reason is not None:
        raise RuntimeError(f"the rank1 C++ kernel is unavailable: {reason}")
    # Importing it warns "No CUDA runtime is found" on CPU-only machines: irrelevant here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    out = _build_dir()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / f"{_build_name()}.so").exists():
        print(f"rank1: compiling the C++ CPU kernel once into {out} (about half a minute on 2 cores)", file=sys.stderr, flush=True)
    source = out / _SOURCE.name  # compiled from a copy in the folder: the same command wherever rank1 is
    if not source.exists():
        tmp = out / f".{_SOURCE.name}.{os.getpid()}"
        shutil.copyfile(_SOURCE, tmp)
        os.replace(tmp, source)
    try:
        module = cpp_extension.load(
            name=_build_name(), sources=[str(source)], build_directory=str(out), extra_cflags=_cflags(),
            extra_ldflags=["-fopenmp"], verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - any compiler or loader failure makes the kernel unavailable
        lines = str(e).strip().splitlines()
        _build_error = f"{type(e).__name__}: {lines[-1] if lines else ''}"
        raise RuntimeError(f"the rank1 C++ kernel could not be built: {_build_error}") from e
    return module


class CppRank1Conv2d(nn.Module):
    """A whole decomposed rank-1 layer (1x1, ``kh x 1``, ``1 x kw``, bias) as one call of
    the C++ CPU kernel; same stride, padding, dilation and padding-mode semantics as
    ``nn.Conv2d``. Inference only (see the module docstring): under autograd, for
    other dtypes or devices it computes the same function with ``F.conv2d``.
    """

    def __init__(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        c: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride: tuple[int, int] = (1, 1),
        padding: str | tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        padding_mode: str = "zeros",
        library: bool = False,
    ) -> None:
        super().__init__()
        if a.dim() != 2 or b.dim() != 2 or c.dim() != 2 or not a.shape[0] == b.shape[0] == c.shape[0]:
            raise ValueError(f"a, b and c must be O x C, O x kh and O x kw; got {tuple(a.shape)}, "
                             f"{tuple(b.shape)} and {tuple(c.shape)}")
        if padding_mode not in R.PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {R.PADDING_MODES}, got {padding_mode!r}")
        if max(b.shape[1], c.shape[1]) > MAX_KERNEL:
            raise ValueError(f"the C++ kernel takes kernel sizes up to {MAX_KERNEL}, got {(b.shape[1], c.shape[1])}")
        self.out_channels, self.in_channels = a.shape
        self.kernel_size = (b.shape[1], c.shape[1])
        self.stride, self.padding, self.dilation = tuple(stride), padding, tuple(dilation)
        self.padding_mode = padding_mode
        # Buffers (nothing here is trained); b and c stored transposed, as the kernel reads them.
        self.register_buffer("a", a.detach().clone().contiguous())
        self.register_buffer("bt", b.detach().t().contiguous())
        self.register_buffer("ct", c.detach().t().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().contiguous())
        # The kernel's geometry, resolved once: a forward at small shapes takes ~50 µs,
        # and resolving padding per call would be a tenth of it.
        (top, bottom), (left, right) = R.pad_amounts(self.kernel_size, padding, self.dilation)
        self._pads = (left, right, top, bottom)
        zeros = padding_mode == "zeros" or not any(self._pads)
        self._geometry = (self.stride[0], self.stride[1], *((top, bottom, left, right) if zeros else (0, 0, 0, 0)),
                          self.dilation[0], self.dilation[1])
        self._pre_pad = not zeros
        self.relu = False  # a following ReLU fused into the output store (see fuse_relu)
        self.pool_ceil: bool | None = None  # a following 2x2 max pool fused in (see fuse_max_pool)
        # The 1x1's weights packed for the kernel's in-register path, and the (data, version) of
        # `a` they were packed from: packed once, not per call (a plain attribute: not state).
        self._packed: torch.Tensor | None = None
        self._packed_from: tuple[int, int] | None = None
        # The 1x1 always by one library call (``cpp_lib``), never in registers: which is faster
        # depends on the input's layout, the threads and the shape, so `auto` measures both.
        self.library = library

    def fuse_relu(self) -> bool:
        """Apply the ReLU that follows this layer in its own output store (one pass over the
        activations fewer); the caller drops that ReLU. Returns True: this kernel can."""
        self.relu = True
        return True

    def fuse_max_pool(self, pool: nn.Module) -> bool:
        """Apply ``pool``, the module that follows this layer (and its ReLU, if one was fused),
        in this layer's store where the kernel can: an ``nn.MaxPool2d`` with a 2x2 window,
        stride 2, no padding or dilation, no indices (either ceil mode). Returns whether it did;
        the caller then drops the pool. The pool reads nothing back from memory and the layer
        writes a quarter of its output."""
        if not isinstance(pool, nn.MaxPool2d) or pool.return_indices or self.pool_ceil is not None:
            return False
        pair = nn.modules.utils._pair
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        if pair(pool.kernel_size) != (2, 2) or pair(stride) != (2, 2) or pair(pool.padding) != (0, 0) \
                or pair(pool.dilation) != (1, 1):
            return False
        self.pool_ceil = bool(pool.ceil_mode)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Lean on purpose: at 32 channels 8x8 the whole layer takes ~45 µs, and each
        # nn.Module attribute lookup of a buffer costs about half a microsecond.
        buffers = self._buffers
        a, bt, ct, bias = buffers["a"], buffers["bt"], buffers["ct"], buffers["bias"]
        if x.is_cpu and x.dtype is torch.float32 and a.dtype is torch.float32 and not (
                x.requires_grad and torch.is_grad_enabled()):
            if self._pre_pad:  # a bias-free 1x1 commutes with padding: pad its input instead
                x = F.pad(x, self._pads, mode=self.padding_mode)
            if not (x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous()):
                x = x.contiguous(memory_format=torch.channels_last)
            pool, ceil = (0, False) if self.pool_ceil is None else (2, self.pool_ceil)
            if self.library:
                return build()(x, a, bt, ct, bias, *self._geometry, 0, 0, self.relu, LIBRARY_CONV_ROWS, pool, ceil)
            # (an inference tensor has no version counter: its data pointer alone)
            source = (a.data_ptr(), -1 if a.is_inference() else a._version)
            if self._packed_from != source:
                self._packed, self._packed_from = pack()(a), source
            return build()(x, a, bt, ct, bias, *self._geometry, FUSED_WEIGHTS, FUSED_PLANE, self.relu,
                           LIBRARY_CONV_ROWS, pool, ceil, self._packed)
        # Autograd, another dtype or device: the same function with F.conv2d.
        y = R.conv2d_chain(x, a, bt.t(), ct.t(), bias, self.stride, self.padding, self.dilation, self.padding_mode)
        y = torch.relu(y) if self.relu else y
        return y if self.pool_ceil is None else F.max_pool2d(y, 2, 2, ceil_mode=self.pool_ceil)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        s += R.settings_repr(self.stride, self.padding, self.dilation, self.bias is not None, self.padding_mode)
        s += (", 1x1=library" if self.library else "") + (", relu=True" if self.relu else "")
        return s + ("" if self.pool_ceil is None else f", max_pool=2x2{' ceil' if self.pool_ceil else ''}")


def _build(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, g: Geometry,
           library: bool = False) -> nn.Module:
    seq = nn.Sequential()
    seq.add_module("fused", CppRank1Conv2d(a, b, c, bias, g.stride, g.padding, g.dilation, g.padding_mode, library))
    return seq


def _build_library(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None,
                   g: Geometry) -> nn.Module:
    return _build(a, b, c, bias, g, library=True)


def _cost(c_in: int, c_out: int, k: int, h: int, w: int, batch: int, bytes_per: int = 4) -> tuple[float, float]:
    # On the fused path the 1x1 output never leaves the cache: one read and one write of the
    # activations; else a library GEMM writes it and one fused pass reads it (triton's bytes).
    fused = fused_path(c_in, c_out, h, w, batch)
    return layer_cost(passes=0 if fused else 1, separable=True)(c_in, c_out, k, h, w, batch, bytes_per)


def _cost_library(c_in: int, c_out: int, k: int, h: int, w: int, batch: int, bytes_per: int = 4) -> tuple[float, float]:
    return layer_cost(passes=1, separable=True)(c_in, c_out, k, h, w, batch, bytes_per)


register_kernel(Kernel(
    "cpp", _build, devices=("cpu",), dtypes=(torch.float32,), exportable=False, calls=1, cost=_cost,
    unavailable=lambda device: unavailable_reason(device), layout="channels_last",
    doc="the whole layer in one call of a fused C++ CPU kernel (compiled on first use), channels-last fp32; "
        "inference only",
))
register_kernel(Kernel(
    "cpp_lib", _build_library, devices=("cpu",), dtypes=(torch.float32,), exportable=False, calls=1,
    cost=_cost_library, unavailable=lambda device: unavailable_reason(device), layout="channels_last",
    doc="the same C++ kernel with its 1x1 always one library call (oneDNN's 1x1 convolution on a channels-last "
        "input, a GEMM otherwise), then its fused depthwise passes: faster than the in-register 1x1 at some "
        "shapes, layouts and thread counts, slower at others (auto measures both); inference only",
))
