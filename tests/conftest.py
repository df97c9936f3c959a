import os

import torch

# Triton reads TRITON_INTERPRET once, when it is imported (torch does not import it): with
# no GPU, the Triton kernel tests run on CPU tensors through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def isa(request):
    """Run the test with the named C++ kernel build active (parametrize it indirectly with
    "avx512", "avx2" or "generic"), restoring the default after."""
    from trp_kernels import cpp

    lib = cpp._require()
    default = lib.isa()
    if not lib.set_isa(request.param):
        pytest.skip(f"this CPU or build has no {request.param} kernels")
    yield request.param
    lib.set_isa(default)
