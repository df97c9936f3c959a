"""LowRankConv2d / LowRankLinear as drop-in modules."""

import io

import pytest
import torch
import torch.nn as nn

from tests.helpers import rel_err
import trp
from trp import LowRankConv2d, LowRankLinear
from trp_kernels import ops


def _conv_layer(scheme="channel", **kw):
    conv = nn.Conv2d(6, 8, 3, padding=1, **kw)
    return conv, LowRankConv2d.from_conv(conv, rank=4, scheme=scheme)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_drop_in_shapes_dtype_layouts(scheme):
    conv, layer = _conv_layer(scheme)
    x = torch.randn(3, 6, 10, 7)
    with torch.no_grad():
        y = layer(x)
        assert y.shape == conv(x).shape and y.dtype == x.dtype and y.device == x.device
        y_cl = layer(x.to(memory_format=torch.channels_last))
        assert torch.allclose(y_cl, y, atol=1e-6)
        y_nc = layer(torch.randn(3, 10, 6, 7).transpose(1, 2))  # non-contiguous input
        assert y_nc.shape == y.shape
        assert layer(x[0]).shape == conv(x[0]).shape  # unbatched input, like nn.Conv2d


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_gradients_flow_and_fine_tuning_reduces_loss(backend, scheme):
    torch.manual_seed(1)
    target = nn.Conv2d(6, 8, 3, padding=1)
    layer = LowRankConv2d(6, 8, 3, rank=4, padding=1, scheme=scheme, backend=backend)
    x = torch.randn(8, 6, 9, 9)
    y = target(x).detach()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (layer(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_op_gradients_equal_reference_gradients():
    _, layer = _conv_layer()
    ref = LowRankConv2d.from_conv(layer.to_dense(), rank=4)  # same function, fresh parameters
    ref.load_state_dict(layer.state_dict())
    ref.backend = "torch"
    layer.backend = "auto"
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    layer(x).square().sum().backward()
    ref(x2).square().sum().backward()
    assert rel_err(x.grad, x2.grad) < 1e-5
    for (n, p), (_, q) in zip(layer.named_parameters(), ref.named_parameters()):
        assert rel_err(p.grad, q.grad) < 1e-5, n


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_to_dense_round_trip(scheme):
    conv, layer = _conv_layer(scheme, stride=2, dilation=2)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Conv2d) and dense.stride == conv.stride and dense.dilation == conv.dilation
    x = torch.randn(2, 6, 15, 15)
    with torch.no_grad():
        assert rel_err(dense(x), layer(x)) < 1e-5


def test_linear_drop_in_and_to_dense():
    linear = nn.Linear(10, 6)
    layer = LowRankLinear.from_linear(linear, rank=3)
    x = torch.randn(4, 5, 10)
    with torch.no_grad():
        assert layer(x).shape == (4, 5, 6)
        assert rel_err(layer.to_dense()(x), layer(x)) < 1e-5
    layer(x).sum().backward()
    assert layer.weight1.grad is not None and layer.bias.grad is not None


def test_state_dict_round_trip_and_dtype_moves():
    _, layer = _conv_layer()
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = LowRankConv2d(6, 8, 3, rank=4, padding=1)
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
        double = fresh.to(torch.float64)
        assert double.weight1.dtype == torch.float64
        assert double(x.double()).dtype == torch.float64


def test_extra_repr_names_scheme_rank_backend():
    _, layer = _conv_layer("spatial")
    text = repr(layer)
    assert "rank=4/" in text and "scheme=spatial" in text and "backend=auto" in text


def test_explicit_backend_that_cannot_run_says_why():
    from trp_kernels import ops

    _, layer = _conv_layer()
    layer = layer.double()
    for backend, reason in [("triton", "dtype torch.float64 is not supported"),
                            ("cpp", "dtype torch.float64 is not supported")]:
        layer.backend = backend
        with pytest.raises(ops.BackendError, match=f"backend '{backend}' cannot run .*{reason}"):
            layer(torch.randn(1, 6, 5, 5, dtype=torch.float64))


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank must be an int >= 1"),
    (dict(rank=100), "rank must be <= full rank 8"),
    (dict(rank=2, scheme="tensor-train"), "scheme must be one of"),
    (dict(rank=2, backend="cudnn"), "backend must be one of"),
    (dict(rank=2, stride=0), "stride must be an int >= 1"),
    (dict(rank=2, stride=2, padding="same"), "padding='same' is not supported for strided"),
    (dict(rank=2, padding="full"), "padding must be 'same', 'valid'"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankConv2d(6, 8, 3, **kwargs)


def test_bad_inputs_and_sources():
    _, layer = _conv_layer()
    with pytest.raises(ValueError, match=r"input must be \(N, 6, H, W\)"):
        layer(torch.randn(1, 5, 8, 8))
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        LowRankConv2d.from_conv(nn.Linear(3, 3), rank=1)
    with pytest.raises(ValueError, match="cannot factor this conv: depthwise"):
        LowRankConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=4), rank=1)
    with pytest.raises(ValueError, match="at most one of energy, rank, ratio"):
        LowRankConv2d.from_conv(nn.Conv2d(4, 4, 3), rank=1, energy=0.5)
    with pytest.raises(ValueError, match="input must have last dimension 10"):
        LowRankLinear(10, 6, rank=2)(torch.randn(3, 9))
    with pytest.raises(ValueError, match="backend must be one of"):
        layer.backend = "fast"


def _backends_here():
    return [b for b in ("torch", "cpp", "triton")
            if not ops.refusals(b, "cpu", torch.float32) and (b == "torch" or ops.is_fused(b))]


