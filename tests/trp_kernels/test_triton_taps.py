"""The tap-sparse Triton conv (SPP's pruned convs) against the reference (the conv with the
pruned taps zeroed) under Triton's interpreter on CPU (natively with CUDA), in every dtype,
on awkward shapes with none to all columns kept and every epilogue; and compiled natively
for sm_80 and sm_90 from a real launch's arguments, with no register spill and within the
architecture's shared memory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from trp_kernels import ops, reference

pytestmark = pytest.mark.skipif(bool(ops._TRITON_IMPORT_ERROR), reason=ops._TRITON_IMPORT_ERROR or "")
if not ops._TRITON_IMPORT_ERROR:
    from trp_kernels.triton.conv_taps import conv_taps
from tests.trp_kernels.test_triton import ATOL, DEVICE, DTYPES, assert_matches_reference  # noqa: E402

# (batch, in_c, out_c, (h, w), kernel, stride, padding (t, b, l, r), dilation)
SHAPES = [
    (1, 16, 24, (9, 11), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    (2, 19, 33, (8, 8), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    (1, 7, 5, (10, 7), (3, 5), (1, 1), (1, 1, 2, 2), (1, 1)),
    (1, 12, 40, (12, 12), (3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),
]
SMALL = dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16)  # several tiles on every axis of these shapes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"shape{i}" for i in range(len(SHAPES))])
@pytest.mark.parametrize("kept", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("epilogue", ["none", "bias+residual+relu"])
def test_triton_tap_sparse_conv_matches_the_reference(dtype, shape, kept, epilogue):
    batch, c, n, (h, w), (kh, kw), stride, pad, dil = shape
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, c, h, w, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(n, c, kh, kw, generator=g) / (c * kh * kw) ** 0.5).to(DEVICE, dtype)
    keep = (torch.rand(c, kh, kw, generator=g) < kept).to(DEVICE)
    full = epilogue != "none"
    bias = torch.randn(n, generator=g).to(DEVICE, dtype) if full else None
    packed, cols = reference.pack_taps(weight, keep)
    ref_out = reference.conv_taps(x.float(), packed.float(), cols, None, (kh, kw), stride, pad, dil)
    residual = torch.randn(ref_out.shape, generator=g).to(DEVICE, dtype) if full else None
    out = conv_taps(x, packed, cols, bias, residual, (kh, kw), stride, pad, dil, full, config=SMALL)

    def ref(x, weight, bias, residual):
        return reference.conv_taps(x, *reference.pack_taps(weight, keep), bias, (kh, kw), stride, pad, dil,
                                   residual, full)

    assert_matches_reference(out, ref, (x, weight, bias, residual), dtype)


def test_triton_tap_sparse_conv_compiles_natively_for_sm80_and_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {
        "TRITON_DUMP_PTXAS_LOG": "1", "TRITON_CACHE_DIR": str(tmp_path)}  # an empty cache: ptxas reports
    code = "from trp_kernels.triton import native; import json; print(json.dumps(native.compile_taps()))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert {r["arch"] for r in rows} == {80, 90} and len(rows) == 4
    for r in rows:
        assert not r["error"], r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["shared"] <= r["shared_limit"], r
