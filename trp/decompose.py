"""SVD factorisation of Conv2d and Linear weights, and the one rank-selection routine.

Schemes for a conv weight W of shape (n, c, kh, kw) (see DESIGN.md, "The arithmetic"):

- ``channel``: unfold to n × (c·kh·kw); first factor a kh×kw conv c→r, second a 1×1 conv r→n.
- ``spatial``: unfold to (c·kh) × (n·kw); first factor a kh×1 conv c→r, second a 1×kw conv r→n.

A Linear weight (out, in) factors to in→r then r→out. √Σ goes to each side, so the two
factors have comparable scale (better conditioned for fine-tuning and for fp16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from trp_kernels.reference import SCHEMES

DEFAULT_ENERGY = 0.9


@dataclass(frozen=True)
class RankSpec:
    """How to choose a layer's rank: exactly one of ``energy``, ``rank``, ``ratio``.

    ``energy`` e picks the smallest r with Σ_{i≤r} σ_i² ≥ e·Σσ²; ``ratio`` takes
    ⌈ratio·full_rank⌉. Both are then rounded up to a multiple of ``rank_multiple`` (what
    suits the kernels), never above full rank. An explicit integer ``rank`` is used as
    given (capped at full rank).
    """

    energy: Optional[float] = None
    rank: Optional[int] = None
    ratio: Optional[float] = None
    rank_multiple: int = 16

    def __post_init__(self):
        given = [k for k in ("energy", "rank", "ratio") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of energy, rank, ratio; got {', '.join(given)}")
        if not given:
            object.__setattr__(self, "energy", DEFAULT_ENERGY)
        if self.energy is not None and (isinstance(self.energy, bool) or not isinstance(self.energy, (int, float))
                                        or not 0.0 < self.energy <= 1.0):
            raise ValueError(f"energy must be a number in (0, 1], got {self.energy!r}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be an int >= 1, got {self.rank!r}")
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float))
                                       or not 0.0 < self.ratio <= 1.0):
            raise ValueError(f"ratio must be a number in (0, 1], got {self.ratio!r}")
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) or self.rank_multiple < 1:
            raise ValueError(f"rank_multiple must be an int >= 1, got {self.rank_multiple!r}")

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank={self.rank}"
        if self.ratio is not None:
            return f"ratio={self.ratio:g}"
        return f"energy={self.energy:g}"


def select_rank(singular_values: torch.Tensor, spec: RankSpec) -> int:
    """The rank ``spec`` asks for, given a layer's singular values (any order-preserving dtype)."""
    full = int(singular_values.numel())
    if full == 0:
        raise ValueError("singular_values is empty")
    if spec.rank is not None:
        return min(spec.rank, full)
    if spec.ratio is not None:
        r = math.ceil(spec.ratio * full - 1e-9)
    else:
        energy = singular_values.detach().double().pow(2)
        total = energy.sum()
        if total <= 0:
            r = 1
        else:
            cumulative = torch.cumsum(energy, 0) / total
            target = torch.tensor(spec.energy, dtype=cumulative.dtype)
            r = int(torch.searchsorted(cumulative, target).item()) + 1
    r = max(1, r)
    r = math.ceil(r / spec.rank_multiple) * spec.rank_multiple
    return min(r, full)


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    return scheme


