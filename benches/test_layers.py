"""One benchmark per (layer case, provider)."""

import pytest
import torch

from benches.conftest import DEVICE, QUICK, run_benchmark
from trp.benchmark import cases as C
from trp.benchmark import providers as P
from trp.benchmark.runner import make_row

CASES = C.layer_cases(DEVICE, QUICK)


@pytest.mark.parametrize("provider", P.LAYER_PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[
    f"{c.name.replace(' ', '_')}-b{c.batch}-r{c.rank_text}-{str(c.dtype)[6:]}" for c in CASES])
def test_layer(benchmark, case, provider):
    t = P.layer_tensors(case, torch.Generator().manual_seed(0))
    row = make_row("layers", case.name, provider, case, case.rank_field, case.rank_rule, case.macs_dense,
               case.macs_dense if provider == "dense_torch" else case.macs)
    run_benchmark(benchmark, row, lambda: P.prepare_layer(provider, case, t), P.layer_reference(case, t),
                  lambda: P.prepare_layer("dense_torch", case, t), case.device)
