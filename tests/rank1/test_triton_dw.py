"""The fused Triton depthwise kernel against the dense references, on the CPU interpreter.

CI has no GPU, so the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``),
which must be set before triton is first imported: all kernel cases run once, in one
fresh subprocess (:func:`run_cases`), and each case is its own test reading that result.
With a CUDA device the same cases run in-process on it instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rank1 import Rank1Conv2d, decompose_model, dense_model, project_model_
from rank1.autotune import candidate_impls
from rank1.functional import depthwise_chain, pad_amounts
from rank1.kernels.triton import (
    _NUM_WARPS,
    TritonDepthwise1d,
    _block_hw,
    _kernel,
    available,
    interpreter_enabled,
    launch_plan,
)
from rank1.models import build_model
from tests.conftest import rel_err

ROOT = Path(__file__).resolve().parents[2]
# bf16 output rounding is half an ulp (2**-9) on a GPU, but Triton 3.8's interpreter
# truncates fp32 -> bf16 (a whole ulp, 2**-7 relative): the tolerance covers both.
_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

# Whole layers over every geometry and dtype are the registry-wide test's (test_kernels.py).
# Here: the depthwise stage alone where its layout handling matters.
# (batch, channels, H, W, kernel, stride, padding, dilation, padding_mode, bias, dtype, channels_last)
KERNEL_CASES = {
    "k3-channels-last-b3": (3, 8, 9, 10, 3, 1, 1, 1, "zeros", True, "float32", True),
    "k3x5-s2-channels-last-fp16": (2, 16, 17, 15, (3, 5), 2, "valid", 2, "zeros", True, "float16", True),
    "k5-p2-bf16-b1": (1, 8, 16, 13, 5, 1, 2, 1, "zeros", True, "bfloat16", False),
}


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _dense_depthwise(x, b, c, bias, stride, padding, dilation, padding_mode):
    """The reference: one depthwise ``F.conv2d`` with the composed kernel ``b (x) c``,
    in float64, padded as ``nn.Conv2d`` pads."""
    o, kh, kw = b.shape[0], b.shape[1], c.shape[1]
    w = torch.einsum("oh,ow->ohw", b, c).reshape(o, 1, kh, kw).double()
    (top, bottom), (left, right) = pad_amounts((kh, kw), padding, dilation)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    xp = F.pad(x.double(), (left, right, top, bottom), mode=mode)
    return F.conv2d(xp, w, None if bias is None else bias.double(), stride, 0, dilation, o)


def run_cases(device: str) -> dict[str, float]:
    """``{case: max relative error}`` of the fused kernel on ``device``; must run where
    triton can launch (CUDA, or the interpreter set before triton is imported)."""
    from rank1.kernels.triton import rank1_depthwise

    dev = torch.device(device)
    errors: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    for name, (n, o, h, w, k, s, p, d, mode, has_bias, dtype, cl) in KERNEL_CASES.items():
        kh, kw = _pair(k)
        dt = getattr(torch, dtype)
        x = torch.randn(n, o, h, w, generator=gen).to(dev, dt)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        b, c = torch.randn(o, kh, generator=gen).to(dev), torch.randn(o, kw, generator=gen).to(dev)
        bias = torch.randn(o, generator=gen).to(dev) if has_bias else None
        p = p if isinstance(p, str) else _pair(p)
        y = rank1_depthwise(x, b, c, bias, _pair(s), p, _pair(d), mode)
        ref = _dense_depthwise(x, b, c, bias, _pair(s), p, _pair(d), mode)
        assert y.dtype == dt and y.shape == ref.shape, (name, y.dtype, y.shape, ref.shape)
        assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format), name
        errors[name] = rel_err(y.double(), ref)
    with torch.no_grad():
        torch.manual_seed(2)
        model = build_model("vgg", arm="rank1", depth=3, width=8, in_channels=3).eval().to(dev)
        project_model_(model)
        x = torch.randn(2, 3, 16, 16, device=dev)
        errors["model-vgg3-triton"] = rel_err(decompose_model(model, "triton")(x), dense_model(model)(x))
    return errors


def _tolerance(name: str) -> float:
    spec = KERNEL_CASES.get(name)
    return _TOL[getattr(torch, spec[10])] if spec else 1e-5


@pytest.fixture(scope="module")
def kernel_errors() -> dict[str, float]:
    """Every case's error: in-process on CUDA, else in a subprocess under the interpreter."""
    pytest.importorskip("triton", reason="triton is not installed")
    if torch.cuda.is_available():
        return run_cases("cuda")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    code = "import json; from tests.rank1.test_triton_dw import run_cases; print(json.dumps(run_cases('cpu')))"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    if p.returncode != 0:
        pytest.fail(f"the Triton interpreter run failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [*KERNEL_CASES, "model-vgg3-triton"])
def test_fused_kernel_equals_dense_reference(kernel_errors, name):
    assert kernel_errors[name] <= _tolerance(name), f"{name}: max rel err {kernel_errors[name]:.2e}"


def test_import_rank1_never_imports_triton():
    code = "import sys, rank1, rank1.layers, rank1.kernels.triton, rank1.autotune; print('triton' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the triton impl is available")
