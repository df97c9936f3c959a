"""The factored structures trp knows, each one object: the family registry.

A family says everything about one way of factoring a layer's weight, and nothing else in
trp branches on a family's name:

- which layers it takes when a ``scheme`` names it (``kinds``: 'kxk' conv, '1x1' conv,
  'linear');
- its rank modes: the matrices (unfoldings of the weight) whose ranks are its ranks, with
  their singular values, the rank selection for a :class:`trp.decompose.RankSpec`, and
  TRP's projection and nuclear-norm sub-gradient in that form;
- how to factor a weight into the chain of conv stages it runs, and how to compose the
  stages back;
- the stages' weight shapes and geometry (stride, padding, dilation of each stage), from
  which MACs and parameters follow for every family alike.

Families:

- ``channel``: W (n, c, kh, kw) unfolded to n × (c·kh·kw); a kh×kw conv c→r (with the
  layer's geometry), then a 1×1 conv r→n.
- ``spatial``: unfolded to (c·kh) × (n·kw); a kh×1 conv c→r (vertical geometry), then a
  1×kw conv r→n (horizontal geometry).
- ``tucker``: Tucker-2 over the (out, in) modes: a 1×1 conv c→r1, the kh×kw core
  r1→r2 (the layer's geometry), a 1×1 conv r2→n. Ranks are per mode, in stage order
  (r1 from the input-channel unfolding, r2 from the output-channel one); HOSVD, then HOOI
  sweeps.
- ``pointwise``: a 1×1 conv or a Linear as two thin ones (n × c SVD): c→r (the layer's
  stride and padding), then r→n.

Ranks are always given and reported in stage order: ``ranks[i]`` is the number of output
channels of stage i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from trp import decompose
from trp.decompose import RankSpec, select_rank, truncated_svd

Shape = tuple  # (out, in, kh, kw) of a conv weight
Geometry = tuple  # (stride (2), padding (top, bottom, left, right), dilation (2))
PLAIN: Geometry = ((1, 1), (0, 0, 0, 0), (1, 1))

HOOI_SWEEPS = 2


def rank_value(ranks: Sequence[int]):
    """A layer's ranks as trp reports them: an int for a one-mode family, else the tuple."""
    return ranks[0] if len(ranks) == 1 else tuple(ranks)


def rank_text(ranks: Sequence[int], full_ranks: Sequence[int]) -> str:
    """'16/64', or one 'rank/full' per stage ('16/64,32/128')."""
    return ",".join(f"{r}/{f}" for r, f in zip(ranks, full_ranks))


def layer_kind(module: nn.Module) -> str:
    """'linear', '1x1' (a 1×1 conv) or 'kxk' (any other conv)."""
    if isinstance(module, nn.Linear):
        return "linear"
    return "1x1" if tuple(module.kernel_size) == (1, 1) else "kxk"


@dataclass
class Mode:
    """One rank mode: ``unfold`` maps the dense weight to the matrix whose rank it is,
    ``fold`` maps such a matrix back (given the weight's shape)."""
    unfold: Callable[[torch.Tensor], torch.Tensor]
    fold: Callable[[torch.Tensor, Shape], torch.Tensor]


@dataclass
class Factored:
    """A weight factored by a family: the stage weights (in the weight's dtype and device),
    the ranks and full ranks per mode (stage order), each mode's singular values (float64,
    descending) and, for iterative families, the relative error after each sweep."""
    weights: tuple
    ranks: tuple
    full_ranks: tuple
    spectra: tuple
    errors: list = field(default_factory=list)


def _out_mode() -> Mode:  # n × (c·kh·kw): the output-channel unfolding
    return Mode(lambda w: w.reshape(w.shape[0], -1), lambda m, s: m.reshape(s))


def _in_mode() -> Mode:  # c × (n·kh·kw): the input-channel unfolding
    return Mode(lambda w: w.transpose(0, 1).reshape(w.shape[1], -1),
                lambda m, s: m.reshape(s[1], s[0], *s[2:]).transpose(0, 1))


