"""Rank specs, the one rank-selection routine, and the truncated SVD every factored
structure is built from. How each structure unfolds, factors and composes a weight is its
family's (:mod:`trp.families`); √Σ goes to each side of a split, so the factors have
comparable scale (better conditioned for fine-tuning and for fp16).
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


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float64) of ``matrix``."""
    return _gram_eigh(matrix.detach().double())[0]


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
