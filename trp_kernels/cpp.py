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
import weakref
from collections.abc import Sequence
from typing import Optional

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


def has_fused_kernels() -> bool:
    """Whether the loaded extension has the fused low-rank kernels (an older build may not)."""
    return _C is not None and hasattr(_C, "lowrank_conv")


def max_kernel() -> int:
    """The largest kernel height or width the fused kernels take (the C++ side's own limit)."""
    return int(_require().MAX_KERNEL)


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


# --- fused low-rank layers --------------------------------------------------------------

# The kernels read each factor in place, as the row-major GEMM panel [kh*kw*in][out]: a
# conv factor (out, in, kh, kw) whose memory runs kh, kw, in, out ("HWIO"), a linear factor
# (out, in) stored transposed. trp's modules keep their factors in this layout
# (kernel_layout, through trp_kernels.ops), so the kernel reads the parameters themselves:
# there is no packed copy that an optimizer, a ``.data`` write or a numpy view could leave
# behind. A factor in another layout is copied into a panel on every call, never cached.

def _hwio(w: torch.Tensor) -> torch.Tensor:
    return w.permute(2, 3, 1, 0) if w.dim() == 4 else w.t()


def in_kernel_layout(w: torch.Tensor) -> bool:
    """Whether the fused kernels read ``w`` (a 4-D conv or 2-D linear factor) in place."""
    return _hwio(w).is_contiguous() and not w.is_neg()


def kernel_layout(w: torch.Tensor) -> torch.Tensor:
    """``w`` itself when the kernels read it in place, else a copy with the same values,
    shape and dtype laid out so (a dense permutation of the standard strides, which
    optimizers, autograd and ``state_dict`` carry like any other)."""
    if in_kernel_layout(w):
        return w
    order = (3, 2, 0, 1) if w.dim() == 4 else (1, 0)
    return _hwio(w.resolve_neg()).contiguous().permute(*order)


def _panel(w: torch.Tensor, name: str) -> tuple["numpy.ndarray", bool]:  # noqa: F821
    """(``w`` as the kernel's panel, whether that panel is ``w``'s own memory)."""
    t = _checked(w, name)
    view = t.data_ptr() == w.data_ptr() and in_kernel_layout(t)
    return _hwio(t).contiguous().view(-1, t.shape[0]).numpy(), view


def reads_as_is(w: torch.Tensor) -> bool:
    """Whether the dense kernel reads the 1×1 conv weight ``w`` in place as PyTorch keeps
    it: (out, in, 1, 1), contiguous (its "dense_oi" form: the GEMM the other way round, so
    that a dense 1×1 conv need not take :func:`kernel_layout`, which makes PyTorch's own
    conv reorder the weight on every call)."""
    return (w.dim() == 4 and tuple(w.shape[2:]) == (1, 1) and w.is_contiguous() and not w.is_neg()
            and w.dtype == torch.float32 and w.device.type == "cpu")


def _nhwc(t: torch.Tensor) -> "numpy.ndarray":  # noqa: F821
    """A channels_last-contiguous (N, C, H, W) tensor's memory as an (N, H, W, C) array."""
    return t.numpy().transpose(0, 2, 3, 1)


def _checked(t: torch.Tensor, name: str) -> torch.Tensor:
    """A float32 CPU tensor, detached, its lazy negation bit resolved (a copy then: the
    memory holds minus the values); anything else raises naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"lowrank_conv2d: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype is not torch.float32 or not t.is_cpu or t.layout is not torch.strided:
        _cpu_float32(t, name, "lowrank_conv2d", contiguous=False)  # raises the precise error
    if t.requires_grad:
        t = t.detach()
    return t.resolve_neg() if t.is_neg() else t


def _array(t: torch.Tensor, name: str) -> "numpy.ndarray":  # noqa: F821
    """A checked tensor's memory as numpy, zero-copy unless it had to be resolved."""
    return _checked(t, name).numpy()