class Family:
    """The interface every family implements; see the module docstring."""

    name: str = ""
    kinds: frozenset = frozenset()

    # -- structure ------------------------------------------------------------------
    def modes(self) -> list[Mode]:
        raise NotImplementedError

    def stage_shapes(self, shape: Shape, ranks: Sequence[int]) -> list[Shape]:
        """The weight shape of each stage, for a dense weight of ``shape`` at ``ranks``."""
        raise NotImplementedError

    def geometry(self, stride, padding4, dilation) -> list[Geometry]:
        """Each stage's (stride, padding4, dilation) for the layer's geometry."""
        raise NotImplementedError

    def accepts(self, module: nn.Module) -> Optional[str]:
        """Why this family cannot factor ``module`` (None: it can)."""
        if isinstance(module, nn.Linear):
            return f"scheme {self.name!r} factors convolutions, not linear layers"
        return self.refuses_kernel(tuple(module.kernel_size))

    def refuses_kernel(self, kernel_size: tuple) -> Optional[str]:
        """Why this family cannot factor a conv of ``kernel_size`` (None: it can)."""
        return None

    # -- ranks ----------------------------------------------------------------------
    def full_ranks(self, shape: Shape) -> tuple:
        return tuple(min(m.unfold(torch.empty(shape, device="meta")).shape) for m in self.modes())

    def specs(self, spec: RankSpec) -> list[RankSpec]:
        """One int-rank spec per mode: an int ``rank`` applies to every mode, a tuple gives
        one per mode (stage order); energy and ratio apply to each mode's spectrum."""
        n = len(self.modes())
        if not isinstance(spec.rank, tuple):
            return [spec] * n
        if len(spec.rank) != n:
            raise ValueError(f"rank {spec.rank} gives {len(spec.rank)} ranks; scheme {self.name!r} has "
                             f"{n} (one per stage but the last)")
        return [RankSpec(rank=r, rank_multiple=spec.rank_multiple) for r in spec.rank]

    def select(self, spectra: Sequence[torch.Tensor], spec: RankSpec) -> tuple:
        """The ranks ``spec`` asks for, given each mode's singular values: the one rank
        selection (:func:`trp.decompose.select_rank`) per mode."""
        return tuple(select_rank(s, sp) for s, sp in zip(spectra, self.specs(spec)))

    def spectra(self, weight: torch.Tensor) -> tuple:
        """Singular values (float64, descending) of each mode's unfolding."""
        return tuple(decompose.singular_values(m.unfold(weight.detach().double())) for m in self.modes())

    # -- factor / compose -----------------------------------------------------------
    def factor(self, weight: torch.Tensor, spec: RankSpec, what: str = "weight") -> Factored:
        raise NotImplementedError

    def compose(self, weights: Sequence[torch.Tensor]) -> torch.Tensor:
        """The dense weight the stages multiply out to (a Linear's (out, in) when the
        stages are 2-D)."""
        raise NotImplementedError

    # -- cost -----------------------------------------------------------------------
    def macs_per_pixel(self, shape: Shape, stride, ranks: Optional[Sequence[int]]) -> int:
        """MACs per output pixel, dense (``ranks=None``) or factored. A stage runs at its
        own output resolution: ahead of a strided stage that is ``stride_h·stride_w`` times
        the layer's output (the spatial first factor runs at the input width, the Tucker
        first 1×1 at the input resolution), which makes those forms dearer on strided convs."""
        if ranks is None:
            return math.prod(shape)
        shapes = self.stage_shapes(shape, ranks)
        geometry = self.geometry(tuple(stride), (0, 0, 0, 0), (1, 1))
        total, scale = 0, 1
        for s, (st, _, _) in reversed(list(zip(shapes, geometry))):
            total += math.prod(s) * scale
            scale *= st[0] * st[1]
        return total

    # -- TRP ------------------------------------------------------------------------
    def project(self, weight: torch.Tensor, spec: RankSpec, what: str = "weight", project: bool = True):
        """(low, sub, ranks) for TRP: ``low`` the weight truncated to ``spec``'s ranks in
        this family's form (each mode's truncated SVD in turn; None unless ``project``),
        ``sub`` the sum of the modes' nuclear-norm sub-gradients ``U_r V_rᵀ``, folded back."""
        w = weight.detach().double()
        cur, sub, ranks = w, torch.zeros_like(w), []
        for mode, sp in zip(self.modes(), self.specs(spec)):
            u, s_r, vh, _ = truncated_svd(mode.unfold(cur), sp, what)
            sub += mode.fold(u @ vh, w.shape)
            if project:
                cur = mode.fold((u * s_r) @ vh, w.shape)
            ranks.append(int(s_r.numel()))
        low = cur.to(weight.dtype) if project else None
        return low, sub.to(weight.dtype), tuple(ranks)


def _cast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(dtype=like.dtype, device=like.device, memory_format=torch.contiguous_format).contiguous()


def _split(matrix: torch.Tensor, spec: RankSpec, what: str):
    """(left, right, r, s): ``left @ right`` the best rank-r approximation, √σ on each side."""
    u, s_r, vh, s = truncated_svd(matrix, spec, what)
    root = s_r.sqrt()
    return u * root, root[:, None] * vh, int(s_r.numel()), s


