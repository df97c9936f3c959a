"""The reference arithmetic, the op registration (fake, autograd) and backend dispatch."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import rel_err
from trp import families
from trp.decompose import RankSpec
from trp_kernels import cpp, ops, reference


@pytest.mark.parametrize("padding,kernel,dilation,expected", [
    (1, (3, 3), (1, 1), (1, 1, 1, 1)),
    ((2, 0), (3, 3), (1, 1), (2, 2, 0, 0)),
    ("valid", (3, 3), (1, 1), (0, 0, 0, 0)),
    ("same", (3, 5), (1, 1), (1, 1, 2, 2)),
    ("same", (4, 2), (1, 1), (1, 2, 0, 1)),   # even kernel: PyTorch puts the extra row/col last
    ("same", (4, 3), (2, 1), (3, 3, 1, 1)),
])
def test_resolve_padding(padding, kernel, dilation, expected):
    assert reference.resolve_padding(padding, kernel, dilation) == expected


@pytest.mark.parametrize("bad", ["full", -1, (1, -2), (1, 2, 3)])
def test_resolve_padding_rejects(bad):
    with pytest.raises(ValueError, match="padding"):
        reference.resolve_padding(bad, (3, 3), (1, 1))


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("kernel,padding", [((4, 2), "same"), ((3, 3), 1), ((3, 5), (0, 2))])
def test_lowrank_conv_matches_composed_dense(scheme, kernel, padding):
    """Two factor convs equal one conv with the multiplied-out weight, for any padding."""
    conv = torch.nn.Conv2d(5, 7, kernel, padding=padding, dilation=(2, 1), bias=True).double()
    family = families.get(scheme)
    w1, w2 = family.factor(conv.weight, RankSpec(rank=3)).weights
    x = torch.randn(2, 5, 11, 10, dtype=torch.float64)
    pad4 = reference.resolve_padding(padding, kernel, (2, 1))
    out = reference.lowrank_conv2d(x, w1, w2, conv.bias, (1, 1), pad4, (2, 1), scheme)
    dense = family.compose((w1, w2))
    expected = F.conv2d(x, dense, conv.bias, 1, padding, (2, 1))
    assert out.shape == expected.shape
    assert rel_err(out, expected) < 1e-12


def _chain_args(kind, channels_last=False, requires_grad=True, dtype=torch.float64,
                padding=(1, 1, 1, 1)):
    """x and the ``trp::conv_chain`` arguments of a conv of stride (2, 1), dilation (1, 2)
    and ``padding`` computed as ``kind``: a fused two-stage kernel's chain ('channel',
    'spatial'), a Tucker-2 chain of three stages, or one dense stage."""
    x = torch.randn(2, 3, 7, 6, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    stride, dil = [2, 1], [1, 2]
    if kind in reference.TWO_STAGE_KERNELS:
        shapes = [(2, 3, 3, 3), (4, 2, 1, 1)] if kind == "channel" else [(2, 3, 3, 1), (4, 2, 1, 3)]
        strides, paddings, dilations = reference.kernel_stages(kind, stride, padding, dil)
    elif kind == "tucker":
        shapes = [(2, 3, 1, 1), (3, 2, 3, 3), (4, 3, 1, 1)]
        strides, paddings, dilations = [1, 1, *stride, 1, 1], [0] * 4 + list(padding) + [0] * 4, [1, 1, *dil, 1, 1]
    else:
        shapes = [(4, 3, 3, 3)]
        strides, paddings, dilations = stride, list(padding), dil
    weights = [torch.randn(s, dtype=dtype) for s in shapes]
    b = torch.randn(4, dtype=dtype)
    for t in (x, *weights, b):
        t.requires_grad_(requires_grad)
    return x, weights, b, (strides, paddings, dilations)


def _dense(weights):
    """The chain as one dense conv (its composed weight, the geometry of the k×k stage)."""
    dense = weights[0].detach()
    for w in weights[1:]:
        dense = F.conv2d(dense.permute(1, 0, 2, 3), w.detach().flip(-2, -1),
                         padding=(w.shape[2] - 1, w.shape[3] - 1)).permute(1, 0, 2, 3)
    return dense


CHAINS = ["channel", "spatial", "tucker", "dense"]


@pytest.mark.parametrize("kind", CHAINS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("padding", [[1, 1, 1, 1], [0, 1, 2, 1]])
def test_conv_op_registration(kind, channels_last, padding):
    """Schema, fake kernel, autograd registration and AOT dispatch agree with the real op."""
    x, weights, b, geometry = _chain_args(kind, channels_last, padding=padding)
    args = (x, weights, *geometry, b, None, False, "cpp")
    torch.library.opcheck(torch.ops.trp.conv_chain.default, args)


@pytest.mark.parametrize("kind", CHAINS)
@pytest.mark.parametrize("padding", [[1, 1, 1, 1], [0, 1, 2, 1]])
def test_conv_op_gradients(kind, padding):
    x, weights, b, geometry = _chain_args(kind, padding=padding)
    fn = lambda x, b, *ws: torch.ops.trp.conv_chain(  # noqa: E731
        x, list(ws), *geometry, b, None, False, "cpp")
    assert torch.autograd.gradcheck(fn, (x, b, *weights))
    assert torch.autograd.gradcheck(fn, (x, None, *weights))


@pytest.mark.parametrize("kind", CHAINS)
def test_conv_op_epilogue_gradients(kind):
    """Residual and ReLU: gradients wrt every tensor input, opcheck, and the value."""
    x, weights, b, geometry = _chain_args(kind)
    out_shape = reference.conv_chain(x, weights, *geometry, b).shape
    res = torch.randn(out_shape, dtype=torch.float64, requires_grad=True)
    fn = lambda x, b, res, *ws: torch.ops.trp.conv_chain(  # noqa: E731
        x, list(ws), *geometry, b, res, True, "cpp")
    assert torch.autograd.gradcheck(fn, (x, b, res, *weights))
    torch.library.opcheck(torch.ops.trp.conv_chain.default, (x, weights, *geometry, b, res, True, "cpp"))
    expected = torch.relu(reference.conv_chain(x, weights, *geometry, b) + res)
    assert rel_err(fn(x, b, res, *weights), expected) < 1e-12


@pytest.mark.parametrize("kind", CHAINS)
def test_conv_chain_is_the_composed_dense_conv(kind):
    """Every chain equals one conv with the composed weight and the k×k stage's geometry
    (zero padding commutes with the 1×1 / width-1 stages), bias added once at the end."""
    x, weights, b, geometry = _chain_args(kind, requires_grad=False, padding=[0, 1, 2, 1])
    out = reference.conv_chain(x, weights, *geometry, b)
    want = F.conv2d(F.pad(x, (2, 1, 0, 1)), _dense(weights), b, (2, 1), 0, (1, 2))
    assert out.shape == want.shape and rel_err(out, want) < 1e-12


def test_conv_op_output_layout_follows_input():
    x, weights, b, geometry = _chain_args("channel", True, requires_grad=False, dtype=torch.float32)
    out = torch.ops.trp.conv_chain(x, weights, *geometry, b, None, False, "cpp")
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


def _linear_args(requires_grad=True):
    ts = (torch.randn(3, 2, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64),
          torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64))
    return tuple(t.requires_grad_(requires_grad) for t in ts)


def test_linear_op_registration_and_gradients():
    x, w1, w2, b = _linear_args()
    torch.library.opcheck(torch.ops.trp.lowrank_linear.default, (x, w1, w2, b, None, False, "cpp"))
    fn = lambda x, w1, w2, b: torch.ops.trp.lowrank_linear(x, w1, w2, b, None, False, "cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w1, w2, b))
    assert torch.autograd.gradcheck(fn, (x, w1, w2, None))
    out = torch.ops.trp.lowrank_linear(x, w1, w2, b, None, False, "cpp")
    assert rel_err(out, x @ w1.T @ w2.T + b) < 1e-12
    res = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w1, w2, b, res: torch.ops.trp.lowrank_linear(x, w1, w2, b, res, True, "cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w1, w2, b, res))
    assert rel_err(fn(x, w1, w2, b, res), torch.relu(x @ w1.T @ w2.T + b + res)) < 1e-12


def test_auto_backend_on_cpu():
    fused = ops.is_fused("cpp")
    assert ops.resolve_backend("auto", "cpu", torch.float32) == ("cpp" if fused else "torch")
    assert ops.resolve_backend("auto", "cpu", torch.float64) == "torch"  # cpp runs float32 only
    assert ops.resolve_backend("auto", "meta", torch.float32) == "torch"
    assert ops.resolve_backend("torch", "cpu", torch.float16) == "torch"


def test_explicit_backend_refusals_are_named():
    with pytest.raises(ops.BackendError, match=r"backend 'cpp' .*dtype torch.float64 is not supported"):
        ops.resolve_backend("cpp", "cpu", torch.float64)
    with pytest.raises(ops.BackendError, match=r"tensors are on meta; cpp needs cpu"):
        ops.resolve_backend("cpp", "meta", torch.float32)
    if not ops._TRITON_INTERPRET:
        with pytest.raises(ops.BackendError, match="triton needs cuda"):
            ops.resolve_backend("triton", "cpu", torch.float32)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        ops.resolve_backend("cudnn", "cpu", torch.float32)


@pytest.mark.skipif(not cpp.has_fused_kernels(), reason="the fused C++ kernels are not built")
def test_dispatch_knows_the_cpp_kernels_limits():
    """auto never picks the C++ kernels for a layer they refuse: dispatch reads the kernels'
    own limit (_C.MAX_KERNEL, the constant their check uses)."""
    big = cpp.max_kernel() + 1
    assert cpp.max_kernel() == cpp._C.MAX_KERNEL == 64
    assert ops.resolve_backend("auto", "cpu", torch.float32, kernel_size=(3, 3)) == "cpp"
    for kernel in ((big, big), (big, 1), (3, big)):
        assert ops.resolve_backend("auto", "cpu", torch.float32, kernel_size=kernel) == "torch"
        with pytest.raises(ops.BackendError, match=rf"kernel size \({kernel[0]}, {kernel[1]}\) exceeds the fused C\+\+"):
            ops.resolve_backend("cpp", "cpu", torch.float32, kernel_size=kernel)
    x, w1, w2 = torch.randn(1, 2, big, big), torch.randn(3, 2, big, big), torch.randn(4, 3, 1, 1)
    with pytest.raises(ValueError, match=f"kernel size must be within 1..{cpp.max_kernel()}"):
        cpp.lowrank_conv2d(x, w1, w2, None, (1, 1), (0, 0, 0, 0), (1, 1), "channel")
    out = ops.lowrank_conv2d(x, w1, w2, None, (1, 1), (0, 0, 0, 0), (1, 1), "channel")  # auto: torch
    assert torch.allclose(out, reference.lowrank_conv2d(x, w1, w2, None, (1, 1), (0, 0, 0, 0), (1, 1), "channel"))


def test_triton_is_never_auto_on_cpu_even_when_interpreting():
    assert "triton" not in ops.AUTO_ORDER["cpu"]


def test_fused_backends():
    triton_ok = not ops._TRITON_IMPORT_ERROR
    assert [ops.is_fused(b) for b in ops.BACKENDS] == [triton_ok, cpp.has_fused_kernels(), False]
    if triton_ok:
        assert ops.resolve_backend("auto", "cuda", torch.float16) == "triton"
        assert ops.resolve_backend("auto", "cuda", torch.float16, rank=1024) == "torch"  # over MAX_RANK
        with pytest.raises(ops.BackendError, match="rank 1024 exceeds"):
            ops.resolve_backend("triton", "cuda", torch.float16, rank=1024)


def test_plain_eager_calls_skip_the_op_only_when_nothing_traces_or_needs_grad():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w = torch.randn(1, 3, 4, 4), torch.nn.Parameter(torch.randn(2, 3, 3, 3))
    assert not ops._plain_eager(x, w, None)           # autograd must record the parameter's use
    with torch.no_grad():
        assert ops._plain_eager(x, w, None)
        with FakeTensorMode() as mode:
            assert not ops._plain_eager(mode.from_tensor(x), w)
    assert ops._plain_eager(x, w.detach())


def test_kernel_layout_names_a_bad_weight():
    with pytest.raises(TypeError, match="kernel_layout: weight must be a 2-D or 4-D torch.Tensor"):
        ops.kernel_layout("w")
    with pytest.raises(TypeError, match="kernel_layout: weight must be"):
        ops.kernel_layout(torch.zeros(3))
