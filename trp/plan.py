"""What a training method hands to :func:`trp.compile`: per layer, the family and ranks it
chose (``trp.compile(model, plan=method.plan())``), carried as they are, not through
override regexes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from trp import families

Ranks = Union[int, tuple]


@dataclass(frozen=True)
class LayerChoice:
    """One layer's choice: the family that factors it (a name in the family registry) and
    its ranks (an int, or one per rank mode in stage order for a several-mode family)."""

    family: str
    ranks: Ranks

    def __post_init__(self):
        if not isinstance(self.family, str) or self.family not in families.REGISTRY:
            raise ValueError(f"family must be one of {families.NAMES}, got {self.family!r}")
        ranks = tuple(self.ranks) if isinstance(self.ranks, (list, tuple)) else (self.ranks,)
        if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
            raise ValueError(f"ranks must be an int >= 1 or a tuple of them, got {self.ranks!r}")
        object.__setattr__(self, "ranks", families.rank_value(ranks))


class Plan(dict):
    """``{fqn: LayerChoice}``: the layers to factor and how. Layers not in it stay dense."""

    def __init__(self, choices=()):
        super().__init__(choices)
        for fqn, choice in self.items():
            if not isinstance(fqn, str):
                raise TypeError(f"a plan's keys are layer names (str), got {fqn!r}")
            if not isinstance(choice, LayerChoice):
                raise TypeError(f"plan[{fqn!r}] must be a trp.plan.LayerChoice, got {type(choice).__name__}")

    def to_json(self) -> dict:
        return {fqn: {"family": c.family, "ranks": c.ranks} for fqn, c in self.items()}

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        return cls({fqn: LayerChoice(d["family"], tuple(d["ranks"]) if isinstance(d["ranks"], list) else d["ranks"])
                    for fqn, d in data.items()})
