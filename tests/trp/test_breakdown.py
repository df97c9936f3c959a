"""trp.breakdown: which part each module's time counts to, that the time lands in the right
part (slow parts made slow with sleeps, so the checks hold on a loaded machine), that nested
parts are not counted twice, that the model is left as it was, and the arithmetic of the
check against the plain model."""

import time

import pytest
import torch
import torch.nn as nn

import trp
from trp import models, program
from trp.breakdown import GLUE, PARTS, TOLERANCE, Breakdown, part_of


class _SlowPool(nn.AdaptiveAvgPool2d):
    def forward(self, x):
        time.sleep(0.003)
        return super().forward(x)


class _Toy(nn.Module):
    """conv (the stem) -> glue that sleeps 2 ms -> a 3 ms pool -> fc."""

    def __init__(self, pool=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = pool if pool is not None else _SlowPool(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        time.sleep(0.002)
        return self.fc(self.pool(y).flatten(1))


def test_parts_of_a_compiled_resnet():
    model = trp.compile(models.resnet_cifar(20).eval(), rank=8, rank_multiple=1)
    assert part_of("conv1", model.conv1, "conv1") == "stem"
    assert part_of("layer1.0.conv1", model.layer1[0].conv1, "conv1") == "low-rank layers"
    assert part_of("x", nn.Conv2d(8, 8, 1), "conv1") == "dense 1×1 convs"
    assert part_of("x", nn.Conv2d(8, 8, 3), "conv1") == "dense k×k convs"
    for m in (nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Linear(2, 2), nn.Flatten()):
        assert part_of("x", m, "conv1") == "pooling and head"
    for m in (nn.ReLU(), nn.Identity(), nn.Sequential()):
        assert part_of("x", m, "conv1") is None
    b = trp.breakdown(model, torch.randn(1, 3, 32, 32), repeats=3, warmup=1)
    assert list(b.parts) == [p for p in PARTS if p in b.parts] and GLUE in b.parts
    assert b.parts["stem"]["modules"] == 1 and b.parts["low-rank layers"]["modules"] == 18
    assert b.parts["pooling and head"]["modules"] == 2  # avgpool, fc
    assert set(b.modules) >= {"conv1", "layer3.2.conv2", "fc"}
    assert b.sum_ms == pytest.approx(sum(p["median_ms"] for p in b.parts.values()))


def test_time_lands_in_its_part():
    b = trp.breakdown(_Toy(), torch.randn(1, 3, 8, 8), repeats=5, warmup=1)
    head, glue = b.parts["pooling and head"]["median_ms"], b.parts[GLUE]["median_ms"]
    assert head >= 3.0 and glue >= 2.0
    assert glue < head < glue + 2.0  # the 3 ms sleep is the pool's, the 2 ms one the glue's
    assert b.parts["stem"]["median_ms"] < 1.0
    assert b.modules["pool"] >= 3.0
    assert b.instrumented_ms >= 5.0 and b.plain_ms >= 5.0


def test_nested_parts_count_once():
    class Inner(nn.Linear):
        def forward(self, x):
            time.sleep(0.002)
            return super().forward(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 4)
            self.head.inner = Inner(4, 4)  # a part inside a part
            self.head.forward = lambda x: self.head.inner(x)  # the instance's own forward, kept after

        def forward(self, x):
            return self.head(x)

    model = Outer()
    own = model.head.__dict__["forward"]
    b = trp.breakdown(model, torch.randn(2, 4), repeats=5, warmup=1)
    head = b.parts["pooling and head"]["median_ms"]
    assert 2.0 <= head < 3.5  # once, not twice
    assert b.parts[GLUE]["median_ms"] > -0.5
    assert model.head.__dict__["forward"] is own


def test_the_model_is_left_as_it_was():
    model = trp.compile(models.resnet_cifar(8).eval(), rank=4, rank_multiple=1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model(x)  # builds trp.program's steps (which may differ from the modules' by rounding)
        before = model(x)
    trp.breakdown(model, x, repeats=2, warmup=0)
    # the model's own forward (trp.program's Runner) is still there, and nothing else is
    assert [m for m in model.modules() if "forward" in m.__dict__] == [model]
    assert isinstance(model.__dict__["forward"], program.Runner)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_the_check_against_the_plain_model():
    parts = {"stem": {"median_ms": 1.0, "p25_ms": 1.0, "p75_ms": 1.0, "modules": 1},
             GLUE: {"median_ms": 0.5, "p25_ms": 0.5, "p75_ms": 0.5, "modules": 0}}
    b = Breakdown(parts, plain_ms=1.5, instrumented_ms=1.5, repeats=3)
    assert b.sum_ms == 1.5 and b.discrepancy == 0 and b.ok and "+0.0%: ok" in str(b)
    b = Breakdown(parts, plain_ms=1.5 / (1 + 2 * TOLERANCE), instrumented_ms=1.5, repeats=3)
    assert b.discrepancy == pytest.approx(2 * TOLERANCE) and not b.ok and "distorts" in str(b)
    d = b.to_dict()
    assert d["ok"] is False and d["sum_ms"] == 1.5 and d["parts"] is parts


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(model="m"), TypeError, "model must be an nn.Module"),
    (dict(x=[1.0]), TypeError, "x must be a tensor"),
    (dict(repeats=0), ValueError, "repeats must be an int >= 1"),
    (dict(repeats=True), ValueError, "repeats must be an int >= 1"),
    (dict(warmup=-1), ValueError, "warmup must be an int >= 0"),
    (dict(x=torch.randn(1, 3, 8, 8, device="meta")), ValueError, "breakdown times CPU models"),
])
def test_bad_arguments(kwargs, error, message):
    args = dict(model=_Toy(nn.AdaptiveAvgPool2d(1)), x=torch.randn(1, 3, 8, 8)) | kwargs
    with pytest.raises(error, match=message):
        trp.breakdown(args.pop("model"), args.pop("x"), **args)
