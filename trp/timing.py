"""Wall-clock timing with warm-up and medians (CUDA synchronised inside the timed call); each
function timed in blocks of its own, each runtime's thread pool idle while another's runs
(see :func:`compare`)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Optional

import torch


def summarize(times: list[float]) -> dict:
    """Median, quartiles, extremes and count of call times (ms)."""
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "p25_ms": q[0], "p75_ms": q[2], "min_ms": min(times),
            "max_ms": max(times), "repeats": len(times)}


def compare(fns: dict[str, Callable[[], object]], *, warmup: int = 3, repeats: int = 10, device=None,
            pools: Optional[dict[str, str]] = None, interleave: bool = False, blocks: int = 4,
            idle_s: float = 0.2, raw: bool = False) -> dict:
    """Time several functions, ``repeats`` calls each; median and quartiles per function.

    Each function runs in ``blocks`` blocks of its own, the functions' blocks in turn, so
    that drift in a shared machine's speed reaches every function. A block starts with 50 ms
    of untimed calls (its caches, the pool and the clock wake up: short blocks right after a
    pause otherwise ran slow, a 1 ms model at 1.26-1.35x its time alone) and, when the block
    before ran on another thread pool (``pools`` maps a name to its pool: "torch", or an ONNX
    Runtime session's own; default, all on one), after ``idle_s`` of sleep: a runtime's pool
    keeps spinning after its call and would slow whatever runs next on the same cores (on 2
    cores, ONNX Runtime's CIFAR ResNet-20 took 1.9x as long interleaved with PyTorch as
    alone). Functions are not timed call by call against each other by default because a
    call then finds the caches full of the other function's data: CIFAR ResNet-20 at batch
    1 took 1.01-1.13x as long interleaved with seven other PyTorch models as alone, 0.99-1.04x
    in blocks (benches/results/timing-method/interleaving.txt).

    ``interleave=True`` times the functions of one pool call by call instead, one call of
    each per round in rotating order: for variants of one computation on one working set
    (a model with and without instrumentation), where it makes drift hit them alike.
    Functions on different pools are never interleaved. ``raw=True``: each function's stats
    also hold its call times (``"times_ms"``), for pooling calls measured in several runs.
    """
    if warmup < 0 or repeats < 1 or not fns or blocks < 1 or idle_s < 0:
        raise ValueError(f"need functions, warmup >= 0, repeats >= 1, blocks >= 1 and idle_s >= 0, got {len(fns)}, "
                         f"{warmup}, {repeats}, {blocks}, {idle_s}")
    pools = pools or {}
    unknown = set(pools) - set(fns)
    if unknown:
        raise ValueError(f"pools names functions that are not timed: {sorted(unknown)}")
    cuda = device is not None and torch.device(device).type == "cuda"
    units: dict[str, list[str]] = {}  # what runs in one block
    for name in fns:
        units.setdefault(pools.get(name, "") if interleave else name, []).append(name)
    for name in fns:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in fns}

    def timed(name):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fns[name]()
        if cuda:
            torch.cuda.synchronize(device)
        times[name].append((time.perf_counter() - t0) * 1e3)

    def interleaved(names, rounds):  # one call of each per round, the order rotating
        for i in range(rounds):
            for name in names[i % len(names):] + names[:i % len(names)]:
                timed(name)

    if len(units) == 1:
        interleaved(list(fns), repeats)
        return {n: summarize(t) | ({"times_ms": t} if raw else {}) for n, t in times.items()}
    blocks = min(blocks, repeats)
    last_pool = pools.get(list(fns)[-1], "")  # the pool of the last warm-up call
    for b in range(blocks):
        rounds = repeats * (b + 1) // blocks - repeats * b // blocks
        for names in units.values():  # in turn: every block follows another function's
            pool = pools.get(names[0], "")
            if pool != last_pool:
                time.sleep(idle_s)
            last_pool = pool
            woke = time.perf_counter()
            while True:  # untimed, at least one call each and 50 ms: the pool, caches and clock wake up
                for name in names:
                    fns[name]()
                if time.perf_counter() - woke >= 0.05:
                    break
            interleaved(names, rounds)
    return {n: summarize(t) | ({"times_ms": t} if raw else {}) for n, t in times.items()}


def machine_info() -> dict:
    """What a timing depends on: CPU/GPU model, cores, threads and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    for name in ("triton", "onnxruntime", "openvino"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - not installed, or broken: record its absence
            info[name] = None
    return info
