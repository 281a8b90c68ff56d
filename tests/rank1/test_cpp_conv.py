"""The fused C++ CPU kernel (impl="cpp"): what the registry-wide test (test_kernels.py)
does not reach — both of its paths, random geometries, its build, its fallbacks.

The kernel is compiled here for real (once per machine, cached): CI has g++ and ninja.
The build test compiles into a fresh cache, about half a minute on 2 cores: it is marked slow.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rank1 import Flat1dConv2d, Rank1Conv2d, decompose_model, dense_model, project_model_
from rank1.autotune import candidate_impls
from rank1.kernels import cpp as cpp_conv
from rank1.layers import available_impls
from rank1.models import build_model
from rank1.roofline import CALLS, impl_cost
from tests.conftest import rel_err
from tests.rank1.test_kernels import GEOMETRIES

ROOT = Path(__file__).resolve().parents[2]
LIMITS = (cpp_conv.FUSED_WEIGHTS, cpp_conv.FUSED_PLANE)
CL = torch.channels_last


def _layer(case):
    n, c_in, c_out, h, w, k, s, p, d, mode, bias = GEOMETRIES[case]
    layer = Rank1Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, padding_mode=mode, bias=bias)
    with torch.no_grad():
        layer.project_()
        if bias:
            layer.bias.normal_()
    return layer, torch.randn(n, c_in, h, w)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_cpp_on_one_thread_and_in_its_layout(name):
    """The shared geometries (tests/rank1/test_kernels.py) again on one thread: every batch is
    then >= the threads, so small layers take the fused path on any machine."""
    layer, x = _layer(name)
    fused = layer.decompose(impl="cpp").eval()
    ref = layer.dense_conv()(x)
    # NCHW (what users pass: read as it is), channels-last, and neither (converted first).
    for xi in (x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        with torch.no_grad(), one_thread():
            y = fused(xi)
        assert y.is_contiguous(memory_format=torch.channels_last)  # the kernel's layout, kept for the next layer
        assert rel_err(y, ref) <= 1e-5


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _reference(x, a, b, c, bias, stride, pads, dilation):
    """F.conv2d with the composed weight on the explicitly zero-padded input, in float64.

    In float32 with one input channel, the composed weight's strides (einsum's) read as
    channels-last too, and F.conv2d (torch 2.14.1, this CPU) then got outputs one column wide
    at a horizontal stride > 1 wrong: e.g. a 5 x 4 kernel at stride (1, 3) on a 12 x 5 input,
    off by up to 18 against float64 and against the same weight with standard strides."""
    w = torch.einsum("oc,oh,ow->ochw", a, b, c).double()
    bias = None if bias is None else bias.double()
    return F.conv2d(F.pad(x.double(), pads), w, bias, stride=stride, dilation=dilation).float()


# (fused_weights, fused_plane, library_conv_rows) sending a layer down each of the kernel's
# three paths for the 1x1: in registers, the library's GEMM, the library's 1x1 convolution.
PATHS = {"registers": (10**9, 10**9, 10**9), "library-gemm": (0, 0, 10**9), "library-conv": (0, 0, 0)}


def test_random_geometries_on_every_path_and_layout():
    """Seeded random shapes: kernels up to 64, padding beyond the kernel's reach on any
    side, channel counts around the 16-float vector, a single output, images narrower
    than a pixel block; each through every path of the 1x1, fed channels-last and NCHW."""
    gen = torch.Generator().manual_seed(0)
    op = cpp_conv.build()

    def pick(*options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    with torch.no_grad(), one_thread():
        for _ in range(60):
            o, ch = pick(1, 5, 15, 16, 17, 33, 48, 64, 81, 130), pick(1, 3, 16, 20)
            kh, kw = pick(1, 2, 3, 5, 7, 64), pick(1, 3, 4, 5, 64)
            sh, sw, dh, dw = pick(1, 2, 3), pick(1, 2, 3), pick(1, 2), pick(1, 2)
            pt, pb, pl, pr = (pick(0, 1, 3, 70) for _ in range(4))
            h = max(1, dh * (kh - 1) + 1 - pt - pb) + pick(0, 1, 5)
            w = max(1, dw * (kw - 1) + 1 - pl - pr) + pick(0, 2, 9)
            x = torch.randn(pick(1, 2, 3), ch, h, w, generator=gen)
            a, b, c = (torch.randn(o, n, generator=gen) for n in (ch, kh, kw))
            bias = pick(None, torch.randn(o, generator=gen))
            ref = _reference(x, a, b, c, bias, (sh, sw), (pl, pr, pt, pb), (dh, dw))
            relu = bool(pick(0, 1))
            ref = ref.relu() if relu else ref
            for (fw, fp, rows), xi in itertools.product(PATHS.values(), (x, x.contiguous(memory_format=CL))):
                y = op(xi, a, b.t().contiguous(), c.t().contiguous(), bias, sh, sw, pt, pb, pl, pr, dh, dw, fw, fp,
                       relu, rows)
                assert y.shape == ref.shape and rel_err(y, ref) <= 1e-5, (o, ch, kh, kw, sh, sw, dh, dw, pt, pb, pl,
                                                                          pr, h, w, fw, rows, relu, xi.stride())


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_of_the_1x1_equals_the_dense_conv(path, layout):
    layer, x = _layer("k5-p2-c24-o40")
    fused = layer.decompose(impl="cpp").fused
    op = cpp_conv.build()
    xi = x.contiguous(memory_format=CL) if layout == "channels_last" else x
    fw, fp, rows = PATHS[path]
    with torch.no_grad(), one_thread():  # batch 3 >= 1 thread: the fused path is allowed
        y = op(xi, fused.a, fused.bt, fused.ct, fused.bias, 1, 1, 2, 2, 2, 2, 1, 1, fw, fp, False, rows)
        assert rel_err(y, layer.dense_conv()(x)) <= 1e-5
    assert y.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("ceil", [False, True])
def test_the_fused_max_pool_equals_torchs_on_every_path_and_layout(ceil):
    """A 2x2, stride-2 max pool in the kernel's store against F.max_pool2d after the dense
    conv (and the ReLU): even and odd output sides (a ceil-mode pool's last window is one row
    or column), output channels around the vector width, NaN propagated; every path of the
    1x1, both layouts, 1 and 2 threads."""
    gen = torch.Generator().manual_seed(1)
    op = cpp_conv.build()
    threads = torch.get_num_threads()
    try:
        for o, (h, w), relu, n in itertools.product((5, 16, 37), ((6, 8), (7, 9), (3, 2)), (False, True), (1, 3)):
            x = torch.randn(n, 6, h, w, generator=gen)
            a, b, c = torch.randn(o, 6, generator=gen), torch.randn(o, 3, generator=gen), torch.randn(o, 3, generator=gen)
            bias = torch.randn(o, generator=gen)
            ref = _reference(x, a, b, c, bias, (1, 1), (1, 1, 1, 1), (1, 1))
            ref = F.max_pool2d(ref.relu() if relu else ref, 2, 2, ceil_mode=ceil)
            for (fw, fp, rows), xi, t in itertools.product(PATHS.values(), (x, x.contiguous(memory_format=CL)), (1, 2)):
                torch.set_num_threads(t)
                with torch.no_grad():
                    y = op(xi, a, b.t().contiguous(), c.t().contiguous(), bias, 1, 1, 1, 1, 1, 1, 1, 1, fw, fp, relu,
                           rows, 2, ceil)
                assert y.shape == ref.shape and y.is_contiguous(memory_format=CL), (o, h, w, y.shape, ref.shape)
                assert torch.equal(y, ref) or rel_err(y, ref) <= 1e-5, (o, h, w, relu, n, fw, rows, t)
        x = torch.randn(2, 6, 6, 8, generator=gen)
        x[1, :, 2, 3] = float("nan")  # reaches a 3x3 neighbourhood of outputs, hence some pool windows
        with torch.no_grad():
            y = op(x, a, b.t().contiguous(), c.t().contiguous(), None, 1, 1, 1, 1, 1, 1, 1, 1, *LIMITS, False, 2048, 2,
                   ceil)
        ref = F.max_pool2d(_reference(x, a, b, c, None, (1, 1), (1, 1, 1, 1), (1, 1)), 2, 2, ceil_mode=ceil)
        assert torch.equal(y.isnan(), ref.isnan()) and y.isnan().any()
        with pytest.raises(RuntimeError, match="pool must be 0"):
            op(x, a, b.t().contiguous(), c.t().contiguous(), None, 1, 1, 1, 1, 1, 1, 1, 1, *LIMITS, False, 2048, 3, ceil)
    finally:
        torch.set_num_threads(threads)


def test_only_a_2x2_stride_2_max_pool_is_fused():
    layer = Rank1Conv2d(4, 8, 3, padding=1)
    with torch.no_grad():
        layer.project_()
    for pool, fused in ((torch.nn.MaxPool2d(2), True), (torch.nn.MaxPool2d(2, 2, ceil_mode=True), True),
                        (torch.nn.MaxPool2d(3, 2), False), (torch.nn.MaxPool2d(2, 1), False),
                        (torch.nn.MaxPool2d(2, padding=1), False), (torch.nn.MaxPool2d(2, dilation=2), False),
                        (torch.nn.MaxPool2d(2, return_indices=True), False), (torch.nn.AvgPool2d(2), False)):
        net = torch.nn.Sequential(layer, torch.nn.ReLU(), pool)
        fast = decompose_model(net, "cpp")
        assert isinstance(fast[2], torch.nn.Identity) is fused, pool
        x = torch.randn(2, 4, 9, 10)
        if not getattr(pool, "return_indices", False):
            with torch.no_grad():
                assert rel_err(fast(x), torch.nn.Sequential(layer.dense_conv(), torch.nn.ReLU(), pool)(x)) <= 1e-5


def test_the_packed_weights_are_made_once_and_follow_the_weights():
    """The in-register 1x1 reads its weights packed; a module packs them on its first call
    and again only when they change (at 512 channels packing took longer than the layer at
    batch 1): a load_state_dict into the module gives the new layer's function."""
    layer, x = _layer("k3-p1-16x16-b3")
    other, _ = _layer("k3-p1-16x16-b3")
    fused = layer.decompose(impl="cpp").eval()
    with torch.no_grad(), one_thread():
        assert rel_err(fused(x), layer.dense_conv()(x)) <= 1e-5
        packed = fused.fused._packed
        assert packed is not None and packed.numel() == layer.out_channels * layer.in_channels
        fused(x)
        assert fused.fused._packed is packed
        fused.load_state_dict(other.decompose(impl="cpp").state_dict())
        assert rel_err(fused(x), other.dense_conv()(x)) <= 1e-5 and fused.fused._packed is not packed
        op, f = cpp_conv.build(), fused.fused
        with pytest.raises(RuntimeError, match="packed must be pack"):
            op(x, f.a, f.bt, f.ct, f.bias, 1, 1, 1, 1, 1, 1, 1, 1, *LIMITS, False, 2048, 0, False, torch.zeros(3))


