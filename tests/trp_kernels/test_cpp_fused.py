"""The fused C++ low-rank kernels against the plain-PyTorch reference.

The same awkward-shape grid as the Triton kernels, float32 with a tight tolerance, for
every instruction-set build this CPU runs (AVX-512, AVX2, portable), single- and
multi-threaded, with the weights as given and in the kernels' own layout; plus reading
the weights in place, the kept plans, the op dispatch and bad inputs.
"""

from __future__ import annotations

import pytest
import torch

from tests import helpers
from trp_kernels import cpp, ops, reference

pytestmark = pytest.mark.skipif(not cpp.has_fused_kernels(),
                                reason=f"fused C++ kernels not built ({cpp.unavailable_reason()})")

ISAS = [isa for isa in ("avx512", "avx2", "generic")] if cpp.has_fused_kernels() else []


@pytest.fixture
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def conv_case(scheme, *case):
    """helpers.conv_case in float32 on CPU, in the reference's argument order."""
    x, w1, w2, bias, residual, stride, pad4, dilation, relu = helpers.conv_case(scheme, *case)
    return x, w1, w2, bias, tuple(stride), tuple(pad4), tuple(dilation), scheme, residual, relu


def assert_within_bound(out, exact, torch_fp32):
    """``out`` (float32) against the float64 ``exact``: within twice PyTorch's own float32
    error (``torch_fp32``) plus 1e-6 of the output's scale. Returns ``out``."""
    assert out.shape == exact.shape and out.dtype == torch.float32
    err = (out.double() - exact).abs().max().item()
    torch_err = (torch_fp32.double() - exact).abs().max().item()
    bound = 2 * torch_err + 1e-6 * exact.abs().max().item()
    assert err <= bound, f"max error {err:.3g} > {bound:.3g} (torch's own float32 error {torch_err:.3g})"
    return out


