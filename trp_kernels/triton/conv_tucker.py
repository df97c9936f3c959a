"""Fused Tucker-2 conv: 1×1 conv c→r1, the k×k core r1→r2 (the layer's geometry), 1×1 conv
r2→n, in one kernel.

A program owns BLOCK_M output pixels (flattened over batch, rows, columns). For each core
tap it computes the first 1×1 at that tap's input pixels (zero where the tap falls in the
padding: the first stage has no bias), rounds it to the input dtype as the three-conv
form does, and accumulates its product with the tap's r1×r2 slice of the core, in
registers; then the r2-wide core output times the last factor, BLOCK_N output channels at
a time, goes through the epilogue (bias, residual, ReLU), and only the output is stored.

The first stage is recomputed at every tap (kh·kw times its MACs, where the C++ kernel
computes each input pixel's once per band): Triton has no gather from a register tile,
and a shared scratch would be another write and read per pixel. Which one is faster on a
GPU is for the GPU benchmarks to say; none has been run (no GPU was lent when this was
written). Every tensor is addressed through its strides, as in ``conv_channel``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from trp_kernels import _autograd
from trp_kernels.triton import _common
from trp_kernels.triton._common import dot, first_factor, last_pointwise, pixel_tile

# Both ranks at most this: the core's r1 x r2 tap slice is one tile, and at 256 x 256 it
# needs more shared memory than sm_80/sm_90 give a block (278 KiB against 163/227 KiB in
# the native compile, benches/results/triton-native/tucker.txt); at 128 the fallback config
# compiles with no spill. Wider chains run as three cuDNN convs (the reference).
MAX_RANK = 128


@triton.jit
def _conv_tucker_kernel(
        x_ptr, w1_ptr, w2_ptr, w3_ptr, bias_ptr, res_ptr, out_ptr,
        M, C, H, W, R1, R2, NOUT, HO, WO,
        sxn, sxc, sxh, sxw,
        s1r, s1c,
        s2o, s2i, s2h, s2w,
        s3n, s3r,
        srn, src, srh, srw,
        son, soc, soh, sow,
        STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
        M_BUCKET,
        KH: tl.constexpr, KW: tl.constexpr, R1_PAD: tl.constexpr, R2_PAD: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr):
    m_mask, ow, oh, nb = pixel_tile(tl.program_id(0), M, HO, WO, BLOCK_M)
    offs_r1 = tl.arange(0, R1_PAD)
    offs_r2 = tl.arange(0, R2_PAD)
    r1_mask = offs_r1 < R1
    r2_mask = offs_r2 < R2

    # First 1x1 at each tap's input pixels, times that tap's slice of the core.
    h2 = tl.zeros((BLOCK_M, R2_PAD), dtype=tl.float32)
    for tap in range(0, KH * KW):
        kh = tap // KW
        kw = tap - kh * KW
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        iw = ow * STRIDE_W - PAD_W + kw * DIL_W
        h1 = first_factor(x_ptr, w1_ptr, nb * sxn, ih, iw, m_mask, C, H, W, sxc, sxh, sxw, s1c, s1r, 0, 0, 1, 1,
                          R1, 0, 1, 1, R1_PAD, BLOCK_M, BLOCK_K, PRECISION).to(x_ptr.dtype.element_ty)
        core = tl.load(w2_ptr + offs_r1[:, None] * s2i + offs_r2[None, :] * s2o + kh * s2h + kw * s2w,
                       mask=r1_mask[:, None] & r2_mask[None, :], other=0.0)
        h2 = dot(h1, core, h2, PRECISION)
    h2 = tl.where(r2_mask[None, :], h2, 0.0).to(x_ptr.dtype.element_ty)

    # Last 1x1 and epilogue.
    last_pointwise(h2, w3_ptr, s3r, s3n, offs_r2, r2_mask, tl.program_id(1), NOUT, m_mask, nb, oh, ow, son, soh, sow,
                   srn, srh, srw, soc, src, bias_ptr, res_ptr, out_ptr, HAS_BIAS, HAS_RES, RELU, PRECISION, BLOCK_M,
                   BLOCK_N, SPLIT_N)


_KEY = ["C", "NOUT", "M_BUCKET", "KH", "KW", "R1_PAD", "R2_PAD", "HAS_BIAS", "HAS_RES", "RELU", "PRECISION"]


@functools.lru_cache(maxsize=None)
def _tuned(r_pad: int, pclass: str, arch: int):
    return triton.autotune(_common.configs("conv_tucker", r_pad, pclass, arch), key=_KEY)(_conv_tucker_kernel)


def conv_tucker(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor, weight3: torch.Tensor,
                bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], stride: list[int],
                padding: list[int], dilation: list[int], relu: bool, config: Optional[dict] = None) -> torch.Tensor:
    """``reference.conv_chain`` of ``reference.kernel_stages('tucker', stride, padding,
    dilation)`` in one kernel: weight1 (r1, C, 1, 1), weight2 the core (r2, r1, kh, kw),
    weight3 (n, r2, 1, 1). ``padding`` is (top, bottom, left, right); ``config`` fixes the
    block sizes (tests)."""
    op = "triton conv_tucker"
    if (x.dim() != 4 or any(w.dim() != 4 for w in (weight1, weight2, weight3))
            or weight1.shape[-2:] != (1, 1) or weight3.shape[-2:] != (1, 1)):
        raise ValueError(f"{op}: want x (N, C, H, W), weight1 (r1, C, 1, 1), weight2 (r2, r1, kh, kw), weight3 "
                         f"(n, r2, 1, 1); got {tuple(x.shape)}, {tuple(weight1.shape)}, {tuple(weight2.shape)}, "
                         f"{tuple(weight3.shape)}")
    out = _common.conv_output(op, x, (weight1, weight2, weight3), bias, residual, stride, padding, dilation,
                              tuple(weight2.shape[-2:]))
    nb, c, h, w = x.shape
    ho, wo = out.shape[-2:]
    r1, r2, nout = weight1.shape[0], weight2.shape[0], weight3.shape[0]
    m = nb * ho * wo
    if m == 0 or nout == 0:
        return out
    r1_pad, r2_pad = _common.rank_pad(r1), _common.rank_pad(r2)
    precision = _common.dot_precision(x.dtype, conv=True)
    consts = dict(KH=weight2.shape[2], KW=weight2.shape[3], R1_PAD=r1_pad, R2_PAD=r2_pad, HAS_BIAS=bias is not None,
                  HAS_RES=residual is not None, RELU=bool(relu), PRECISION=precision)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), meta["SPLIT_N"])

    res_strides = residual.stride() if residual is not None else out.stride()
    args = (x, weight1, weight2, weight3, bias if bias is not None else out,
            residual if residual is not None else out, out, m, c, h, w, r1, r2, nout, ho, wo, *x.stride(),
            weight1.stride(0), weight1.stride(1), *weight2.stride(), weight3.stride(0), weight3.stride(1),
            *res_strides, *out.stride(), *stride, padding[0], padding[2], *dilation, _common.bucket(m))
    _common.launch(_conv_tucker_kernel, lambda: _tuned(max(r1_pad, r2_pad), _common.precision_class(x.dtype, precision),
                                                        _common.device_arch(x.device)),
                   grid, args, consts, config)
    return out


def _op(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor, weight3: torch.Tensor,
        bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], stride: list[int], padding: list[int],
        dilation: list[int], relu: bool) -> torch.Tensor:
    return conv_tucker(x, weight1, weight2, weight3, bias, residual, stride, padding, dilation, relu)


_op.__name__ = "triton_conv_tucker"
op = _common.register_op("trp::triton_conv_tucker")(_op)

_autograd.register(op, "conv", kernel="tucker")