def test_cpp_is_one_module_and_rejects_kernels_it_cannot_run():
    layer, _ = _layer("k3-p1-16x16-b3")
    fused = layer.decompose(impl="cpp").eval()
    assert [type(m).__name__ for m in fused] == ["CppRank1Conv2d"]
    assert "kernel_size=(3, 3)" in repr(fused) and "padding=(1, 1)" in repr(fused)
    with pytest.raises(ValueError, match="kernel sizes up to 64, got \\(65, 3\\)"):
        cpp_conv.CppRank1Conv2d(torch.randn(4, 4), torch.randn(4, 65), torch.randn(4, 3))


def test_flat1d_and_whole_networks_decompose_to_cpp():
    twin = Flat1dConv2d(12, 20, 3, padding=1)
    x = torch.randn(2, 12, 10, 10)
    with torch.no_grad():
        assert rel_err(twin.decompose(impl="cpp")(x), twin.dense_conv()(x)) <= 1e-5
    for family in ("vgg", "resnet"):
        model = build_model(family, arm="rank1", depth=8 if family == "resnet" else 4, width=16,
                            in_channels=3).eval()
        project_model_(model)
        x = torch.randn(3, 3, 16, 16)
        fast = decompose_model(model, "cpp")
        with torch.no_grad():
            assert rel_err(fast(x), dense_model(model)(x)) <= 1e-5, family