def check(args):
    """The kernel's output against the float64 reference, for the weights as given (copied
    into the kernel's panels on each call) and in the kernel's layout (read in place): the
    first call of those is checked in full and keeps a plan, the second runs the plan. All
    must agree bit for bit."""
    out = cpp.lowrank_conv2d(*args)
    laid = list(args)
    laid[1], laid[2] = cpp.kernel_layout(args[1]), cpp.kernel_layout(args[2])
    assert cpp.in_kernel_layout(laid[1]) and cpp.in_kernel_layout(laid[2])
    first, again = cpp.lowrank_conv2d(*laid), cpp.lowrank_conv2d(*laid)
    assert torch.equal(out, first), "weights read in place give another result than copied ones"
    assert torch.equal(first, again), "the kept plan's output differs from the first call's"
    exact = reference.lowrank_conv2d(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    torch_fp32 = reference.lowrank_conv2d(*args)
    return assert_within_bound(out, exact, torch_fp32)


SHAPES = helpers.AWKWARD_CONV_SHAPES + [
    (2, 40, 70, (3, 150), (3, 3), 24, (1, 1), (1, 1), 1),   # wider than one spatial tile
]


def grid(param: str, values, shapes):
    """The awkward-shape grid: every ISA build, 1 and 2 threads, ``param`` over ``values``,
    every epilogue, layout and shape (the same marks, stacked in this order, as decorators)."""
    marks = [pytest.mark.parametrize("isa", ISAS, indirect=True),
             pytest.mark.parametrize("threads", [1, 2], indirect=True),
             pytest.mark.parametrize(param, values),
             pytest.mark.parametrize("epilogue", helpers.EPILOGUES),
             pytest.mark.parametrize("layout", helpers.LAYOUTS),
             pytest.mark.parametrize("shape", shapes, ids=[f"s{i}" for i in range(len(shapes))])]

    def apply(fn):
        for mark in reversed(marks):
            fn = mark(fn)
        return fn
    return apply


@grid("scheme", ["channel", "spatial"], SHAPES)
def test_conv_grid(shape, layout, epilogue, scheme, threads, isa):
    out = check(conv_case(scheme, *shape, layout, epilogue))
    assert out.is_contiguous(memory_format=torch.channels_last)  # whatever the input's layout


def check_chain(kind, x, weights, bias, residual, geometry, relu):
    """:func:`check` for any fused chain (``cpp.fused_chain``): as given, in the kernel's
    layout (first call and kept plan, bit for bit), and against the float64 reference."""
    args = (bias, kind, *geometry, residual, relu)
    out = cpp.fused_chain(x, weights, *args)
    laid = [cpp.kernel_layout(w) for w in weights]
    assert all(cpp.in_kernel_layout(w) for w in laid)
    first, again = cpp.fused_chain(x, laid, *args), cpp.fused_chain(x, laid, *args)
    assert torch.equal(out, first), "weights read in place give another result than copied ones"
    assert torch.equal(first, again), "the kept plan's output differs from the first call's"
    stages = reference.kernel_stages(kind, *geometry)
    d = [t.double() if isinstance(t, torch.Tensor) else t for t in (x, bias, residual)]
    exact = reference.conv_chain(d[0], [w.double() for w in weights], *stages, d[1], d[2], relu)
    torch_fp32 = reference.conv_chain(x, weights, *stages, bias, residual, relu)
    return assert_within_bound(out, exact, torch_fp32)


CHAIN_SHAPES = SHAPES + [
    (1, 24, 16, (300, 40), (3, 3), 40, (1, 1), (1, 1), 1),  # several bands of output rows per image
]


@grid("kind", ["tucker", "dense"], CHAIN_SHAPES)
def test_chain_grid(shape, layout, epilogue, kind, threads, isa):
    """The three-stage (Tucker-2) and one-stage (dense) kernels over the awkward shapes."""
    out = check_chain(kind, *helpers.chain_case(kind, *shape, layout, epilogue))
    assert out.is_contiguous(memory_format=torch.channels_last)


def flat_rank_pairs(vl):
    """Tucker rank pairs (first 1x1, core) for a build with ``vl`` floats a vector: the first
    1x1 1-4 vectors wide (every instantiation of the stride-1 Tucker kernel, ``tucker_flat``
    in csrc/lowrank_kernels.inc), the core 1-4 (its column slivers: one, two, two and one
    partly padded, two and two), each both whole and padded. ``helpers.chain_case`` ties the
    core's rank to the first's and so reaches few."""
    return [(vl * ldv - ldv % 2, r2) for ldv in (1, 2, 3, 4) for r2 in (vl - 3, 2 * vl, 3 * vl - 1, 4 * vl)]


# Stride-1 geometries (kernel, dilation, padding): 3-tap kernel rows one pixel apart (run a
# kernel row at a time), dilated rows, other kernel rows (tap by tap), one-sided padding
# and none. Output rows of 27, 29 and 31 columns take every row-block size: 14 + 7 + 4 + 2,
# 14 + 14 + 1 and 14 + 14 + 3 with AVX-512's one-vector blocks of 14; 7 * 3 + 4 + 2,
# 7 * 4 + 1, 7 * 4 + 3 with blocks of 7; 4 * 6 + 3, 4 * 7 + 1, 4 * 7 + 3 with blocks of 4.
FLAT_GEOMETRIES = [
    ((3, 3), (1, 1), 1),
    ((3, 3), (2, 1), (2, 2, 1, 1)),
    ((3, 5), (1, 2), "same"),
    ((5, 3), (1, 1), (0, 1, 2, 1)),
    ((1, 1), (1, 1), 0),
    ((3, 3), (1, 1), "valid"),
]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("out_w", [27, 29, 31])
@pytest.mark.parametrize("geometry", FLAT_GEOMETRIES, ids=[f"g{i}" for i in range(len(FLAT_GEOMETRIES))])
@pytest.mark.parametrize("pair", range(16))
def test_tucker_stride_one_kernel(pair, geometry, out_w, batch, threads, isa):
    """The stride-1 Tucker kernel for every first-rank width it is built for, every kind of
    kernel row, and one or several bands of rows per image; the call counter proves that
    path ran."""
    lib = cpp._require()
    r1, r2 = flat_rank_pairs(lib.vector_width())[pair]
    kernel, dilation, padding = geometry
    torch.manual_seed(pair)
    pad4 = reference.resolve_padding(padding, kernel, dilation)
    in_w = out_w + (kernel[1] - 1) * dilation[1] - pad4[2] - pad4[3]  # stride 1
    x = helpers.make_input((batch, 13, 11, in_w), "channels_last")
    weights = [torch.randn(r1, 13, 1, 1) / 13 ** 0.5, torch.randn(r2, r1, *kernel) / (r1 * kernel[0] * kernel[1]) ** 0.5,
               torch.randn(20, r2, 1, 1) / r2 ** 0.5]
    hw_out = reference.conv_output_hw(x.shape[2:], kernel, (1, 1), pad4, dilation)
    assert hw_out[1] == out_w
    residual = helpers.make_input((batch, 20, *hw_out), "channels_last")
    before = lib.flat_tucker_calls()
    check_chain("tucker", x, weights, torch.randn(20), residual, ((1, 1), pad4, dilation), True)
    assert lib.flat_tucker_calls() - before == 3


def test_tucker_stride_one_kernel_bands_and_other_layers():
    """Several bands of one image for the band buffer (not only for the threads); the
    layers that do not take the stride-1 kernel (a stride, a first rank too wide) do not."""
    lib = cpp._require()
    before = lib.flat_tucker_calls()
    x, w, b, res, geometry, relu = helpers.chain_case("tucker", 1, 4, 6, (700, 40), (3, 3), 3, (1, 1), (1, 1), 1,
                                                      "channels_last", "residual_relu")
    check_chain("tucker", x, w, b, res, geometry, relu)  # 700 rows of 42 x (3 -> 1 vector) floats: 2+ bands
    assert lib.flat_tucker_calls() - before == 3
    vl = lib.vector_width()
    for stride, rank in [((2, 1), 3), ((1, 2), 3), ((1, 1), 4 * vl + 1)]:
        before = lib.flat_tucker_calls()
        check_chain("tucker", *helpers.chain_case("tucker", 1, 6, 5, (9, 11), (3, 3), rank, stride, (1, 1), 1,
                                                  "channels_last", "bias"))
        assert lib.flat_tucker_calls() == before, (stride, rank)


# 1x1 layers with enough pixels for the per-thread tiles, input pixels not crowding an L1
# set: the first factor reads its rows by a stride (micro_strided in csrc/lowrank_kernels.inc).
# Ranks of one vector and less, two, and two and a padded one, for every build; a tile's
# row blocks of MR, 4 and 1-3; 1024 channels (crowded) go by row pointers.
STRIDED_SHAPES = [
    (2, 40, 33, (15, 17), (1, 1), 5, (1, 1), (1, 1), 0),
    (1, 64, 24, (30, 31), (1, 1), 16, (1, 1), (1, 1), 0),
    (3, 17, 50, (9, 23), (1, 1), 27, (1, 1), (1, 1), 0),
    (1, 200, 8, (20, 21), (1, 1), 40, (1, 1), (1, 1), 0),
    (1, 1024, 8, (17, 15), (1, 1), 12, (1, 1), (1, 1), 0),
]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("epilogue", helpers.EPILOGUES)
@pytest.mark.parametrize("shape", STRIDED_SHAPES, ids=[f"p{i}" for i in range(len(STRIDED_SHAPES))])
def test_pointwise_first_factor_by_stride(shape, epilogue, threads, isa):
    check(conv_case("channel", *shape, "channels_last", epilogue))


# Pixels 4 or 8 KiB apart (1024 or 2048 input channels, NHWC): a row block's reads all fall
# in one L1 set, and the kernels run those rows in blocks of MR / 2 (`crowded` in
# csrc/lowrank_kernels.inc; AVX-512's MR of 12 only): its 6-row blocks, their 4- and 1-3-row
# tails, the zero rows of padding among them, and both the per-thread tiles and the split
# path of few pixels.
CROWDED_SHAPES = [
    (1, 1024, 40, (7, 7), (1, 1), 24, (1, 1), (1, 1), 0),     # 49 pixels: the split path with 2 threads
    (2, 1024, 24, (14, 15), (1, 1), 20, (1, 1), (1, 1), 0),   # 420 pixels: tiles
    (1, 1024, 20, (9, 9), (3, 3), 16, (2, 2), (1, 1), 1),     # stride 2 (8 KiB apart), zero rows of padding
    (1, 2048, 33, (6, 11), (1, 1), 17, (1, 1), (1, 1), 0),
]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("kind", ["channel", "spatial", "tucker", "dense"])
@pytest.mark.parametrize("shape", CROWDED_SHAPES, ids=[f"c{i}" for i in range(len(CROWDED_SHAPES))])
def test_rows_crowding_one_cache_set(shape, kind, threads, isa):
    check_chain(kind, *helpers.chain_case(kind, *shape, "channels_last", "residual_relu"))


@pytest.fixture
def stream_bytes(request):
    """Outputs of at least ``request.param`` bytes go to memory by streaming stores."""
    lib = cpp._require()
    default = lib.stream_bytes()
    lib.set_stream_bytes(request.param)
    yield request.param
    lib.set_stream_bytes(default)


# Outputs whose channels are whole AVX-512 vectors (and so AVX2 and portable ones): with the
# threshold at one byte every such output is stored past the caches (`for_build` in
# csrc/lowrank_cpu.cpp; the portable build has no streaming store and stores as usual);
# out_c 40 streams with AVX2 only (its last 8 channels a one-vector sliver), and with
# AVX-512 takes the tail sliver, unstreamed. The per-thread tiles, the split path of few
# pixels, and several Tucker bands.
STREAMED_SHAPES = [
    (2, 24, 32, (17, 19), (3, 3), 16, (1, 1), (1, 1), 1),
    (1, 40, 48, (7, 7), (1, 1), 24, (1, 1), (1, 1), 0),
    (1, 16, 40, (300, 12), (3, 3), 8, (2, 1), (1, 1), 1),
]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("stream_bytes", [1, 0], indirect=True, ids=["streamed", "cached"])
@pytest.mark.parametrize("kind", ["channel", "spatial", "tucker", "dense"])
@pytest.mark.parametrize("epilogue", ["none", "residual_relu"])
@pytest.mark.parametrize("shape", STREAMED_SHAPES, ids=[f"t{i}" for i in range(len(STREAMED_SHAPES))])
def test_outputs_stored_past_the_caches(shape, epilogue, kind, stream_bytes, threads, isa):
    lib = cpp._require()
    before = lib.streamed_calls()
    check_chain(kind, *helpers.chain_case(kind, *shape, "channels_last", epilogue))  # three kernel calls
    streamed = stream_bytes == 1 and isa != "generic" and shape[2] % lib.vector_width() == 0
    # (a dense 1x1's weight as given is read as it is, "dense_oi", which stores a pixel's
    # channels one by one: that call does not stream)
    calls = 2 if kind == "dense" and shape[4] == (1, 1) else 3
    assert lib.streamed_calls() - before == (calls if streamed else 0)


def test_the_streaming_threshold_is_a_setting_of_the_extension():
    lib = cpp._require()
    default = lib.stream_bytes()
    assert default == 4_000_000  # the measured choice (benches/results/streaming-stores.txt)
    with pytest.raises(ValueError, match=r"set_stream_bytes: bytes must be >= 0 \(0: never stream\), got -5"):
        lib.set_stream_bytes(-5)
    assert lib.stream_bytes() == default


# Dense 1x1 convs with the weight as PyTorch keeps it, (out, in) contiguous: the dense
# kernel's "dense_oi" form (check_chain's first call; the others read the [in][out] panel,
# bit for bit the same). Strides, padding, in_c and out_c past whole vectors and row
# blocks, many pixel blocks (split by pixels) and few (split by output channels).
OI_SHAPES = [
    (1, 5, 7, (9, 7), (1, 1), 1, (1, 1), (1, 1), 0),
    (3, 20, 18, (11, 9), (1, 1), 1, (2, 2), (1, 1), 1),
    (1, 33, 40, (7, 7), (1, 1), 1, (1, 1), (1, 1), 0),
    (2, 70, 130, (14, 15), (1, 1), 1, (1, 2), (1, 1), (0, 1, 2, 1)),
    (1, 300, 260, (3, 4), (1, 1), 1, (1, 1), (1, 1), 0),
]


@grid("kind", ["dense"], OI_SHAPES)
def test_dense_1x1_read_as_pytorch_keeps_it(shape, layout, epilogue, kind, threads, isa):
    x, weights, bias, residual, geometry, relu = helpers.chain_case(kind, *shape, layout, epilogue)
    assert cpp.reads_as_is(weights[0])
    check_chain(kind, x, weights, bias, residual, geometry, relu)
    if layout != "channels_last":
        return
    _, bound = cpp.bound_chain(x, weights, bias, kind, *geometry, residual, relu)
    assert bound is not None  # a plan over the weight's own memory is kept
    weights[0].data.mul_(-2.0)  # through .data: seen, the plan reads that memory
    again = bound(x, weights, bias, residual, relu)
    assert torch.equal(again, cpp.fused_chain(x, [cpp.kernel_layout(weights[0])], bias, kind, *geometry, residual,
                                              relu))


def test_what_the_dense_kernel_reads_as_it_is():
    w = torch.randn(8, 5, 1, 1)
    assert cpp.reads_as_is(w)
    assert not cpp.reads_as_is(w.transpose(0, 1).contiguous().transpose(0, 1))  # strided
    assert not cpp.reads_as_is(torch.randn(8, 5, 3, 3)) and not cpp.reads_as_is(w.double())


@pytest.fixture
def winograd(request):
    """The Winograd mode of the extension (never, auto, always) for the test."""
    lib = cpp._require()
    default = lib.winograd()
    lib.winograd(request.param)
    yield request.param
    lib.winograd(default)


# 3x3 stride-1 first stages, Winograd F(2x2, 3x3): odd and even sizes (a last tile half
# outside the output), a tile row shorter and longer than a group of tiles, groups that
# span tile rows and images, asymmetric padding, in_c past whole vectors, ranks 1, 17, 64.
WINOGRAD_SHAPES = [
    (1, 5, 7, (9, 7), (3, 3), 1, (1, 1), (1, 1), 1),
    (3, 20, 18, (11, 9), (3, 3), 17, (1, 1), (1, 1), 1),
    (1, 33, 40, (7, 8), (3, 3), 64, (1, 1), (1, 1), 0),
    (3, 6, 9, (5, 6), (3, 3), 256, (1, 1), (1, 1), (0, 1, 2, 1)),
    (2, 24, 32, (30, 61), (3, 3), 16, (1, 1), (1, 1), 1),
]


@pytest.mark.parametrize("winograd", ["always"], indirect=True)
@grid("kind", ["channel", "dense"], WINOGRAD_SHAPES)
def test_winograd_first_stage(shape, layout, epilogue, kind, threads, isa, winograd):
    """Every 3x3 stride-1 first stage through Winograd: within the kernels' bound (twice
    PyTorch's own float32 error) of the float64 reference."""
    lib = cpp._require()
    before = lib.winograd_calls()
    check_chain(kind, *helpers.chain_case(kind, *shape, layout, epilogue))  # three kernel calls
    assert lib.winograd_calls() - before == 3


@pytest.mark.parametrize("kind", ["channel", "dense", "spatial", "tucker"])
@pytest.mark.parametrize("batch, hw, stride, cols, runs", [
    (1, (14, 14), 1, 16, True), (1, (13, 14), 1, 16, False), (1, (28, 28), 2, 16, False),
    (8, (7, 7), 1, 64, True), (8, (7, 7), 1, 48, False), (7, (7, 7), 1, 64, False)])
def test_winograd_where_it_wins(kind, batch, hw, stride, cols, runs):
    """'auto' (the default) takes Winograd for a channel or dense 3x3 stride-1 first stage
    with outputs of at least 14 x 14, or 128 tiles of 2 x 2 outputs and 64 columns (the
    rank, or a dense conv's out_c) (csrc/lowrank_cpu.cpp, winograd_wins); never for a strided
    one, nor for the spatial scheme or a Tucker core (their 3x3 stage is not the first, or
    not 3x3)."""
    lib = cpp._require()
    assert lib.winograd() == "auto"
    before = lib.winograd_calls()
    check_chain(kind, *helpers.chain_case(kind, batch, 8, cols, hw, (3, 3), cols, (stride, stride), (1, 1), 1,
                                          "channels_last", "bias"))
    assert lib.winograd_calls() - before == (3 if runs and kind in ("channel", "dense") else 0)


@pytest.mark.parametrize("winograd", ["never"], indirect=True)
def test_winograd_never(winograd):
    lib = cpp._require()
    before = lib.winograd_calls()
    check_chain("channel", *helpers.chain_case("channel", *WINOGRAD_SHAPES[-1], "channels_last", "bias"))
    assert lib.winograd_calls() == before


def test_winograd_mode_is_checked():
    lib = cpp._require()
    with pytest.raises(ValueError, match="winograd: mode must be 'never', 'auto' or 'always', got 'sometimes'"):
        lib.winograd("sometimes")
    assert lib.winograd() == "auto"


@pytest.mark.parametrize("kind", helpers.CHAIN_KINDS)
def test_op_runs_every_fused_chain(kind, monkeypatch):
    """The op (backend='cpp') reaches the fused kernel for every chain it has, gradients
    included, and matches backend='torch'."""
    calls = []
    real = cpp.fused_chain
    monkeypatch.setattr(cpp, "fused_chain", lambda *a: calls.append(a[3]) or real(*a))
    x, weights, b, res, geometry, relu = helpers.chain_case(kind, *SHAPES[1], "channels_last", "residual_relu")
    stages = reference.kernel_stages(kind, *geometry)
    tensors = [t.requires_grad_() for t in (x, *weights, b, res)]
    out = ops.conv_chain(x, weights, *stages, b, res, relu, "cpp")
    ref = ops.conv_chain(x, weights, *stages, b, res, relu, "torch")
    assert calls == [kind] and (out - ref).abs().max() < 1e-5
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, tensors, g), torch.autograd.grad(ref, tensors, g)):
        assert (a - r).abs().max() <= 1e-5 * r.abs().max()