class Channel(Family):
    name = "channel"
    kinds = frozenset({"kxk"})

    def modes(self):
        return [_out_mode()]

    # Written for any weight (n, c, ...): a conv's second stage is a 1×1 conv, a linear
    # layer's (2-D weight) a matrix; Pointwise is this family for 1×1 convs and Linear.
    def stage_shapes(self, shape, ranks):
        return [(ranks[0], *shape[1:]), (shape[0], ranks[0], *(1, 1)[:len(shape) - 2])]

    def geometry(self, stride, padding4, dilation):
        return [(tuple(stride), tuple(padding4), tuple(dilation)), PLAIN]

    def factor(self, weight, spec, what="weight"):
        shape = tuple(weight.shape)
        left, right, r, s = _split(weight.reshape(shape[0], -1), self.specs(spec)[0], what)
        first, second = self.stage_shapes(shape, (r,))
        w1, w2 = right.reshape(first), left.reshape(second)
        return Factored((_cast(w1, weight), _cast(w2, weight)), (r,), (int(s.numel()),), (s,))

    def compose(self, weights):
        w1, w2 = weights
        n, r = w2.shape[:2]
        return (w2.reshape(n, r) @ w1.reshape(r, -1)).reshape(n, *w1.shape[1:])


class Spatial(Family):
    name = "spatial"
    kinds = frozenset({"kxk"})

    def modes(self):  # (c·kh) × (n·kw)
        return [Mode(lambda w: w.permute(1, 2, 0, 3).reshape(w.shape[1] * w.shape[2], -1),
                     lambda m, s: m.reshape(s[1], s[2], s[0], s[3]).permute(2, 0, 1, 3))]

    def stage_shapes(self, shape, ranks):
        n, c, kh, kw = shape
        return [(ranks[0], c, kh, 1), (n, ranks[0], 1, kw)]

    def geometry(self, stride, padding4, dilation):
        (sh, sw), (t, b, l, r), (dh, dw) = stride, padding4, dilation
        return [((sh, 1), (t, b, 0, 0), (dh, 1)), ((1, sw), (0, 0, l, r), (1, dw))]

    def factor(self, weight, spec, what="weight"):
        n, c, kh, kw = weight.shape
        left, right, r, s = _split(self.modes()[0].unfold(weight), self.specs(spec)[0], what)
        w1 = left.reshape(c, kh, r).permute(2, 0, 1).unsqueeze(-1)
        w2 = right.reshape(r, n, kw).permute(1, 0, 2).unsqueeze(2)
        return Factored((_cast(w1, weight), _cast(w2, weight)), (r,), (int(s.numel()),), (s,))

    def compose(self, weights):
        w1, w2 = weights
        return torch.einsum("rci,nrj->ncij", w1[..., 0], w2[:, :, 0, :])


class Pointwise(Channel):
    """The channel split of a 1×1 conv or a Linear (n × c SVD): c→r (the layer's stride and
    padding), then r→n."""
    name = "pointwise"
    kinds = frozenset({"1x1", "linear"})

    def accepts(self, module):
        return None if isinstance(module, nn.Linear) else self.refuses_kernel(tuple(module.kernel_size))

    def refuses_kernel(self, kernel_size):
        if kernel_size == (1, 1):
            return None
        return f"scheme 'pointwise' factors 1x1 convs and linear layers, not a {kernel_size} conv"


