"""Structured Probabilistic Pruning (Wang, Zhang, Wang, Hu, BMVC 2018; PAPERS.md §4),
trained: the pruning unit is a column of a conv's im2col weight matrix, one (input channel,
kernel row, kernel column) tap across all filters, so a pruned conv is a thinner GEMM.

Constants from the authors' Caffe code (``ProbPruneCol``). Per target conv, every
``interval`` iterations:

- score each column j by h_j = Σᵢ |W_ij| (no decay) and rank the columns ascending, the
  columns already pruned last;
- with R′ = ceil(target · columns) − pruned, α = ln(2/u)/R′ and N₁ = −ln(u)/α (u = 0.25),
  each column's keep probability drops by Δ(r) = A·e^(−αr) for rank r < N₁, else by
  2uA − A·e^(−α(2N₁ − r)) (A = 0.05): Δ(0) = A, Δ(N₁) = uA, Δ(R′) = 0, and columns ranked
  above R′ get Δ < 0, so they recover;
- q ← clip(q − Δ, 0, 1), from q = 1; a column whose q reaches 0 is pruned for good (zeroed);
  a layer stops when its pruned fraction reaches ``target`` (its other columns are then
  kept for good).

Every training forward draws a Bernoulli(q) mask per column (the paper's version: a column
is kept when a uniform draw is below q; the authors' later code stores 1 − q instead) from
the method's own generator, so every DDP process draws the same masks and a resumed run
the same ones as an uninterrupted run. A masked column takes no part in the step: its
weights are zeroed for the forward pass, its gradient is masked, and after
``optimizer.step()`` its weights are put back as they were (the step's momentum or decay
cannot move them); pruned columns are zeroed again after every step.

The trained model holds the pruned taps as zeros; ``trp.compile(model, plan=spp.plan())``
swaps each pruned conv for a :class:`trp.modules.TapSparseConv2d`, which holds and
multiplies the kept taps only (:func:`trp_kernels.ops.conv_taps`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from trp.methods import Method, decide_on_rank0
from trp.plan import Plan, TapChoice

U = 0.25   # the authors' u: Δ(N₁) = u·A
A = 0.05   # the authors' A: the largest drop of a keep probability in one update


def delta(rank: torch.Tensor, remaining: int) -> torch.Tensor:
    """Δ(r) for columns at ranks ``rank`` (0 = least important) when ``remaining`` (R′)
    columns are still to be pruned (float64)."""
    if remaining < 1:
        raise ValueError(f"remaining must be >= 1, got {remaining}")
    r = rank.double()
    alpha = math.log(2 / U) / remaining
    n1 = -math.log(U) / alpha
    return torch.where(r < n1, A * torch.exp(-alpha * r), 2 * U * A - A * torch.exp(-alpha * (2 * n1 - r)))


def draw(q: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A Bernoulli(q) keep mask (True: kept): kept when a uniform draw is below q."""
    return torch.rand(q.shape, generator=generator, dtype=torch.float64) < q