def unfold_conv_weight(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """The matrix whose rank is the conv's rank under ``scheme``."""
    n, c, kh, kw = weight.shape
    if check_scheme(scheme) == "channel":
        return weight.reshape(n, c * kh * kw)
    return weight.permute(1, 2, 0, 3).reshape(c * kh, n * kw)


def conv_singular_values(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """Singular values (descending, float64) of the conv weight's ``scheme`` unfolding."""
    return _gram_eigh(unfold_conv_weight(weight.detach().double(), scheme))[0]


def _gram_eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) of ``m`` and the orthonormal singular vectors of its
    shorter side, from the eigendecomposition of the smaller Gram matrix.

    A LAPACK SVD of a 512 × 4608 conv unfolding takes seconds on two cores; this takes
    tens of milliseconds. Squaring loses relative accuracy only for singular values below
    ~1e-8 of the largest, which carry no energy; the factors are formed by projecting
    ``m`` onto the basis, so the product of the factors is exact at full rank.
    """
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    eigvals, basis = torch.linalg.eigh(gram)
    return eigvals.flip(0).clamp_min(0).sqrt(), basis.flip(1)


@dataclass
class Factors:
    weight1: torch.Tensor
    weight2: torch.Tensor
    rank: int
    full_rank: int
    singular_values: torch.Tensor  # float64, all of them


def truncated_svd(matrix: torch.Tensor, spec: RankSpec, what: str = "weight"):
    """``(u, s_r, vh, s)`` in float64: the top-r singular triplets of ``matrix``, r from
    ``spec``, and all its singular values ``s``. ``u @ diag(s_r) @ vh`` is the best rank-r
    approximation; a zero singular value gets zero vectors (it carries nothing)."""
    m = matrix.detach().double()
    if not torch.isfinite(m).all():
        raise ValueError(f"{what} has non-finite values (nan or inf); cannot factor it")
    s, basis = _gram_eigh(m)
    r = select_rank(s, spec)
    basis, s_r = basis[:, :r], s[:r]
    inv = torch.where(s_r > 0, 1 / s_r.clamp_min(1e-300), torch.zeros_like(s_r))
    if m.shape[0] <= m.shape[1]:  # basis: left singular vectors
        return basis, s_r, inv[:, None] * (basis.T @ m), s
    return (m @ basis) * inv, s_r, basis.T, s


def _truncated_svd(matrix: torch.Tensor, spec: RankSpec, what: str):
    """(left, right, r, singular values) with ``left @ right`` the best rank-r
    approximation of ``matrix`` and √σ on each side."""
    u, s_r, vh, s = truncated_svd(matrix, spec, what)
    root = s_r.sqrt()
    return u * root, root[:, None] * vh, int(s_r.numel()), s


def fold_conv_matrix(matrix: torch.Tensor, shape, scheme: str) -> torch.Tensor:
    """Inverse of :func:`unfold_conv_weight`: the (n, c, kh, kw) tensor of an unfolding."""
    n, c, kh, kw = shape
    if check_scheme(scheme) == "channel":
        return matrix.reshape(n, c, kh, kw)
    return matrix.reshape(c, kh, n, kw).permute(2, 0, 1, 3)


def factor_conv2d_weight(weight: torch.Tensor, spec: RankSpec, scheme: str = "channel",
                         what: str = "conv weight") -> Factors:
    """Factor a (n, c, kh, kw) weight into ``weight1`` (r, c, kh, kw | kh, 1) and
    ``weight2`` (n, r, 1, 1 | 1, kw), in the weight's dtype and device."""
    n, c, kh, kw = weight.shape
    left, right, r, s = _truncated_svd(unfold_conv_weight(weight, scheme), spec, what)
    if scheme == "channel":
        w1 = right.reshape(r, c, kh, kw)
        w2 = left.reshape(n, r, 1, 1)
    else:
        w1 = left.reshape(c, kh, r).permute(2, 0, 1).unsqueeze(-1)
        w2 = right.reshape(r, n, kw).permute(1, 0, 2).unsqueeze(2)
    cast = dict(dtype=weight.dtype, device=weight.device, memory_format=torch.contiguous_format)
    return Factors(w1.to(**cast), w2.to(**cast), r, int(s.numel()), s)


def compose_conv2d_weight(weight1: torch.Tensor, weight2: torch.Tensor, scheme: str) -> torch.Tensor:
    """The dense (n, c, kh, kw) weight of two conv factors (inverse of the factorisation)."""
    n, r = weight2.shape[:2]
    if check_scheme(scheme) == "channel":
        c, kh, kw = weight1.shape[1:]
        return (weight2.reshape(n, r) @ weight1.reshape(r, c * kh * kw)).reshape(n, c, kh, kw)
    return torch.einsum("rci,nrj->ncij", weight1[..., 0], weight2[:, :, 0, :])


def factor_linear_weight(weight: torch.Tensor, spec: RankSpec, what: str = "linear weight") -> Factors:
    """Factor an (out, in) weight into ``weight1`` (r, in) and ``weight2`` (out, r)."""
    left, right, r, s = _truncated_svd(weight, spec, what)
    cast = dict(dtype=weight.dtype, device=weight.device)
    return Factors(right.to(**cast).contiguous(), left.to(**cast).contiguous(), r, int(s.numel()), s)


def conv_full_rank(out_channels: int, in_channels: int, kernel_size, scheme: str) -> int:
    kh, kw = kernel_size
    if check_scheme(scheme) == "channel":
        return min(out_channels, in_channels * kh * kw)
    return min(in_channels * kh, out_channels * kw)


def conv_macs_per_pixel(out_channels: int, in_channels: int, kernel_size, stride, rank: Optional[int],
                        scheme: str = "channel") -> int:
    """MACs per output pixel of a conv, dense (``rank=None``) or factored.

    The spatial scheme's first factor runs at the input width, about ``stride_w`` times
    the output width, which is what makes it a poor fit for strided convs.
    """
    kh, kw = kernel_size
    if rank is None:
        return out_channels * in_channels * kh * kw
    if check_scheme(scheme) == "channel":
        return rank * in_channels * kh * kw + out_channels * rank
    return rank * in_channels * kh * stride[1] + out_channels * rank * kw


def refusal(module: nn.Module) -> Optional[str]:
    """Why ``module``, a conv or linear layer, cannot be factored (None: it can)."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy layer is not initialised yet (run one forward pass first)"
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return "out_proj of nn.MultiheadAttention, which reads its weight directly"
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return f"{type(module).__name__} is not supported (only Conv2d and Linear are factored)"
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__} is not supported (only Conv2d and Linear are factored)"
    if module.groups > 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return f"{kind} conv (groups={module.groups}) is not factored"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} is not supported (zeros only)"
    if not module.weight.dtype.is_floating_point:
        return f"weight dtype {module.weight.dtype} is not a floating type"
    return None


def is_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a conv or linear layer that trp reports on."""
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))