@pytest.mark.parametrize("batchnorm", [False, True])
def test_the_relu_after_a_cpp_layer_is_fused_into_it(batchnorm):
    """vgg's conv, norm (an Identity without batch norm), ReLU, and at a stage's end a 2x2
    max pool (ceil mode): the ReLU and then the pool move into the kernel's store past the
    Identity, never past a real norm; the function is unchanged, on the kernel and on its
    autograd fallback; other forms keep their ReLUs and pools. 15x15 inputs: the ceil-mode
    pools see odd sides (15, then 8)."""
    model = build_model("vgg", arm="flat1d", depth=4, width=20, in_channels=3, batchnorm=batchnorm).eval()
    x = torch.randn(3, 3, 15, 15)
    pools = sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert pools == 2
    fast = decompose_model(model, "cpp")
    convs = [m for m in fast.modules() if isinstance(m, cpp_conv.CppRank1Conv2d)]
    relus = [m for m in fast.modules() if isinstance(m, torch.nn.ReLU)]
    assert len(convs) == 4 and all(m.relu is not batchnorm for m in convs)
    assert len(relus) == (4 if batchnorm else 0) and ("relu=True" in repr(fast)) is not batchnorm
    left = sum(isinstance(m, torch.nn.MaxPool2d) for m in fast.modules())
    assert left == (pools if batchnorm else 0) and ("max_pool=2x2 ceil" in repr(fast)) is not batchnorm
    assert sum(isinstance(m, torch.nn.ReLU) for m in decompose_model(model, "chain").modules()) == 4
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in decompose_model(model, "chain").modules()) == pools
    ref = dense_model(model)(x)
    with torch.no_grad():
        assert rel_err(fast(x), ref) <= 1e-5
    grad_x = x.clone().requires_grad_(True)
    assert rel_err(fast(grad_x), ref) <= 1e-5  # the F.conv2d fallback applies the fused ReLU too


