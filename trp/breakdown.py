"""Where a CPU model's time goes: each call split into its parts.

    b = trp.breakdown(model, x)       # stem, low-rank layers, dense 1×1 convs, ..., glue
    print(b)                          # median ms per part, and the check below

A part is the set of modules of one kind (:data:`PARTS`); each part module's ``forward``
is wrapped, for the measured calls only, in two clock reads, and a part's time in a call is
the sum over its modules. "glue" is the rest of the call: residual adds and ReLUs outside
the fused kernels, layout conversions, and Python's dispatch between modules.

The instrumentation must not change what it measures, so the same model is also timed
without it, interleaved call by call with the instrumented calls (both on PyTorch's thread
pool, :func:`trp.timing.compare`), and the sum of the parts' medians is held against that
plain median: :attr:`Breakdown.discrepancy`, within a few percent on the models of the
benchmark suite (``python -m trp breakdown``).

Both run the model layer by layer (:func:`trp.program.disabled`): a compiled model's plain
calls otherwise run whole stretches of layers in one C++ call (:mod:`trp.program`), which
has no parts to time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from trp import program
from trp.compile import find_stem, walk
from trp.modules import LAYER_TYPES
from trp.timing import compare, summarize

PARTS = ("stem", "low-rank layers", "dense 1×1 convs", "dense k×k convs", "pooling and head", "glue")
GLUE = "glue"
TOLERANCE = 0.05  # |sum of the parts - the plain model| / the plain model, above which b.ok is False
_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
          nn.modules.pooling._AdaptiveMaxPoolNd)


def part_of(fqn: str, module: nn.Module, stem: Optional[str]) -> Optional[str]:
    """The part a module's time counts to, or None when it is not a part (containers,
    activations, identities: their time is glue)."""
    if fqn == stem:
        return "stem"
    if isinstance(module, LAYER_TYPES):
        return "low-rank layers"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "dense 1×1 convs" if all(k == 1 for k in module.kernel_size) else "dense k×k convs"
    if isinstance(module, (*_POOLS, nn.Linear, nn.Flatten)):
        return "pooling and head"
    return None


@dataclass
class Breakdown:
    """Median ms per part over ``repeats`` instrumented calls, against the plain model's median."""

    parts: dict          # part -> {"median_ms", "p25_ms", "p75_ms", "modules"}, in PARTS order
    plain_ms: float      # median of the model's calls without instrumentation
    instrumented_ms: float  # median of the instrumented calls, whole
    repeats: int
    modules: dict = field(default_factory=dict)  # fqn -> median ms, every part module

    @property
    def sum_ms(self) -> float:
        """The sum of the parts' medians: what the breakdown says the call takes."""
        return sum(p["median_ms"] for p in self.parts.values())

    @property
    def discrepancy(self) -> float:
        """(sum of the parts - the plain model) / the plain model."""
        return self.sum_ms / self.plain_ms - 1

    @property
    def ok(self) -> bool:
        """The parts add up to the plain model within :data:`TOLERANCE`."""
        return abs(self.discrepancy) <= TOLERANCE

    def to_dict(self) -> dict:
        return {"parts": self.parts, "plain_ms": self.plain_ms, "instrumented_ms": self.instrumented_ms,
                "sum_ms": self.sum_ms, "discrepancy": self.discrepancy, "ok": self.ok, "repeats": self.repeats,
                "modules": self.modules}

    def __str__(self) -> str:
        lines = [f"{'part':<18} {'modules':>7} {'median ms':>10} {'share':>6}"]
        for name, p in self.parts.items():
            count = "-" if name == GLUE else str(p["modules"])
            lines.append(f"{name:<18} {count:>7} {p['median_ms']:>10.3f} {p['median_ms'] / self.sum_ms:>6.1%}")
        lines.append(f"{'sum of the parts':<26} {self.sum_ms:>10.3f}")
        verdict = "ok" if self.ok else f"more than {TOLERANCE:.0%} off: the instrumentation distorts this model"
        lines.append(f"{'the model, plain':<26} {self.plain_ms:>10.3f}  ({self.discrepancy:+.1%}: {verdict}; "
                     f"medians of {self.repeats} calls)")
        return "\n".join(lines)


def breakdown(model: nn.Module, x: torch.Tensor, *, repeats: int = 30, warmup: int = 3) -> Breakdown:
    """Time ``model(x)`` part by part (:data:`PARTS`), ``repeats`` instrumented calls
    interleaved with as many plain ones, under ``torch.inference_mode``. CPU only: on a GPU
    a module returns before its kernels finish, and a synchronisation per module would
    change the timing it reports (use ``torch.profiler`` there). The model is left as it
    was: the wrappers exist only during the instrumented calls."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    devices = {t.device.type for t in (x, *model.parameters(), *model.buffers())}
    if devices != {"cpu"}:
        raise ValueError(f"breakdown times CPU models (on a GPU the parts run asynchronously: use torch.profiler), "
                         f"got tensors on {sorted(devices)}")
    stem = find_stem(model)
    members: dict[int, tuple[str, nn.Module, str]] = {}  # one entry per module object, its first name
    for fqn, m, _, _ in walk(model):
        part = part_of(fqn, m, stem)
        if part is not None and id(m) not in members:
            members[id(m)] = (fqn, m, part)
    clock = {"depth": 0, "acc": {}}
    records: list[tuple[float, dict]] = []

    def timed(inner, fqn):
        def forward(*args, **kwargs):
            if clock["depth"]:  # inside another part: that part's time
                return inner(*args, **kwargs)
            clock["depth"] += 1
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                clock["acc"][fqn] = clock["acc"].get(fqn, 0.0) + time.perf_counter() - t0
                clock["depth"] -= 1
        return forward

    def instrumented():
        saved = [(m, m.__dict__.get("forward")) for _, m, _ in members.values()]
        for fqn, m, _ in members.values():
            m.forward = timed(m.forward, fqn)
        clock["acc"] = {}
        try:
            t0 = time.perf_counter()
            model(x)
            whole = time.perf_counter() - t0
        finally:
            for m, own in saved:
                del m.forward
                if own is not None:
                    m.forward = own
        records.append((whole, clock["acc"]))

    with torch.inference_mode(), program.disabled():
        stats = compare({"plain": lambda: model(x), "instrumented": instrumented}, warmup=warmup, repeats=repeats,
                        interleave=True)
    measured = records[-repeats:]  # compare() calls each function `warmup` times, then `repeats` times
    per_part = {name: [] for name in PARTS}
    for whole, acc in measured:
        sums = dict.fromkeys(PARTS, 0.0)
        for fqn, _, part in members.values():
            sums[part] += acc.get(fqn, 0.0)
        sums[GLUE] = whole - sum(sums.values())
        for name in PARTS:
            per_part[name].append(sums[name] * 1e3)
    counts = {name: sum(part == name for _, _, part in members.values()) for name in PARTS}
    parts = {}
    for name in PARTS:
        if name == GLUE or counts[name]:
            s = summarize(per_part[name])
            parts[name] = {"median_ms": s["median_ms"], "p25_ms": s["p25_ms"], "p75_ms": s["p75_ms"],
                           "modules": counts[name]}
    modules = {fqn: statistics.median(acc.get(fqn, 0.0) * 1e3 for _, acc in measured)
               for fqn, _, _ in members.values()}
    return Breakdown(parts, stats["plain"]["median_ms"], statistics.median(w * 1e3 for w, _ in measured),
                     repeats, modules)
