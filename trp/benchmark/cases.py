"""What the suite measures: the 3×3 conv shapes of ResNet-18/50 and VGG-16, and whole models."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trp import families

RANK_FRACTIONS = (1 / 8, 1 / 4, 1 / 2)
RANK_MULTIPLE = 16
BATCHES = {"cpu": (1, 8), "cuda": (1, 32, 128)}
DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float16, torch.bfloat16, torch.float32)}


@dataclass(frozen=True)
class ConvShape:
    """A 3×3, padding-1 conv of a reference network: ``c_in`` → ``c_out`` on ``hw``² input."""

    nets: tuple[str, ...]
    c_in: int
    c_out: int
    hw: int
    stride: int

    @property
    def name(self) -> str:
        return f"{'/'.join(self.nets)} {self.c_in}->{self.c_out} 3x3 s{self.stride} @{self.hw}"

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 - 3) // self.stride + 1

    @property
    def full_rank(self) -> int:
        return min(self.c_out, self.c_in * 9)


def _shapes() -> list[ConvShape]:
    resnet18 = [(64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (128, 256, 28, 2), (256, 256, 14, 1),
                (256, 512, 14, 2), (512, 512, 7, 1)]
    # torchvision ResNet-50 (v1.5) strides in the bottleneck's 3×3 conv
    resnet50 = [(64, 64, 56, 1), (128, 128, 56, 2), (128, 128, 28, 1), (256, 256, 28, 2), (256, 256, 14, 1),
                (512, 512, 14, 2), (512, 512, 7, 1)]
    # VGG-16 without its 3-channel stem, which is never factored
    vgg16 = [(64, 64, 224, 1), (64, 128, 112, 1), (128, 128, 112, 1), (128, 256, 56, 1), (256, 256, 56, 1),
             (256, 512, 28, 1), (512, 512, 28, 1), (512, 512, 14, 1)]
    nets: dict[tuple, list[str]] = {}
    for net, shapes in (("resnet18", resnet18), ("resnet50", resnet50), ("vgg16", vgg16)):
        for s in shapes:
            nets.setdefault(s, []).append(net)
    return [ConvShape(tuple(n), *s) for s, n in nets.items()]


LAYER_SHAPES = _shapes()
QUICK_LAYER_SHAPES = [s for s in LAYER_SHAPES if (s.c_in, s.c_out, s.hw, s.stride) in
                      {(64, 64, 56, 1), (128, 256, 28, 2), (256, 256, 14, 1)}]


def lowrank_rank(full_rank: int, fraction: float, multiple: int = RANK_MULTIPLE) -> int:
    """``fraction`` of full rank rounded up to ``multiple``, never above full rank."""
    return min(full_rank, math.ceil(full_rank * fraction / multiple) * multiple)


@dataclass(frozen=True)
class LayerCase:
    """One layer shape factored by one family (``scheme``) at ``rank`` (an int, or a tuple
    of per-stage ranks for a family with several rank modes)."""

    shape: ConvShape
    rank: int | tuple
    rank_rule: str
    batch: int
    device: str
    dtype: torch.dtype
    scheme: str = "channel"

    @property
    def name(self) -> str:
        return self.shape.name if self.scheme == "channel" else f"{self.shape.name} {self.scheme}"

    @property
    def ranks(self) -> tuple:
        return self.rank if isinstance(self.rank, tuple) else (self.rank,)

    @property
    def rank_field(self):
        """The rank as a result row holds it: an int, or a list of per-stage ranks."""
        return list(self.rank) if isinstance(self.rank, tuple) else self.rank

    @property
    def rank_text(self) -> str:
        return ",".join(map(str, self.ranks))

    @property
    def weight_shape(self) -> tuple:
        return (self.shape.c_out, self.shape.c_in, 3, 3)

    def _macs(self, ranks) -> int:
        per_pixel = families.get(self.scheme).macs_per_pixel(self.weight_shape, (self.shape.stride,) * 2, ranks)
        return self.batch * self.shape.out_hw ** 2 * per_pixel

    @property
    def macs_dense(self) -> int:
        return self._macs(None)

    @property
    def macs(self) -> int:
        return self._macs(self.ranks)

    @property
    def channels_last(self) -> bool:
        return self.device == "cuda"


# The layers the Tucker-2 cases run on: ResNet-18's and ResNet-50's 3×3 shapes, at these
# fractions of each mode's full rank.
TUCKER_NETS = ("resnet18", "resnet50")
TUCKER_FRACTIONS = (1 / 4, 1 / 2)


def layer_cases(device: str, quick: bool = False) -> list[LayerCase]:
    shapes = QUICK_LAYER_SHAPES if quick else LAYER_SHAPES
    fractions = (1 / 4,) if quick else RANK_FRACTIONS
    batches = BATCHES[device][:1] if quick else BATCHES[device]
    dtypes = DTYPES[device][:1] if quick else DTYPES[device]
    cases = []
    for shape in shapes:
        ranks: dict = {}
        for f in fractions:
            r = lowrank_rank(shape.full_rank, f)
            ranks.setdefault(r, f"1/{round(1 / f)} of {shape.full_rank}, rounded to {RANK_MULTIPLE}")
        for r, rule in ranks.items():
            for batch in batches:
                for dtype in dtypes:
                    cases.append(LayerCase(shape, r, rule, batch, device, dtype))
    for shape in shapes[:1] if quick else shapes:
        if not set(shape.nets) & set(TUCKER_NETS):
            continue
        for f in TUCKER_FRACTIONS[:1] if quick else TUCKER_FRACTIONS:
            r = (lowrank_rank(shape.c_in, f), lowrank_rank(shape.c_out, f))
            rule = (f"tucker: 1/{round(1 / f)} of each mode's full rank ({shape.c_in}, {shape.c_out}), "
                    f"rounded to {RANK_MULTIPLE}")
            for batch in batches:
                for dtype in dtypes:
                    cases.append(LayerCase(shape, r, rule, batch, device, dtype, "tucker"))
    return cases


@dataclass(frozen=True)
class ModelCase:
    model: str
    hw: int
    batch: int
    device: str
    dtype: torch.dtype
    ratio: float = 0.25
    scheme: str | tuple = "channel"

    @property
    def name(self) -> str:
        return f"{self.model} @{self.hw}" + ("" if self.scheme == "channel" else f" {'+'.join(self.schemes)}")

    @property
    def schemes(self) -> tuple:
        return families.parse_scheme(self.scheme)

    @property
    def rank_rule(self) -> str:
        if self.scheme == "channel":
            return (f"every 3x3 conv but the stem: planted exact rank = trp.compile(ratio={self.ratio}, "
                    f"rank_multiple={RANK_MULTIPLE})")
        return (f"scheme {'+'.join(self.schemes)}: every layer a family takes but the stem, planted exactly at "
                f"trp.compile(ratio={self.ratio}, rank_multiple={RANK_MULTIPLE})'s ranks in that family's form "
                f"(trp.models.plant_ranks)")

    @property
    def channels_last(self) -> bool:
        return self.device == "cuda"


MODELS = (("resnet18", 224), ("resnet50", 224), ("resnet20", 32), ("resnet56", 32))
# ResNet-50 with the families that reach its 1x1 convs: Tucker-2 on the 3x3s, and the
# channel scheme on them for comparison, both with pointwise on the 1x1s.
FAMILY_MODELS = (("resnet50", 224, ("tucker", "pointwise")), ("resnet50", 224, ("channel", "pointwise")))


def model_cases(device: str, quick: bool = False) -> list[ModelCase]:
    if quick:
        return [ModelCase("resnet20", 32, 1, device, DTYPES[device][0])]
    return ([ModelCase(m, hw, b, device, dt) for m, hw in MODELS for b in BATCHES[device] for dt in DTYPES[device]]
            + [ModelCase(m, hw, b, device, dt, scheme=sc) for m, hw, sc in FAMILY_MODELS for b in BATCHES[device]
               for dt in DTYPES[device]])
