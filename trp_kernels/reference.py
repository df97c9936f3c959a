"""Plain-PyTorch reference of every trp op.

This is the oracle the kernel tests compare against, the "torch" backend, and the form
that ONNX export and autograd see. Padding is carried as an explicit 4-tuple
``(top, bottom, left, right)`` so that ``padding='same'`` with an even kernel (which
PyTorch pads asymmetrically) survives factorisation exactly.

Every factored conv is a *chain* of convs: ``weights[i]`` with the geometry
``strides[2i:2i+2]``, ``paddings[4i:4i+4]``, ``dilations[2i:2i+2]``, the bias on the
last stage, then the epilogue (residual, ReLU). That is the one argument order of
:func:`conv_chain`, of ``trp::conv_chain`` and of :func:`trp_kernels.ops.conv_chain`.
Which chains a fused kernel runs is said here too (:func:`match_kernel`): the two-stage
kernels ``channel`` (a k×k conv, then a plain 1×1) and ``spatial`` (kh×1 with the
vertical geometry, then 1×kw with the horizontal one).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

Pair = tuple[int, int]
Pad4 = tuple[int, int, int, int]

TWO_STAGE_KERNELS = ("channel", "spatial")
# Every chain a fused kernel computes, with its number of stages: the two-stage schemes,
# Tucker-2's 1×1 → k×k → 1×1, and one dense conv.
KERNEL_STAGES = {**dict.fromkeys(TWO_STAGE_KERNELS, 2), "tucker": 3, "dense": 1}
KERNELS = tuple(KERNEL_STAGES)


def _pair(value, name: str) -> Pair:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def resolve_padding(padding, kernel_size, dilation) -> Pad4:
    """Explicit ``(top, bottom, left, right)`` zero padding of a Conv2d's ``padding``.

    Accepts an int, a pair, a 4-sequence, ``'valid'`` or ``'same'``; ``'same'`` follows
    PyTorch: total ``d*(k-1)`` per dimension, the odd extra element at the bottom/right.
    """
    kh, kw = _pair(kernel_size, "kernel_size")
    dh, dw = _pair(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            th, tw = dh * (kh - 1), dw * (kw - 1)
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        raise ValueError(f"padding must be 'same', 'valid', an int or a tuple, got {padding!r}")
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        pad = tuple(int(p) for p in padding)
    else:
        ph, pw = _pair(padding, "padding")
        pad = (ph, ph, pw, pw)
    if min(pad) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return pad  # type: ignore[return-value]


def kernel_stages(kernel: str, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]):
    """The chain ``(strides, paddings, dilations)`` (flat lists) that the fused kernel
    ``kernel`` computes for a conv of geometry ``stride``/``padding`` (4)/``dilation``.

    channel: the first stage keeps the k×k geometry, the second is a plain 1×1.
    spatial: the first (kh×1) stage takes the vertical geometry, the second (1×kw) the
    horizontal one; zero padding commutes with a width-1 conv, so this is exact.
    tucker: plain 1×1, the k×k core with the geometry, plain 1×1. dense: one stage.
    """
    sh, sw = stride
    t, b, l, r = padding
    dh, dw = dilation
    if kernel == "channel":
        return [sh, sw, 1, 1], [t, b, l, r, 0, 0, 0, 0], [dh, dw, 1, 1]
    if kernel == "spatial":
        return [sh, 1, 1, sw], [t, b, 0, 0, 0, 0, l, r], [dh, 1, 1, dw]
    if kernel == "tucker":
        return [1, 1, sh, sw, 1, 1], [0, 0, 0, 0, t, b, l, r, 0, 0, 0, 0], [1, 1, dh, dw, 1, 1]
    if kernel == "dense":
        return [sh, sw], [t, b, l, r], [dh, dw]
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def kernel_size(kernel: str, shapes: Sequence[Sequence[int]]) -> Pair:
    """The (kh, kw) of the conv that the fused kernel ``kernel`` computes from stage weights
    of ``shapes``: the k×k stage's (tucker: the core), spatial's kh×1 and 1×kw together."""
    if kernel == "spatial":
        return (shapes[0][2], shapes[1][3])
    return tuple(shapes[1 if kernel == "tucker" else 0][2:])


def match_kernel(shapes: Sequence[Sequence[int]], strides: Sequence[int], paddings: Sequence[int],
                 dilations: Sequence[int]) -> Optional[tuple]:
    """``(kernel, stride, padding4, dilation)`` when a fused kernel computes the chain of
    weight ``shapes`` and geometry (the conv it is, in that kernel's arguments), else None.
    The one place that knows which chains the fused kernels take."""
    n = len(shapes)
    if n not in (1, 2, 3):
        return None
    geo = stage_geometry(strides, paddings, dilations)
    if n == 1:
        return ("dense", *geo[0])
    candidates = {2: (("channel", 0), ("spatial", None)), 3: (("tucker", 1),)}[n]
    for kernel, at in candidates:
        if kernel == "spatial":  # the conv's geometry, split over the two stages
            if shapes[0][3] != 1 or shapes[1][2] != 1:
                continue
            (s1, p1, d1), (s2, p2, d2) = geo
            conv = ((s1[0], s2[1]), (*p1[:2], *p2[2:]), (d1[0], d2[1]))
        else:  # the geometry on stage `at`, every other stage a plain 1×1
            if any(tuple(s[2:]) != (1, 1) for i, s in enumerate(shapes) if i != at):
                continue
            conv = geo[at]
        if [list(g) for g in kernel_stages(kernel, *conv)] == [list(strides), list(paddings), list(dilations)]:
            return (kernel, *conv)
    return None


def stage_geometry(strides: Sequence[int], paddings: Sequence[int], dilations: Sequence[int]) -> list:
    """The chain's geometry as one ``(stride, padding4, dilation)`` per stage."""
    return [(tuple(strides[2 * i:2 * i + 2]), tuple(paddings[4 * i:4 * i + 4]), tuple(dilations[2 * i:2 * i + 2]))
            for i in range(len(strides) // 2)]


def check_chain(fn: str, shapes: Sequence[Sequence[int]], strides: Sequence[int], paddings: Sequence[int],
                dilations: Sequence[int], in_channels: Optional[int] = None) -> None:
    """Raise a ValueError naming the argument unless ``shapes`` are 4-D conv weights whose
    channels chain (stage i's outputs are stage i+1's inputs) and the geometry has 2
    strides >= 1, 4 paddings >= 0 and 2 dilations >= 1 per stage. Checked once, when a
    layer or a plan is built; the kernels trust it."""
    k = len(shapes)
    if k < 1:
        raise ValueError(f"{fn}: weights must hold at least one stage, got none")
    for i, s in enumerate(shapes):
        if len(s) != 4:
            raise ValueError(f"{fn}: weights[{i}] must be a 4-D conv weight, got shape {tuple(s)}")
        if i and s[1] != shapes[i - 1][0]:
            raise ValueError(f"{fn}: weights[{i}] takes {s[1]} input channels but weights[{i - 1}] gives "
                             f"{shapes[i - 1][0]}")
    if in_channels is not None and shapes[0][1] != in_channels:
        raise ValueError(f"{fn}: weights[0] takes {shapes[0][1]} input channels, the input has {in_channels}")
    for name, value, n, lo in (("strides", strides, 2, 1), ("paddings", paddings, 4, 0),
                               ("dilations", dilations, 2, 1)):
        if (not isinstance(value, (list, tuple)) or len(value) != n * k
                or any(isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)) or v < lo for v in value)):
            raise ValueError(f"{fn}: {name} must be {n} ints >= {lo} per stage ({n * k} for {k} stages), "
                             f"got {value!r}")


def chain_output_hw(what: str, hw: Sequence[int], shapes: Sequence[Sequence[int]], strides: Sequence[int],
                    paddings: Sequence[int], dilations: Sequence[int]) -> Pair:
    """The output height and width of a chain on an ``hw`` input (:func:`checked_output_hw`
    stage by stage)."""
    for s, g in zip(shapes, stage_geometry(strides, paddings, dilations)):
        hw = checked_output_hw(what, hw, s[2:], *g)
    return tuple(hw)


def chain_min_input_hw(shapes: Sequence[Sequence[int]], strides: Sequence[int], paddings: Sequence[int],
                       dilations: Sequence[int]) -> Pair:
    """The smallest input height and width that give a chain at least one output pixel."""
    need = [1, 1]
    for s, (st, pad, dil) in reversed(list(zip(shapes, stage_geometry(strides, paddings, dilations)))):
        lo = min_input_hw(s[2:], pad, dil)
        need = [max(lo[d], (need[d] - 1) * st[d] + lo[d]) for d in range(2)]
    return (max(need[0], 1), max(need[1], 1))


def check_geometry(fn: str, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> None:
    """Raise a ValueError naming the argument unless a factored conv's geometry is 2 strides
    >= 1, 4 paddings (top, bottom, left, right) >= 0 and 2 dilations >= 1."""
    for name, value, n, lo in (("stride", stride, 2, 1), ("padding", padding, 4, 0), ("dilation", dilation, 2, 1)):
        if (not isinstance(value, (list, tuple)) or len(value) != n
                or any(isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)) or v < lo for v in value)):
            raise ValueError(f"{fn}: {name} must be {n} ints >= {lo}, got {value!r}")


