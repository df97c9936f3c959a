"""The one dispatch point between trp's modules and the kernels.

``conv_chain`` / ``lowrank_linear`` choose a backend for the input's device, dtype and
rank and call its torch.library op: the Triton ops ``trp::triton_conv_channel``,
``trp::triton_conv_spatial``, ``trp::triton_conv_tucker``, ``trp::triton_linear``
(``torch.library.triton_op``, so that
``torch.compile`` sees the kernels and ``torch.export`` keeps the ops) for the chains a
Triton kernel fuses, or ``trp::conv_chain`` / ``trp::lowrank_linear`` (custom ops with
fake kernels, running the fused C++ kernel for the chains it has, else the reference) for
the others; or the plain reference for the "torch" backend and during ONNX export, so that an
exported model is made of ordinary Conv/Gemm nodes. Every op takes the fused epilogue
(``residual`` to add, ``relu``) and shares one autograd formula (:mod:`trp_kernels._autograd`).

Backends, each able to say why it refuses an input (xformers-style dispatch):

- ``triton``: CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``, and then only
  when asked for by name);
- ``cpp``: CPU float32 tensors, needs the compiled extension ``trp_kernels._C`` (the
  fused C++ kernels);
- ``torch``: anywhere; two ``F.conv2d`` / ``F.linear`` calls.

``auto`` takes the first backend of ``AUTO_ORDER`` that accepts the input and has a fused
kernel: triton then torch on CUDA, cpp then torch on CPU. An explicit backend that cannot run raises
:class:`BackendError` listing its reasons.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional, Sequence

import torch

from trp_kernels import _autograd, cpp, reference

BACKENDS = ("triton", "cpp", "torch")
# On CPU auto takes the fused C++ kernel whenever the extension has it. Isolated layers
# without an epilogue ran 1.12-1.34x faster than oneDNN's two channels_last convs up to
# ~800 output pixels a call at batch 1 and 0.92-0.98x above on an AMD EPYC (an Intel Xeon
# run, benches/results/cpu-layers, has it slower on VGG's 512-channel layers, 0.46-0.68x
# at batch 1, and at batch 8 on most); in whole models, where the kernel also fuses the
# residual add and ReLU, it was as fast or faster than switching to the two convs above 1024 pixels in
# every case of a model-suite run made to decide this (e.g. ResNet-56 at batch 8, 12.43
# against 14.53 ms; that run was superseded by benches/results/cpu-models).
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}

# Read once, like Triton itself, which fixes interpreter mode when it is imported.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPP_DTYPES = (torch.float32,)

_triton_kernels = None
_TRITON_TUCKER_RANK = 0
_TRITON_IMPORT_ERROR = "triton is not installed"
if _TRITON_INSTALLED:
    try:  # registers trp::triton_conv_channel, trp::triton_conv_spatial, trp::triton_linear
        from trp_kernels import triton as _triton_kernels
        from trp_kernels.triton._common import MAX_RANK as _TRITON_MAX_RANK
        from trp_kernels.triton.conv_channel import conv_channel as _triton_conv_channel
        from trp_kernels.triton.conv_spatial import conv_spatial as _triton_conv_spatial
        from trp_kernels.triton.conv_tucker import MAX_RANK as _TRITON_TUCKER_RANK
        from trp_kernels.triton.conv_tucker import conv_tucker as _triton_conv_tucker
        from trp_kernels.triton.linear import linear as _triton_linear
        from trp_kernels.triton.conv_taps import conv_taps as _triton_conv_taps
        _TRITON_IMPORT_ERROR = ""
    except Exception as e:  # noqa: BLE001 - e.g. a Triton too old for the kernels
        _TRITON_IMPORT_ERROR = f"the Triton kernels could not be imported ({type(e).__name__}: {e})"

# The Triton launcher of each fused chain (its op is trp::triton_conv_<kernel>).
_TRITON_LAUNCHERS = ({"channel": _triton_conv_channel, "spatial": _triton_conv_spatial, "tucker": _triton_conv_tucker}
                     if _triton_kernels is not None else {})

# Backends whose op runs a fused kernel; the others run the reference arithmetic.
_FUSED = ({"triton"} if _triton_kernels is not None else set()) | ({"cpp"} if cpp.has_fused_kernels() else set())


class BackendError(RuntimeError):
    """An explicitly requested backend cannot run the given input."""


def refusals(backend: str, device: torch.device | str, dtype: torch.dtype,
             rank: Optional[int] = None, kernel_size: Optional[Sequence[int]] = None) -> list[str]:
    """Why ``backend`` cannot run tensors of ``device``/``dtype`` (and factors of ``rank``,
    a conv of ``kernel_size``, when given); empty: it can. The kernels' own limits are read
    from the kernels, so that dispatch and their checks cannot disagree."""
    device = torch.device(device)
    reasons = []
    if backend == "torch":
        return reasons
    if backend == "triton":
        if _TRITON_IMPORT_ERROR:
            reasons.append(_TRITON_IMPORT_ERROR)
        if device.type != "cuda" and not (device.type == "cpu" and _TRITON_INTERPRET):
            reasons.append(f"tensors are on {device.type}; triton needs cuda "
                           "(or cpu with TRITON_INTERPRET=1 set before triton is imported)")
        if dtype not in _TRITON_DTYPES:
            reasons.append(f"dtype {dtype} is not supported (triton runs {_names(_TRITON_DTYPES)})")
        if rank is not None and _triton_kernels is not None and rank > _TRITON_MAX_RANK:
            reasons.append(f"rank {rank} exceeds the Triton kernels' maximum {_TRITON_MAX_RANK}")
        return reasons
    if backend == "cpp":
        if not cpp.available():
            reasons.append(f"the C++ extension is not available ({cpp.unavailable_reason()})")
        if device.type != "cpu":
            reasons.append(f"tensors are on {device.type}; cpp needs cpu")
        if dtype not in _CPP_DTYPES:
            reasons.append(f"dtype {dtype} is not supported (cpp runs {_names(_CPP_DTYPES)})")
        if kernel_size is not None and cpp.has_fused_kernels() and max(kernel_size) > cpp.max_kernel():
            reasons.append(f"kernel size {tuple(kernel_size)} exceeds the fused C++ kernels' maximum "
                           f"{cpp.max_kernel()}")
        return reasons
    raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype,
                    rank: Optional[int] = None, kernel_size: Optional[Sequence[int]] = None) -> str:
    """The backend that will run tensors of ``device``/``dtype`` (factors of ``rank``, a conv
    of ``kernel_size``) when ``backend`` is asked for."""
    return _backend_for(backend, torch.device(device).type, dtype, rank,
                        None if kernel_size is None else tuple(kernel_size))


# What _resolve said, per (backend, device type, dtype, rank, kernel size): what is
# installed and built does not change while the process runs, and every layer call asks.
# Refusals raise and are never cached; traced code (torch.compile) resolves afresh, so no
# guard on the cache.
_RESOLVED: dict[tuple, str] = {}


def _backend_for(backend: str, device_type: str, dtype: torch.dtype, rank: Optional[int],
                 kernel_size: Optional[tuple] = None) -> str:
    if not isinstance(backend, str):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if torch.compiler.is_compiling():
        return _resolve(backend, device_type, dtype, rank, kernel_size)
    key = (backend, device_type, dtype, rank, kernel_size)
    name = _RESOLVED.get(key)
    if name is None:
        name = _RESOLVED[key] = _resolve(backend, device_type, dtype, rank, kernel_size)
    return name


def _resolve(backend: str, device_type: str, dtype: torch.dtype, rank: Optional[int],
             kernel_size: Optional[tuple]) -> str:
    if backend == "auto":
        # A backend whose fused kernel has not landed would run the same arithmetic as
        # "torch" with more dispatch overhead: auto only takes fused ones.
        for name in AUTO_ORDER.get(device_type, ("torch",)):
            if (name == "torch" or is_fused(name)) and not refusals(name, device_type, dtype, rank, kernel_size):
                return name
        return "torch"
    reasons = refusals(backend, device_type, dtype, rank, kernel_size)
    if reasons:
        raise BackendError(f"backend {backend!r} cannot run {dtype} tensors on {device_type}: "
                           + "; ".join(reasons))
    return backend


def kernel_layout(weight: torch.Tensor, backend: str = "auto",
                  kernel_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``weight`` (a factor: conv (out, in, kh, kw) or linear (out, in)) in the memory layout
    in which the kernel that ``backend`` runs for its device and dtype reads it in place:
    the same tensor when it already is, else a copy with the same values. The fused C++
    kernels read factors in place (see :mod:`trp_kernels.cpp`), so a module that keeps its
    parameters so is never computed with stale weights and pays no per-call packing; the
    other backends take any layout, and ``weight`` is returned as it is. ``kernel_size``:
    the layer's, for the backend choice (auto does not take the C++ kernels for every size)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
        raise TypeError(f"kernel_layout: weight must be a 2-D or 4-D torch.Tensor (a linear or conv factor), "
                        f"got {weight!r:.80}")
    return cpp.kernel_layout(weight) if _reads_in_place(weight, backend, kernel_size) else weight


def _reads_in_place(weight: torch.Tensor, backend: str, kernel_size: Optional[Sequence[int]]) -> bool:
    try:
        name = _backend_for(backend, weight.device.type, weight.dtype, None,
                            None if kernel_size is None else tuple(kernel_size))
    except BackendError:
        return False  # the call will say why; the layout does not matter
    return name == "cpp" and is_fused("cpp")


def is_fused(backend: str) -> bool:
    """Whether ``backend`` runs a fused kernel (False: it runs the reference arithmetic)."""
    return backend in _FUSED


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


# --- the custom ops of the non-Triton backends --------------------------------------------
# "cpp" runs the fused C++ kernel (trp_kernels.cpp) for float32 CPU tensors; a build
# without it runs the reference arithmetic through the same op, so that dispatch,
# torch.compile and autograd treat every non-torch backend alike.

@torch.library.custom_op("trp::conv_chain", mutates_args=(), device_types=("cpu", "cuda"))
def _conv_chain_op(x: torch.Tensor, weights: list[torch.Tensor], strides: list[int], paddings: list[int],
                   dilations: list[int], bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                   relu: bool, backend: str) -> torch.Tensor:
    kernel = _cpp_kernel(x, backend, weights, strides, paddings, dilations)
    if kernel is not None:
        out = cpp.fused_chain(x, weights, bias, *kernel, residual, relu)
    else:
        out = reference.conv_chain(x, weights, strides, paddings, dilations, bias, residual, relu)
    return out.contiguous(memory_format=reference.output_memory_format(x))


def _runs_cpp_kernel(x: torch.Tensor, backend: str) -> bool:
    return backend == "cpp" and "cpp" in _FUSED and x.device.type == "cpu" and x.dtype == torch.float32


def _cpp_kernel(x, backend, weights, strides, paddings, dilations) -> Optional[tuple]:
    """The fused C++ kernel's (kernel, stride, padding, dilation) for this call, or None."""
    if not _runs_cpp_kernel(x, backend):
        return None
    return backend_kernel(backend, [w.shape for w in weights], strides, paddings, dilations)