def _geometry(x_shape, shapes, stride, padding, dilation, kernel) -> tuple:
    """The output shape and the binding's geometry ints of a call, checked (once per kept
    plan: later calls of a layer skip this)."""
    from trp_kernels.reference import KERNEL_STAGES, check_geometry, checked_output_hw, kernel_size

    if kernel not in KERNEL_STAGES:
        raise ValueError(f"lowrank_conv2d: scheme must be one of {tuple(KERNEL_STAGES)}, got {kernel!r}")
    if len(shapes) != KERNEL_STAGES[kernel]:
        raise ValueError(f"lowrank_conv2d: kernel {kernel!r} takes {KERNEL_STAGES[kernel]} weights, got "
                         f"{len(shapes)}")
    if len(x_shape) != 4 or any(len(s) != 4 for s in shapes):
        names = ", ".join(["x"] + [f"weight{i + 1}" for i in range(len(shapes))])
        raise ValueError(f"lowrank_conv2d: {names} must be 4-D, got shapes {tuple(x_shape)}, "
                         + ", ".join(str(tuple(s)) for s in shapes))
    if shapes[0][1] != x_shape[1] or any(b[1] != a[0] for a, b in zip(shapes, shapes[1:])):
        raise ValueError(f"lowrank_conv2d: shapes do not chain: x {tuple(x_shape)}, "
                         + ", ".join(f"weight{i + 1} {tuple(s)}" for i, s in enumerate(shapes)))
    check_geometry("lowrank_conv2d", stride, padding, dilation)
    kh, kw = kernel_size(kernel, shapes)
    ho, wo = checked_output_hw("lowrank_conv2d", x_shape[-2:], (kh, kw), stride, padding, dilation)
    out_shape = (x_shape[0], shapes[-1][0], ho, wo)
    return (out_shape, int(kh), int(kw), (int(stride[0]), int(stride[1])), (int(padding[0]), int(padding[2])),
            (int(dilation[0]), int(dilation[1])))


def lowrank_conv2d(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor, bias: Optional[torch.Tensor],
                   stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], scheme: str,
                   residual: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """``reference.lowrank_conv2d`` in one fused C++ kernel: float32 CPU tensors.

    The kernel runs in channels_last and its output is always channels_last; an NCHW input
    (or residual) is converted on entry. (``trp_kernels.ops`` hands it channels_last input,
    so a model converts once, at its first low-rank layer.)
    """
    return _fused(x, (weight1, weight2), bias, stride, padding, dilation, scheme, residual, relu, False)


def fused_chain(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor], kernel: str,
                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                residual: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """The conv chain ``weights`` in the fused C++ kernel ``kernel`` (one of
    ``reference.KERNELS``; ``reference.match_kernel`` names it and gives the conv geometry
    it takes: the k×k stage's for channel and tucker, the whole conv's for spatial and
    dense). Float32 CPU tensors; channels_last output, as :func:`lowrank_conv2d`."""
    return _fused(x, tuple(weights), bias, stride, padding, dilation, kernel, residual, relu, False)


class Bound:
    """A kept plan bound to one layer's call: the input's shape, the weights' and the bias's
    identity and memory (address, shape, strides), the epilogue. Calling it with the layer's
    next call runs the plan when all of that still holds, and returns None otherwise (go
    the checked way, :func:`fused_chain`). It skips :func:`fused_chain`'s search for the
    plan by key, most of a small layer's Python time at batch 1 (see
    ``trp_kernels.ops.conv_chain``'s ``kept``)."""

    __slots__ = ("plan", "x_shape", "out_shape", "params", "relu", "residual")

    def __init__(self, plan, x, weights, bias, out_shape, residual, relu):
        self.plan, self.x_shape, self.out_shape = plan, x.shape, out_shape
        self.params = tuple((t, *_tag(t)) for t in (*weights, bias))
        self.relu, self.residual = bool(relu), residual is not None

    def __call__(self, x, weights, bias, residual, relu) -> Optional[torch.Tensor]:
        if (not _plannable(x) or x.shape != self.x_shape or bool(relu) != self.relu
                or (residual is not None) != self.residual or len(weights) + 1 != len(self.params)):
            return None
        for t, (kept, *tag) in zip((*weights, bias), self.params):
            if t is not kept or (t is not None and tuple(tag) != _tag(t)):
                return None
        return _run(self.plan, x, self.out_shape, residual)


