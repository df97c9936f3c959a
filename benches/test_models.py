"""One benchmark per (model case, provider); outputs are checked before timing."""

import pytest
import torch

from benches.conftest import DEVICE, QUICK
from trp.benchmark import cases as C
from trp.benchmark import providers as P

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
    bundle = _bundle(case)
    try:
        with torch.inference_mode():
            fn = P.prepare_model(provider, case, bundle)
            out = fn()
    except P.Unavailable as e:
        pytest.skip(str(e))
    err = ((out.double().cpu() - bundle["ref"]).norm() / bundle["ref"].norm()).item()
    assert err < (1e-4 if case.dtype == torch.float32 else 5e-2), err
    macs = bundle["macs_dense"] if provider.startswith("dense_") else bundle["macs"]
    benchmark.extra_info.update(macs_dense=bundle["macs_dense"], macs=macs, batch=case.batch,
                                device=case.device, dtype=str(case.dtype), max_rel_err=err)
    with torch.inference_mode():
        if case.device == "cuda":
            benchmark(lambda: (fn(), torch.cuda.synchronize()))
        else:
            benchmark(fn)