@_conv_chain_op.register_fake
def _(x, weights, strides, paddings, dilations, bias, residual, relu, backend):
    shapes = [w.shape for w in weights]
    hw = reference.chain_output_hw("trp::conv_chain", x.shape[-2:], shapes, strides, paddings, dilations)
    return torch.empty((x.shape[0], shapes[-1][0], *hw), dtype=x.dtype, device=x.device,
                       memory_format=reference.output_memory_format(x))


_autograd.register(_conv_chain_op, "chain")


@torch.library.custom_op("trp::lowrank_linear", mutates_args=(), device_types=("cpu", "cuda"))
def _lowrank_linear_op(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                       bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], relu: bool,
                       backend: str) -> torch.Tensor:
    if _runs_cpp_kernel(x, backend):
        return cpp.lowrank_linear(x, weight1, weight2, bias, residual, relu)
    return reference.lowrank_linear(x, weight1, weight2, bias, residual, relu).contiguous()


@_lowrank_linear_op.register_fake
def _(x, weight1, weight2, bias, residual, relu, backend):
    return x.new_empty((*x.shape[:-1], weight2.shape[0]))


_autograd.register(_lowrank_linear_op, "linear")


# --- what trp calls ------------------------------------------------------------------

# The fused kernel (if any) of each chain, per (shapes, geometry): asked on every call.
_KERNELS: dict[tuple, Optional[tuple]] = {}