def test_unavailable_triton_impl_names_what_is_allowed(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not available("cpu")
    layer = Rank1Conv2d(4, 4, 3, padding=1)
    with pytest.raises(ValueError, match=r"impl='triton' is unavailable here .*allowed: \('chain', 'dw2d'(, 'cpp', 'cpp_lib')?\)"):
        layer.decompose(impl="triton")
    with pytest.raises(ValueError, match=r"must be one of \('chain', 'dw2d', 'triton', 'cpp', 'cpp_lib'\)"):
        layer.decompose(impl="cuda")
    with pytest.raises(ValueError, match=r"impl='triton' is unavailable here"):
        decompose_model(build_model("vgg", arm="rank1", depth=2, width=4), "triton")
    # A module built elsewhere and run on a cpu tensor says why instead of crashing in triton.
    module = TritonDepthwise1d(torch.randn(4, 3), torch.randn(4, 3), padding=(1, 1))
    with torch.no_grad(), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        module(torch.randn(1, 4, 8, 8))


def test_autotune_measures_triton_only_on_cuda():
    assert "triton" not in candidate_impls(torch.device("cpu"))  # never, even under the interpreter


def test_autograd_falls_back_to_the_differentiable_chain():
    b, c, bias = torch.randn(4, 3), torch.randn(4, 5), torch.randn(4)
    module = TritonDepthwise1d(b, c, bias, stride=(2, 1), padding=(1, 2), padding_mode="reflect")
    x = torch.randn(2, 4, 9, 10, requires_grad=True)
    y = module(x)  # needs no triton: the kernel has no backward, so autograd takes the chain
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    ref = depthwise_chain(x2, b, c, bias, (2, 1), (1, 2), (1, 1), "reflect")
    ref.square().sum().backward()
    assert rel_err(y, ref) <= 1e-6 and rel_err(x.grad, x2.grad) <= 1e-6
    assert "stride=(2, 1)" in repr(module) and "padding_mode='reflect'" in repr(module)


@pytest.mark.parametrize("positions", [1, 49, 64, 225, 256, 1000, 1024, 3136, 100_000])
def test_block_width_is_a_power_of_two_wasting_at_most_an_eighth(positions):
    width = _block_hw(positions)
    assert width & (width - 1) == 0 and 16 <= width <= 1024
    padded = -(-positions // width) * width
    assert width == 16 or (padded - positions) * 8 <= padded


_TT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.mark.parametrize("dtype,size,k,stride,padding,dilation,channels_last", [
    (torch.float32, 8, 3, 1, 1, 1, False),  # 16 planes per program
    (torch.bfloat16, 56, 5, 1, 2, 1, False),  # 512 positions x 2 planes
    (torch.float32, 32, 3, 1, 1, 1, False),  # one plane of 1024 per program
    (torch.float16, 17, (3, 5), 2, "valid", 2, True),
])
def test_kernel_compiles_for_hopper_without_a_gpu(dtype, size, k, stride, padding, dilation, channels_last):
    """The interpreter never runs Triton's compiler: compile for sm_90 (H100/H200) ahead of time,
    through LLVM, PTX and ptxas, with the launch parameters a real call would use."""
    triton = pytest.importorskip("triton")
    if interpreter_enabled():
        pytest.skip("TRITON_INTERPRET is set in this process: the kernel is an interpreted function")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # pragma: no cover - a triton whose AOT API moved
        pytest.skip(f"this triton has no ASTSource/GPUTarget: {e}")
    kh, kw = _pair(k)
    x = torch.empty(2, 16, size, size, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    p = padding if isinstance(padding, str) else _pair(padding)
    _, _, args, meta = launch_plan(x, torch.randn(16, kh), torch.randn(16, kw), torch.randn(16), _pair(stride), p,
                                   _pair(dilation))
    names = list(_kernel().arg_names)
    sig = {n: (f"*{_TT[a.dtype]}" if isinstance(a, torch.Tensor) else "i32") for n, a in zip(names, args)}
    sig.update({n: "constexpr" for n in meta})
    assert list(sig) == names, "launch_plan's arguments no longer match the kernel's"
    src = ASTSource(fn=_kernel(), signature=sig, constexprs={(names.index(n),): v for n, v in meta.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": _NUM_WARPS})
    assert len(compiled.asm["cubin"]) > 0