def test_autograd_and_other_dtypes_fall_back_to_the_same_function():
    layer, x = _layer("k3x5-s2-p12")
    fused = layer.decompose(impl="cpp")
    x.requires_grad_(True)
    y = fused(x)  # needs a gradient: F.conv2d, not the kernel
    y.square().sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    layer.dense_conv()(ref_x).square().sum().backward()
    assert rel_err(x.grad, ref_x.grad) <= 1e-4
    with torch.no_grad():
        half = fused.to(torch.bfloat16)(x.detach().bfloat16())
        assert half.dtype == torch.bfloat16
        assert rel_err(half.float(), layer.dense_conv()(x.detach())) <= 3e-2


def test_the_op_checks_its_inputs():
    op = cpp_conv.build()
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    a, b, c = torch.randn(8, 4), torch.randn(3, 8), torch.randn(3, 8)
    assert op(x, a, b, c, None, 1, 1, 1, 1, 1, 1, 1, 1, *LIMITS).shape == (1, 8, 5, 5)
    assert rel_err(op(x.contiguous(), a, b, c, None, 1, 1, 1, 1, 1, 1, 1, 1, *LIMITS),
                   op(x, a, b, c, None, 1, 1, 1, 1, 1, 1, 1, 1, *LIMITS)) <= 1e-6  # NCHW too
    with pytest.raises(RuntimeError, match="channels-last or contiguous NCHW"):
        op(x.transpose(2, 3), a, b, c, None, 1, 1, 1, 1, 1, 1, 1, 1, *LIMITS)
    with pytest.raises(RuntimeError, match="float32"):
        op(x.double(), a, b, c, None, 1, 1, 1, 1, 1, 1, 1, 1, *LIMITS)
    with pytest.raises(RuntimeError, match="a: O x C"):
        op(x, torch.randn(8, 5), b, c, None, 1, 1, 1, 1, 1, 1, 1, 1, *LIMITS)
    with pytest.raises(RuntimeError, match="too small"):
        op(x, a, b, c, None, 1, 1, 0, 0, 0, 0, 3, 3, *LIMITS)
    with pytest.raises(RuntimeError, match="bias must be"):
        op(x, a, b, c, torch.randn(7), 1, 1, 1, 1, 1, 1, 1, 1, *LIMITS)
    with pytest.raises(RuntimeError, match="padding must be non-negative"):
        op(x, a, b, c, None, 1, 1, -1, 1, 1, 1, 1, 1, *LIMITS)
    with pytest.raises(RuntimeError, match="stride and dilation must be positive"):
        op(x, a, b, c, None, 0, 1, 1, 1, 1, 1, 1, 1, *LIMITS)


