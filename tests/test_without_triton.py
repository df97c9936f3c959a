"""Triton is a dev dependency only: `import trp` and every CPU path work without it.

A fresh process has ``sys.modules["triton"] = None`` before anything is imported, which is
what Python does for a module that is not installed: ``import triton`` raises ImportError
and ``importlib.util.find_spec("triton")`` returns None. (A fresh venv without triton was
also checked by hand: see issue 13's closing note.)"""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # as if not installed
    import importlib.util
    assert importlib.util.find_spec("triton") is None

    import torch
    import trp
    from trp import models
    from trp_kernels import ops

    x = torch.randn(2, 3, 32, 32)
    model = models.resnet_cifar(8).eval()
    with torch.no_grad():
        ref = model(x)
    compiled = trp.compile(model, rank=4, rank_multiple=1)          # backend auto: cpp, else torch
    with torch.no_grad():
        err = ((compiled(x) - ref).norm() / ref.norm()).item()
    assert err < 2, err  # rank 4 of 16: an approximation, not the same function
    backends = {r["backend"] for r in trp.summary(compiled, x).rows if r["rank"]}
    assert backends <= {"cpp", "torch"}, backends
    try:
        trp.compile(models.resnet_cifar(8).eval(), rank=4, backend="triton")
    except trp.BackendError as e:
        assert "triton is not installed" in str(e), e
    else:
        raise AssertionError("backend='triton' without triton must raise")
    digest = trp.save(compiled, sys.argv[1])
    trp.load(sys.argv[1], models.resnet_cifar(8).eval(), expected_sha256=digest)
    trp.breakdown(compiled, x[:1], repeats=2, warmup=0)
    from trp.cli import main
    assert main(["summary", "trp.models:resnet_cifar", "--input", "1,3,32,32", "--rank", "4"]) == 0
    assert "triton" not in sys.modules or sys.modules["triton"] is None
    print("ok without triton:", sorted(backends))
""")


def test_cpu_paths_run_without_triton(tmp_path):
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "m.safetensors")], capture_output=True,
                         text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ok without triton" in run.stdout