def test_chain_binding_refuses_mismatched_weights():
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    w1, w2, w3 = torch.randn(3, 4, 1, 1), torch.randn(6, 3, 3, 3), torch.randn(2, 6, 1, 1)
    with pytest.raises(ValueError, match="kernel 'tucker' takes 3 weights, got 2"):
        cpp.fused_chain(x, [w1, w2], None, "tucker", (1, 1), (1, 1, 1, 1), (1, 1))
    with pytest.raises(ValueError, match="shapes do not chain"):
        cpp.fused_chain(x, [w1, w2, w3[:, :5]], None, "tucker", (1, 1), (1, 1, 1, 1), (1, 1))
    with pytest.raises(ValueError, match="scheme must be one of"):
        cpp.fused_chain(x, [w1], None, "cp", (1, 1), (1, 1, 1, 1), (1, 1))
    lib, out = cpp._require(), torch.empty(1, 2, 5, 5).contiguous(memory_format=torch.channels_last)
    p = [cpp._panel(w, "w")[0] for w in (w1, w2, w3)]
    nhwc = x.numpy().transpose(0, 2, 3, 1)
    with pytest.raises(ValueError, match="lowrank_conv: the tucker kernel takes three weights: w3 is missing"):
        lib.lowrank_conv(nhwc, p[0], p[1], None, None, cpp._nhwc(out), "tucker", 3, 3, (1, 1), (1, 1), (1, 1),
                         False, 1)
    with pytest.raises(ValueError, match=r"lowrank_conv: w3.shape\[0\] must be 6"):
        lib.lowrank_conv(nhwc, p[0], p[1], None, None, cpp._nhwc(out), "tucker", 3, 3, (1, 1), (1, 1), (1, 1),
                         False, 1, p[2][:5])
    with pytest.raises(ValueError, match="lowrank_conv: w3 must be None for scheme 'channel'"):
        lib.lowrank_conv(nhwc, p[0], p[1], None, None, cpp._nhwc(out), "channel", 3, 3, (1, 1), (1, 1), (1, 1),
                         False, 1, p[2])
    with pytest.raises(ValueError, match="lowrank_conv: the dense kernel takes one weight: w2 must be None"):
        lib.lowrank_conv(nhwc, p[0], p[1], None, None, cpp._nhwc(out), "dense", 1, 1, (1, 1), (0, 0), (1, 1),
                         False, 1)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("case", [((1,), 5, 7, 1), ((3, 4), 20, 18, 17), ((37,), 33, 40, 64), ((2, 3), 12, 9, 256)])
