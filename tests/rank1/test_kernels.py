"""Every registered kernel against ``F.conv2d`` with the composed weight, over one shared
table of geometries: a new kernel registered in ``rank1.kernels`` is tested here for free.

Kernels run where they can: the library forms everywhere, ``cpp`` on the CPU (compiled
for real, once per machine), ``triton`` on CUDA or, without a GPU, in one fresh
subprocess under Triton's interpreter (``TRITON_INTERPRET=1`` must be set before triton
is first imported).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rank1 import Rank1Conv2d
from rank1.functional import pad_amounts
from rank1.kernels import KERNELS, Geometry, available_kernels, describe, get_kernel
from rank1.roofline import CALLS, impl_cost
from tests.conftest import rel_err

ROOT = Path(__file__).resolve().parents[2]

# (batch, c_in, c_out, H, W, kernel, stride, padding, dilation, padding_mode, bias)
GEOMETRIES = {
    "k3-p1-32ch-8x8-b4": (4, 32, 32, 8, 8, 3, 1, 1, 1, "zeros", True),
    "k3-p1-8x8-b1": (1, 4, 4, 8, 8, 3, 1, 1, 1, "zeros", True),
    "k3-p1-16x16-b3": (3, 32, 32, 16, 16, 3, 1, 1, 1, "zeros", True),  # power-of-two rows
    "k5-p2-c24-o40": (3, 24, 40, 13, 12, 5, 1, 2, 1, "zeros", True),  # 40 = 2 vectors + 8 tail channels
    "k3-o7-tail-only": (2, 5, 7, 9, 11, 3, 1, 1, 1, "zeros", False),  # fewer channels than a vector
    "k3-p0-valid": (3, 16, 16, 9, 9, 3, 1, "valid", 1, "zeros", True),
    "k3-p2-wider-than-same": (2, 16, 16, 7, 10, 3, 1, 2, 1, "zeros", True),  # padding-only output rows
    "k3x5-s2-p12": (3, 16, 48, 17, 15, (3, 5), 2, (1, 2), 1, "zeros", True),
    "k3-s21-d2": (2, 8, 32, 16, 19, 3, (2, 1), 2, 2, "zeros", True),
    "k4-same": (3, 16, 16, 12, 11, 4, 1, "same", 1, "zeros", True),  # even kernel: extra pad bottom/right
    "k5-same-d2": (1, 16, 16, 17, 15, 5, 1, "same", 2, "zeros", False),
    "k7-s3": (2, 16, 32, 23, 22, 7, 3, 3, 1, "zeros", True),
    "k1x7": (2, 16, 16, 9, 20, (1, 7), 1, (0, 3), 1, "zeros", True),
    "k1-pointwise": (2, 16, 32, 5, 6, 1, 1, 0, 1, "zeros", True),
    "k3-reflect": (3, 16, 16, 10, 9, 3, 1, 1, 1, "reflect", True),
    "k5-replicate-s2": (1, 16, 16, 11, 12, 5, 2, 2, 1, "replicate", True),
    "k3-circular-same": (3, 16, 16, 8, 9, 3, 1, "same", 1, "circular", True),
    "b1-56x56": (1, 32, 32, 56, 56, 3, 1, 1, 1, "zeros", True),  # fewer images than threads
    "out-1x1": (2, 16, 16, 3, 3, 3, 1, 0, 1, "zeros", True),
    "k5-s1-16x20": (3, 16, 32, 16, 20, 5, 1, 2, 1, "zeros", True),
    "c160-o136": (3, 160, 136, 6, 5, 3, 1, 1, 1, "zeros", True),  # > 128 x 128 weights: cpp's library GEMM
}
# Besides fp32, each kernel is checked in its other fast dtypes on a few geometries.
DTYPE_GEOMETRIES = ("k3-p1-16x16-b3", "k5-p2-c24-o40", "k3x5-s2-p12")
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 3e-3,
             # bf16 output rounding is half an ulp on a GPU; Triton's interpreter truncates (a whole ulp)
             torch.bfloat16: 2e-2}


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def case_error(kernel: str, case: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """Max relative error of ``kernel`` on geometry ``case`` against F.conv2d with the composed
    weight in float64 on the explicitly padded input (the padding modes as nn.Conv2d pads)."""
    n, c_in, c_out, h, w, k, s, p, d, mode, bias = GEOMETRIES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    kh, kw = _pair(k)
    a, b, c = (torch.randn(c_out, m, generator=gen) for m in (c_in, kh, kw))
    bias_t = torch.randn(c_out, generator=gen) if bias else None
    x = torch.randn(n, c_in, h, w, generator=gen)
    padding = p if isinstance(p, str) else _pair(p)
    g = Geometry(_pair(s), padding, _pair(d), mode)
    dev = torch.device(device)
    m = KERNELS[kernel].build(*(t.to(dev, dtype) for t in (a, b, c)), None if bias_t is None else bias_t.to(dev, dtype),
                              g).eval()
    (top, bottom), (left, right) = pad_amounts((kh, kw), padding, _pair(d))
    xp = F.pad(x.double(), (left, right, top, bottom), mode="constant" if mode == "zeros" else mode)
    ref = F.conv2d(xp, torch.einsum("oc,oh,ow->ochw", a.double(), b.double(), c.double()),
                   None if bias_t is None else bias_t.double(),
                   _pair(s), 0, _pair(d))
    with torch.no_grad():
        y = m(x.to(dev, dtype))
    assert y.shape == ref.shape and y.dtype == dtype, (kernel, case, y.shape, ref.shape, y.dtype)
    return rel_err(y.double().cpu(), ref)


def _cases(kernel: str) -> list[tuple[str, torch.dtype]]:
    out = [(case, torch.float32) for case in GEOMETRIES]
    for dtype in KERNELS[kernel].dtypes:
        if dtype != torch.float32:
            out += [(case, dtype) for case in DTYPE_GEOMETRIES]
    return out


def run_cases(kernel: str, device: str) -> dict[str, float]:
    """``{"case/dtype": error}`` of every case of ``kernel`` (for the interpreter subprocess)."""
    return {f"{case}/{str(dt).replace('torch.', '')}": case_error(kernel, case, dt, device)
            for case, dt in _cases(kernel)}


def _native(kernel: str) -> str | None:
    """Where ``kernel`` runs in this process: cuda if it can, else cpu, else None."""
    for dev in ("cuda", "cpu"):
        if (dev != "cuda" or torch.cuda.is_available()) and KERNELS[kernel].available(dev):
            return dev
    return None


@pytest.fixture(scope="session")
def interpreted() -> dict[str, dict[str, float]]:
    """The errors of kernels that run on this machine only under Triton's interpreter, from one subprocess."""
    names = [n for n in KERNELS if _native(n) is None and n == "triton"]
    if not names or importlib.util.find_spec("triton") is None:
        return {}
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    code = ("import json; from tests.rank1.test_kernels import run_cases; "
            f"print(json.dumps({{n: run_cases(n, 'cpu') for n in {names!r}}}))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        pytest.fail(f"the Triton interpreter run failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


ALL_CASES = [(k, case, dt) for k in KERNELS for case, dt in _cases(k)]
# The kernels that run in this process, and the others (checked under Triton's interpreter in
# one subprocess, whose fixture groups their cases on one pytest-xdist worker: tests/conftest.py).
NATIVE_CASES = [c for c in ALL_CASES if _native(c[0]) is not None]
OTHER_CASES = [c for c in ALL_CASES if _native(c[0]) is None]


def _ids(cases):
    return [f"{k}-{c}-{str(d).replace('torch.', '')}" for k, c, d in cases]


@pytest.mark.parametrize("kernel, case, dtype", NATIVE_CASES, ids=_ids(NATIVE_CASES))
def test_kernel_equals_the_dense_conv(kernel, case, dtype):
    err = case_error(kernel, case, dtype, _native(kernel))
    assert err <= TOLERANCE[dtype], f"{kernel} {case} {dtype}: max rel err {err:.2e}"


@pytest.mark.parametrize("kernel, case, dtype", OTHER_CASES, ids=_ids(OTHER_CASES))
def test_kernel_equals_the_dense_conv_interpreted(kernel, case, dtype, interpreted):
    if kernel not in interpreted:
        pytest.skip(f"{kernel} cannot run here: {KERNELS[kernel].unavailable_reason()}")
    err = interpreted[kernel][f"{case}/{str(dtype).replace('torch.', '')}"]
    assert err <= TOLERANCE[dtype], f"{kernel} {case} {dtype} (Triton's interpreter): max rel err {err:.2e}"


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_every_record_says_what_it_can_do(kernel):
    k = KERNELS[kernel]
    assert k.devices and k.dtypes and k.calls >= 1 and k.doc
    assert CALLS[kernel] == k.calls
    flops, nbytes = impl_cost(kernel, 64, 64, 3, 16, 16, 2)
    dense_flops, _ = impl_cost("dense", 64, 64, 3, 16, 16, 2)
    assert 0 < flops <= dense_flops and nbytes > 0
    assert flops < dense_flops or not k.decomposed
    for dev in ("cpu", "cuda", "meta"):
        why = k.unavailable_reason(dev)
        assert (why is None) == k.available(dev) and (why is None or isinstance(why, str))
    assert k.unavailable_reason("meta") is not None  # no kernel runs on meta tensors
    row = next(r for r in describe() if r["name"] == kernel)
    assert row["exportable"] == k.exportable and row["calls"] == k.calls


def test_library_kernels_export_and_accelerated_ones_say_they_do_not():
    assert {n for n, k in KERNELS.items() if k.exportable} == {"chain", "dw2d", "dense"}
    layer = Rank1Conv2d(6, 8, 3, padding=1)
    x = torch.randn(2, 6, 9, 9)
    for name in ("chain", "dw2d"):
        prog = torch.export.export(layer.decompose(impl=name).eval(), (x,))
        with torch.no_grad():
            assert rel_err(prog.module()(x), layer.dense_conv()(x)) <= 1e-5


def test_an_unknown_or_unavailable_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match=r"impl must be one of \('chain', 'dw2d', 'triton', 'cpp', 'cpp_lib'\), got 'fast'"):
        get_kernel("fast")
    if not KERNELS["triton"].available():
        with pytest.raises(ValueError, match=r"impl='triton' is unavailable here \(.*\); allowed: \('chain', 'dw2d'"):
            get_kernel("triton")
    with pytest.raises(ValueError, match=r"impl='cpp' is unavailable here \(cpp runs on cpu, not cuda\)"):
        get_kernel("cpp", "cuda")
    assert set(available_kernels("cpu")) >= {"chain", "dw2d"}