def match_kernel(shapes: Sequence[Sequence[int]], strides: Sequence[int], paddings: Sequence[int],
                 dilations: Sequence[int]) -> Optional[tuple]:
    """:func:`trp_kernels.reference.match_kernel` of a chain's weight shapes, remembered."""
    key = (tuple(tuple(s) for s in shapes), tuple(strides), tuple(paddings), tuple(dilations))
    if torch.compiler.is_compiling():
        return reference.match_kernel(*key)
    if key not in _KERNELS:
        _KERNELS[key] = reference.match_kernel(*key)
    return _KERNELS[key]


# The chains each fused backend has a kernel for (reference.match_kernel names them), with
# the widest intermediate that kernel takes below the backend's own limit (None: no other).
BACKEND_KERNELS = {"cpp": dict.fromkeys(reference.KERNELS),
                   "triton": {**dict.fromkeys(reference.TWO_STAGE_KERNELS), "tucker": _TRITON_TUCKER_RANK}}


def backend_kernel(backend: str, shapes: Sequence[Sequence[int]], strides: Sequence[int], paddings: Sequence[int],
                   dilations: Sequence[int]) -> Optional[tuple]:
    """:func:`match_kernel` when ``backend`` has that kernel for these shapes, else None."""
    kernel = match_kernel(shapes, strides, paddings, dilations)
    kernels = BACKEND_KERNELS.get(backend, {})
    if kernel is None or kernel[0] not in kernels:
        return None
    limit = kernels[kernel[0]]
    return kernel if limit is None or chain_rank(shapes) <= limit else None


