"""Kernels of trp and nothing else: torch.library ops, their plain-PyTorch reference,
the Triton kernels (GPU) and the compiled C++ extension (CPU).

`trp` calls into this package only through :mod:`trp_kernels.ops`.
"""

__version__ = "0.1.0"
