"""Wall-clock timing with warm-up and medians (CUDA synchronised inside the timed call)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def _stats(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "p25_ms": q[0], "p75_ms": q[2], "min_ms": min(times),
            "max_ms": max(times), "repeats": len(times)}


def compare(fns: dict[str, Callable[[], object]], *, warmup: int = 3, repeats: int = 10, device=None) -> dict:
    """Time several functions interleaved, one call of each per round (the order rotating),
    so that drift in a shared, noisy machine's speed hits them all alike."""
    if warmup < 0 or repeats < 1 or not fns:
        raise ValueError(f"need functions, warmup >= 0 and repeats >= 1, got {len(fns)}, {warmup}, {repeats}")
    cuda = device is not None and torch.device(device).type == "cuda"
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fns[name]()
            if cuda:
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
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
    for name in ("triton", "onnxruntime"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - not installed, or broken: record its absence
            info[name] = None
    return info
