import os

# Triton reads this once, at import: the Triton kernel tests run on CPU tensors through
# the interpreter when no GPU is present. Set it before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("CUDA_VISIBLE_DEVICES") else "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b``."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
