"""The tap-sparse C++ conv (SPP's pruned convs): the dense conv over the kept im2col columns
only, against the float64 reference (the conv with the pruned taps zeroed), on every instruction-set build,
1 and 2 threads, awkward shapes and every epilogue; and its argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.trp_kernels.test_cpp_fused import ISAS, assert_within_bound, threads  # noqa: F401 (a fixture)
from trp_kernels import cpp, reference

pytestmark = pytest.mark.skipif(not cpp.has_fused_kernels(),
                                reason=f"fused C++ kernels not built ({cpp.unavailable_reason()})")

# (batch, in_c, out_c, (h, w), kernel, stride, padding, dilation)
SHAPES = [
    (1, 16, 24, (9, 11), (3, 3), (1, 1), 1, (1, 1)),
    (2, 19, 33, (8, 8), (3, 3), (2, 2), 1, (1, 1)),     # stride 2, channels past whole vectors
    (1, 7, 5, (10, 7), (3, 5), (1, 1), (1, 2), (1, 1)),  # non-square kernel, few channels
    (2, 32, 64, (7, 7), (3, 3), (1, 1), 1, (1, 1)),      # the deep layers' size
    (1, 12, 40, (12, 12), (3, 3), (1, 1), 2, (2, 2)),    # dilation
    (3, 8, 16, (40, 70), (3, 3), (1, 1), 1, (1, 1)),     # several tiles per thread
]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"shape{i}" for i in range(len(SHAPES))])
@pytest.mark.parametrize("kept", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("epilogue", ["none", "bias", "bias+residual+relu"])
def test_tap_sparse_conv_matches_the_conv_with_pruned_taps_zeroed(isa, threads, shape, kept, epilogue):
    batch, c, n, (h, w), (kh, kw), stride, pad, dil = shape
    g = torch.Generator().manual_seed(hash((shape, kept)) % 2**31)
    x = torch.randn(batch, c, h, w, generator=g)
    weight = torch.randn(n, c, kh, kw, generator=g) / (c * kh * kw) ** 0.5
    keep = torch.rand(c, kh, kw, generator=g) < kept
    bias = torch.randn(n, generator=g) if epilogue != "none" else None
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    ho = (h + 2 * ph - dil[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * pw - dil[1] * (kw - 1) - 1) // stride[1] + 1
    residual = torch.randn(batch, n, ho, wo, generator=g) if "residual" in epilogue else None
    relu = "relu" in epilogue
    packed, columns = reference.pack_taps(weight, keep)
    assert columns.numel() == int(keep.sum())
    out = cpp.conv_taps(x, packed, columns, bias, (kh, kw), stride, (ph, ph, pw, pw), dil, residual, relu)

    def ref(dtype):
        return reference.conv_taps(x.to(dtype), packed.to(dtype), columns, None if bias is None else bias.to(dtype),
                                   (kh, kw), stride, (ph, ph, pw, pw), dil,
                                   None if residual is None else residual.to(dtype), relu)

    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_within_bound(out, ref(torch.float64), ref(torch.float32))


def test_packed_taps_unpack_to_the_weight_with_pruned_taps_zeroed():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(5, 3, 3, 2, generator=g)
    keep = torch.rand(3, 3, 2, generator=g) < 0.5
    taps, kept = reference.pack_taps(weight, keep)
    assert taps.shape == (int(keep.sum()), 5) and kept.tolist() == sorted(kept.tolist())
    assert torch.equal(reference.unpack_taps(taps, kept, 3, (3, 2)), weight * keep)
    # the column of tap (ki, kj) and input channel ci is (ki * kw + kj) * c + ci
    one = torch.zeros(3, 3, 2, dtype=torch.bool)
    one[1, 2, 1] = True
    assert reference.pack_taps(weight, one)[1].tolist() == [(2 * 2 + 1) * 3 + 1]


def test_tap_sparse_conv_argument_checks():
    lib = cpp._require()
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    out = torch.empty(1, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    w = torch.randn(3, 6).numpy()
    with pytest.raises(ValueError, match="kept must be strictly ascending columns in \\[0, 36\\)"):
        lib.conv_taps(nhwc(x), w, torch.tensor([3, 2, 7]).numpy(), None, None, nhwc(out), 3, 3, (1, 1), (1, 1),
                      (1, 1), False, 1)
    with pytest.raises(ValueError, match="kept must be strictly ascending columns in \\[0, 36\\)"):
        lib.conv_taps(nhwc(x), w, torch.tensor([0, 1, 36]).numpy(), None, None, nhwc(out), 3, 3, (1, 1), (1, 1),
                      (1, 1), False, 1)
    with pytest.raises(ValueError, match=r"w.shape\[0\] must be 2 \(kept columns\)"):
        lib.conv_taps(nhwc(x), w, torch.tensor([0, 5]).numpy(), None, None, nhwc(out), 3, 3, (1, 1), (1, 1),
                      (1, 1), False, 1)
    with pytest.raises(ValueError, match="pack_taps: keep must be a bool tensor of shape \\(4, 3, 3\\)"):
        reference.pack_taps(torch.randn(6, 4, 3, 3), torch.ones(4, 3))
