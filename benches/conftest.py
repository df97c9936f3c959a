"""pytest-benchmark front end of the suite in trp.benchmark: the same cases, providers and
output checks as ``python -m trp bench``. ``TRP_BENCH_QUICK=1`` keeps to the quick cases;
the device is CUDA when available (``TRP_BENCH_DEVICE`` overrides)."""

import os

import pytest
import torch

from trp.benchmark import runner

DEVICE = os.environ.get("TRP_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("TRP_BENCH_QUICK", "") == "1"


def run_benchmark(benchmark, row: dict, prepare, ref: torch.Tensor, dense_prepare, device: str) -> None:
    """Check the provider's output against ``ref`` (tolerance from the dense provider's own
    error), then hand it to pytest-benchmark; unavailable providers are skipped with the reason."""
    dense_row = dict(row)
    runner.prepare_checked(dense_row, dense_prepare, ref, None)
    tol = runner.tolerance(dense_row["max_rel_err"], getattr(torch, row["dtype"]),
                           layers=1 if row["suite"] == "layers" else 10)
    fn = runner.prepare_checked(row, prepare, ref, tol)
    if fn is None and row["status"] == "skipped":
        pytest.skip(row["reason"])
    assert fn is not None, row["reason"]
    benchmark.extra_info.update({k: row[k] for k in ("macs_dense", "macs", "rank", "batch", "device", "dtype",
                                                     "max_rel_err")})
    with torch.inference_mode():
        if device == "cuda":
            benchmark(lambda: (fn(), torch.cuda.synchronize()))
        else:
            benchmark(fn)
