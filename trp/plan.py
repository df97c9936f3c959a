"""What a training method hands to :func:`trp.compile`: per layer, the family and ranks it
chose (``trp.compile(model, plan=method.plan())``), carried as they are, not through
override regexes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from trp import families

Ranks = Union[int, tuple]


@dataclass(frozen=True)
class LayerChoice:
    """One layer's choice: the family that factors it (a name in the family registry) and
    its ranks (an int, or one per rank mode in stage order for a several-mode family).

    ``weights``, when given, are the stage weights themselves (the method computed them, as
    EigenDamage and ADMM do), in the layer's weight space before BatchNorm folding: compile
    uses them as they are (folding a BN into the last stage) instead of factoring the
    layer's weight again."""

    family: str
    ranks: Ranks
    weights: Optional[tuple] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.family, str) or self.family not in families.REGISTRY:
            raise ValueError(f"family must be one of {families.NAMES}, got {self.family!r}")
        ranks = tuple(self.ranks) if isinstance(self.ranks, (list, tuple)) else (self.ranks,)
        if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
            raise ValueError(f"ranks must be an int >= 1 or a tuple of them, got {self.ranks!r}")
        object.__setattr__(self, "ranks", families.rank_value(ranks))
        if self.weights is not None:
            weights = tuple(self.weights) if isinstance(self.weights, (list, tuple)) else None
            if not weights or not all(isinstance(w, torch.Tensor) for w in weights):
                raise TypeError(f"weights must be a tuple of stage weight tensors or None, got {type(self.weights).__name__}")
            object.__setattr__(self, "weights", tuple(w.detach() for w in weights))


@dataclass(frozen=True)
class TapChoice:
    """One layer made tap-sparse (SPP): ``keep``, a bool mask (in_channels, kh, kw) of the
    im2col columns (taps) it keeps. compile swaps in a :class:`trp.modules.TapSparseConv2d`
    holding those taps of the layer's (BN-folded) weight."""

    keep: torch.Tensor = field(compare=False)
    family = "taps"

    def __post_init__(self):
        if not isinstance(self.keep, torch.Tensor) or self.keep.dtype is not torch.bool or self.keep.dim() != 3:
            raise TypeError(f"keep must be a bool tensor (in_channels, kh, kw), got {self.keep!r:.80}")
        object.__setattr__(self, "keep", self.keep.detach().cpu())


class Plan(dict):
    """``{fqn: LayerChoice}``: the layers to factor and how. Layers not in it stay dense."""

    def __init__(self, choices=()):
        super().__init__(choices)
        for fqn, choice in self.items():
            if not isinstance(fqn, str):
                raise TypeError(f"a plan's keys are layer names (str), got {fqn!r}")
            if not isinstance(choice, (LayerChoice, TapChoice)):
                raise TypeError(f"plan[{fqn!r}] must be a trp.plan.LayerChoice or TapChoice, got "
                                f"{type(choice).__name__}")

    def to_json(self) -> dict:
        """Each layer's family and ranks (a plan with explicit stage weights cannot be
        written this way: save the compiled model with ``trp.save`` instead)."""
        explicit = [fqn for fqn, c in self.items() if isinstance(c, LayerChoice) and c.weights is not None]
        if explicit:
            raise ValueError(f"the plan carries stage weights for {explicit[:3]}; JSON holds families and ranks "
                             f"only (trp.compile the model with this plan and trp.save it)")
        return {fqn: {"family": c.family, "keep": c.keep.int().tolist()} if isinstance(c, TapChoice)
                else {"family": c.family, "ranks": c.ranks} for fqn, c in self.items()}

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        def choice(d):
            if d["family"] == TapChoice.family:
                return TapChoice(torch.tensor(d["keep"], dtype=torch.bool))
            return LayerChoice(d["family"], tuple(d["ranks"]) if isinstance(d["ranks"], list) else d["ranks"])

        return cls({fqn: choice(d) for fqn, d in data.items()})
