"""The fused Triton kernels against the plain-PyTorch reference.

Without a GPU these run on CPU tensors through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before Triton is imported), on small shapes and with small blocks so
that every shape spans several tiles; with CUDA the same cases run natively, plus larger
ones. Tolerance (DESIGN.md): max error against a float64 reference <= 2 x PyTorch's own
same-dtype error + atol, atol a small multiple of the dtype's resolution.
"""

from __future__ import annotations

import pytest
import torch

from tests import helpers
from trp_kernels import ops, reference

pytestmark = pytest.mark.skipif(bool(ops._TRITON_IMPORT_ERROR), reason=ops._TRITON_IMPORT_ERROR or "")
if not ops._TRITON_IMPORT_ERROR:
    from trp_kernels.triton import _common
    from trp_kernels.triton.conv_channel import conv_channel
    from trp_kernels.triton.conv_spatial import conv_spatial, tile_width
    from trp_kernels.triton.conv_tucker import conv_tucker
    from trp_kernels.triton.linear import linear

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# atol, relative to the reference's largest magnitude.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_matches_reference(out, ref_fn, tensors, dtype):
    """``out`` (the kernel's, computed from ``tensors`` in ``dtype``) vs ``ref_fn``."""
    exact = ref_fn(*[t.double() if t is not None else None for t in tensors])
    same_dtype = ref_fn(*tensors)
    assert out.shape == exact.shape and out.dtype == dtype
    err = (out.double() - exact).abs().max().item()
    torch_err = (same_dtype.double() - exact).abs().max().item()
    bound = 2 * torch_err + ATOL[dtype] * exact.abs().max().item()
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g} (torch's own {dtype} error {torch_err:.3g})"


def conv_case(*args):
    """helpers.conv_case on this test's device, the dtype given last."""
    *case, dtype = args
    return helpers.conv_case(*case, dtype=dtype, device=DEVICE)


def check_conv(scheme, args, dtype, config=None):
    x, w1, w2, bias, residual, stride, pad4, dilation, relu = args
    kernel = conv_channel if scheme == "channel" else conv_spatial
    out = kernel(x, w1, w2, bias, residual, stride, pad4, dilation, relu, config=config)

    def ref(x, w1, w2, bias, residual):
        return reference.lowrank_conv2d(x, w1, w2, bias, stride, pad4, dilation, scheme, residual, relu)

    assert_matches_reference(out, ref, (x, w1, w2, bias, residual), dtype)
    return out


SHAPES = helpers.AWKWARD_CONV_SHAPES
LAYOUTS, EPILOGUES = helpers.LAYOUTS, helpers.EPILOGUES


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"s{i}" for i in range(len(SHAPES))])
def test_conv_fp32_grid(scheme, shape, layout, epilogue):
    out = check_conv(scheme, conv_case(scheme, *shape, layout, epilogue, torch.float32), torch.float32)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    elif layout == "nchw":
        assert out.is_contiguous()


def check_tucker(args, dtype, config=None):
    x, weights, bias, residual, (stride, pad4, dilation), relu = args
    out = conv_tucker(x, *weights, bias, residual, list(stride), list(pad4), list(dilation), relu, config=config)
    stages = reference.kernel_stages("tucker", stride, pad4, dilation)

    def ref(x, w1, w2, w3, bias, residual):
        return reference.conv_chain(x, [w1, w2, w3], *stages, bias, residual, relu)

    assert_matches_reference(out, ref, (x, *weights, bias, residual), dtype)
    return out


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"s{i}" for i in range(len(SHAPES))])
def test_tucker_fp32_grid(shape, layout, epilogue):
    """The three-stage kernel over the awkward shapes (two different ranks, see chain_case)."""
    out = check_tucker(helpers.chain_case("tucker", *shape, layout, epilogue, device=DEVICE), torch.float32)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    elif layout == "nchw":
        assert out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=[f"s{i}" for i in range(3)])
def test_tucker_half_precision(shape, dtype):
    check_tucker(helpers.chain_case("tucker", *shape, "channels_last", "residual_relu", dtype=dtype, device=DEVICE),
                 dtype)