class Tucker(Family):
    name = "tucker"
    kinds = frozenset({"kxk"})

    def modes(self):  # stage order: the input-channel mode (r1), then the output-channel one (r2)
        return [_in_mode(), _out_mode()]

    def stage_shapes(self, shape, ranks):
        n, c, kh, kw = shape
        r1, r2 = ranks
        return [(r1, c, 1, 1), (r2, r1, kh, kw), (n, r2, 1, 1)]

    def geometry(self, stride, padding4, dilation):
        return [PLAIN, (tuple(stride), tuple(padding4), tuple(dilation)), PLAIN]

    def factor(self, weight, spec, what="weight", sweeps: int = HOOI_SWEEPS):
        """HOSVD of the two channel modes at ``spec``'s ranks, then ``sweeps`` HOOI sweeps
        (each mode's basis recomputed with the other projected out); ``errors`` holds the
        relative Frobenius error after HOSVD and after each sweep."""
        if weight.dim() != 4:
            raise ValueError(f"{what} must be a conv weight (n, c, kh, kw), got shape {tuple(weight.shape)}")
        if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
            raise ValueError(f"sweeps must be an int >= 0, got {sweeps!r}")
        w = weight.detach().double()
        if not torch.isfinite(w).all():
            raise ValueError(f"{what} has non-finite values (nan or inf); cannot factor it")
        inm, outm = self.modes()
        spec_in, spec_out = self.specs(spec)
        u_in, _, _, s_in = truncated_svd(inm.unfold(w), spec_in, what)
        u_out, _, _, s_out = truncated_svd(outm.unfold(w), spec_out, what)
        norm = w.norm().clamp_min(1e-300)

        def core_of(u_out, u_in):
            return torch.einsum("ockl,or,cs->rskl", w, u_out, u_in)

        def error(u_out, u_in):
            approx = torch.einsum("rskl,or,cs->ockl", core_of(u_out, u_in), u_out, u_in)
            return float((approx - w).norm() / norm)

        errors = [error(u_out, u_in)]
        for _ in range(sweeps):
            u_out = truncated_svd(outm.unfold(torch.einsum("ockl,cs->oskl", w, u_in)),
                                  RankSpec(rank=u_out.shape[1]), what)[0]
            u_in = truncated_svd(inm.unfold(torch.einsum("ockl,or->rckl", w, u_out)),
                                 RankSpec(rank=u_in.shape[1]), what)[0]
            errors.append(error(u_out, u_in))
        n, c = w.shape[:2]
        r1, r2 = u_in.shape[1], u_out.shape[1]
        weights = (u_in.T.reshape(r1, c, 1, 1), core_of(u_out, u_in), u_out.reshape(n, r2, 1, 1))
        return Factored(tuple(_cast(t, weight) for t in weights), (r1, r2), (int(s_in.numel()), int(s_out.numel())),
                        (s_in, s_out), errors)

    def factor_tt(self, weight, ranks: Sequence[int], what="weight") -> Factored:
        """The tensor-train form of the same chain (Yin et al., CVPR 2021): the kernel as a
        3-way tensor (n, kh·kw, c), factored by TT-SVD, a sequential truncated SVD: n × (kh·kw·c)
        at rank ``ranks[1]`` gives the last stage (its left factor), and the remainder,
        (ranks[1]·kh·kw) × c at rank ``ranks[0]``, the core (left) and the first stage (right).
        ``ranks`` are in stage order, as everywhere in trp; ``spectra`` are the two SVDs'
        singular values and ``errors`` the relative error of the composed chain."""
        if weight.dim() != 4:
            raise ValueError(f"{what} must be a conv weight (n, c, kh, kw), got shape {tuple(weight.shape)}")
        r1, r2 = ranks
        w = weight.detach().double()
        n, c, kh, kw = w.shape
        tensor = w.permute(0, 2, 3, 1)  # (n, kh, kw, c)
        u2, s2_r, vh2, s2 = truncated_svd(tensor.reshape(n, -1), RankSpec(rank=r2), what)
        r2 = int(s2_r.numel())
        rest = (s2_r[:, None] * vh2).reshape(r2 * kh * kw, c)
        u1, s1_r, vh1, s1 = truncated_svd(rest, RankSpec(rank=r1), what)
        r1 = int(s1_r.numel())
        core = u1.reshape(r2, kh, kw, r1).permute(0, 3, 1, 2)  # (r2, r1, kh, kw)
        weights = ((s1_r[:, None] * vh1).reshape(r1, c, 1, 1), core, u2.reshape(n, r2, 1, 1))
        error = float((self.compose(weights) - w).norm() / w.norm().clamp_min(1e-300))
        return Factored(tuple(_cast(t, weight) for t in weights), (r1, r2), (int(s1.numel()), int(s2.numel())),
                        (s1, s2), [error])

    def compose(self, weights):
        first, core, last = weights
        return torch.einsum("or,rskl,sc->ockl", last[:, :, 0, 0], core, first[:, :, 0, 0])


REGISTRY: dict[str, Family] = {f.name: f for f in (Channel(), Spatial(), Tucker(), Pointwise())}
NAMES = tuple(REGISTRY)


def get(name) -> Family:
    """The family called ``name``; a ValueError naming the choices for anything else."""
    family = REGISTRY.get(name) if isinstance(name, str) else None
    if family is None:
        raise ValueError(f"scheme must be one of {NAMES}, got {name!r}")
    return family


def parse_scheme(scheme) -> tuple:
    """A ``scheme`` argument (a family name, or a sequence of them tried in order for each
    layer) as a tuple of family names, checked."""
    names = (scheme,) if isinstance(scheme, str) else tuple(scheme) if isinstance(scheme, (list, tuple)) else None
    if not names:
        raise ValueError(f"scheme must be one of {NAMES} or a sequence of them, got {scheme!r}")
    for n in names:
        get(n)
    if len(set(names)) != len(names):
        raise ValueError(f"scheme names a family twice: {scheme!r}")
    return names


def family_for(module: nn.Module, scheme: tuple) -> Optional[Family]:
    """The first family of ``scheme`` (a parsed tuple) that takes layers of ``module``'s kind."""
    kind = layer_kind(module)
    for name in scheme:
        if kind in REGISTRY[name].kinds:
            return REGISTRY[name]
    return None
