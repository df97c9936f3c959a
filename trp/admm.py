"""Tensor-train decomposition trained with ADMM (Yin et al., CVPR 2021; PAPERS.md).

:class:`ADMM` trains each target conv towards the set of kernels a three-core tensor train
(the ``tucker`` chain 1×1 → k×k → 1×1) can hold, with the authors' splitting:

- the loss gains ``ρ/2 · ‖W − Z + U‖²_F`` per target (ρ = 1e-3, constant, as in the
  authors' code);
- it starts from ``Z = Π(W)`` and ``U = 0``; at the start of every epoch but the first,
  ``Z ← Π(W + U)`` and then ``U ← U + W − Z``;
- ``Π`` is the TT-SVD projection of the kernel as a 3-way tensor (n, k², c) at ranks
  (r1, r2) (:meth:`trp.families.Tucker.factor_tt`), or with ``projection="tucker"`` the
  Tucker-2 HOSVD (+ HOOI) projection of the same chain.

Ranks are chosen once, at construction, from each target's initial weight (``energy``,
``rank`` or ``ratio``, per mode of the ``tucker`` family, as ``trp.compile`` would; the
authors set them by hand per layer, which ``overrides`` does). After training,
``trp.compile(model, plan=admm.plan())`` builds the chain from the TT cores of the trained
weight (contracted into the three stages), and ``trp.fit`` can fine-tune the compiled
model (the paper does)::

    admm = trp.ADMM(model, ratio=0.5)
    trp.fit(model, train, val, epochs=30, method=admm)
    fast = trp.compile(model.eval(), plan=admm.plan())
    trp.fit(fast, train, val, epochs=5, lr=0.01)      # fine-tune the factors
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from trp import decompose
from trp.methods import Method, decide_on_rank0
from trp.plan import LayerChoice, Plan

RHO = 1e-3  # the authors' penalty, constant through training
PROJECTIONS = ("tt", "tucker")


class ADMM(Method):
    """ADMM towards tensor-train (``tucker`` chain) kernels; see the module docstring."""

    name = "admm"

    def __init__(self, model: nn.Module, *, energy: Optional[float] = None, rank=None, ratio: Optional[float] = None,
                 rho: float = RHO, projection: str = "tt", filter_fn=None, overrides: Optional[dict] = None):
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
            raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        super().__init__(model, energy=energy, rank=rank, ratio=ratio, scheme="tucker", filter_fn=filter_fn,
                         overrides=overrides)
        self.rho = float(rho)
        self.projection = projection
        self.ranks: dict[str, tuple] = {}
        for fqn, (m, layer, family) in self.targets.items():
            r1, r2 = family.select(family.spectra(m.weight), layer.spec)
            if projection == "tt":  # a tensor train's second split, (r2·kh·kw) × c, has rank at most r2·kh·kw
                r1 = min(r1, r2 * m.kernel_size[0] * m.kernel_size[1])
            self.ranks[fqn] = (r1, r2)
        self.z: dict[str, torch.Tensor] = {}
        self.u: dict[str, torch.Tensor] = {}
        self.updated = 0  # the last epoch whose start updated Z and U (0: only the start state)
        with torch.no_grad():
            for fqn, (m, _, _) in self.targets.items():
                self.z[fqn] = self._shared(lambda w=m.weight, f=fqn: [self._project(f, w)], m.weight)
                self.u[fqn] = torch.zeros_like(m.weight)

    # -- the projection ----------------------------------------------------------------
    def factors(self, fqn: str, weight: torch.Tensor):
        """The chain's three stage weights for ``weight`` at the layer's ranks."""
        _, _, family = self.targets[fqn]
        what = f"weight of {fqn!r}"
        if self.projection == "tt":
            return family.factor_tt(weight, self.ranks[fqn], what)
        return family.factor(weight, decompose.RankSpec(rank=self.ranks[fqn], rank_multiple=1), what)

    def _project(self, fqn: str, weight: torch.Tensor) -> torch.Tensor:
        _, _, family = self.targets[fqn]
        return family.compose(self.factors(fqn, weight).weights).to(weight.dtype).contiguous()

    @staticmethod
    def _shared(compute, like: torch.Tensor) -> torch.Tensor:
        return decide_on_rank0(compute, [like])[0]

    # -- the training step's hooks -------------------------------------------------------
    @torch.no_grad()
    def epoch_start(self, epoch: int) -> None:
        """At the start of every epoch after the first: Z ← Π(W + U), then U ← U + W − Z."""
        if epoch < 1 or epoch <= self.updated:
            return
        for fqn, (m, _, _) in self.targets.items():
            w = m.weight.detach()
            z = self._shared(lambda f=fqn, v=w + self.u[fqn]: [self._project(f, v)], w)
            self.z[fqn] = z
            self.u[fqn] = self.u[fqn] + w - z
        self.updated = epoch

    def loss(self) -> torch.Tensor:
        """ρ/2 · Σ ‖W − Z + U‖²_F over the targets."""
        total = None
        for fqn, (m, _, _) in self.targets.items():
            term = (m.weight - self.z[fqn] + self.u[fqn]).pow(2).sum()
            total = term if total is None else total + term
        return 0.5 * self.rho * total

    @torch.no_grad()
    def distance(self) -> dict:
        """Over all targets together, relative to ‖W‖: ``residual`` ‖W − Z‖ (ADMM's primal
        residual, against the current Z) and ``gap`` ‖W − Π(W)‖ (how far the weights are from
        the tensor-train set: what compiling them now would lose). ADMM drives both down."""
        den = sum(float(m.weight.double().pow(2).sum()) for m, _, _ in self.targets.values())
        residual = gap = 0.0
        for fqn, (m, _, _) in self.targets.items():
            w = m.weight.detach()
            residual += float((w - self.z[fqn]).double().pow(2).sum())
            gap += float((w - self._project(fqn, w)).double().pow(2).sum())
        return {"residual": math.sqrt(residual / max(den, 1e-300)), "gap": math.sqrt(gap / max(den, 1e-300))}

    def record(self) -> dict:
        d = self.distance()
        return {"ranks": dict(self.ranks), "admm_residual": d["residual"], "admm_gap": d["gap"]}

    # -- the hand-off to compile ---------------------------------------------------------
    @torch.no_grad()
    def plan(self) -> Plan:
        """Each target as the chain of the TT cores of its trained weight (the stage weights
        themselves; compile folds a BN into the last)."""
        choices = {}
        for fqn, (m, _, family) in self.targets.items():
            like = [torch.empty(s, dtype=m.weight.dtype, device=m.weight.device)
                    for s in family.stage_shapes(tuple(m.weight.shape), self.ranks[fqn])]
            weights = decide_on_rank0(lambda f=fqn, w=m.weight: list(self.factors(f, w.detach()).weights), like)
            choices[fqn] = LayerChoice(family.name, self.ranks[fqn], weights=tuple(weights))
        return Plan(choices)

    # -- resume --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "rho": self.rho, "projection": self.projection,
                "ranks": {f: list(r) for f, r in self.ranks.items()}, "updated": self.updated,
                "z": dict(self.z), "u": dict(self.u)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for key in ("rho", "projection"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"ADMM state has {key}={state.get(key)!r}, this method {getattr(self, key)!r}")
        ranks = {f: tuple(r) for f, r in state.get("ranks", {}).items()}
        if ranks != self.ranks:
            raise ValueError(f"ADMM state has ranks {ranks}, this method {self.ranks}")
        for key in ("z", "u"):
            for fqn, t in state[key].items():
                if t.shape != self.targets[fqn][0].weight.shape:
                    raise ValueError(f"ADMM state's {key}[{fqn!r}] has shape {tuple(t.shape)}")
        like = {f: m.weight for f, (m, _, _) in self.targets.items()}
        self.z = {f: t.to(like[f].device, like[f].dtype) for f, t in state["z"].items()}
        self.u = {f: t.to(like[f].device, like[f].dtype) for f, t in state["u"].items()}
        self.updated = int(state["updated"])

    def __repr__(self) -> str:
        return (f"ADMM(targets={len(self.targets)}, rho={self.rho}, projection={self.projection!r}, "
                f"updated={self.updated})")