@dataclass
class Tucker2:
    """A conv weight (n, c, kh, kw) as three stages: ``first`` a 1×1 conv c→r_in,
    ``core`` the kh×kw conv r_in→r_out (stride, padding and dilation go here), ``last`` a
    1×1 conv r_out→n. ``errors``: the relative Frobenius error after HOSVD and after each
    HOOI sweep (what the sweeps buy)."""
    first: torch.Tensor
    core: torch.Tensor
    last: torch.Tensor
    ranks: tuple          # (r_out, r_in)
    errors: list


def tucker2_conv2d_weight(weight: torch.Tensor, out_spec: RankSpec, in_spec: RankSpec,
                          sweeps: int = 2) -> Tucker2:
    """Tucker-2 of a conv weight over its (out, in) modes: HOSVD (the top singular vectors of
    each mode's unfolding, ranks from ``out_spec`` / ``in_spec``), then ``sweeps`` HOOI
    sweeps (each mode's basis recomputed with the other projected out)."""
    if weight.dim() != 4:
        raise ValueError(f"weight must be a conv weight (n, c, kh, kw), got shape {tuple(weight.shape)}")
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
        raise ValueError(f"sweeps must be an int >= 0, got {sweeps!r}")
    w = weight.detach().double()
    if not torch.isfinite(w).all():
        raise ValueError("weight has non-finite values (nan or inf); cannot factor it")
    n, c, kh, kw = w.shape
    norm = w.norm().clamp_min(1e-300)

    def unfold_out(t):  # (n, c', kh, kw) -> n x (c' kh kw)
        return t.reshape(t.shape[0], -1)

    def unfold_in(t):   # (n', c, kh, kw) -> c x (n' kh kw)
        return t.transpose(0, 1).reshape(t.shape[1], -1)

    def basis(m, spec):  # the top left singular vectors of a mode's unfolding
        return truncated_svd(m, spec)[0]

    u_out, u_in = basis(unfold_out(w), out_spec), basis(unfold_in(w), in_spec)

    def core_of(u_out, u_in):
        return torch.einsum("ockl,or,cs->rskl", w, u_out, u_in)

    def error(u_out, u_in):
        return float((torch.einsum("rskl,or,cs->ockl", core_of(u_out, u_in), u_out, u_in) - w).norm() / norm)

    errors = [error(u_out, u_in)]
    for _ in range(sweeps):
        u_out = basis(unfold_out(torch.einsum("ockl,cs->oskl", w, u_in)), RankSpec(rank=u_out.shape[1]))
        u_in = basis(unfold_in(torch.einsum("ockl,or->rckl", w, u_out)), RankSpec(rank=u_in.shape[1]))
        errors.append(error(u_out, u_in))
    dtype = weight.dtype
    return Tucker2(first=u_in.T.reshape(u_in.shape[1], c, 1, 1).to(dtype),
                   core=core_of(u_out, u_in).to(dtype),
                   last=u_out.reshape(n, u_out.shape[1], 1, 1).to(dtype),
                   ranks=(u_out.shape[1], u_in.shape[1]), errors=errors)


def compose_tucker2(first: torch.Tensor, core: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The dense (n, c, kh, kw) weight of the three stages."""
    return torch.einsum("or,rskl,sc->ockl", last[:, :, 0, 0], core, first[:, :, 0, 0])
