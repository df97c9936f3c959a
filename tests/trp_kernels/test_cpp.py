"""The compiled extension trp_kernels._C, through trp_kernels.cpp.

Skipped when the extension is not built, unless TRP_CPP_REQUIRED=1 says it must be (CI
builds it), in which case its absence is a failure.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trp_kernels import cpp

_REQUIRED = os.environ.get("TRP_CPP_REQUIRED", "").strip().lower() in {"1", "true", "yes", "on"}

if not cpp.available():
    if _REQUIRED:
        pytest.fail(
            f"TRP_CPP_REQUIRED is set but the C++ extension is missing: "
            f"{cpp.unavailable_reason()}",
            pytrace=False,
        )
    pytest.skip(f"C++ extension not built: {cpp.unavailable_reason()}", allow_module_level=True)


IN_CH, OUT_CH, H, W = 3, 4, 7, 9  # odd, unequal H and W catch swapped axes


def _data(batch, kernel, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, IN_CH, H, W, generator=g)
    w = torch.randn(OUT_CH, IN_CH, *kernel, generator=g)
    b = torch.randn(OUT_CH, generator=g) if bias else None
    return x, w, b


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _assert_matches_torch(out, x, w, b, stride, padding, dilation):
    args = (stride, padding, dilation)
    ref32 = F.conv2d(x, w, b, *args)
    ref64 = F.conv2d(x.double(), w.double(), None if b is None else b.double(), *args)
    assert out.dtype == torch.float32
    assert out.shape == ref32.shape
    if out.numel() == 0:
        return
    scale = max(1.0, ref64.abs().max().item())
    # DESIGN convention 3: against an fp64 oracle, no worse than twice PyTorch's own fp32
    # error plus an atol. _C accumulates in double and rounds once (<= 0.5 ulp, ~6e-8
    # relative), so 1e-6 * scale is slack for that rounding, not room for a wrong index.
    torch_err = (ref32.double() - ref64).abs().max().item()
    our_err = (out.double() - ref64).abs().max().item()
    assert our_err <= 2 * torch_err + 1e-6 * scale, (our_err, torch_err, scale)
    # And directly against fp32 torch: fp32 sums of K = c*kh*kw <= 75 products of unit
    # normals err by ~K * 6e-8 * sum|w*x| <~ 1e-5 of the output scale; any indexing or
    # padding mistake is O(1) and fails by orders of magnitude.
    torch.testing.assert_close(out, ref32, rtol=1e-5, atol=1e-5 * scale)


GRID = list(
    itertools.product(
        [(1, 1), (3, 3), (5, 5), (3, 5)],  # kernel
        [1, 2],  # stride
        [0, 1, (2, 1)],  # padding
        [1, 2],  # dilation
        [True, False],  # bias
        [0, 1, 3],  # batch
    )
)


def _grid_id(kernel, stride, padding, dilation, bias, batch):
    pad = "x".join(map(str, _pair(padding)))
    return f"k{kernel[0]}x{kernel[1]}-s{stride}-p{pad}-d{dilation}-{'bias' if bias else 'nobias'}-b{batch}"


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation,bias,batch", GRID, ids=[_grid_id(*g) for g in GRID]
)
def test_conv2d_direct_matches_torch(kernel, stride, padding, dilation, bias, batch):
    x, w, b = _data(batch, kernel, bias)
    ph, pw = _pair(padding)
    fits = H + 2 * ph >= dilation * (kernel[0] - 1) + 1 and W + 2 * pw >= dilation * (
        kernel[1] - 1
    ) + 1
    if not fits:
        # PyTorch refuses these too; ours must refuse with a clear message, not read OOB.
        with pytest.raises(RuntimeError):
            F.conv2d(x, w, b, stride, padding, dilation)
        with pytest.raises(ValueError, match="output size"):
            cpp.conv2d_direct(x, w, b, stride, padding, dilation)
        return
    out = cpp.conv2d_direct(x, w, b, stride, padding, dilation)
    _assert_matches_torch(out, x, w, b, stride, padding, dilation)


@pytest.mark.parametrize("kernel", [(3, 5), (5, 3)])
@pytest.mark.parametrize(
    "stride,padding,dilation",
    [((1, 2), (1, 2), (2, 1)), ((2, 1), (2, 0), (1, 2)), ((2, 3), (1, 0), (2, 2))],
)
def test_asymmetric_hyper_parameters_are_not_swapped(kernel, stride, padding, dilation):
    x, w, b = _data(3, kernel, True, seed=2)
    out = cpp.conv2d_direct(x, w, b, stride, padding, dilation)
    _assert_matches_torch(out, x, w, b, stride, padding, dilation)


def test_zero_batch_returns_empty_output_of_right_shape():
    x, w, b = _data(0, (3, 3), True)
    out = cpp.conv2d_direct(x, w, b, 2, 1, 1)
    assert out.shape == (0, OUT_CH, 4, 5)
    assert out.dtype == torch.float32


def test_larger_shape_exercises_every_plane():
    # Enough (batch, out-channel) planes to be split across OpenMP threads.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 16, 13, 11, generator=g)
    w = torch.randn(24, 16, 3, 3, generator=g)
    b = torch.randn(24, generator=g)
    out = cpp.conv2d_direct(x, w, b, (1, 2), (1, 0), (2, 1))
    _assert_matches_torch(out, x, w, b, (1, 2), (1, 0), (2, 1))


def test_non_contiguous_and_channels_last_inputs_are_made_contiguous():
    x, w, b = _data(3, (3, 3), True)
    wide = torch.randn(3, IN_CH, H, 2 * W)
    views = {
        "strided": wide[..., ::2],
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "transposed": x.transpose(2, 3).contiguous().transpose(2, 3),
    }
    for name, view in views.items():
        assert not view.is_contiguous(), name
        out = cpp.conv2d_direct(view, w, b, 1, 1, 1)
        _assert_matches_torch(out, view, w, b, 1, 1, 1)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    _assert_matches_torch(cpp.conv2d_direct(x, w_cl, b, 1, 1, 1), x, w, b, 1, 1, 1)


def test_hyper_parameters_accept_ints_tuples_and_lists():
    x, w, b = _data(1, (3, 5), True)
    a = cpp.conv2d_direct(x, w, b, 2, 1, 1)
    assert torch.equal(a, cpp.conv2d_direct(x, w, b, (2, 2), [1, 1], (1, 1)))
    assert torch.equal(a, cpp.conv2d_direct(x, w, b, np.int64(2), (np.int32(1), 1), 1))


def test_input_that_requires_grad_is_accepted_and_output_is_new_memory():
    x, w, b = _data(1, (3, 3), True)
    x.requires_grad_(True)
    out = cpp.conv2d_direct(x, w, b, 1, 1, 1)
    assert not out.requires_grad
    assert out.is_contiguous()
    out.fill_(0)  # the output owns its buffer: writing it leaves the inputs alone
    assert x.abs().sum() > 0


def test_raw_binding_returns_float32_numpy():
    x, w, b = _data(2, (3, 3), True)
    out = cpp._C.conv2d_direct(x.numpy(), w.numpy(), None, (1, 1), (0, 0), (1, 1))
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]
    assert out.shape == (2, OUT_CH, H - 2, W - 2)


# ---- every bad input is refused with a message naming the argument ----------------------


def _ok():
    x, w, b = _data(2, (3, 3), True)
    return dict(x=x, weight=w, bias=b, stride=1, padding=0, dilation=1)


BAD_TORCH_INPUTS = [
    ("x float64", dict(x=lambda a: a.double()), ValueError, r"x must be torch\.float32, got torch\.float64"),
    ("weight float64", dict(weight=lambda a: a.double()), ValueError, r"weight must be torch\.float32"),
    ("bias float64", dict(bias=lambda a: a.double()), ValueError, r"bias must be torch\.float32"),
    ("x int32", dict(x=lambda a: a.int()), ValueError, r"x must be torch\.float32, got torch\.int32"),
    ("x 3 dims", dict(x=lambda a: a[0]), ValueError, r"input must have 4 dims \(batch, channels, height, width\), got 3"),
    ("weight 3 dims", dict(weight=lambda a: a[0]), ValueError, r"weight must have 4 dims \(out, in, kh, kw\), got 3"),
    ("weight 5 dims", dict(weight=lambda a: a[None]), ValueError, r"weight must have 4 dims .*got 5"),
    ("bias 2 dims", dict(bias=lambda a: a[None]), ValueError, r"bias must have 1 dim \(out,\), got 2"),
    ("channel mismatch", dict(weight=lambda a: a[:, :2]), ValueError, r"weight has 2 input channels .*input has 3 channels"),
    ("bias length", dict(bias=lambda a: a[:3]), ValueError, r"bias must have 4 elements \(weight\.shape\[0\]\), got 3"),
    ("kernel size 0", dict(weight=lambda a: a[:, :, :0]), ValueError, r"weight kernel size must be >= 1"),
    ("stride 0", dict(stride=lambda a: 0), ValueError, r"stride must be >= 1"),
    ("stride (1, 0)", dict(stride=lambda a: (1, 0)), ValueError, r"stride must be >= 1 in both dims, got \(1, 0\)"),
    ("negative padding", dict(padding=lambda a: (0, -1)), ValueError, r"padding must be >= 0 in both dims, got \(0, -1\)"),
    ("dilation 0", dict(dilation=lambda a: 0), ValueError, r"dilation must be >= 1"),
    ("huge padding", dict(padding=lambda a: 2**40), ValueError, r"padding must be <= 2147483647"),
    ("output size < 1", dict(dilation=lambda a: 4), ValueError, r"output size would be .*must be >= 1"),
    ("stride float", dict(stride=lambda a: 1.0), TypeError, r"stride must be an int or a pair of ints"),
    ("stride bool", dict(stride=lambda a: True), TypeError, r"stride must be an int or a pair of ints"),
    ("padding triple", dict(padding=lambda a: (1, 1, 1)), TypeError, r"padding must be an int or a pair of ints"),
    ("x not a tensor", dict(x=lambda a: a.numpy()), TypeError, r"x must be a torch\.Tensor, got ndarray"),
    ("x on meta device", dict(x=lambda a: a.to("meta")), ValueError, r"x must be on the CPU, got device meta"),
    ("weight sparse", dict(weight=lambda a: a.to_sparse()), ValueError, r"weight must be a dense \(strided\) tensor"),
]


@pytest.mark.parametrize(
    "change,error,pattern", [c[1:] for c in BAD_TORCH_INPUTS], ids=[c[0] for c in BAD_TORCH_INPUTS]
)
def test_bad_input_raises_naming_the_argument(change, error, pattern):
    kwargs = _ok()
    for key, f in change.items():
        kwargs[key] = f(kwargs[key])
    with pytest.raises(error, match="conv2d_direct: " + pattern):
        cpp.conv2d_direct(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to make a CUDA tensor")
def test_cuda_tensor_is_refused():
    kwargs = _ok()
    kwargs["x"] = kwargs["x"].cuda()
    with pytest.raises(ValueError, match=r"x must be on the CPU, got device cuda"):
        cpp.conv2d_direct(**kwargs)


# The binding itself, below the torch wrapper: it must never convert or copy silently.


def _raw_ok():
    x, w, b = _data(2, (3, 3), True)
    return [x.numpy(), w.numpy(), b.numpy(), (1, 1), (0, 0), (1, 1)]


BAD_RAW_INPUTS = [
    ("input float64", 0, lambda a: a.astype(np.float64), ValueError, r"input must have dtype float32, got float64"),
    ("weight float16", 1, lambda a: a.astype(np.float16), ValueError, r"weight must have dtype float32, got float16"),
    ("bias big-endian", 2, lambda a: a.astype(">f4"), ValueError, r"bias must have dtype float32"),
    ("input not C-contiguous", 0, lambda a: np.asfortranarray(a), ValueError, r"input must be C-contiguous"),
    ("weight strided view", 1, lambda a: a[:, :, ::2], ValueError, r"weight must be C-contiguous"),
    ("input misaligned", 0, lambda a: np.frombuffer(b"\0" + np.ascontiguousarray(a).tobytes(), np.float32, offset=1).reshape(a.shape), ValueError, r"input data must be aligned"),
    ("input a list", 0, lambda a: a.tolist(), TypeError, r"input must be a numpy\.ndarray of float32, got list"),
    ("stride an int", 3, lambda a: 1, TypeError, r"stride must be a tuple of 2 ints, got 1"),
    ("dilation floats", 5, lambda a: (1.0, 1.0), TypeError, r"dilation must be a tuple of 2 ints"),
    ("padding overflows int64", 4, lambda a: (2**70, 0), ValueError, r"padding must be <= 2147483647"),
]


@pytest.mark.parametrize(
    "index,change,error,pattern", [c[1:] for c in BAD_RAW_INPUTS], ids=[c[0] for c in BAD_RAW_INPUTS]
)
def test_raw_binding_refuses_instead_of_converting(index, change, error, pattern):
    args = _raw_ok()
    args[index] = change(args[index])
    with pytest.raises(error, match="conv2d_direct: " + pattern):
        cpp._C.conv2d_direct(*args)


def test_raw_binding_accepts_read_only_arrays_and_no_bias():
    args = _raw_ok()
    for a in args[:3]:
        a.flags.writeable = False
    args[2] = None
    assert cpp._C.conv2d_direct(*args).shape == (2, OUT_CH, H - 2, W - 2)


# ---- build_info ---------------------------------------------------------------------------

BUILD_INFO_TYPES = {
    "version": str,
    "compiler_id": str,
    "compiler_version": str,
    "cplusplus": int,
    "cxx_standard": int,
    "build_type": str,
    "native": bool,
    "compiled_avx2": bool,
    "compiled_avx512f": bool,
    "openmp": bool,
    "openmp_max_threads": int,
    "arch": str,
    "cpu_detection": str,
    "cpu_avx2": bool,
    "cpu_avx512f": bool,
}


def test_build_info_keys_and_types():
    info = cpp.build_info()
    assert set(info) == set(BUILD_INFO_TYPES)
    for key, typ in BUILD_INFO_TYPES.items():
        assert type(info[key]) is typ, (key, info[key])
    assert info["version"] == "0.1.0"
    assert info["cxx_standard"] >= 17
    assert info["cplusplus"] >= 201703
    assert info["compiler_id"] and info["compiler_version"]
    assert info["build_type"]
    assert info["openmp_max_threads"] >= 1
    assert info["cpu_detection"] in {"builtin_cpu_supports", "unknown"}
    # Code compiled for AVX-512F could not be running here otherwise.
    if info["compiled_avx512f"]:
        assert info["cpu_avx512f"] or info["cpu_detection"] == "unknown"


def _cpuinfo_flags():
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def test_build_info_runtime_cpu_flags_agree_with_proc_cpuinfo():
    info = cpp.build_info()
    flags = _cpuinfo_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags line on this system")
    if info["cpu_detection"] != "builtin_cpu_supports":
        pytest.skip(f"the extension cannot detect CPU features on {info['arch']}")
    assert info["cpu_avx2"] == ("avx2" in flags)
    assert info["cpu_avx512f"] == ("avx512f" in flags)


def test_build_info_raises_when_extension_is_missing(monkeypatch):
    monkeypatch.setattr(cpp, "_C", None)
    monkeypatch.setattr(cpp, "_UNAVAILABLE_REASON", "pretend it was not built")
    assert not cpp.available()
    with pytest.raises(RuntimeError, match="pretend it was not built"):
        cpp.build_info()
    with pytest.raises(RuntimeError, match="not available"):
        cpp.conv2d_direct(*_data(1, (1, 1), False)[:2])
