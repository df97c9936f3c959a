"""Rank selection on known spectra, and full-rank exactness of both schemes."""

import itertools
import math

import pytest
import torch
import torch.nn as nn

from tests.helpers import rel_err
from trp import decompose, families
from trp.decompose import RankSpec, select_rank
from trp.modules import LowRankConv2d, LowRankLinear


def test_energy_picks_smallest_rank_reaching_the_fraction():
    s = torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5])  # sigma^2: 9, 4, 1, 1, 0.25 of 15.25
    cum = torch.cumsum(s ** 2, 0) / (s ** 2).sum()  # 0.590, 0.852, 0.918, 0.984, 1.0
    for e, want in [(0.5, 1), (0.59, 1), (0.6, 2), (0.852, 2), (0.9, 3), (0.95, 4), (0.99, 5), (1.0, 5)]:
        assert select_rank(s, RankSpec(energy=e, rank_multiple=1)) == want, (e, cum)


def test_energy_rank_is_rounded_up_and_capped():
    s = torch.linspace(10, 1, 40)
    r1 = select_rank(s, RankSpec(energy=0.5, rank_multiple=1))
    assert select_rank(s, RankSpec(energy=0.5, rank_multiple=16)) == math.ceil(r1 / 16) * 16
    assert select_rank(s, RankSpec(energy=0.999, rank_multiple=16)) == 40  # 48 capped at full rank


def test_ratio_and_explicit_rank():
    s = torch.ones(64)
    assert select_rank(s, RankSpec(ratio=0.25)) == 16
    assert select_rank(s, RankSpec(ratio=0.2, rank_multiple=1)) == 13   # ceil(12.8)
    assert select_rank(s, RankSpec(ratio=0.2, rank_multiple=8)) == 16
    assert select_rank(s, RankSpec(rank=5)) == 5                        # explicit: not rounded
    assert select_rank(s, RankSpec(rank=100)) == 64                     # capped


def test_default_is_energy_09_and_zero_weights_get_rank_1():
    assert RankSpec().energy == 0.9
    assert select_rank(torch.zeros(8), RankSpec(rank_multiple=1)) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(energy=0.0), "energy must be a number in \\(0, 1\\]"),
    (dict(energy=1.5), "energy"),
    (dict(energy="0.9"), "energy"),
    (dict(rank=0), "rank must be an int >= 1"),
    (dict(rank=2.0), "rank must be an int"),
    (dict(ratio=0), "ratio must be a number in \\(0, 1\\]"),
    (dict(rank_multiple=0), "rank_multiple must be an int >= 1"),
    (dict(energy=0.9, rank=3), "at most one of energy, rank, ratio"),
])
def test_rank_spec_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RankSpec(**kwargs)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_unfold_compose_round_trip(scheme):
    w = torch.randn(6, 5, 3, 4, dtype=torch.float64)
    family = families.get(scheme)
    f = family.factor(w, RankSpec(rank=1000))
    assert f.ranks[0] == f.full_ranks[0] == (min(6, 5 * 12) if scheme == "channel" else min(5 * 3, 6 * 4))
    assert rel_err(family.compose(f.weights), w) < 1e-12
    s = family.spectra(w)[0]
    assert torch.allclose(s, f.spectra[0])


def test_non_finite_weights_are_refused_by_name():
    w = torch.randn(4, 3, 3, 3)
    w[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="conv weight has non-finite values"):
        families.get("channel").factor(w, RankSpec(rank=2), "conv weight")


KERNELS = [(1, 1), (3, 3), (5, 5), (3, 5)]
GRID = [c for c in itertools.product(KERNELS, [1, 2], [0, 1, "same"], [1, 2], [True, False])
        if not (c[2] == "same" and c[1] == 2)]  # PyTorch: 'same' needs stride 1


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("kernel,stride,padding,dilation,bias", GRID)
def test_full_rank_reproduces_the_conv(scheme, kernel, stride, padding, dilation, bias):
    conv = nn.Conv2d(5, 6, kernel, stride, padding, dilation, bias=bias)
    layer = LowRankConv2d.from_conv(conv, rank=10_000, scheme=scheme, backend="torch")
    assert layer.rank == layer.full_rank
    for batch, channels_last in [(1, False), (3, True)]:
        x = torch.randn(batch, 5, 13, 11)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        with torch.no_grad():
            expected, out = conv(x), layer(x)
        assert out.shape == expected.shape
        assert rel_err(out, expected) <= 1e-5


def test_full_rank_on_every_backend_that_runs_here():
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 9, 9)
    for backend in ("torch", "cpp"):
        try:
            layer = LowRankConv2d.from_conv(conv, rank=36, backend=backend)
            layer.resolved_backend()
        except Exception as e:  # cpp missing in a TRP_NO_CPP install
            pytest.skip(str(e))
        with torch.no_grad():
            assert rel_err(layer(x), conv(x)) <= 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_linear_full_rank(bias):
    linear = nn.Linear(12, 7, bias=bias)
    layer = LowRankLinear.from_linear(linear, rank=7)
    x = torch.randn(3, 4, 12)
    with torch.no_grad():
        assert rel_err(layer(x), linear(x)) <= 1e-5


def test_macs_per_pixel():
    channel, spatial = families.get("channel"), families.get("spatial")
    assert channel.macs_per_pixel((64, 32, 3, 3), (1, 1), None) == 64 * 32 * 9
    assert channel.macs_per_pixel((64, 32, 3, 3), (1, 1), (8,)) == 8 * 32 * 9 + 64 * 8
    # spatial: first factor (kh x 1) runs at the input width, stride_w times the output width
    assert spatial.macs_per_pixel((64, 32, 3, 3), (2, 2), (8,)) == 8 * 32 * 3 * 2 + 64 * 8 * 3


def test_refusal_reasons():
    assert decompose.refusal(nn.Conv2d(4, 4, 3)) is None
    assert decompose.refusal(nn.Linear(4, 4)) is None
    assert "depthwise" in decompose.refusal(nn.Conv2d(4, 4, 3, groups=4))
    assert "grouped" in decompose.refusal(nn.Conv2d(4, 8, 3, groups=2))
    assert "padding_mode='reflect'" in decompose.refusal(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert "ConvTranspose2d is not supported" in decompose.refusal(nn.ConvTranspose2d(4, 4, 3))
    assert "Conv1d is not supported" in decompose.refusal(nn.Conv1d(4, 4, 3))
    assert "Conv3d is not supported" in decompose.refusal(nn.Conv3d(4, 4, 3))
    assert "lazy" in decompose.refusal(nn.LazyConv2d(4, 3))
    assert "MultiheadAttention" in decompose.refusal(nn.MultiheadAttention(8, 2).out_proj)