def bound_chain(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor], kernel: str,
                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                residual: Optional[torch.Tensor] = None, relu: bool = False) -> tuple[torch.Tensor, Optional[Bound]]:
    """:func:`fused_chain`, and the :class:`Bound` of its plan for the layer's next call
    (None when no plan was kept: one over copies would not see later writes)."""
    weights = tuple(weights)
    out = _fused(x, weights, bias, stride, padding, dilation, kernel, residual, relu, False)
    hit = _kept_plan(x, weights, bias, stride, padding, dilation, kernel, residual, relu, False)
    return out, None if hit is None else Bound(hit[0], x, weights, bias, hit[3], residual, relu)


# Checked calls kept for the next call of the same layer on the same shapes
# (``_C.LowRankPlan``): per first-weight tensor, a weak reference to it and its plans by
# key. A plan is kept only when it reads the weights' and the bias's own memory (never a
# copy), so it always computes with their current values; the key (each tensor's address,
# shape and strides) and the weak references make sure they are still the caller's tensors.
_PLANS: dict[int, tuple] = {}
_PLAN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _tag(t: Optional[torch.Tensor]) -> tuple:
    return (None,) if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.is_neg())


def _plan_key(x, weights, bias, stride, padding, dilation, scheme, residual, relu, linear) -> tuple:
    return (x.shape, *map(_tag, weights), _tag(bias), tuple(stride), tuple(padding), tuple(dilation),
            scheme, bool(relu), residual is None, linear)


def _run_plan(x, weights, bias, stride, padding, dilation, scheme, residual, relu, linear):
    """The output of a call that a kept plan can run (None: go the checked way). Every
    buffer's type, dtype, device, layout, shape and contiguity is checked here first."""
    if not _plannable(x):
        return None  # (the first weight's entry exists only for a weight checked to be a float32 CPU tensor)
    hit = _kept_plan(x, weights, bias, stride, padding, dilation, scheme, residual, relu, linear)
    return None if hit is None else _run(hit[0], x, hit[3], residual)


def _plannable(t) -> bool:
    """Whether a kept plan can read ``t`` in place: a plain float32 CPU tensor in channels_last."""
    return (type(t) in _PLAN_TYPES and t.dtype is torch.float32 and t.is_cpu and not t.is_neg()
            and t.is_contiguous(memory_format=torch.channels_last))


def _run(plan, x, out_shape, residual) -> Optional[torch.Tensor]:
    """A kept plan's output for input ``x`` (checked by the caller) and ``residual``, or None
    when the residual is not one the plan can read in place."""
    res_ptr = 0
    if residual is not None:
        if not _plannable(residual) or residual.shape != out_shape:
            return None
        res_ptr = residual.data_ptr()
    out = torch.empty(out_shape, dtype=torch.float32, memory_format=torch.channels_last)
    if out.numel():
        plan.run(x.data_ptr(), out.data_ptr(), res_ptr, torch.get_num_threads())
    return out


def _kept_plan(x, weights, bias, stride, padding, dilation, scheme, residual, relu, linear) -> Optional[tuple]:
    """The kept (plan, weight refs, bias ref, output shape) of a call, or None."""
    entry = _PLANS.get(id(weights[0]))
    if entry is None or entry[0]() is not weights[0]:
        return None
    hit = entry[1].get(_plan_key(x, weights, bias, stride, padding, dilation, scheme, residual, relu, linear))
    if (hit is None or any(ref() is not w for ref, w in zip(hit[1], weights[1:]))
            or (bias is not None and hit[2]() is not bias)):
        return None
    return hit