class SPP(Method):
    """Structured Probabilistic Pruning of the k×k convs' im2col columns; see the module
    docstring."""

    name = "spp"

    def __init__(self, model: nn.Module, *, target: float = 0.5, interval: int = 1, seed: int = 0,
                 filter_fn=None, overrides: Optional[dict] = None):
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
            raise ValueError(f"target must be a fraction of the columns in (0, 1), got {target!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {interval!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        super().__init__(model, scheme="channel", filter_fn=filter_fn, overrides=overrides)
        self.target, self.interval, self.seed = float(target), interval, seed
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.step_count = 0
        self.q: dict[str, torch.Tensor] = {}       # keep probability per column (float64)
        self.pruned: dict[str, torch.Tensor] = {}  # pruned for good
        self.done: dict[str, bool] = {}
        for fqn, (m, _, _) in self.targets.items():
            cols = m.weight[0].numel()
            self.q[fqn] = torch.ones(cols, dtype=torch.float64)
            self.pruned[fqn] = torch.zeros(cols, dtype=torch.bool)
            self.done[fqn] = False
        self._held: dict[str, tuple] = {}  # fqn -> (mask, the masked columns' weights) during a step

    @staticmethod
    def _taps(m: nn.Module, columns: torch.Tensor) -> torch.Tensor:
        """A per-column bool (im2col order: input channel, kernel row, kernel column) as a
        (c, kh, kw) index into the weight's trailing dims, for a weight of any strides."""
        return columns.to(m.weight.device).view(m.weight.shape[1:])

    # -- the schedule ------------------------------------------------------------------
    def quota(self, fqn: str) -> int:
        """ceil(target · columns): how many columns the layer prunes in all."""
        return math.ceil(self.target * self.q[fqn].numel() - 1e-9)

    @torch.no_grad()
    def _update(self, fqn: str) -> None:
        m, _, _ = self.targets[fqn]
        q, pruned = self.q[fqn], self.pruned[fqn]
        remaining = self.quota(fqn) - int(pruned.sum())
        if remaining < 1:
            self.done[fqn] = True
            return

        def compute():
            score = m.weight.detach().abs().sum(0).flatten().double().cpu()
            score[pruned] = math.inf  # pruned columns rank last
            rank = torch.empty_like(score)
            rank[torch.argsort(score, stable=True)] = torch.arange(score.numel(), dtype=score.dtype)
            new_q = (q - delta(rank, remaining)).clamp(0, 1)
            new_q[pruned] = 0
            newly = (new_q == 0) & ~pruned
            if int(newly.sum()) > remaining:  # more reached 0 than the quota takes: the lowest ranked go
                order = torch.nonzero(newly).flatten()
                order = order[torch.argsort(rank[order], stable=True)]
                new_q[order[remaining:]] = torch.finfo(torch.float64).tiny
                newly[order[remaining:]] = False
            return [new_q, pruned | newly]

        # the broadcast on the weight's device (an NCCL group has no CPU tensors); kept on CPU
        device = m.weight.device
        new_q, new_pruned = decide_on_rank0(lambda: [t.to(device) for t in compute()],
                                            [q.to(device), pruned.to(device)])
        self.q[fqn], self.pruned[fqn] = new_q.cpu(), new_pruned.cpu()
        if int(self.pruned[fqn].sum()) >= self.quota(fqn):
            self.done[fqn] = True
            self.q[fqn] = torch.where(self.pruned[fqn], torch.zeros_like(q), torch.ones_like(q))

    # -- the training step's hooks -------------------------------------------------------
    @torch.no_grad()
    def before_forward(self) -> None:
        """Every ``interval`` steps update the keep probabilities; then draw this step's
        masks and hold the masked columns out of the forward pass."""
        if self.step_count % self.interval == 0:
            for fqn in self.targets:
                if not self.done[fqn]:
                    self._update(fqn)
        for fqn, (m, _, _) in self.targets.items():
            mask = draw(self.q[fqn], self.generator) if not self.done[fqn] else ~self.pruned[fqn]
            out = self._taps(m, ~mask)
            self._held[fqn] = (mask, m.weight[:, out].clone())
            m.weight[:, out] = 0

    @torch.no_grad()
    def after_backward(self) -> None:
        """Mask the gradient as the forward pass was masked."""
        for fqn, (m, _, _) in self.targets.items():
            if fqn in self._held and m.weight.grad is not None:
                m.weight.grad[:, self._taps(m, ~self._held[fqn][0])] = 0

    @torch.no_grad()
    def after_step(self) -> None:
        """Put the masked columns back as they were; pruned columns stay zero."""
        self._restore()
        self.step_count += 1

    def _restore(self) -> None:
        for fqn, (m, _, _) in self.targets.items():
            held = self._held.pop(fqn, None)
            if held is not None:
                mask, values = held
                m.weight[:, self._taps(m, ~mask)] = values
            m.weight[:, self._taps(m, self.pruned[fqn])] = 0

    @torch.no_grad()
    def epoch_end(self, epoch: int) -> None:
        self._restore()

    # -- what it decided ---------------------------------------------------------------
    def kept(self) -> dict:
        """``{fqn: fraction of columns kept}``."""
        return {f: 1 - float(p.double().mean()) for f, p in self.pruned.items()}

    def record(self) -> dict:
        kept = self.kept()
        return {"spp_kept": sum(kept.values()) / len(kept), "spp_done": sum(self.done.values())}

    def plan(self) -> Plan:
        """Every target as a tap-sparse conv without its pruned columns
        (:class:`trp.plan.TapChoice`), for ``trp.compile(model, plan=spp.plan())``; a target
        with nothing pruned yet stays dense."""
        choices = {}
        for fqn, (m, _, _) in self.targets.items():
            if bool(self.pruned[fqn].any()):
                choices[fqn] = TapChoice(~self.pruned[fqn].view(m.weight.shape[1:]))
        return Plan(choices)

    # -- resume --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "target": self.target, "interval": self.interval, "seed": self.seed,
                "step_count": self.step_count, "generator": self.generator.get_state(), "q": dict(self.q),
                "pruned": dict(self.pruned), "done": dict(self.done)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for key in ("target", "interval", "seed"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"SPP state has {key}={state.get(key)!r}, this method {getattr(self, key)!r}")
        for fqn, q in state["q"].items():
            if q.shape != self.q[fqn].shape:
                raise ValueError(f"SPP state's q[{fqn!r}] has {q.numel()} columns, the layer {self.q[fqn].numel()}")
        generator = torch.Generator(device="cpu")
        generator.set_state(state["generator"].cpu())  # (a checkpoint may be mapped to the GPU)
        self.step_count = int(state["step_count"])
        self.generator = generator
        self.q = {f: t.detach().cpu().clone() for f, t in state["q"].items()}
        self.pruned = {f: t.detach().cpu().clone() for f, t in state["pruned"].items()}
        self.done = dict(state["done"])

    def __repr__(self) -> str:
        return f"SPP(targets={len(self.targets)}, target={self.target}, interval={self.interval}, step={self.step_count})"