def chain_kernel(shapes: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The largest (kh, kw) among a chain's stages (what the backends' limits are about)."""
    kh = kw = 1
    for s in shapes:
        kh, kw = max(kh, s[2]), max(kw, s[3])
    return (kh, kw)


def chain_rank(shapes: Sequence[Sequence[int]]) -> Optional[int]:
    """The widest intermediate of a chain (None for one stage)."""
    rank = None
    for s in shapes[:-1]:
        rank = s[0] if rank is None else max(rank, s[0])
    return rank


def _plain_eager(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call can skip the op and run the kernel directly: plain eager execution
    with nothing for autograd to record. The op's Python dispatch costs about 20 µs a call,
    as much as a small layer's whole kernel at batch 1. Anything that traces (torch.compile,
    torch.export, fake tensors, a dispatch mode) or needs gradients goes through the op."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or (grad and t.requires_grad):
            return False
    return True


def run_kept(kept: list, x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor] = None,
             residual: Optional[torch.Tensor] = None, relu: bool = False) -> Optional[torch.Tensor]:
    """A layer's call run by what :func:`conv_chain` kept in ``kept`` (its ``kept``
    argument) from the layer's last call, or None when it cannot (nothing kept, other
    shapes or tensors, or a call that must go through the op: tracing, gradients): then
    call :func:`conv_chain`. The layer clears ``kept[0]`` when its backend changes."""
    if not _plain_eager(x, *weights, bias, residual):
        return None  # (kept is not even read: a traced graph must not depend on it)
    bound = kept[0]
    return None if bound is None else bound(x, weights, bias, residual, relu)


def conv_chain(x: torch.Tensor, weights: Sequence[torch.Tensor], strides: Sequence[int],
               paddings: Sequence[int], dilations: Sequence[int], bias: Optional[torch.Tensor] = None,
               residual: Optional[torch.Tensor] = None, relu: bool = False, backend: str = "auto",
               kept: Optional[list] = None) -> torch.Tensor:
    """A factored conv as a chain of convs: ``weights[i]`` with stage i's geometry
    (``strides[2i:2i+2]``, ``paddings[4i:4i+4]`` as top, bottom, left, right,
    ``dilations[2i:2i+2]``), the bias on the last stage, then ``+ residual`` and ReLU when
    given (the fused epilogue). The geometry is trusted: it is checked once, when the layer
    is built (:func:`trp_kernels.reference.check_chain`).

    ``kept``: a one-element list the calling layer owns; a call that runs the fused C++
    kernel directly stores there what lets :func:`run_kept` repeat it for the layer's next
    call with about 25 µs less Python (a ResNet-50 has 50 such layers)."""
    if torch.onnx.is_in_onnx_export():
        return reference.conv_chain(x, weights, strides, paddings, dilations, bias, residual, relu)
    shapes = [w.shape for w in weights]
    name = _backend_for(backend, x.device.type, x.dtype, chain_rank(shapes), chain_kernel(shapes))
    if name == "torch":
        return reference.conv_chain(x, weights, strides, paddings, dilations, bias, residual, relu)
    if name == "cpp" and x.dim() == 4:
        # The C++ kernel computes in channels_last: converting here (a no-op once the model
        # is channels_last) makes the output channels_last too, so an NCHW model converts
        # once, at its first low-rank layer, and PyTorch's own ops keep the layout after.
        x = x.contiguous(memory_format=torch.channels_last)
    direct = _plain_eager(x, *weights, bias, residual)
    kernel = backend_kernel(name, shapes, strides, paddings, dilations)
    if name == "triton" and kernel is not None:
        args = (x, *weights, bias, residual, list(kernel[1]), list(kernel[2]), list(kernel[3]), relu)
        if direct:
            return _TRITON_LAUNCHERS[kernel[0]](*args)
        return getattr(torch.ops.trp, f"triton_conv_{kernel[0]}")(*args)
    if direct and kernel is not None and _runs_cpp_kernel(x, name):
        if kept is None:
            return cpp.fused_chain(x, weights, bias, *kernel, residual, relu)
        out, kept[0] = cpp.bound_chain(x, weights, bias, *kernel, residual, relu)
        return out
    return torch.ops.trp.conv_chain(x, list(weights), list(strides), list(paddings), list(dilations), bias,
                                    residual, relu, name)


def lowrank_conv2d(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                   bias: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], kernel: str, backend: str = "auto",
                   residual: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """The two-stage kernel ``kernel`` ('channel' or 'spatial') for a conv of the given
    geometry (``padding`` top, bottom, left, right): :func:`conv_chain` of its
    :func:`trp_kernels.reference.kernel_stages`."""
    return conv_chain(x, (weight1, weight2), *reference.kernel_stages(kernel, stride, padding, dilation), bias,
                      residual, relu, backend)


def lowrank_linear(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                   bias: Optional[torch.Tensor], backend: str = "auto",
                   residual: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """A factored linear layer: ``x @ weight1.T @ weight2.T + bias`` (+ residual, ReLU)."""
    if torch.onnx.is_in_onnx_export():
        return reference.lowrank_linear(x, weight1, weight2, bias, residual, relu)
    name = _backend_for(backend, x.device.type, x.dtype, weight1.shape[0])
    if name == "torch":
        return reference.lowrank_linear(x, weight1, weight2, bias, residual, relu)
    direct = _plain_eager(x, weight1, weight2, bias, residual)
    if name == "triton":
        if direct:
            return _triton_linear(x, weight1, weight2, bias, residual, relu)
        return torch.ops.trp.triton_linear(x, weight1, weight2, bias, residual, relu)
    if direct and _runs_cpp_kernel(x, name):
        return cpp.lowrank_linear(x, weight1, weight2, bias, residual, relu)
    return torch.ops.trp.lowrank_linear(x, weight1, weight2, bias, residual, relu, name)


# --- tap-sparse convs (SPP) ------------------------------------------------------------

def _run_taps(x, taps, kept, bias, residual, kernel_size, stride, padding, dilation, relu, backend):
    if _runs_cpp_kernel(x, backend):
        out = cpp.conv_taps(x, taps, kept, bias, kernel_size, stride, padding, dilation, residual, relu)
    elif backend == "triton" and _triton_kernels is not None and x.device.type == "cuda":
        out = _triton_conv_taps(x, taps, kept, bias, residual, kernel_size, stride, padding, dilation, relu)
    else:
        out = reference.conv_taps(x, taps, kept, bias, kernel_size, stride, padding, dilation, residual, relu)
    return out.contiguous(memory_format=reference.output_memory_format(x))


@torch.library.custom_op("trp::conv_taps", mutates_args=(), device_types=("cpu", "cuda"))
def _conv_taps_op(x: torch.Tensor, taps: torch.Tensor, kept: torch.Tensor, bias: Optional[torch.Tensor],
                  residual: Optional[torch.Tensor], kernel_size: list[int], stride: list[int], padding: list[int],
                  dilation: list[int], relu: bool, backend: str) -> torch.Tensor:
    return _run_taps(x, taps, kept, bias, residual, kernel_size, stride, padding, dilation, relu, backend)


@_conv_taps_op.register_fake
def _(x, taps, kept, bias, residual, kernel_size, stride, padding, dilation, relu, backend):
    hw = reference.checked_output_hw("trp::conv_taps", x.shape[-2:], kernel_size, stride, padding, dilation)
    return torch.empty((x.shape[0], taps.shape[1], *hw), dtype=x.dtype, device=x.device,
                       memory_format=reference.output_memory_format(x))


def conv_taps(x: torch.Tensor, taps: torch.Tensor, kept: torch.Tensor, bias: Optional[torch.Tensor],
              kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
              residual: Optional[torch.Tensor] = None, relu: bool = False, backend: str = "auto",
              plan: Optional[list] = None) -> torch.Tensor:
    """A tap-sparse conv (SPP's pruned convs) at the cost of its kept taps: the conv over the
    im2col columns ``kept`` only, their weights ``taps`` (n_kept, n) (the packed form of
    :func:`trp_kernels.reference.pack_taps`), + bias, + residual, ReLU. ``padding``: (top,
    bottom, left, right). The fused C++ kernel on CPU float32, the Triton kernel on CUDA,
    else the reference; a call that needs gradients runs the reference (differentiable in
    ``taps``, so pruned taps get none), and so does ONNX export (a dense conv whose pruned
    taps are zero: exact).

    ``plan``: as :func:`conv_chain`'s ``kept``, a one-element list the calling layer owns,
    where a direct call of the C++ kernel stores what lets :func:`run_kept` repeat it (with
    weights ``(taps, kept)``)."""
    if torch.onnx.is_in_onnx_export():
        return reference.conv_taps(x, taps, kept, bias, kernel_size, stride, padding, dilation, residual, relu)
    name = _backend_for(backend, x.device.type, x.dtype, None, tuple(kernel_size))
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, taps, bias, residual))
    if name == "torch" or grad or not is_fused(name):
        return reference.conv_taps(x, taps, kept, bias, kernel_size, stride, padding, dilation, residual, relu)
    if name == "cpp" and x.dim() == 4:  # (as conv_chain does: the kernel computes in channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    args = (x, taps, kept, bias, residual, list(kernel_size), list(stride), list(padding), list(dilation), relu, name)
    if _plain_eager(x, taps, kept, bias, residual):
        if plan is not None and _runs_cpp_kernel(x, name):
            out, plan[0] = cpp.bound_taps(x, taps, kept, bias, kernel_size, stride, padding, dilation, residual, relu)
            return out
        return _run_taps(*args)
    return torch.ops.trp.conv_taps(*args)
