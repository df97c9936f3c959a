"""What the suite measures: the 3×3 conv shapes of ResNet-18/50 and VGG-16, and whole models."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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
    shape: ConvShape
    rank: int
    rank_rule: str
    batch: int
    device: str
    dtype: torch.dtype

    @property
    def macs_dense(self) -> int:
        s = self.shape
        return self.batch * s.out_hw ** 2 * s.c_out * s.c_in * 9

    @property
    def macs(self) -> int:
        s = self.shape
        return self.batch * s.out_hw ** 2 * self.rank * (s.c_in * 9 + s.c_out)

    @property
    def channels_last(self) -> bool:
        return self.device == "cuda"


def layer_cases(device: str, quick: bool = False) -> list[LayerCase]:
    shapes = QUICK_LAYER_SHAPES if quick else LAYER_SHAPES
    fractions = (1 / 4,) if quick else RANK_FRACTIONS
    batches = BATCHES[device][:1] if quick else BATCHES[device]
    dtypes = DTYPES[device][:1] if quick else DTYPES[device]
    cases = []
    for shape in shapes:
        ranks: dict[int, str] = {}
        for f in fractions:
            r = lowrank_rank(shape.full_rank, f)
            ranks.setdefault(r, f"1/{round(1 / f)} of {shape.full_rank}, rounded to {RANK_MULTIPLE}")
        for r, rule in ranks.items():
            for batch in batches:
                for dtype in dtypes:
                    cases.append(LayerCase(shape, r, rule, batch, device, dtype))
    return cases


@dataclass(frozen=True)
class ModelCase:
    model: str
    hw: int
    batch: int
    device: str
    dtype: torch.dtype
    ratio: float = 0.25

    @property
    def name(self) -> str:
        return f"{self.model} @{self.hw}"

    @property
    def rank_rule(self) -> str:
        return (f"every 3x3 conv but the stem: planted exact rank = trp.compile(ratio={self.ratio}, "
                f"rank_multiple={RANK_MULTIPLE})")

    @property
    def channels_last(self) -> bool:
        return self.device == "cuda"


MODELS = (("resnet18", 224), ("resnet50", 224), ("resnet20", 32), ("resnet56", 32))


def model_cases(device: str, quick: bool = False) -> list[ModelCase]:
    if quick:
        return [ModelCase("resnet20", 32, 1, device, DTYPES[device][0])]
    return [ModelCase(m, hw, b, device, dt) for m, hw in MODELS for b in BATCHES[device] for dt in DTYPES[device]]
