"""The Python side of the compiled CPU extension ``trp_kernels._C``.

This is the only module that imports ``_C``. When the extension is missing (a
``TRP_NO_CPP=1`` install, or a C++ build that failed) importing this module warns once and
everything else keeps working: :func:`available` is False and the ops use the "torch"
backend on CPU instead.

The functions here take and return torch tensors; they hand ``_C`` zero-copy numpy views.
They are plain kernels: no autograd (inputs are detached), no dispatch.
"""

from __future__ import annotations

import importlib.util
import operator
import warnings
from collections.abc import Sequence

import torch

_C = None
_UNAVAILABLE_REASON: str | None = None

try:
    from trp_kernels import _C  # type: ignore[attr-defined, no-redef]
except ImportError as exc:  # the .so is absent, or present but cannot be loaded
    if importlib.util.find_spec("trp_kernels._C") is None:
        _UNAVAILABLE_REASON = (
            "trp_kernels._C was not built (installed with TRP_NO_CPP=1, or the C++ build "
            "failed during install)"
        )
    else:
        _UNAVAILABLE_REASON = f"trp_kernels._C failed to load: {exc}"
    warnings.warn(
        f"The trp C++ extension is missing: {_UNAVAILABLE_REASON}. CPU ops use the "
        "'torch' backend instead (correct, but without the fused C++ kernels). To build "
        "it, reinstall without TRP_NO_CPP, e.g. `pip install -e . -v` from the repository "
        "(add TRP_CPP_REQUIRED=1 to make a failing C++ build an error and see why).",
        RuntimeWarning,
        stacklevel=2,
    )


def available() -> bool:
    """Whether the compiled extension is loaded."""
    return _C is not None


def unavailable_reason() -> str | None:
    """Why the extension is not loaded, or None when it is."""
    return _UNAVAILABLE_REASON


def build_info() -> dict:
    """How ``_C`` was built (compiler, C++ standard, build type, AVX2/AVX-512F flags,
    OpenMP) and what this CPU supports at run time. Raises RuntimeError if it is missing."""
    return dict(_require().build_info())


def conv2d_direct(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> torch.Tensor:
    """Naive direct 2-D convolution in C++: float32 CPU tensors, NCHW, groups=1, symmetric
    zero padding. Same result as ``torch.nn.functional.conv2d`` (accumulated in double, so
    usually closer to exact). Non-contiguous inputs are made contiguous first. The C++
    side names the input tensor ``input`` in its error messages."""
    lib = _require()
    x = _cpu_float32(x, "x")
    weight = _cpu_float32(weight, "weight")
    bias = None if bias is None else _cpu_float32(bias, "bias")
    out = lib.conv2d_direct(
        x.numpy(),
        weight.numpy(),
        None if bias is None else bias.numpy(),
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
    )
    return torch.from_numpy(out)


def _require():
    if _C is None:
        raise RuntimeError(f"the trp C++ extension is not available: {_UNAVAILABLE_REASON}")
    return _C


def _cpu_float32(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"conv2d_direct: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"conv2d_direct: {name} must be on the CPU, got device {t.device}")
    if t.layout != torch.strided:
        raise ValueError(f"conv2d_direct: {name} must be a dense (strided) tensor, got {t.layout}")
    if t.dtype != torch.float32:
        raise ValueError(f"conv2d_direct: {name} must be torch.float32, got {t.dtype}")
    # .numpy() refuses tensors that require grad or carry a lazy negation bit.
    return t.detach().resolve_neg().contiguous()


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, bool):
        raise TypeError(f"conv2d_direct: {name} must be an int or a pair of ints, got {v!r}")
    try:
        n = operator.index(v)
        return (n, n)
    except TypeError:
        pass
    if (
        isinstance(v, Sequence)
        and len(v) == 2
        and all(not isinstance(e, bool) and hasattr(e, "__index__") for e in v)
    ):
        return (operator.index(v[0]), operator.index(v[1]))
    raise TypeError(f"conv2d_direct: {name} must be an int or a pair of ints, got {v!r}")