def test_tucker_dispatch_op_and_gradients():
    """backend='triton' runs trp::triton_conv_tucker for a Tucker chain: the op checks
    (schema, fake kernel, autograd registration) and its gradients against the reference."""
    x, weights, bias, res, geometry, relu = helpers.chain_case(
        "tucker", 2, 6, 10, (7, 9), (3, 3), 5, (2, 1), (1, 1), 1, "channels_last", "residual_relu", device=DEVICE)
    tensors = [t.requires_grad_() for t in (x, *weights, bias, res)]
    stages = reference.kernel_stages("tucker", *geometry)
    assert ops.backend_kernel("triton", [w.shape for w in weights], *stages) == ("tucker", *geometry)
    out = ops.conv_chain(x, weights, *stages, bias, res, relu, "triton")
    ref = ops.conv_chain(x, weights, *stages, bias, res, relu, "torch")
    assert (out - ref).abs().max() < 1e-4
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, tensors, g), torch.autograd.grad(ref, tensors, g)):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    torch.library.opcheck(torch.ops.trp.triton_conv_tucker.default,
                          (x, *weights, bias, res, *map(list, geometry), relu),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_tucker_refuses_bad_weights():
    x, (w1, w2, w3), *_ = helpers.chain_case("tucker", 1, 5, 7, (9, 7), (3, 3), 4, (1, 1), (1, 1), 1, "nchw",
                                             "none", device=DEVICE)
    with pytest.raises(ValueError, match=r"triton conv_tucker: want x \(N, C, H, W\), weight1 \(r1, C, 1, 1\)"):
        conv_tucker(x, w2, w2, w3, None, None, [1, 1], [1, 1, 1, 1], [1, 1], False)
    with pytest.raises(ValueError, match=r"triton conv_tucker: weight3 must have 9 input channels \(weight2's rank\)"):
        conv_tucker(x, w1, w2, w3[:, :8], None, None, [1, 1], [1, 1, 1, 1], [1, 1], False)
    with pytest.raises(ValueError, match=r"triton conv_tucker: weight2 must have 4 input channels \(weight1's rank\)"):
        conv_tucker(x, w1, w2[:, :3], w3, None, None, [1, 1], [1, 1, 1, 1], [1, 1], False)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"s{i}" for i in range(len(SHAPES))])
def test_conv_half_precision(scheme, shape, dtype):
    check_conv(scheme, conv_case(scheme, *shape, "channels_last", "residual_relu", dtype), dtype)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("config", [
    dict(BLOCK_M=32, BLOCK_K=16, BLOCK_N=16, SPLIT_N=2),   # split output channels over programs
    dict(BLOCK_M=64, BLOCK_K=32, BLOCK_N=32, SPLIT_N=3),   # more splits than some programs have blocks
])
def test_conv_other_tilings(scheme, config):
    """Other block sizes and the SPLIT_N path, which the autotuner may choose on a GPU."""
    args = conv_case(scheme, 3, 20, 50, (9, 11), (3, 3), 17, (1, 1), (1, 1), 1, "channels_last",
                     "residual_relu", torch.float32)
    check_conv(scheme, args, torch.float32, config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [
    dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16, SPLIT_N=1, R_CHUNK=16),  # 3 rank chunks (the last partial), 4 n blocks
    dict(BLOCK_M=32, BLOCK_K=16, BLOCK_N=32, SPLIT_N=2, R_CHUNK=32),  # 2 chunks, n blocks split over programs
])
def test_spatial_wide_rank_in_chunks(config, dtype):
    """A rank wider than R_CHUNK: the kernel builds the intermediate R_CHUNK columns at a time
    and accumulates each chunk's second factor (the path ranks above conv_spatial.RANK_CHUNK take)."""
    args = conv_case("spatial", 2, 12, 50, (6, 13), (3, 3), 40, (1, 2), (1, 1), 1, "channels_last",
                     "residual_relu", dtype)
    check_conv("spatial", args, dtype, config)


@pytest.mark.parametrize("wo,stride,kw,dil", [(7, 1, 3, 1), (56, 1, 3, 1), (112, 2, 3, 1), (40, 1, 5, 2),
                                              (3, 1, 7, 4)])
def test_spatial_tile_covers_halo(wo, stride, kw, dil):
    seg, tile_w = tile_width(wo, stride, kw, dil)
    assert seg & (seg - 1) == 0 and tile_w >= 1
    assert (tile_w - 1) * stride + (kw - 1) * dil <= seg - 1   # the last output's taps stay in the tile


def test_spatial_wide_image_spans_several_tiles():
    """Wider than one tile row (64 columns): tiles meet at a halo that both recompute."""
    args = conv_case("spatial", 1, 4, 5, (3, 150), (3, 3), 3, (1, 1), (1, 1), 1, "nchw", "bias", torch.float32)
    check_conv("spatial", args, torch.float32)


LINEAR_CASES = [  # (leading shape, in, out, rank)
    ((1,), 5, 7, 1),
    ((3, 4), 20, 18, 17),
    ((37,), 33, 40, 64),
    ((2, 3), 12, 9, 256),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=[f"l{i}" for i in range(len(LINEAR_CASES))])
