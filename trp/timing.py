"""Wall-clock timing with warm-up and medians (CUDA synchronised inside the timed call); each
runtime's thread pool timed on its own (see :func:`compare`)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Optional

import torch


def _stats(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "p25_ms": q[0], "p75_ms": q[2], "min_ms": min(times),
            "max_ms": max(times), "repeats": len(times)}


def compare(fns: dict[str, Callable[[], object]], *, warmup: int = 3, repeats: int = 10, device=None,
            pools: Optional[dict[str, str]] = None, blocks: int = 4, idle_s: float = 0.2) -> dict:
    """Time several functions, ``repeats`` calls each; median and quartiles per function.

    Functions on one thread pool (``pools`` maps a name to its pool: "torch", or an ONNX
    Runtime session's own; default, all on one) are interleaved, one call of each per round in
    rotating order, so that drift in a shared machine's speed hits them alike. Functions on
    different pools are never interleaved: a runtime's pool keeps spinning after its call
    and would slow whatever runs next on the same cores (on 2 cores, ONNX Runtime's CIFAR
    ResNet-20 took 1.9x as long interleaved with PyTorch as alone). Each pool runs in
    ``blocks`` blocks, the pools' blocks alternating (so drift still reaches every pool),
    each block after ``idle_s`` of sleep (the previous pool's threads go idle) and 50 ms of
    untimed calls of its functions (short blocks right after a pause otherwise run slow:
    a 1 ms model took 1.26-1.35x its time alone in blocks of 25 calls).
    """
    if warmup < 0 or repeats < 1 or not fns or blocks < 1 or idle_s < 0:
        raise ValueError(f"need functions, warmup >= 0, repeats >= 1, blocks >= 1 and idle_s >= 0, got {len(fns)}, "
                         f"{warmup}, {repeats}, {blocks}, {idle_s}")
    pools = pools or {}
    unknown = set(pools) - set(fns)
    if unknown:
        raise ValueError(f"pools names functions that are not timed: {sorted(unknown)}")
    cuda = device is not None and torch.device(device).type == "cuda"
    groups: dict[str, list[str]] = {}
    for name in fns:
        groups.setdefault(pools.get(name, ""), []).append(name)
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

    if len(groups) == 1:
        interleaved(list(fns), repeats)
        return {n: _stats(t) for n, t in times.items()}
    blocks = min(blocks, repeats)
    for b in range(blocks):
        rounds = repeats * (b + 1) // blocks - repeats * b // blocks
        for names in groups.values():  # in turn: every block follows another pool's
            time.sleep(idle_s)
            woke = time.perf_counter()
            while True:  # untimed, at least one call each and 50 ms: the pool, caches and clock wake up
                for name in names:
                    fns[name]()
                if time.perf_counter() - woke >= 0.05:
                    break
            interleaved(names, rounds)
    return {n: _stats(t) for n, t in times.items()}


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