def _keep_plan(plan, out_shape, x, weights, bias, stride, padding, dilation, scheme, residual, relu, linear):
    first = weights[0]
    entry = _PLANS.get(id(first))
    if entry is None or entry[0]() is not first:
        if entry is None:
            weakref.finalize(first, _PLANS.pop, id(first), None)
        entry = _PLANS[id(first)] = (weakref.ref(first), {})
    key = _plan_key(x, weights, bias, stride, padding, dilation, scheme, residual, relu, linear)
    plans = entry[1]
    for old in [k for k in plans if k[1] != key[1]]:  # the first weight has new memory: those can never
        del plans[old]                                 # run again, and they keep the old memory alive
    if len(plans) >= 16:  # shapes that vary call after call
        plans.clear()
    plans[key] = (plan, tuple(weakref.ref(w) for w in weights[1:]),
                  (lambda: None) if bias is None else weakref.ref(bias), out_shape)


def _fused(x, weights, bias, stride, padding, dilation, scheme, residual, relu, linear: bool):
    # linear: the weights are the 2-D (r, c) and (n, r) of a linear layer, used as 1x1
    # kernels.
    lib = _require()
    out = _run_plan(x, weights, bias, stride, padding, dilation, scheme, residual, relu, linear)
    if out is not None:
        return out
    xa = _array(x, "x")
    bind = scheme
    if scheme == "dense" and len(weights) == 1 and not linear and reads_as_is(weights[0]):
        bind, panels = "dense_oi", [(weights[0].detach().view(weights[0].shape[0], -1).numpy(), True)]
    else:
        panels = [_panel(w, f"weight{i + 1}") for i, w in enumerate(weights)]
    ba = None if bias is None else _array(bias, "bias")
    ra = None if residual is None else _array(residual, "residual")
    shapes = [tuple(w.shape) + (1, 1) if linear else tuple(w.shape) for w in weights]
    out_shape, kh, kw, stride2, pad2, dil2 = _geometry(xa.shape, shapes, stride, padding, dilation, scheme)
    out = torch.empty(out_shape, dtype=torch.float32, memory_format=torch.channels_last)
    if ra is not None and ra.shape != out_shape:
        raise ValueError(f"lowrank_conv2d: residual must have the output's shape {out_shape}, "
                         f"got {tuple(residual.shape)}")
    if out.numel():
        cl = torch.channels_last
        if not x.is_contiguous(memory_format=cl):
            xa = _array(x.contiguous(memory_format=cl), "x")
        if ra is not None and not residual.is_contiguous(memory_format=cl):
            ra = _array(residual.contiguous(memory_format=cl), "residual")
        bias_view = bias is None or (bias.is_contiguous() and not bias.is_neg())
        arrays = [a for a, _ in panels] + [None] * (3 - len(panels))
        # The plan checks every array it is given; it then runs on those very arrays.
        plan = lib.LowRankPlan(
            xa.transpose(0, 2, 3, 1), arrays[0], arrays[1],
            None if ba is None else (ba if bias.is_contiguous() else _array(bias.contiguous(), "bias")),
            None if ra is None else ra.transpose(0, 2, 3, 1), _nhwc(out), bind, kh, kw, stride2, pad2, dil2,
            bool(relu), arrays[2])
        plan.run(xa.ctypes.data, out.data_ptr(), 0 if ra is None else ra.ctypes.data, torch.get_num_threads())
        if all(view for _, view in panels) and bias_view:  # a plan over copies would not see later writes
            _keep_plan(plan, out_shape, x, weights, bias, stride, padding, dilation, scheme, residual, relu, linear)
    return out