def conv_output_hw(hw: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int]) -> Pair:
    h, w = hw
    t, b, l, r = padding
    ho = (h + t + b - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    wo = (w + l + r - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return (ho, wo)


class InputTooSmallError(ValueError, RuntimeError):
    """An input smaller than a conv's dilated kernel (after padding), for which F.conv2d
    raises a RuntimeError: a ValueError that is also a RuntimeError, so that code written
    for the dense layer catches it too."""


def _span(kernel_size: Sequence[int], dilation: Sequence[int]) -> Pair:
    """How many input rows and columns a dilated kernel covers."""
    return (dilation[0] * (kernel_size[0] - 1) + 1, dilation[1] * (kernel_size[1] - 1) + 1)


def min_input_hw(kernel_size: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Pair:
    """The smallest input height and width that give a conv at least one output pixel."""
    t, b, l, r = padding
    eff = _span(kernel_size, dilation)
    return (eff[0] - t - b, eff[1] - l - r)


def input_too_small(what: str, hw: Sequence[int], kernel_size: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int]) -> InputTooSmallError:
    """The error for an input of spatial size ``hw`` that ``min_input_hw`` refuses."""
    t, b, l, r = padding
    eff = _span(kernel_size, dilation)
    return InputTooSmallError(
        f"{what}: input of spatial size {hw[0]}x{hw[1]} is smaller than the kernel: padded by "
        f"(top {t}, bottom {b}, left {l}, right {r}) it is {hw[0] + t + b}x{hw[1] + l + r}, and the kernel "
        f"{tuple(kernel_size)} with dilation {tuple(dilation)} spans {eff[0]}x{eff[1]} (F.conv2d raises here too)")


def checked_output_hw(what: str, hw: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
                      padding: Sequence[int], dilation: Sequence[int]) -> Pair:
    """:func:`conv_output_hw`, raising :class:`InputTooSmallError` where it would be empty."""
    lo = min_input_hw(kernel_size, padding, dilation)
    if hw[0] < lo[0] or hw[1] < lo[1]:
        raise input_too_small(what, hw, kernel_size, padding, dilation)
    return conv_output_hw(hw, kernel_size, stride, padding, dilation)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout every conv op gives its output: the input's (channels_last stays so)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """``F.conv2d`` with 4-sided padding; pads explicitly only when it is asymmetric."""
    t, b, l, r = padding
    if t == b and l == r:
        return F.conv2d(x, weight, bias, tuple(stride), (t, l), tuple(dilation))
    return F.conv2d(F.pad(x, (l, r, t, b)), weight, bias, tuple(stride), 0, tuple(dilation))


def epilogue(out: torch.Tensor, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """What the fused kernels apply after the second factor (and its bias): ``+ residual``,
    then ReLU. In a ResNet block this is ``relu(bn(conv(x)) + shortcut)`` with BN folded."""
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def conv_chain(x: torch.Tensor, weights: Sequence[torch.Tensor], strides: Sequence[int],
               paddings: Sequence[int], dilations: Sequence[int], bias: Optional[torch.Tensor] = None,
               residual: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """A chain of convs: ``F.conv2d`` per stage (the bias on the last), then the :func:`epilogue`."""
    geometry = stage_geometry(strides, paddings, dilations)
    last = len(weights) - 1
    for i, (w, g) in enumerate(zip(weights, geometry)):
        x = conv2d(x, w, bias if i == last else None, *g)
    return epilogue(x, residual, relu)


def lowrank_conv2d(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                   bias: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], kernel: str, residual: Optional[torch.Tensor] = None,
                   relu: bool = False) -> torch.Tensor:
    """What the two-stage kernel ``kernel`` ('channel' or 'spatial') computes for a conv of
    the given geometry: :func:`conv_chain` of its :func:`kernel_stages`."""
    return conv_chain(x, (weight1, weight2), *kernel_stages(kernel, stride, padding, dilation), bias, residual, relu)


def lowrank_linear(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                   bias: Optional[torch.Tensor], residual: Optional[torch.Tensor] = None,
                   relu: bool = False) -> torch.Tensor:
    return epilogue(F.linear(F.linear(x, weight1), weight2, bias), residual, relu)


def epilogue_backward(grad_out: torch.Tensor, out: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """Gradient wrt the pre-epilogue output (which is also the residual's gradient);
    ``out`` is the op's output, needed only for ReLU's mask."""
    return grad_out * (out > 0) if relu else grad_out


def _conv2d_backward(grad_out, x, weight, has_bias, stride, padding, dilation, mask):
    """Gradients of :func:`conv2d` wrt (x, weight, bias) for the entries of ``mask``."""
    t, b, l, r = padding
    symmetric = t == b and l == r
    xp = x if symmetric else F.pad(x, (l, r, t, b))
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad_out, xp, weight, [weight.shape[0]] if has_bias else None, list(stride),
        [t, l] if symmetric else [0, 0], list(dilation), False, [0, 0], 1,
        [mask[0], mask[1], has_bias and mask[2]])
    if gx is not None and not symmetric:
        gx = gx[:, :, t:t + x.shape[2], l:l + x.shape[3]]
    return gx, gw, gb


def conv_chain_backward(grad_out, x, weights, has_bias, strides, paddings, dilations, needs):
    """Gradients of :func:`conv_chain` (before its epilogue) wrt ``(x, [weights], bias)``;
    ``needs``: which of x, each weight and bias want one.

    The intermediates are recomputed rather than saved: forward kernels never write them
    to memory, so the backward pays the thin convs once more instead.
    """
    geometry = stage_geometry(strides, paddings, dilations)
    inputs = [x]
    for w, g in zip(weights[:-1], geometry):
        inputs.append(conv2d(inputs[-1], w, None, *g))
    k = len(weights)
    need_w = list(needs[1:1 + k])
    # stage i needs the gradient of its input when anything before it wants a gradient
    upstream = [needs[0] or any(need_w[:i]) for i in range(k)]
    g, grads_w, gb = grad_out, [None] * k, None
    for i in reversed(range(k)):
        bias_here = has_bias and i == k - 1
        gx, gw, gbi = _conv2d_backward(g, inputs[i], weights[i], bias_here, *geometry[i],
                                       (upstream[i], need_w[i], bias_here and needs[1 + k]))
        grads_w[i] = gw
        if bias_here:
            gb = gbi
        if not upstream[i]:
            break
        g = gx
    return (g if needs[0] else None), grads_w, gb


def lowrank_linear_backward(grad_out, x, weight1, weight2, has_bias, needs):
    h = F.linear(x, weight1)
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    gx = gw1 = gw2 = gb = None
    if needs[2]:
        gw2 = g2.t() @ h.reshape(-1, h.shape[-1])
    if has_bias and needs[3]:
        gb = g2.sum(0)
    if needs[0] or needs[1]:
        gh = grad_out @ weight2
        if needs[0]:
            gx = gh @ weight1
        if needs[1]:
            gw1 = gh.reshape(-1, gh.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    return gx, gw1, gw2, gb


# --- tap-sparse convs (SPP) -------------------------------------------------------------

def tap_columns(keep: torch.Tensor) -> torch.Tensor:
    """The kept im2col columns of a bool mask ``keep`` (c, kh, kw), in the kernels' order:
    each ``(ki * kw + kj) * c + ci``, ascending (int64)."""
    return torch.nonzero(keep.permute(1, 2, 0).reshape(-1)).flatten().to(torch.int64).contiguous()


def tap_mask(kept: torch.Tensor, in_channels: int, kernel_size: Sequence[int]) -> torch.Tensor:
    """:func:`tap_columns` undone: the bool mask (in_channels, kh, kw) of the columns ``kept``."""
    kh, kw = (int(k) for k in kernel_size)
    flat = torch.zeros(kh * kw * int(in_channels), dtype=torch.bool, device=kept.device)
    flat[kept] = True
    return flat.reshape(kh, kw, int(in_channels)).permute(2, 0, 1)


def pack_taps(weight: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv weight (n, c, kh, kw) and its kept im2col columns ``keep`` (bool (c, kh, kw))
    as :func:`conv_taps` takes them: the kept columns in the kernel's order, each
    ``(ki * kw + kj) * c + ci`` ascending (int64), and their weight rows (n_kept, n) in the
    weight's dtype: ``(taps, kept)``."""
    if weight.dim() != 4 or tuple(keep.shape) != tuple(weight.shape[1:]) or keep.dtype is not torch.bool:
        raise ValueError(f"pack_taps: keep must be a bool tensor of shape {tuple(weight.shape[1:])} (the weight's "
                         f"(in, kh, kw)), got {keep.dtype} {tuple(keep.shape)}")
    hwio = weight.detach().permute(2, 3, 1, 0)            # (kh, kw, c, n): rows in the kernel's column order
    kept = tap_columns(keep)
    rows = hwio.reshape(-1, weight.shape[0])[kept.to(weight.device)]
    return rows.contiguous(), kept


def unpack_taps(taps: torch.Tensor, kept: torch.Tensor, in_channels: int, kernel_size: Sequence[int]) -> torch.Tensor:
    """The dense conv weight (n, c, kh, kw) of a tap-sparse conv's packed form (``taps``
    (n_kept, n), ``kept`` as :func:`pack_taps` gives them), zero at the pruned taps;
    differentiable in ``taps``."""
    kh, kw = (int(k) for k in kernel_size)
    flat = taps.new_zeros((kh * kw * int(in_channels), taps.shape[1])).index_copy(0, kept.to(taps.device), taps)
    return flat.reshape(kh, kw, int(in_channels), taps.shape[1]).permute(3, 2, 0, 1)


def conv_taps(x: torch.Tensor, taps: torch.Tensor, kept: torch.Tensor, bias: Optional[torch.Tensor],
              kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
              residual: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """The tap-sparse conv as plain PyTorch, from its packed form (:func:`pack_taps`): the
    conv whose pruned im2col columns are zero (:func:`unpack_taps`), + residual, ReLU.
    ``padding``: (top, bottom, left, right). Differentiable in every tensor but ``kept``."""
    weight = unpack_taps(taps, kept, x.shape[-3], kernel_size).to(x.dtype)
    return conv_chain(x, [weight], stride, padding, dilation, bias, residual, relu)