def test_linear(case, epilogue, dtype):
    lead, k, n, rank = case
    x = torch.randn(*lead, 2 * k, device=DEVICE, dtype=dtype)[..., ::2]  # non-contiguous rows
    w1 = torch.randn(rank, k, device=DEVICE, dtype=dtype) / k ** 0.5
    w2 = torch.randn(n, rank, device=DEVICE, dtype=dtype) / rank ** 0.5
    bias = torch.randn(n, device=DEVICE, dtype=dtype) if epilogue != "none" else None
    residual = torch.randn(*lead, n, device=DEVICE, dtype=dtype) if epilogue == "residual_relu" else None
    relu = epilogue == "residual_relu"
    out = linear(x, w1, w2, bias, residual, relu)
    assert_matches_reference(out, lambda x, w1, w2, b, r: reference.lowrank_linear(x, w1, w2, b, r, relu),
                             (x, w1, w2, bias, residual), dtype)


def test_zero_size_batch():
    args = conv_case("channel", 1, 5, 7, (6, 6), (3, 3), 4, (1, 1), (1, 1), 1, "nchw", "bias", torch.float32)
    x = args[0][:0]
    for scheme, kernel in (("channel", conv_channel), ("spatial", conv_spatial)):
        a = conv_case(scheme, 1, 5, 7, (6, 6), (3, 3), 4, (1, 1), (1, 1), 1, "nchw", "bias", torch.float32)
        out = kernel(x, *a[1:4], None, *a[5:])
        assert out.shape == (0, 7, 6, 6)
    assert linear(torch.randn(0, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE),
                  torch.randn(4, 3, device=DEVICE), None, None, False).shape == (0, 4)


def test_bad_inputs_are_named():
    x, w1, w2, bias, residual, stride, pad4, dil, relu = conv_case(
        "channel", 1, 5, 7, (6, 6), (3, 3), 4, (1, 1), (1, 1), 1, "nchw", "residual_relu", torch.float32)
    with pytest.raises(TypeError, match="weight1 must have x's dtype"):
        conv_channel(x, w1.half(), w2, bias, residual, stride, pad4, dil, relu)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        conv_channel(x.double(), w1.double(), w2.double(), None, None, stride, pad4, dil, relu)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        conv_channel(x, w1, w2, bias, residual[:, :3], stride, pad4, dil, relu)
    with pytest.raises(ValueError, match=r"triton conv_channel: dilation must be 2 ints >= 1"):
        conv_channel(x, w1, w2, bias, residual, stride, pad4, [1, 0], relu)
    with pytest.raises(ValueError, match="weight1 has 4 input channels, x has 5"):
        conv_channel(x, w1[:, :4], w2, bias, residual, stride, pad4, dil, relu)
    with pytest.raises(ValueError, match="weight2 must have 4 input channels"):
        conv_channel(x, w1, w2[:, :3], bias, residual, stride, pad4, dil, relu)
    with pytest.raises(ValueError, match="bias must have shape"):
        conv_channel(x, w1, w2, bias[:3], residual, stride, pad4, dil, relu)
    with pytest.raises(ValueError, match="rank 513 exceeds"):
        conv_channel(x, w1.new_zeros(513, 5, 3, 3), w2.new_zeros(7, 513, 1, 1), None, None, stride, pad4, dil,
                     relu)
    with pytest.raises(ValueError, match="weight2 \\(n, r, 1, 1\\)"):
        conv_channel(x, w1, w2.new_zeros(7, 4, 3, 3), None, None, stride, pad4, dil, relu)
    with pytest.raises(ValueError, match="weight1 has 6 in-features"):
        linear(torch.randn(2, 5, device=DEVICE), torch.randn(3, 6, device=DEVICE), torch.randn(4, 3, device=DEVICE),
               None, None, False)


def test_rank_padding_and_candidates():
    assert [_common.rank_pad(r) for r in (1, 16, 17, 64, 65, 256, 300)] == [16, 16, 32, 64, 128, 256, 512]
    assert [i for i, _ in _common.candidates()] == list(range(len(_common.SPACE)))
    raised = _common.candidates(64)  # the spatial kernel's 64-wide tile row: BLOCK_M >= 64, no repeats
    assert all(cfg[0] >= 64 for _, cfg in raised) and len({cfg for _, cfg in raised}) == len(raised)
    assert _common.FALLBACK in [i for i, _ in raised]
    for family in ("conv_channel", "conv_spatial", "linear"):
        for r_pad in (16, 32, 64, 128, 256, 512):  # every padded rank has configs (the table's or the fallback)
            assert _common.configs(family, r_pad, "fp32", 80, 16)
    assert _common.precision_class(torch.float32, "tf32") == "tf32"
    assert _common.precision_class(torch.float32, "ieee") == "fp32"
    assert _common.precision_class(torch.bfloat16, "upcast") == "bf16"