def lowrank_linear(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor, bias: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """``reference.lowrank_linear`` in the fused kernel: the rows of ``x`` are the pixels of a
    1×1 channel-scheme conv."""
    for name, t in (("x", x), ("weight1", weight1), ("weight2", weight2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lowrank_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, w in (("weight1", weight1), ("weight2", weight2)):
        if w.dim() != 2:
            raise ValueError(f"lowrank_linear: {name} must be 2-D, got shape {tuple(w.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight1.shape[1] or weight2.shape[1] != weight1.shape[0]:
        raise ValueError(f"lowrank_linear: shapes do not chain: x {tuple(x.shape)} (last dimension = in "
                         f"features), weight1 {tuple(weight1.shape)}, weight2 {tuple(weight2.shape)}")
    lead, k = x.shape[:-1], x.shape[-1]
    x4 = x.reshape(-1, k)[:, :, None, None]  # the 2-D weights go as they are: their own memory is the panel
    res4 = None if residual is None else residual.reshape(-1, weight2.shape[0])[:, :, None, None]
    out = _fused(x4, (weight1, weight2), bias, (1, 1), (0, 0, 0, 0), (1, 1), "channel", res4, relu, True)
    return out.reshape(*lead, weight2.shape[0]).contiguous()


def _require():
    if _C is None:
        raise RuntimeError(f"the trp C++ extension is not available: {_UNAVAILABLE_REASON}")
    return _C


def _cpu_float32(t: torch.Tensor, name: str, fn: str = "conv2d_direct", contiguous: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{fn}: {name} must be on the CPU, got device {t.device}")
    if t.layout != torch.strided:
        raise ValueError(f"{fn}: {name} must be a dense (strided) tensor, got {t.layout}")
    if t.dtype != torch.float32:
        raise ValueError(f"{fn}: {name} must be torch.float32, got {t.dtype}")
    # .numpy() refuses tensors that require grad or carry a lazy negation bit.
    t = t.detach().resolve_neg()
    return t.contiguous() if contiguous else t


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


# --- tap-sparse convs (SPP) ---------------------------------------------------------------

def conv_taps(x: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor, bias: Optional[torch.Tensor],
              kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
              residual: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """A tap-sparse conv in the fused C++ kernel: ``conv2d`` over the kept im2col columns only
    (``weight``, ``kept`` from :func:`pack_taps`), + bias, + residual, ReLU; float32 CPU,
    channels_last output. ``padding``: (top, bottom, left, right), symmetric."""
    return bound_taps(x, weight, kept, bias, kernel_size, stride, padding, dilation, residual, relu)[0]


def bound_taps(x: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor, bias: Optional[torch.Tensor],
               kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
               residual: Optional[torch.Tensor] = None, relu: bool = False) -> tuple[torch.Tensor, Optional[Bound]]:
    """:func:`conv_taps`, and the :class:`Bound` of its checked plan for the layer's next call
    (its weights: ``(weight, kept)``; None when the plan reads a copy of ``weight`` or the
    bias, which would not see later writes, or when the output is empty)."""
    lib = _require()
    from trp_kernels.reference import checked_output_hw

    if not isinstance(kept, torch.Tensor) or kept.dtype != torch.int64 or kept.device.type != "cpu":
        raise ValueError(f"conv_taps: kept must be an int64 CPU tensor of im2col columns, got {kept!r:.60}")
    kh, kw = (int(k) for k in kernel_size)
    x = _checked(x, "x").contiguous(memory_format=torch.channels_last)
    ho, wo = checked_output_hw("conv_taps", x.shape[-2:], (kh, kw), stride, padding, dilation)
    out = torch.empty((x.shape[0], weight.shape[1], ho, wo), dtype=torch.float32, memory_format=torch.channels_last)
    if not out.numel():
        return out, None
    ra = None
    if residual is not None:
        residual = _checked(residual, "residual").contiguous(memory_format=torch.channels_last)
        ra = _nhwc(residual)
    plan = lib.LowRankPlan.taps(_nhwc(x), _array(weight, "weight"), kept.contiguous().numpy(),
                                None if bias is None else _array(bias, "bias"), ra, _nhwc(out), kh, kw,
                                (int(stride[0]), int(stride[1])), (int(padding[0]), int(padding[2])),
                                (int(dilation[0]), int(dilation[1])), bool(relu))
    plan.run(x.data_ptr(), out.data_ptr(), 0 if residual is None else residual.data_ptr(), torch.get_num_threads())
    views = all(t is None or (t.is_contiguous() and not t.is_neg()) for t in (weight, bias))
    return out, Bound(plan, x, (weight, kept), bias, tuple(out.shape), residual, relu) if views else None
