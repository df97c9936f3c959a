"""One benchmark per (model case, provider)."""

import pytest
import torch

from benches.conftest import DEVICE, QUICK, run_benchmark
from trp.benchmark import cases as C
from trp.benchmark import providers as P
from trp.benchmark.runner import make_row

CASES = C.model_cases(DEVICE, QUICK)
_BUNDLES = {}


def _bundle(case):
    if case not in _BUNDLES:  # built once per case, shared by its providers
        _BUNDLES.clear()
        _BUNDLES[case] = P.model_bundle(case, torch.Generator().manual_seed(0))
    return _BUNDLES[case]


@pytest.mark.parametrize("provider", P.MODEL_PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.model}-b{c.batch}-{str(c.dtype)[6:]}" for c in CASES])
def test_model(benchmark, case, provider):
    b = _bundle(case)
    row = make_row("models", case.name, provider, case, None, case.rank_rule, b["macs_dense"],
               b["macs_dense"] if provider.startswith("dense_") else b["macs"])
    run_benchmark(benchmark, row, lambda: P.prepare_model(provider, case, b), b["ref"],
                  lambda: P.prepare_model("dense_eager", case, b), case.device)