# --- through the op: dispatch, autograd, torch.compile, torch.export ---------------------------

def _module_inputs(scheme, layout="channels_last"):
    args = conv_case(scheme, 2, 6, 10, (7, 9), (3, 3), 5, (2, 1), (1, 1), 1, layout, "residual_relu",
                     torch.float32)
    return [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_dispatch_and_gradients_match_reference(scheme):
    x, w1, w2, bias, residual, stride, pad4, dil, relu = _module_inputs(scheme)
    tensors = (x, w1, w2, bias, residual)
    out = ops.lowrank_conv2d(x, w1, w2, bias, stride, pad4, dil, scheme, "triton", residual, relu)
    ref = ops.lowrank_conv2d(x, w1, w2, bias, stride, pad4, dil, scheme, "torch", residual, relu)
    assert (out - ref).abs().max() < 1e-4
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, tensors, g)
    ref_grads = torch.autograd.grad(ref, tensors, g)
    for name, a, b in zip(("x", "weight1", "weight2", "bias", "residual"), grads, ref_grads):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max(), name


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_triton_op_registration(scheme):
    """Schema, fake kernel (the output's metadata), autograd registration, AOT dispatch."""
    x, w1, w2, bias, residual, stride, pad4, dil, relu = _module_inputs(scheme)
    op = torch.ops.trp.triton_conv_channel if scheme == "channel" else torch.ops.trp.triton_conv_spatial
    torch.library.opcheck(op.default, (x, w1, w2, bias, residual, stride, pad4, dil, relu),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    xl = torch.randn(3, 2, 6, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.trp.triton_linear.default,
                          (xl, torch.randn(4, 6, device=DEVICE), torch.randn(5, 4, device=DEVICE), None,
                           torch.randn(3, 2, 5, device=DEVICE), True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fake_kernel_metadata(layout):
    x, w1, w2, bias, residual, stride, pad4, dil, relu = _module_inputs("channel", layout)
    real = torch.ops.trp.triton_conv_channel(x, w1, w2, bias, residual, stride, pad4, dil, relu)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.trp.triton_conv_channel(*[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                                                   for t in (x, w1, w2, bias, residual)],
                                                 stride, pad4, dil, relu)
    assert fake.shape == real.shape and fake.stride() == real.stride() and fake.dtype == real.dtype


@pytest.mark.skipif(CUDA, reason="CPU-only check of the interpreter gate")
def test_auto_never_takes_triton_on_cpu():
    assert ops.resolve_backend("auto", "cpu", torch.float32) != "triton"
    assert ops.resolve_backend("triton", "cpu", torch.float32) == "triton"  # by name, interpreting


# --- natively on a GPU: network-sized shapes through the autotuner, CUDA graphs ----------------

GPU_SHAPES = [  # ResNet/VGG-like 3x3 layers at a fraction of full rank; batch 1 and 32
    (1, 64, 64, (56, 56), (3, 3), 16, (1, 1), (1, 1), 1),
    (32, 128, 256, (28, 28), (3, 3), 64, (2, 2), (1, 1), 1),
    (32, 256, 256, (14, 14), (3, 3), 128, (1, 1), (1, 1), 1),
    (3, 512, 512, (7, 7), (3, 3), 256, (1, 1), (1, 1), 1),
    (2, 96, 80, (31, 33), (3, 3), 17, (1, 1), (2, 2), 2),
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[f"g{i}" for i in range(len(GPU_SHAPES))])
def test_gpu_network_shapes(scheme, shape, layout, dtype):
    check_conv(scheme, conv_case(scheme, *shape, layout, "residual_relu", dtype), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[f"g{i}" for i in range(len(GPU_SHAPES))])
def test_gpu_tucker_network_shapes(shape, dtype):
    check_tucker(helpers.chain_case("tucker", *shape, "channels_last", "residual_relu", dtype=dtype, device=DEVICE),
                 dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_cuda_graph_capture():
    """After warm-up (which autotunes), the launches are captured and replayed."""
    args = conv_case("channel", 8, 64, 64, (28, 28), (3, 3), 16, (1, 1), (1, 1), 1, "channels_last",
                     "residual_relu", torch.float16)
    x, w1, w2, bias, residual, stride, pad4, dil, relu = args
    run = lambda: torch.ops.trp.triton_conv_channel(x, w1, w2, bias, residual, stride, pad4, dil, relu)  # noqa: E731
    eager = run()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, run()) and not torch.equal(static, eager)