def test_cpp_is_an_auto_candidate_on_cpu_with_its_roofline():
    assert "cpp" in available_impls("cpu") and "cpp" in candidate_impls(torch.device("cpu"))
    assert "cpp" not in available_impls("meta")
    assert CALLS["cpp"] == 1
    # The chain's multiply-adds; on the fused path one read and one write of the
    # activations, else triton's passes (a GEMM writes the 1x1 output, one pass reads it).
    assert cpp_conv.fused_path(32, 32, 8, 8, 4, threads=2) and not cpp_conv.fused_path(32, 32, 8, 8, 1, threads=2)
    assert cpp_conv.fused_path(512, 512, 8, 8, 32, threads=2) and cpp_conv.fused_path(128, 128, 56, 56, 32, 2)
    # Weights over 1 MB, or one image's 1x1 output over 8 MB: the library's 1x1.
    assert not cpp_conv.fused_path(1024, 1024, 4, 4, 32, threads=2) and not cpp_conv.fused_path(64, 512, 128, 128, 32, 2)
    flops, nbytes = impl_cost("cpp", 32, 32, 3, 8, 8, 32)
    assert flops == impl_cost("chain", 32, 32, 3, 8, 8, 32)[0]
    if cpp_conv.fused_path(32, 32, 8, 8, 32):  # batch 32 >= threads on any machine up to 32 cores
        assert nbytes == 4 * (2 * 32 * 64 * 32 + 32 * (32 + 6))
    assert impl_cost("cpp", 1024, 1024, 3, 8, 8, 32) == impl_cost("triton", 1024, 1024, 3, 8, 8, 32)


def test_cpp_lib_always_takes_the_library_1x1_and_auto_measures_it(monkeypatch):
    """``cpp_lib`` is the same kernel with the 1x1 by the library at every size: on a layer small
    enough for ``cpp``'s in-register path it hands the op limits that send the 1x1 to the library
    (the two paths' outputs can agree bit for bit, so the limits are what is checked), and it
    computes the dense conv's function in both layouts."""
    assert "cpp_lib" in candidate_impls(torch.device("cpu")) and CALLS["cpp_lib"] == 1
    assert impl_cost("cpp_lib", 32, 32, 3, 8, 8, 32) == impl_cost("triton", 32, 32, 3, 8, 8, 32)  # always a pass more
    layer = Rank1Conv2d(16, 32, 3, padding=1, bias=True)
    with torch.no_grad():
        layer.project_()
        layer.bias.normal_()
    lib, fused = layer.decompose(impl="cpp_lib").eval(), layer.decompose(impl="cpp").eval()
    assert lib.fused.library and not fused.fused.library and "1x1=library" in repr(lib)
    op, limits = cpp_conv.build(), []

    def recording(*args):
        limits.append(args[13:15])  # fused_weights, fused_plane
        return op(*args)

    monkeypatch.setattr(cpp_conv, "build", lambda: recording)
    x = torch.randn(4, 16, 8, 8)
    assert cpp_conv.fused_path(16, 32, 8, 8, 4, threads=1)  # cpp computes this 1x1 in registers
    with torch.no_grad(), one_thread():
        for xi in (x, x.contiguous(memory_format=CL)):
            limits.clear()
            y = lib(xi)
            assert limits == [(0, 0)]  # no layer fits: the library's 1x1
            assert rel_err(y, layer.dense_conv()(x)) <= 1e-5 and rel_err(fused(xi), y) <= 1e-5
            assert limits[-1] == LIMITS  # cpp: by size


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=300)


