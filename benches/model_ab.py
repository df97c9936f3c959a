"""Two variants of one computation (a whole compiled model, a layer), in one process, call by
call, the order alternating (same caches, same drift): what benches/kept_ab.py and
streaming_ab.py share."""
import statistics
import time
from typing import Callable, Optional

import torch

from trp import program
from trp.benchmark import cases as C, providers as P


def suite_bundle(model: str, batch: int, scheme="channel"):
    """The model suite's CPU float32 case of ``model`` (at its resolution in cases.MODELS) and
    its bundle (providers.seeded_bundle)."""
    case = C.ModelCase(model, dict(C.MODELS)[model], batch, "cpu", torch.float32, scheme=scheme)
    return case, P.seeded_bundle(case)


def bundle_from_args(args: list):
    """:func:`suite_bundle` of command-line arguments MODEL BATCH [SCHEME] (SCHEME as a+b)."""
    scheme = tuple(args[2].split("+")) if len(args) > 2 else "channel"
    return suite_bundle(args[0], int(args[1]), scheme)


def resnet50_bundle(batch: int):
    """The benchmark's ResNet-50 tucker+pointwise case and its bundle."""
    return suite_bundle("resnet50", batch, ("tucker", "pointwise"))


def resnet50_case(batch: int):
    """The model and input of the benchmark's ResNet-50 tucker+pointwise case."""
    case, bundle = resnet50_bundle(batch)
    return case, bundle["trp"], bundle["x"]


def alternate(call: Callable[[], object], variants: dict[str, Callable[[], None]], calls: int,
              warmup: int = 0) -> dict[str, list]:
    """Times (s) of ``call()`` under each of two variants, ``variants[name]()`` switching to it
    before each call; the pair's order swaps every round; the first ``warmup`` rounds untimed."""
    a, b = variants
    times = {a: [], b: []}
    with torch.inference_mode():
        for i in range(warmup + calls):
            for name in ((a, b) if i % 2 else (b, a)):
                variants[name]()
                t0 = time.perf_counter()
                call()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    return times


def pair_ratio(times: dict[str, list]) -> float:
    """The median of the per-pair ratios, first variant / second."""
    a, b = times
    return statistics.median(p / q for p, q in zip(times[a], times[b]))


def report(times: dict[str, list]) -> None:
    """Medians and the median of the per-pair ratios (first variant / second)."""
    a, b = times
    for name, t in times.items():
        print(f"  {name:8s} median {statistics.median(t) * 1e3:.3f} ms")
    print(f"  {a} / {b}, median of per-pair ratios: {pair_ratio(times):.3f}")
    print(f"  torch {torch.__version__}, {torch.get_num_threads()} threads")


def two_builds(models: dict, calls: int, switch: Optional[Callable[[str], None]] = None) -> tuple[dict, dict]:
    """Two built copies of a compiled model, ``{label: (model, x)}``, called in turn (the
    pair's order swapping every round, ``switch(label)`` before each call when given), under
    inference_mode: (times in s per label, "N steps in M segments" of each one's program)."""
    a, b = models
    times = {a: [], b: []}
    with torch.inference_mode():
        for i in range(calls):
            for label in ((a, b) if i % 2 else (b, a)):
                if switch is not None:
                    switch(label)
                model, x = models[label]
                t0 = time.perf_counter()
                model(x)
                times[label].append(time.perf_counter() - t0)
    shape = {}
    for label, (model, x) in models.items():
        prog = program.runner(model).programs[x.shape]
        shape[label] = f"{sum(len(s.step_names) for s in prog.segments)} steps in {len(prog.segments)} segments"
    return times, shape


def ab_line(times: dict, shape: dict, a: str, b: str, calls: int) -> str:
    """``a``'s and ``b``'s medians (ms) with their programs' shapes, and the median of the
    per-pair ratios a / b, for :func:`two_builds`' output."""
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratio = statistics.median(p / q for p, q in zip(times[a], times[b]))
    return (f"{med[a]:.3f} ms ({shape[a]}), {b} {med[b]:.3f} ms ({shape[b]}); {a}/{b} per-pair median {ratio:.3f} "
            f"({calls} calls each, torch {torch.__version__}, {torch.get_num_threads()} threads)")
