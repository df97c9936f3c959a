"""pytest-benchmark front end of the suite in trp.benchmark (the same cases and providers
as ``python -m trp bench``). ``TRP_BENCH_QUICK=1`` keeps to the quick cases; the device is
CUDA when available (``TRP_BENCH_DEVICE`` overrides)."""

import os

import pytest
import torch

DEVICE = os.environ.get("TRP_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("TRP_BENCH_QUICK", "") == "1"


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)
