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
