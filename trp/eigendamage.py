"""EigenDamage: pruning in the Kronecker-factored eigenbasis (Wang et al., ICML 2019;
PAPERS.md), one shot, after training.

For each target conv (n output, c input channels, k×k) :meth:`EigenDamage.prune` collects,
over one pass of the training data with the model in eval mode:

- ``A = E[a aᵀ]`` (c × c) over the layer's input patches, each patch averaged over its k²
  positions, the mean over samples and output positions;
- ``S = E[g gᵀ]`` (n × n) over the gradients at the layer's output, with the true Fisher:
  the labels are sampled from the model's own softmax. ``g`` is a sample's gradient (the
  batch-mean loss's times the batch size), summed over output positions in the mean, so
  that ``A ⊗ S`` approximates the Fisher of the weight (KFC's spatial independence).

Both are eigendecomposed (``torch.linalg.eigh``; eigenvalues below 1e-10 become 0, no
damping). In that eigenbasis the weight is ``W* = Q_Sᵀ W Q_A`` (at each of the k² taps),
and the loss increase of removing an entry is about ``W*² ⊙ (λ_S λ_Aᵀ)``, summed over the
taps. Its row sums rank the output directions (columns of Q_S), its column sums the input
directions (columns of Q_A). One threshold across all layers removes the ``ratio`` least
important directions, with at most ``cap`` (0.95) of any layer's directions on either side
removed and the most important one always kept. The result is the ``tucker`` chain, given
to compile as its stage weights: 1×1 ``Q_A[:, kept]ᵀ`` → k×k core ``Q_S[:, kept]ᵀ W
Q_A[:, kept]`` → 1×1 ``Q_S[:, kept]``. A conv bias stays the layer's bias, exactly (the
authors' constant-channel trick is wrong at zero-padded borders). Pruning nothing gives the
layer back exactly (the bases are orthonormal). Fine-tune after (the paper does)::

    ed = trp.EigenDamage(model, ratio=0.5)
    ed.prune(model, train_loader)
    fast = trp.compile(model.eval(), plan=ed.plan())
    trp.fit(fast, train, val, epochs=5, lr=0.01)

:meth:`select` changes the ratio without collecting again (what a MAC budget search needs).

Iterative mode (the paper's several rounds, each followed by fine-tuning): build the next
round's EigenDamage on the compiled model. Its targets are then also the ``tucker`` chains
of the round before (first stage W₁, core C, last stage W₃): the statistics are collected
at the chain's input and output and carried through its 1×1 stages (A_C = W₁ A W₁ᵀ,
S_C = W₃ᵀ S W₃), the core is rotated and pruned as a conv, and the new bases are merged
into the old 1×1 factors (first stage Q_A[:, kept]ᵀ W₁, last stage W₃ Q_S[:, kept]), so the
layer stays one three-stage chain::

    ed2 = trp.EigenDamage(fast, ratio=0.3)     # fast: round one's compiled, fine-tuned model
    ed2.prune(fast, train_loader)
    fast = trp.compile(fast, plan=ed2.plan())  # each chain replaced by the merged, thinner one
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from trp import families
from trp.methods import Method, decide_on_rank0, distributed, unwrap
from trp.modules import LowRankConv2d, parameter_of
from trp.plan import LayerChoice, Plan

CAP = 0.95         # at most this fraction of a layer's directions (per side) pruned, one shot
EIGEN_FLOOR = 1e-10  # eigenvalues below it are 0 (the authors' code; no damping)


class EigenDamage(Method):
    """One-shot EigenDamage pruning into the ``tucker`` chain; see the module docstring."""

    name = "eigendamage"

    def __init__(self, model: nn.Module, *, ratio: float = 0.5, cap: float = CAP, seed: int = 0,
                 filter_fn=None, overrides: Optional[dict] = None):
        for key, value, low_open in (("ratio", ratio, False), ("cap", cap, True)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not (0 < value < 1 if low_open else 0 <= value < 1):
                raise ValueError(f"{key} must be a number in {'(0, 1)' if low_open else '[0, 1)'}, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        super().__init__(model, scheme="tucker", filter_fn=filter_fn, overrides=overrides)
        self.ratio, self.cap, self.seed = float(ratio), float(cap), seed
        self.bases: dict[str, tuple] = {}   # fqn -> (λ_A, Q_A, λ_S, Q_S)
        self.keep: dict[str, tuple] = {}    # fqn -> (kept input directions, kept output directions)
        self.importance: dict[str, tuple] = {}  # fqn -> (input directions', output directions' importance)

    def find_targets(self, model: nn.Module) -> dict:
        """The k×k convs compile would factor as ``tucker``, and the ``tucker`` chains of an
        earlier round (that ``filter_fn``, if given, admits)."""
        targets = super().find_targets(model)
        tucker = families.get("tucker")
        for fqn, m in model.named_modules():
            if isinstance(m, LowRankConv2d) and m.scheme == "tucker" and fqn not in targets \
                    and (self.config.filter_fn is None or self.config.filter_fn(m, fqn)):
                targets[fqn] = (m, None, tucker)
        return targets

    @staticmethod
    def _parts(m: nn.Module) -> tuple:
        """(W₁ or None, core, W₃ or None) in float64: the conv to prune and the 1×1 stages
        around it (none for a dense conv)."""
        if isinstance(m, LowRankConv2d):
            w1, core, w3 = (w.detach().double() for w in m.stage_weights())
            return w1[:, :, 0, 0], core, w3[:, :, 0, 0]
        return None, m.weight.detach().double(), None

    @staticmethod
    def _padding(m: nn.Module) -> tuple:
        """(left, right, top, bottom) zero padding of the conv's k×k stage."""
        if isinstance(m, LowRankConv2d):
            t, b, l, r = m._padding4
            return (l, r, t, b)
        return tuple(m._reversed_padding_repeated_twice)

    # -- statistics ----------------------------------------------------------------------
    def _collect(self, model: nn.Module, loader, device) -> dict:
        sums = {f: [None, None, 0, 0] for f in self.targets}  # A sum, S sum, positions, samples
        handles = []

        def forward_hook(fqn):
            def hook(m, inputs, output):
                x = F.pad(inputs[0].detach(), self._padding(m))
                patches = F.unfold(x, m.kernel_size, m.dilation, 0, m.stride)  # (b, c·k², L)
                b, _, positions = patches.shape
                a = patches.reshape(b, m.in_channels, -1, positions).mean(2)  # (b, c, L)
                a = a.transpose(1, 2).reshape(-1, m.in_channels).double()
                s = sums[fqn]
                s[0] = a.T @ a if s[0] is None else s[0] + a.T @ a
                s[2] += a.shape[0]

                # A chain with a fused ReLU (an earlier round's): the gradient at its linear output
                # is the one at the ReLU's output where that is positive, 0 elsewhere.
                alive = (output.detach() > 0) if getattr(m, "relu", False) else None

                def grad_hook(grad):
                    g = grad.detach() * grad.shape[0]  # a sample's gradient (the loss is the batch mean)
                    if alive is not None:
                        g = g * alive
                    g = g.transpose(1, -1).reshape(-1, g.shape[1]).double()
                    s[1] = g.T @ g if s[1] is None else s[1] + g.T @ g
                    s[3] += grad.shape[0]
                if output.requires_grad:
                    output.register_hook(grad_hook)
            return hook

        for fqn, (m, _, _) in self.targets.items():
            handles.append(m.register_forward_hook(forward_hook(fqn)))
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        was_training = model.training
        model.eval()
        try:
            for x, _ in loader:
                x = x.to(device)
                logits = model(x)
                with torch.no_grad():
                    probs = torch.softmax(logits.detach().double().cpu(), 1)
                    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)
                F.cross_entropy(logits, sampled).backward()
                model.zero_grad(set_to_none=True)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        if distributed():  # every rank's data, summed: the same statistics everywhere
            for s in sums.values():
                counts = torch.tensor([s[2], s[3]], dtype=torch.float64, device=s[0].device)
                for t in (s[0], s[1], counts):
                    dist.all_reduce(t)
                s[2], s[3] = int(counts[0]), int(counts[1])
        missing = [f for f, s in sums.items() if s[0] is None or s[1] is None]
        if missing:
            raise RuntimeError(f"EigenDamage saw no forward and backward pass through {missing[:3]} (is the loader "
                               f"empty, or do their parameters not require grad?)")
        return {f: (s[0] / s[2], s[1] / s[3]) for f, s in sums.items()}

    @staticmethod
    def _eigen(matrix: torch.Tensor) -> tuple:
        values, vectors = torch.linalg.eigh(matrix)
        return torch.where(values < EIGEN_FLOOR, torch.zeros_like(values), values), vectors

    def prune(self, model: nn.Module, loader, device=None) -> None:
        """Collect the Kronecker factors over ``loader`` (one pass; labels sampled from the
        model), eigendecompose them, score every direction and :meth:`select` at ``ratio``.
        The model's weights are not changed: :meth:`plan` carries the pruned chain."""
        held = {id(m) for m in unwrap(model).modules()}
        if not all(id(m) in held for m, _, _ in self.targets.values()):
            raise ValueError("prune got a model that does not hold this method's target layers")
        params = list(model.parameters())
        device = torch.device(device) if device is not None else params[0].device
        stats = self._collect(model, loader, device)
        for fqn, (m, _, _) in self.targets.items():
            a, s = stats[fqn]
            w1, core, w3 = self._parts(m)
            if w1 is not None:  # through the chain's 1×1 stages to the core's input and output
                a, s = w1 @ a @ w1.T, w3.T @ s @ w3
            n, c = core.shape[:2]
            like = [torch.empty(c, dtype=torch.float64), torch.empty(c, c, dtype=torch.float64),
                    torch.empty(n, dtype=torch.float64), torch.empty(n, n, dtype=torch.float64)]
            like = [t.to(a.device) for t in like]
            self.bases[fqn] = tuple(decide_on_rank0(lambda a=a, s=s: [*self._eigen(a), *self._eigen(s)], like))
        self.score()
        self.select(self.ratio)

    @torch.no_grad()
    def score(self) -> None:
        """Each direction's importance from the current weights and bases."""
        for fqn, (m, _, _) in self.targets.items():
            lam_a, q_a, lam_s, q_s = self.bases[fqn]
            w_star = torch.einsum("on,nckl,cm->omkl", q_s.T, self._parts(m)[1], q_a)
            imp = (w_star.pow(2) * lam_s[:, None, None, None] * lam_a[None, :, None, None]).sum((2, 3))
            self.importance[fqn] = (imp.sum(0), imp.sum(1))

    def select(self, ratio: float) -> dict:
        """Keep all but the ``ratio`` least important directions over all layers (one
        threshold; at most ``cap`` of a layer's side pruned, its top direction kept).
        Returns ``{fqn: (r1, r2)}``, the ranks in stage order."""
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
        if not self.importance:
            raise RuntimeError("no statistics yet: call prune(model, loader) first")
        entries = []  # (importance, fqn, side, index)
        for fqn, sides in self.importance.items():
            for side, imp in enumerate(sides):
                entries += [(float(v), fqn, side, i) for i, v in enumerate(imp.tolist())]
        entries.sort(key=lambda e: (e[0], e[1], e[2], e[3]))
        budget = int(math.floor(ratio * len(entries) + 1e-9))
        pruned = {(f, side): set() for f in self.importance for side in (0, 1)}
        limit = {(f, side): min(int(math.floor(self.cap * len(imp))), len(imp) - 1)
                 for f, sides in self.importance.items() for side, imp in enumerate(sides)}
        for value, fqn, side, i in entries:
            if budget == 0:
                break
            if len(pruned[(fqn, side)]) < limit[(fqn, side)]:
                pruned[(fqn, side)].add(i)
                budget -= 1
        self.ratio = float(ratio)
        self.keep = {}
        for fqn, sides in self.importance.items():
            self.keep[fqn] = tuple(torch.tensor([i for i in range(len(imp)) if i not in pruned[(fqn, side)]],
                                                dtype=torch.long) for side, imp in enumerate(sides))
        return self.ranks

    @property
    def ranks(self) -> dict:
        """``{fqn: (r1, r2)}``: each target's kept directions, in stage order."""
        return {f: (len(k_in), len(k_out)) for f, (k_in, k_out) in self.keep.items()}

    def record(self) -> dict:
        return {"ranks": self.ranks} if self.keep else {}

    # -- the hand-off to compile ---------------------------------------------------------
    @torch.no_grad()
    def plan(self) -> Plan:
        """Each target as the pruned chain in its eigenbasis (the stage weights themselves)."""
        if not self.keep:
            raise RuntimeError("nothing pruned yet: call prune(model, loader) first")
        choices = {}
        for fqn, (m, _, family) in self.targets.items():
            _, q_a, _, q_s = self.bases[fqn]
            k_in, k_out = self.keep[fqn]
            qa, qs = q_a[:, k_in], q_s[:, k_out]
            w1, w, w3 = self._parts(m)
            core = torch.einsum("on,nckl,cm->omkl", qs.T, w, qa)
            first = qa.T if w1 is None else qa.T @ w1  # merged into the round before's 1×1 factors
            last = qs if w3 is None else w3 @ qs
            dtype = parameter_of(m).dtype
            weights = tuple(t.to(dtype).contiguous() for t in (first[:, :, None, None], core, last[:, :, None, None]))
            choices[fqn] = LayerChoice(family.name, (len(k_in), len(k_out)), weights=weights)
        return Plan(choices)

    # -- resume --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "ratio": self.ratio, "cap": self.cap, "seed": self.seed,
                "bases": {f: list(b) for f, b in self.bases.items()},
                "keep": {f: list(k) for f, k in self.keep.items()},
                "importance": {f: list(i) for f, i in self.importance.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for key in ("cap", "seed"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"EigenDamage state has {key}={state.get(key)!r}, this method {getattr(self, key)!r}")
        self.ratio = float(state["ratio"])
        self.bases = {f: tuple(b) for f, b in state["bases"].items()}
        self.keep = {f: tuple(k) for f, k in state["keep"].items()}
        self.importance = {f: tuple(i) for f, i in state["importance"].items()}

    def __repr__(self) -> str:
        return f"EigenDamage(targets={len(self.targets)}, ratio={self.ratio}, cap={self.cap})"