@pytest.mark.parametrize("backend", _backends_here())
def test_input_smaller_than_the_kernel_raises_as_conv2d_does(backend):
    """The issue's model: the dense one raises in F.conv2d; the compiled one must raise too
    (it returned an empty tensor, then NaN logits), naming the layer and the sizes."""
    from trp_kernels.reference import InputTooSmallError

    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 64, 3, dilation=2), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(RuntimeError):
        m(x)
    compiled = trp.compile(m, rank=4, inplace=False, backend=backend)
    assert isinstance(compiled[2], trp.LowRankConv2d)
    with pytest.raises(InputTooSmallError, match=r"layer '2' \(LowRankConv2d\): input of spatial size 3x3 .* "
                                                 r"spans 5x5") as info:
        compiled(x)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    assert compiled(torch.randn(2, 3, 7, 7)).shape == (2, 10)  # the smallest input that fits: 1x1 output
    layer = compiled[2]
    # The op itself, called directly: a RuntimeError on every backend (F.conv2d's own on torch)
    with pytest.raises(RuntimeError, match="padded by" if backend != "torch" else "Kernel size can't be greater"):
        ops.lowrank_conv2d(torch.randn(1, 16, 4, 9), layer.weight1, layer.weight2, layer.bias, layer.stride,
                           layer._padding4, layer.dilation, layer.scheme, backend)


def test_input_too_small_under_torch_compile():
    from trp_kernels.reference import InputTooSmallError

    layer = trp.LowRankConv2d(4, 8, 3, rank=2, dilation=3).eval()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert compiled(torch.randn(1, 4, 7, 7)).shape == (1, 8, 1, 1)
    with pytest.raises(Exception) as info:  # dynamo wraps what the traced forward raised
        compiled(torch.randn(1, 4, 6, 7))
    chain = [info.value] + [e for e in (info.value.__cause__, info.value.__context__) if e is not None]
    assert any(isinstance(e, InputTooSmallError) or "smaller than the kernel" in str(e) for e in chain)


def test_auto_falls_back_for_a_kernel_the_fused_kernels_refuse():
    """A 65x65 kernel: auto runs it (on torch), and an explicit cpp says why at compile time."""
    conv = nn.Conv2d(2, 8, 65, padding=32)
    layer = trp.LowRankConv2d.from_conv(conv, rank=2)
    x = torch.randn(1, 2, 9, 9)
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.to_dense()(x), atol=1e-5)
    assert layer.resolved_backend() == "torch"
    if ops.is_fused("cpp"):
        with pytest.raises(ops.BackendError, match=r"kernel size \(65, 65\) exceeds .* \(layer '0'\)"):
            trp.compile(nn.Sequential(conv, nn.Conv2d(8, 8, 3)), rank=2, backend="cpp",
                        filter_fn=lambda m, q: True, inplace=False)


needs_cpp = pytest.mark.skipif(not ops.is_fused("cpp"), reason="needs the fused C++ kernels")


@needs_cpp
@pytest.mark.parametrize("scheme", ["channel", "tucker"])
def test_a_repeated_call_runs_what_the_last_one_kept_and_leaves_it_when_anything_differs(scheme):
    import copy
    import pickle

    from trp_kernels import cpp

    torch.manual_seed(2)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    layer = LowRankConv2d.from_conv(conv, rank=4 if scheme == "channel" else (4, 4), scheme=scheme).eval()
    cl = torch.channels_last
    x = torch.randn(2, 8, 6, 5).contiguous(memory_format=cl)
    res = torch.randn(2, 8, 6, 5).contiguous(memory_format=cl)

    def want(inp, r=None, relu=False):
        out = layer.to_dense()(inp) + (0 if r is None else r)
        return out.relu() if relu else out

    def kept_runs(inp, r=None):
        return ops.run_kept(layer._bound, inp, layer.stage_weights(), layer.bias, r, layer.relu) is not None

    with torch.no_grad():
        first = layer(x, res)
        assert isinstance(layer._bound[0], cpp.Bound)
        assert kept_runs(x, res) and torch.equal(layer(x, res), first)
        assert rel_err(first, want(x, res)) < 1e-5
        # Another shape, layout, a missing residual or another epilogue: the checked way.
        assert not kept_runs(torch.randn(2, 8, 7, 5).contiguous(memory_format=cl), None)
        assert not kept_runs(x.contiguous(), res) and not kept_runs(x, None)
        layer.relu = True
        assert not kept_runs(x, res) and rel_err(layer(x, res), want(x, res, relu=True)) < 1e-5
        assert kept_runs(x, res)  # (that call kept its own)
        # A weight written in place is read by the kept plan; a weight with new memory is not kept's.
        layer.weight1.mul_(2)
        assert rel_err(layer(x, res), want(x, res, relu=True)) < 1e-5
        layer.weight1.data = layer.weight1.data.clone() * 0.5
        assert not kept_runs(x, res) and rel_err(layer(x, res), want(x, res, relu=True)) < 1e-5
        # Copies and pickles start without a plan, and compute the same.
        for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert other._bound == [None]
            assert torch.equal(other(x, res), layer(x, res))
        layer.backend = "torch"
        assert layer._bound == [None] and rel_err(layer(x, res), want(x, res, relu=True)) < 1e-5
    layer.backend = "auto"
    layer(x, res)
    # With gradients to record the call goes through the op, whatever was kept.
    layer.train()
    layer.requires_grad_(True)
    assert not kept_runs(x, res) and layer(x, res).requires_grad
