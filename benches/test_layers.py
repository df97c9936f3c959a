"""One benchmark per (layer case, provider); outputs are checked before timing."""

import pytest
import torch

from benches.conftest import DEVICE, QUICK
from trp.benchmark import cases as C
from trp.benchmark import providers as P
from trp.benchmark.runner import ATOL

CASES = C.layer_cases(DEVICE, QUICK)


def _id(case):
    return f"{case.shape.name.replace(' ', '_')}-b{case.batch}-r{case.rank}-{str(case.dtype)[6:]}"


@pytest.mark.parametrize("provider", P.LAYER_PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_layer(benchmark, case, provider, generator):
    t = P.layer_tensors(case, generator)
    ref = P.layer_reference(case, t)
    try:
        with torch.inference_mode():
            fn = P.prepare_layer(provider, case, t)
            out = fn()
    except P.Unavailable as e:
        pytest.skip(str(e))
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < 1e-2 if case.dtype != torch.float32 else err < 10 * ATOL[case.dtype], err
    macs = case.macs_dense if provider == "dense_torch" else case.macs
    benchmark.extra_info.update(macs_dense=case.macs_dense, macs=macs, rank=case.rank, batch=case.batch,
                                device=case.device, dtype=str(case.dtype), max_rel_err=err)
    with torch.inference_mode():
        if case.device == "cuda":
            benchmark(lambda: (fn(), torch.cuda.synchronize()))
        else:
            benchmark(fn)
