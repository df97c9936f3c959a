"""NaN and inf go through every backend as through the torch backend: the same outputs are
NaN, +inf and -inf, and the finite ones agree.

Two ways a fused kernel can hide them: a ReLU written as ``x > 0 ? x : 0`` maps NaN to 0
(torch.relu keeps it), and the zero padding of the rank makes ``inf * 0 = NaN`` in the
padded columns of the intermediate, which the second factor then spreads to every output
channel. The shapes below have ranks and channel counts that are not multiples of any
vector width (16, 8, 4), so both the whole-vector and the tail code paths see them.
"""

from __future__ import annotations

import pytest
import torch

from tests import helpers
from trp_kernels import cpp, ops

BACKENDS = ["cpp", "triton"]
SHAPES = [  # (batch, c, n, (h, w), kernel, rank, stride, dilation, padding)
    (1, 8, 32, (6, 6), (3, 3), 4, (1, 1), (1, 1), 1),     # the layer
    (2, 5, 21, (7, 9), (3, 3), 17, (1, 1), (1, 1), 1),
    (1, 20, 40, (8, 7), (3, 3), 33, (2, 1), (1, 2), (0, 1, 2, 1)),
]
POISONS = ["nan", "inf", "-inf", "nan_residual"]


def _available(backend: str) -> None:
    reasons = ops.refusals(backend, "cuda" if torch.cuda.is_available() and backend == "triton" else "cpu",
                           torch.float32)
    if reasons or not ops.is_fused(backend):
        pytest.skip(f"{backend}: {'; '.join(reasons) or 'no fused kernel built'}")


def _isas(backend: str):
    if backend != "cpp" or not cpp.has_fused_kernels():
        return [None]
    return ["avx512", "avx2", "generic"]


def _poisoned(scheme, shape, poison, relu):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w1, w2, bias, residual, stride, pad4, dil, _ = helpers.conv_case(
        scheme, *shape, "channels_last", "residual_relu", device=device)
    x, residual = x.clone(), residual.clone()
    value = float(poison.removesuffix("_residual"))
    if poison.endswith("_residual"):
        residual[0, 1, 0, 0] = value
        residual[-1, -1, -1, -1] = value
    else:
        x[0, 0, 2, 2] = value
        x[-1, -1, -1, 0] = -value if value != value else value  # also the other sign of inf
    return (x, w1, w2, bias, stride, pad4, dil, scheme), residual, relu


def _same_pattern(out: torch.Tensor, want: torch.Tensor, what: str) -> None:
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        got, expected = test(out), test(want)
        assert torch.equal(got, expected), (f"{what}: {name} at {int(got.sum())} outputs, the torch backend "
                                            f"has {int(expected.sum())}")
    finite = torch.isfinite(want)
    assert finite.any(), "the case poisons every output: it tests nothing about the finite ones"
    assert (out[finite] - want[finite]).abs().max() <= 1e-4 * (1 + want[finite].abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"s{i}" for i in range(len(SHAPES))])
def test_conv_nonfinite_pattern(shape, scheme, poison, relu, backend):
    _available(backend)
    args, residual, relu = _poisoned(scheme, shape, poison, relu)
    want = ops.lowrank_conv2d(*args, "torch", residual, relu)
    assert not torch.isfinite(want).all()
    lib = cpp._C
    for isa in _isas(backend):
        default = lib.isa() if isa else None
        if isa and not lib.set_isa(isa):
            continue
        try:
            for _ in range(2):  # the checked call, then the kept plan
                _same_pattern(ops.lowrank_conv2d(*args, backend, residual, relu), want,
                              f"{backend} {isa or ''} {scheme}")
        finally:
            if isa:
                lib.set_isa(default)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", ["nan", "inf", "-inf"])
def test_linear_nonfinite_pattern(poison, backend):
    _available(backend)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(7, 19, device=device)
    x[2, 3] = float(poison)
    w1, w2 = torch.randn(5, 19, device=device), torch.randn(23, 5, device=device)
    b, res = torch.randn(23, device=device), torch.randn(7, 23, device=device)
    for relu in (False, True):
        want = ops.lowrank_linear(x, w1, w2, b, "torch", res, relu)
        _same_pattern(ops.lowrank_linear(x, w1, w2, b, backend, res, relu), want, f"{backend} linear")


def test_module_relu_keeps_nan():
    """The issue's example: a layer with a fused ReLU, NaN in one input pixel."""
    import torch.nn as nn

    import trp

    torch.manual_seed(0)
    low = trp.LowRankConv2d.from_conv(nn.Conv2d(8, 32, 3, padding=1), rank=4)
    low.relu = True
    x = torch.randn(1, 8, 6, 6)
    x[0, 0, 2, 2] = float("nan")
    with torch.no_grad():
        got = torch.isnan(low(x)).sum().item()
        low.backend = "torch"
        want = torch.isnan(low(x)).sum().item()
    assert want == 288 and got == want
