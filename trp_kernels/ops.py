"""The one dispatch point between trp's modules and the kernels.

``lowrank_conv2d`` / ``lowrank_linear`` choose a backend for the input's device and dtype
and call the torch.library op ``trp::lowrank_conv2d`` / ``trp::lowrank_linear`` (whose
fake kernels make ``torch.compile`` and ``torch.export`` trace through them without a
graph break), or the plain reference for the "torch" backend and during ONNX export, so
that an exported model is made of ordinary Conv/Gemm nodes.

Backends, each able to say why it refuses an input (xformers-style dispatch):

- ``triton``: CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``, and then only
  when asked for by name);
- ``cpp``: CPU float32 tensors, needs the compiled extension ``trp_kernels._C``;
- ``torch``: anywhere; two ``F.conv2d`` / ``F.linear`` calls.

``auto`` takes the first backend that accepts the input and has a fused kernel: triton
then torch on CUDA, cpp then torch on CPU. An explicit backend that cannot run raises :class:`BackendError`
listing its reasons.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional, Sequence

import torch

from trp_kernels import cpp, reference

BACKENDS = ("triton", "cpp", "torch")
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}

# Read once, like Triton itself, which fixes interpreter mode when it is imported.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPP_DTYPES = (torch.float32,)

# Which function computes each backend's op. The fused kernels replace these entries as
# they land; until then both non-torch backends run the reference arithmetic.
_CONV_KERNELS = {"triton": reference.lowrank_conv2d, "cpp": reference.lowrank_conv2d}
_LINEAR_KERNELS = {"triton": reference.lowrank_linear, "cpp": reference.lowrank_linear}


class BackendError(RuntimeError):
    """An explicitly requested backend cannot run the given input."""


def refusals(backend: str, device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Why ``backend`` cannot run tensors of ``device``/``dtype`` (empty: it can)."""
    device = torch.device(device)
    reasons = []
    if backend == "torch":
        return reasons
    if backend == "triton":
        if not _TRITON_INSTALLED:
            reasons.append("triton is not installed")
        if device.type != "cuda" and not (device.type == "cpu" and _TRITON_INTERPRET):
            reasons.append(f"tensors are on {device.type}; triton needs cuda "
                           "(or cpu with TRITON_INTERPRET=1 set before triton is imported)")
        if dtype not in _TRITON_DTYPES:
            reasons.append(f"dtype {dtype} is not supported (triton runs {_names(_TRITON_DTYPES)})")
        return reasons
    if backend == "cpp":
        if not cpp.available():
            reasons.append(f"the C++ extension is not available ({cpp.unavailable_reason()})")
        if device.type != "cpu":
            reasons.append(f"tensors are on {device.type}; cpp needs cpu")
        if dtype not in _CPP_DTYPES:
            reasons.append(f"dtype {dtype} is not supported (cpp runs {_names(_CPP_DTYPES)})")
        return reasons
    raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend that will run tensors of ``device``/``dtype`` when ``backend`` is asked for."""
    device = torch.device(device)
    if backend == "auto":
        # A backend whose fused kernel has not landed would run the same arithmetic as
        # "torch" with more dispatch overhead: auto only takes fused ones.
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            if (name == "torch" or is_fused(name)) and not refusals(name, device, dtype):
                return name
        return "torch"
    reasons = refusals(backend, device, dtype)
    if reasons:
        raise BackendError(f"backend {backend!r} cannot run {dtype} tensors on {device}: "
                           + "; ".join(reasons))
    return backend


def is_fused(backend: str) -> bool:
    """Whether ``backend`` runs a fused kernel (False: it runs the reference arithmetic)."""
    return backend in _CONV_KERNELS and _CONV_KERNELS[backend] is not reference.lowrank_conv2d


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout both the real and the fake kernels give the output: the input's."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# --- trp::lowrank_conv2d -------------------------------------------------------------

@torch.library.custom_op("trp::lowrank_conv2d", mutates_args=(), device_types=("cpu", "cuda"))
def _lowrank_conv2d_op(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                       bias: Optional[torch.Tensor], stride: list[int], padding: list[int],
                       dilation: list[int], scheme: str, backend: str) -> torch.Tensor:
    out = _CONV_KERNELS[backend](x, weight1, weight2, bias, stride, padding, dilation, scheme)
    return out.contiguous(memory_format=_output_memory_format(x))


@_lowrank_conv2d_op.register_fake
def _(x, weight1, weight2, bias, stride, padding, dilation, scheme, backend):
    first, second = reference.factor_conv_params(scheme, stride, padding, dilation)
    hw = reference.conv_output_hw(x.shape[-2:], weight1.shape[-2:], *first)
    hw = reference.conv_output_hw(hw, weight2.shape[-2:], *second)
    return torch.empty((x.shape[0], weight2.shape[0], *hw), dtype=x.dtype, device=x.device,
                       memory_format=_output_memory_format(x))


def _conv_setup_context(ctx, inputs, output):
    x, weight1, weight2, bias, stride, padding, dilation, scheme, _backend = inputs
    ctx.save_for_backward(x, weight1, weight2)
    ctx.geometry = (stride, padding, dilation, scheme)
    ctx.has_bias = bias is not None


def _conv_backward(ctx, grad_out):
    x, weight1, weight2 = ctx.saved_tensors
    grads = reference.lowrank_conv2d_backward(grad_out, x, weight1, weight2, ctx.has_bias,
                                              *ctx.geometry, ctx.needs_input_grad[:4])
    return (*grads, None, None, None, None, None)


_lowrank_conv2d_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)


# --- trp::lowrank_linear -------------------------------------------------------------

@torch.library.custom_op("trp::lowrank_linear", mutates_args=(), device_types=("cpu", "cuda"))
def _lowrank_linear_op(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                       bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    return _LINEAR_KERNELS[backend](x, weight1, weight2, bias).contiguous()


@_lowrank_linear_op.register_fake
def _(x, weight1, weight2, bias, backend):
    return x.new_empty((*x.shape[:-1], weight2.shape[0]))


def _linear_setup_context(ctx, inputs, output):
    x, weight1, weight2, bias, _backend = inputs
    ctx.save_for_backward(x, weight1, weight2)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad_out):
    x, weight1, weight2 = ctx.saved_tensors
    grads = reference.lowrank_linear_backward(grad_out, x, weight1, weight2, ctx.has_bias,
                                              ctx.needs_input_grad[:4])
    return (*grads, None)


_lowrank_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# --- what trp calls ------------------------------------------------------------------

def lowrank_conv2d(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                   bias: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], scheme: str, backend: str = "auto") -> torch.Tensor:
    """A factored conv: ``weight1`` (r, c, kh1, kw1) then ``weight2`` (n, r, kh2, kw2) + bias.

    ``padding`` is ``(top, bottom, left, right)`` of the original conv; ``scheme`` says how
    stride, padding and dilation split between the factors (see
    :func:`trp_kernels.reference.factor_conv_params`).
    """
    if torch.onnx.is_in_onnx_export():
        return reference.lowrank_conv2d(x, weight1, weight2, bias, stride, padding, dilation, scheme)
    name = resolve_backend(backend, x.device, x.dtype)
    if name == "torch":
        return reference.lowrank_conv2d(x, weight1, weight2, bias, stride, padding, dilation, scheme)
    return torch.ops.trp.lowrank_conv2d(x, weight1, weight2, bias, list(stride), list(padding),
                                        list(dilation), scheme, name)


def lowrank_linear(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                   bias: Optional[torch.Tensor], backend: str = "auto") -> torch.Tensor:
    """A factored linear layer: ``x @ weight1.T @ weight2.T + bias``."""
    if torch.onnx.is_in_onnx_export():
        return reference.lowrank_linear(x, weight1, weight2, bias)
    name = resolve_backend(backend, x.device, x.dtype)
    if name == "torch":
        return reference.lowrank_linear(x, weight1, weight2, bias)
    return torch.ops.trp.lowrank_linear(x, weight1, weight2, bias, name)
