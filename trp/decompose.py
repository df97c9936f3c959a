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


DEFAULT_ENERGY = 0.9


@dataclass(frozen=True)
class RankSpec:
    """How to choose a layer's rank: exactly one of ``energy``, ``rank``, ``ratio``.

    ``energy`` e picks the smallest r with Σ_{i≤r} σ_i² ≥ e·Σσ²; ``ratio`` takes
    ⌈ratio·full_rank⌉. Both are then rounded up to a multiple of ``rank_multiple`` (what
    suits the kernels), never above full rank. An explicit integer ``rank`` is used as
    given (capped at full rank). A family with several rank modes (``tucker``) applies
    energy and ratio to each mode; its ranks can also be given as a tuple of ints, one per
    mode in stage order (see :mod:`trp.families`).
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
        if isinstance(self.rank, list):
            object.__setattr__(self, "rank", tuple(self.rank))
        ranks = self.rank if isinstance(self.rank, tuple) and self.rank else (self.rank,)
        if self.rank is not None and any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
            raise ValueError(f"rank must be an int >= 1 or a tuple of them (one per rank mode), got {self.rank!r}")
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float))
                                       or not 0.0 < self.ratio <= 1.0):
            raise ValueError(f"ratio must be a number in (0, 1], got {self.ratio!r}")
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) or self.rank_multiple < 1:
            raise ValueError(f"rank_multiple must be an int >= 1, got {self.rank_multiple!r}")

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank={self.rank}" if isinstance(self.rank, int) else f"ranks={self.rank}"
        if self.ratio is not None:
            return f"ratio={self.ratio:g}"
        return f"energy={self.energy:g}"


def select_rank(singular_values: torch.Tensor, spec: RankSpec) -> int:
    """The rank ``spec`` asks for, given a layer's singular values (any order-preserving dtype)."""
    full = int(singular_values.numel())
    if full == 0:
        raise ValueError("singular_values is empty")
    if isinstance(spec.rank, tuple):
        raise ValueError(f"select_rank takes one mode's spec; rank {spec.rank} gives several "
                         f"(trp.families splits it per mode)")
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
    """``scheme`` if it names a family of :mod:`trp.families`, else a ValueError."""
    from trp import families
    return families.get(scheme).name


def _family(scheme: str):
    from trp import families
    return families.get(scheme)


def unfold_conv_weight(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """The matrix whose rank is the conv's rank under ``scheme`` (a one-mode family)."""
    return _family(scheme).modes()[0].unfold(weight)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float64) of ``matrix``."""
    return _gram_eigh(matrix.detach().double())[0]


def conv_singular_values(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """Singular values (descending, float64) of the conv weight's ``scheme`` unfolding."""
    return singular_values(unfold_conv_weight(weight, scheme))


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


def fold_conv_matrix(matrix: torch.Tensor, shape, scheme: str) -> torch.Tensor:
    """Inverse of :func:`unfold_conv_weight`: the (n, c, kh, kw) tensor of an unfolding."""
    return _family(scheme).modes()[0].fold(matrix, tuple(shape))


def _factors(f, weight_dtype=None) -> "Factors":
    return Factors(f.weights[0], f.weights[1], f.ranks[0], f.full_ranks[0], f.spectra[0])


def factor_conv2d_weight(weight: torch.Tensor, spec: RankSpec, scheme: str = "channel",
                         what: str = "conv weight") -> "Factors":
    """Factor a (n, c, kh, kw) weight into ``weight1`` (r, c, kh, kw | kh, 1) and
    ``weight2`` (n, r, 1, 1 | 1, kw), in the weight's dtype and device (a two-stage
    family of :mod:`trp.families`)."""
    return _factors(_family(scheme).factor(weight, spec, what))


def compose_conv2d_weight(weight1: torch.Tensor, weight2: torch.Tensor, scheme: str) -> torch.Tensor:
    """The dense (n, c, kh, kw) weight of two conv factors (inverse of the factorisation)."""
    return _family(scheme).compose((weight1, weight2))


def factor_linear_weight(weight: torch.Tensor, spec: RankSpec, what: str = "linear weight") -> "Factors":
    """Factor an (out, in) weight into ``weight1`` (r, in) and ``weight2`` (out, r)."""
    return _factors(_family("pointwise").factor(weight, spec, what))


def conv_full_rank(out_channels: int, in_channels: int, kernel_size, scheme: str) -> int:
    return _family(scheme).full_ranks((out_channels, in_channels, *kernel_size))[0]


def conv_macs_per_pixel(out_channels: int, in_channels: int, kernel_size, stride, rank: Optional[int],
                        scheme: str = "channel") -> int:
    """MACs per output pixel of a conv, dense (``rank=None``) or factored (see
    :meth:`trp.families.Family.macs_per_pixel`)."""
    ranks = None if rank is None else (rank,) * len(_family(scheme).modes())
    return _family(scheme).macs_per_pixel((out_channels, in_channels, *kernel_size), stride, ranks)


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