def test_without_a_compiler_cpp_is_unavailable_and_says_why(tmp_path):
    code = ("import torch\nfrom rank1 import Rank1Conv2d\nfrom rank1.layers import available_impls\n"
            "from rank1.autotune import candidate_impls\n"
            "print(available_impls(), candidate_impls(torch.device('cpu')))\n"
            "Rank1Conv2d(4, 4, 3).decompose(impl='cpp')\n")
    r = _python(code, CXX=str(tmp_path / "no-such-c++"), RANK1_CPP_CACHE=str(tmp_path / "cache"))
    assert r.returncode != 0
    assert "'cpp'" not in r.stdout and "'dense'" in r.stdout  # neither available nor an auto candidate
    assert "impl='cpp' is unavailable here (no C++ compiler" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow(seconds=30)
def test_the_build_is_cached_per_machine(tmp_path):
    """Built for AVX2 (ATEN_CPU_CAPABILITY=avx2), which the other tests do not reach on an
    AVX-512 machine: its vectors are 8 floats, its 1x1 tile 6 pixels x 2 vectors. Output
    channels 40 and 43 take every kind of panel (16 columns, 8, the last 3), 13 pixels a row
    every remainder of a pixel block, both layouts and both paths of the 1x1."""
    code = ("import torch\nfrom rank1 import Rank1Conv2d\nerr = 0.0\n"
            "assert torch.backends.cpu.get_cpu_capability() == 'AVX2'\n"
            "for o, n in ((40, 1), (43, 3)):\n"
            "    l = Rank1Conv2d(12, o, 3, padding=1)\n"
            "    x = torch.randn(n, 12, 11, 13)\n"
            "    with torch.no_grad():\n"
            "        f, ref = l.decompose(impl='cpp'), l.dense_conv()(x)\n"
            "        for xi in (x, x.contiguous(memory_format=torch.channels_last)):\n"
            "            for t in (1, 2):\n"
            "                torch.set_num_threads(t)\n"
            "                err = max(err, float(((f(xi) - ref).abs().max() / ref.abs().max())))\n"
            "print(err)\n")
    env = {"RANK1_CPP_CACHE": str(tmp_path / "cache"), "ATEN_CPU_CAPABILITY": "avx2"}
    first = _python(code, **env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "compiling the C++ CPU kernel once" in first.stderr and float(first.stdout) < 1e-5
    second = _python(code, **env)
    assert second.returncode == 0 and "compiling" not in second.stderr and float(second.stdout) < 1e-5
    (built,) = (tmp_path / "cache").glob("torch-*/rank1_cpu_avx2-*/rank1_cpu_avx2.so")
    # The same rank1 from another folder (as `mlflow models serve` imports the copy packed into a
    # logged model) loads that build; the shared folder's command named the source's path, and the
    # two rebuilt it in turn (23 s each here).
    shutil.copytree(ROOT / "rank1", tmp_path / "elsewhere" / "rank1", ignore=shutil.ignore_patterns("__pycache__"))
    before = built.stat().st_mtime_ns
    third = subprocess.run([sys.executable, "-c", f"import rank1\nassert rank1.__file__.startswith({str(tmp_path)!r})\n{code}"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300,
                           env={**os.environ, **env, "PYTHONPATH": str(tmp_path / "elsewhere")})
    assert third.returncode == 0 and "compiling" not in third.stderr, third.stderr[-2000:]
    assert float(third.stdout) < 1e-5 and built.stat().st_mtime_ns == before
    assert len(list((tmp_path / "cache").glob("torch-*/rank1_cpu_*"))) == 1


def test_grid_row_includes_cpp():
    from rank1.bench import bench_grid_point, grid_markdown
    from rank1.roofline import Peaks

    row = bench_grid_point(16, 3, 8, 2, Peaks(100.0, 10.0, 0.005), peer=False, repeats=2)
    assert "cpp" in row["times_ms"] and "cpp" in row["bound_ms"]
    # auto's speedup also timed paired with the dense form: a median ratio within its own range
    lo, hi = row["auto_speedup_paired_range"]
    assert 0 < lo <= row["auto_speedup_paired"] <= hi
    assert row["auto_fraction_of_flop_ratio_paired"] == pytest.approx(row["auto_speedup_paired"] / row["flop_ratio"])
    md = grid_markdown([row], {"device": "cpu", "threads": 1, "torch": torch.__version__}, Peaks(100.0, 10.0, 0.005))
    assert f"{row['auto_speedup_paired']:.2f}x [{lo:.2f}, {hi:.2f}]" in md
