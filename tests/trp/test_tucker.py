"""Tucker-2 of a conv weight (issue 15, first step): the decomposition alone."""

import pytest
import torch
import torch.nn.functional as F

from trp import families
from trp.decompose import RankSpec

TUCKER = families.get("tucker")


def tucker2_conv2d_weight(w, out_spec, in_spec, sweeps=2):
    """The Tucker family's factor at a rank pair (r_in, r_out) made of the two specs' ranks."""
    spec = RankSpec(rank=(in_spec.rank, out_spec.rank)) if in_spec.rank else out_spec
    return TUCKER.factor(w, spec, sweeps=sweeps)


def compose_tucker2(first, core, last):
    return TUCKER.compose((first, core, last))


def _planted(n, c, r_out, r_in, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(r_out, r_in, k, k, generator=g, dtype=torch.float64)
    a = torch.linalg.qr(torch.randn(n, r_out, generator=g, dtype=torch.float64))[0]
    b = torch.linalg.qr(torch.randn(c, r_in, generator=g, dtype=torch.float64))[0]
    return torch.einsum("rskl,or,cs->ockl", core, a, b)


def test_a_planted_tucker2_rank_is_recovered_exactly():
    w = _planted(40, 24, 12, 8, 3)
    spec = RankSpec(energy=1 - 1e-12, rank_multiple=1)
    t = tucker2_conv2d_weight(w, spec, spec)
    assert t.ranks == (8, 12)
    assert [tuple(t.shape) for t in t.weights] == [(8, 24, 1, 1), (12, 8, 3, 3), (40, 12, 1, 1)]
    assert t.errors[0] < 1e-10
    assert (compose_tucker2(*t.weights) - w).norm() / w.norm() < 1e-10


def test_the_three_convs_are_the_dense_conv_with_geometry_on_the_core():
    w = _planted(16, 10, 6, 5, 3, seed=1).float()
    t = tucker2_conv2d_weight(w, RankSpec(rank=6), RankSpec(rank=5))
    x = torch.randn(2, 10, 9, 11)
    dense = F.conv2d(x, w, stride=2, padding=1, dilation=1)
    chain = F.conv2d(F.conv2d(F.conv2d(x, t.weights[0]), t.weights[1], stride=2, padding=1), t.weights[2])
    assert (chain - dense).abs().max() / dense.abs().max() < 1e-5


def test_hooi_sweeps_never_increase_the_error():
    w = torch.randn(64, 48, 3, 3, generator=torch.Generator().manual_seed(2))
    t = tucker2_conv2d_weight(w, RankSpec(rank=16), RankSpec(rank=16), sweeps=3)
    assert len(t.errors) == 4
    assert all(b <= a + 1e-12 for a, b in zip(t.errors, t.errors[1:])), t.errors
    assert 0 < t.errors[-1] < 1


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="conv weight"):
        tucker2_conv2d_weight(torch.randn(4, 4), RankSpec(rank=2), RankSpec(rank=2))
    with pytest.raises(ValueError, match="sweeps"):
        tucker2_conv2d_weight(torch.randn(4, 4, 3, 3), RankSpec(rank=2), RankSpec(rank=2), sweeps=-1)
    with pytest.raises(ValueError, match="non-finite"):
        tucker2_conv2d_weight(torch.full((4, 4, 3, 3), float("nan")), RankSpec(rank=2), RankSpec(rank=2))


def test_a_tall_unfolding_a_1x1_conv_with_more_outputs_than_inputs():
    w = _planted(32, 8, 4, 4, 1, seed=3)  # the out-mode unfolding is 32 x 8: tall
    t = tucker2_conv2d_weight(w, RankSpec(rank=4), RankSpec(rank=4))
    assert t.ranks == (4, 4) and t.errors[-1] < 1e-10
    u = t.weights[2][:, :, 0, 0].double()
    assert torch.allclose(u.T @ u, torch.eye(4, dtype=torch.float64), atol=1e-10)  # orthonormal basis