def test_linear(case, isa):
    lead, k, n, rank = case
    x = torch.randn(*lead, 2 * k)[..., ::2]
    w1, w2, b = torch.randn(rank, k) / k ** 0.5, torch.randn(n, rank) / rank ** 0.5, torch.randn(n)
    res = torch.randn(*lead, n)
    for args in ((x, w1, w2, b, None, False), (x, w1, w2, None, res, True)):
        out = cpp.lowrank_linear(*args)
        exact = reference.lowrank_linear(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
        assert out.shape == exact.shape
        assert (out.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


def test_zero_sizes():
    for scheme in ("channel", "spatial"):
        x, w1, w2, b, *rest = conv_case(scheme, 1, 5, 7, (6, 6), (3, 3), 4, (1, 1), (1, 1), 1, "nchw", "bias")
        assert cpp.lowrank_conv2d(x[:0], w1, w2, b, *rest).shape == (0, 7, 6, 6)
    assert cpp.lowrank_linear(torch.randn(0, 5), torch.randn(3, 5), torch.randn(4, 3), None).shape == (0, 4)


def _laid_case(scheme="channel"):
    x, w1, w2, b, *rest = conv_case(scheme, 2, 8, 6, (7, 7), (3, 3), 5, (1, 1), (1, 1), 1, "channels_last", "bias")
    return [x, cpp.kernel_layout(w1), cpp.kernel_layout(w2), b, *rest]


def _writes(t: torch.Tensor):
    """Ways to change a tensor's values, most of which leave its version counter alone."""
    yield "in place", lambda: t.mul_(-1.5)
    yield ".data", lambda: t.data.add_(0.25)
    yield "numpy", lambda: t.detach().numpy().__setitem__(..., 0.5)
    yield "foreach", lambda: torch._foreach_mul_([t.data], 0.5)
    yield "copy_", lambda: t.data.copy_(torch.randn(t.shape))


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_weights_are_read_in_place(scheme):
    """A factor in the kernel's layout is the kernel's panel: every write, whether or not it
    bumps the version counter, shows in the next call, on the checked path and through a
    kept plan."""
    args = _laid_case(scheme)
    for i in (1, 2, 3):  # weight1, weight2, bias
        for how, write in _writes(args[i]):
            cpp.lowrank_conv2d(*args)  # keeps a plan
            with torch.no_grad():
                write()
            out = cpp.lowrank_conv2d(*args)
            want = reference.lowrank_conv2d(*args)
            assert (out - want).abs().max() <= 1e-5 * (1 + want.abs().max()), f"argument {i}, {how}"


def test_weights_in_kernel_layout_are_never_copied(monkeypatch):
    """A factor in the kernel's layout goes to the kernel as its own memory (conv and linear);
    one in another layout is copied on every call and never kept in a plan."""
    lib = cpp._require()
    seen = []
    real = lib.LowRankPlan
    monkeypatch.setattr(lib, "LowRankPlan", lambda *a: seen.append(a[1:3]) or real(*a))
    laid = _laid_case()
    for _ in range(3):
        cpp.lowrank_conv2d(*laid)
    assert len(seen) == 1  # checked once, then planned
    for w, panel in zip(laid[1:3], seen[0]):
        assert panel.ctypes.data == w.data_ptr()  # the weight's own memory
    plain = list(laid)
    plain[1], plain[2] = laid[1].contiguous(), laid[2].contiguous()
    seen.clear()
    for _ in range(3):
        cpp.lowrank_conv2d(*plain)
    assert len(seen) == 3  # no plan kept over a copy
    assert all(p.ctypes.data != w.data_ptr() for p, w in zip(seen[0], plain[1:3]))
    w1, w2 = cpp.kernel_layout(torch.randn(3, 5)), cpp.kernel_layout(torch.randn(4, 3))
    seen.clear()
    for _ in range(3):
        cpp.lowrank_linear(torch.randn(2, 5), w1, w2, None)
    assert len(seen) == 1 and seen[0][0].ctypes.data == w1.data_ptr() and seen[0][1].ctypes.data == w2.data_ptr()


def test_kernel_layout():
    for w in (torch.randn(6, 5, 3, 3), torch.randn(6, 5, 3, 1), torch.randn(7, 6, 1, 3), torch.randn(7, 6)):
        laid = cpp.kernel_layout(w)
        assert torch.equal(laid, w) and laid.shape == w.shape and not cpp.in_kernel_layout(w)
        assert cpp.in_kernel_layout(laid) and cpp.kernel_layout(laid) is laid
        assert torch.zeros_like(laid).stride() == laid.stride()  # dense: optimizer state takes its strides
    neg = torch._neg_view(cpp.kernel_layout(torch.randn(6, 5, 3, 3)))  # memory holds minus the values
    assert neg.is_neg() and not cpp.in_kernel_layout(neg)
    assert torch.equal(cpp.kernel_layout(neg), neg) and cpp.in_kernel_layout(cpp.kernel_layout(neg))


def test_kept_plans_follow_the_callers_tensors(monkeypatch):
    """The second call of a layer runs its kept plan (no full check); a new weight or bias
    tensor, another input shape or layout goes the checked way again and gives the right
    answer; a plan does not depend on the ISA build that made it."""
    lib = cpp._require()
    checked = []
    real = lib.LowRankPlan
    monkeypatch.setattr(lib, "LowRankPlan", lambda *a: checked.append(1) or real(*a))
    args = _laid_case()
    check(tuple(args))
    assert len(checked) == 1  # three calls: checked once, then planned
    for i, new in ((1, cpp.kernel_layout(args[1].clone())), (2, cpp.kernel_layout(args[2].clone())),
                   (3, args[3].clone())):
        args[i] = new  # same values, a new tensor: checked again, then planned
        check(tuple(args))
    assert len(checked) == 4
    args[0] = torch.randn(3, 8, 7, 7).contiguous(memory_format=torch.channels_last)  # another batch
    check(tuple(args))
    args[0] = args[0].contiguous()  # NCHW: converted on the checked path, never planned
    check(tuple(args))
    plan = next(iter(cpp._PLANS[id(args[1])][1].values()))[0]
    with pytest.raises(ValueError, match="this plan has no residual"):
        plan.run(1, 1, 1, 1)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        plan.run(1, 1, 0, 0)
    default = lib.isa()
    x = torch.randn(3, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    args[0] = x
    before = cpp.lowrank_conv2d(*args)
    if default != "generic" and lib.set_isa("generic"):  # another vector width, the same plan
        try:
            checked.clear()
            out = cpp.lowrank_conv2d(*args)
        finally:
            lib.set_isa(default)
        assert not checked and (out - before).abs().max() <= 1e-5 * before.abs().max()


def test_bad_arguments_are_named():
    x, w1, w2, b, stride, pad4, dil, scheme, res, relu = conv_case(
        "channel", 1, 5, 7, (6, 6), (3, 3), 4, (1, 1), (1, 1), 1, "nchw", "residual_relu")
    with pytest.raises(ValueError, match="x must be torch.float32"):
        cpp.lowrank_conv2d(x.double(), w1, w2, b, stride, pad4, dil, scheme, res, relu)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        cpp.lowrank_conv2d(x, w1, w2, b, stride, pad4, dil, scheme, res[:, :3], relu)
    with pytest.raises(ValueError, match=r"lowrank_conv2d: padding must be 4 ints >= 0, got \(1, 1\)"):
        cpp.lowrank_conv2d(x, w1, w2, b, stride, (1, 1), dil, scheme, res, relu)
    with pytest.raises(ValueError, match=r"lowrank_conv2d: stride must be 2 ints >= 1"):
        cpp.lowrank_conv2d(x, w1, w2, b, (0, 1), pad4, dil, scheme, res, relu)
    with pytest.raises(ValueError, match="shapes do not chain"):
        cpp.lowrank_conv2d(x, w1[:, :4], w2, b, stride, pad4, dil, scheme, res, relu)
    with pytest.raises(TypeError, match="lowrank_linear: x must be a torch.Tensor"):
        cpp.lowrank_linear("x", torch.randn(3, 5), torch.randn(4, 3), None)
    with pytest.raises(ValueError, match="lowrank_linear: shapes do not chain"):
        cpp.lowrank_linear(torch.randn(2, 6), torch.randn(3, 5), torch.randn(4, 3), None)
    lib = cpp._require()
    out = torch.empty(1, 7, 6, 6).to(memory_format=torch.channels_last)
    (p1, _), (p2, _) = cpp._panel(w1, "weight1"), cpp._panel(w2, "weight2")
    nhwc = cpp._nhwc(x.to(memory_format=torch.channels_last))
    with pytest.raises(ValueError, match=r"lowrank_conv: w1.shape\[0\] must be 45"):
        lib.lowrank_conv(nhwc, p1[:-1], p2, None, None, cpp._nhwc(out), "channel", 3, 3, (1, 1), (1, 1), (1, 1),
                         False, 1)
    with pytest.raises(ValueError, match="lowrank_conv: scheme must be"):
        lib.lowrank_conv(nhwc, p1, p2, None, None, cpp._nhwc(out), "diagonal", 3, 3, (1, 1), (1, 1), (1, 1),
                         False, 1)
    with pytest.raises(ValueError, match="lowrank_conv: threads must be >= 1"):
        lib.lowrank_conv(nhwc, p1, p2, None, None, cpp._nhwc(out), "channel", 3, 3, (1, 1), (1, 1), (1, 1),
                         False, 0)
    with pytest.raises(ValueError, match="lowrank_conv: x must be C-contiguous"):
        lib.lowrank_conv(x.permute(0, 2, 3, 1).numpy(), p1, p2, None, None, cpp._nhwc(out), "channel", 3, 3, (1, 1), (1, 1), (1, 1),
                         False, 1)
    with pytest.raises(ValueError, match=r"lowrank_conv: bias.shape\[0\] must be 7"):
        lib.lowrank_conv(nhwc, p1, p2, b[:3].numpy(), None, cpp._nhwc(out), "channel", 3, 3, (1, 1), (1, 1),
                         (1, 1), False, 1)


def test_op_dispatch_runs_the_fused_kernel(monkeypatch):
    """backend='cpp' reaches the fused kernel through the op, and autograd still works."""
    calls = []
    real = cpp.fused_chain
    monkeypatch.setattr(cpp, "fused_chain", lambda *a: calls.append(1) or real(*a))
    x, w1, w2, b, stride, pad4, dil, scheme, res, relu = conv_case(
        "spatial", 2, 6, 10, (7, 9), (3, 3), 5, (2, 1), (1, 1), 1, "channels_last", "residual_relu")
    tensors = [t.requires_grad_() for t in (x, w1, w2, b, res)]
    out = ops.lowrank_conv2d(x, w1, w2, b, stride, pad4, dil, scheme, "cpp", res, relu)
    ref = ops.lowrank_conv2d(x, w1, w2, b, stride, pad4, dil, scheme, "torch", res, relu)
    assert calls and (out - ref).abs().max() < 1e-5
    torch.library.opcheck(torch.ops.trp.conv_chain.default,
                          (x.contiguous(), [w1, w2], *reference.kernel_stages(scheme, stride, pad4, dil), b, res,
                           relu, "cpp"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, tensors, g), torch.autograd.grad(ref, tensors, g)):
        assert (a - r).abs().max() <= 1e-5 * r.abs().max()


def test_lazily_negated_tensors_are_never_planned_over_a_copy():
    """A tensor with PyTorch's lazy negation bit holds minus its values: the kernel gets a
    resolved copy, so no kept plan may read that copy on later calls (the tensor's writes
    would not show), and a tensor that gains the bit must miss the plan."""
    args = _laid_case()
    base = torch.randn(args[2].shape[0])
    args[3] = torch._neg_view(base)  # the bias
    for _ in range(2):
        cpp.lowrank_conv2d(*args)
    base += 10.0
    out = cpp.lowrank_conv2d(*args)
    assert (out - reference.lowrank_conv2d(*args)).abs().max() < 1e-4
    args[3] = base.clone()
    w1 = torch.nn.Parameter(args[1].detach().clone())
    args[1] = w1
    for _ in range(2):
        cpp.lowrank_conv2d(*args)  # planned over w1's own memory
    w1.data = torch._neg_view(w1.data)  # same memory, same strides, the values negated
    out = cpp.lowrank_conv2d(*args)
    assert (out - reference.lowrank_conv2d(*args)).abs().max() < 1e-4
