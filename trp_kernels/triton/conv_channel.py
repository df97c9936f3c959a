"""Fused channel-scheme low-rank conv: k×k conv c→r, then 1×1 conv r→n, in one kernel.

A program owns BLOCK_M output pixels (flattened over batch, rows, columns). It builds their
r-wide intermediate in registers by an implicit GEMM over c·kh·kw (never materialising an
im2col matrix), rounds it to the input dtype as the two-conv form does, multiplies it by
the r×n factor BLOCK_N output channels at a time with fp32 accumulation, applies the
epilogue (bias, residual, ReLU) and stores only the output. Every tensor is addressed
through its strides, so NCHW, channels_last (the fast path: the channel loads are
contiguous) and non-contiguous inputs all run without a copy.

The low-rank linear layer is this kernel on a 1×1 "image" (see ``linear.py``).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from trp_kernels.triton import _common
from trp_kernels.triton._common import first_factor, last_pointwise, pixel_tile


@triton.jit
def _conv_channel_kernel(
        x_ptr, w1_ptr, w2_ptr, bias_ptr, res_ptr, out_ptr,
        M, C, H, W, R, NOUT, HO, WO,
        sxn, sxc, sxh, sxw,
        s1r, s1c, s1h, s1w,
        s2n, s2r,
        srn, src, srh, srw,
        son, soc, soh, sow,
        STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
        M_BUCKET,
        KH: tl.constexpr, KW: tl.constexpr, R_PAD: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr):
    m_mask, ow, oh, nb = pixel_tile(tl.program_id(0), M, HO, WO, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R

    # First factor: h[m, r] = sum over (kh, kw, c) of x[pixel m's window] * w1[r, c, kh, kw].
    h_in = first_factor(x_ptr, w1_ptr, nb * sxn, oh * STRIDE_H - PAD_H, ow * STRIDE_W - PAD_W, m_mask, C, H, W,
                        sxc, sxh, sxw, s1c, s1r, s1h, s1w, DIL_H, DIL_W, R, 0, KH, KW, R_PAD, BLOCK_M, BLOCK_K,
                        PRECISION).to(x_ptr.dtype.element_ty)

    # Second factor and epilogue.
    last_pointwise(h_in, w2_ptr, s2r, s2n, offs_r, r_mask, tl.program_id(1), NOUT, m_mask, nb, oh, ow, son, soh, sow,
                   srn, srh, srw, soc, src, bias_ptr, res_ptr, out_ptr, HAS_BIAS, HAS_RES, RELU, PRECISION, BLOCK_M,
                   BLOCK_N, SPLIT_N)


_KEY = ["C", "NOUT", "M_BUCKET", "KH", "KW", "R_PAD", "HAS_BIAS", "HAS_RES", "RELU", "PRECISION"]


@functools.lru_cache(maxsize=None)
def _tuned(family: str, r_pad: int, pclass: str, arch: int):
    return triton.autotune(_common.configs(family, r_pad, pclass, arch), key=_KEY)(_conv_channel_kernel)


def launch(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor, bias: Optional[torch.Tensor],
           residual: Optional[torch.Tensor], out: torch.Tensor, image: tuple, kernel: tuple,
           x_strides: tuple, w1_strides: tuple, out_strides: tuple, res_strides: tuple,
           stride: tuple, pad: tuple, dilation: tuple, relu: bool, precision: str,
           config: Optional[dict], family: str = "conv_channel") -> None:
    """Launch the kernel over an already-allocated ``out``. Shapes and strides are given
    in conv terms (N, C, H, W) so that ``linear.py`` can describe a matrix as a 1×1 image;
    ``family`` names whose clean configs the autotuner gets (``"linear"`` from there)."""
    nb, c, h, w = image
    ho, wo = out.shape[-2:] if out.dim() == 4 else (1, 1)
    rank, nout = weight1.shape[0], weight2.shape[0]
    m = nb * ho * wo
    if m == 0 or nout == 0:
        return
    r_pad = _common.rank_pad(rank)
    consts = dict(KH=kernel[0], KW=kernel[1], R_PAD=r_pad, HAS_BIAS=bias is not None,
                  HAS_RES=residual is not None, RELU=bool(relu), PRECISION=precision)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), meta["SPLIT_N"])

    args = (x, weight1, weight2, bias if bias is not None else out, residual if residual is not None else out, out,
            m, c, h, w, rank, nout, ho, wo, *x_strides, *w1_strides, weight2.stride(0), weight2.stride(1),
            *res_strides, *out_strides, *stride, *pad, *dilation, _common.bucket(m))
    _common.launch(_conv_channel_kernel, lambda: _tuned(family, r_pad, _common.precision_class(x.dtype, precision),
                                                         _common.device_arch(x.device)),
                   grid, args, consts, config)


def conv_channel(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor, bias: Optional[torch.Tensor],
                 residual: Optional[torch.Tensor], stride: list[int], padding: list[int], dilation: list[int],
                 relu: bool, config: Optional[dict] = None) -> torch.Tensor:
    """``reference.lowrank_conv2d(..., 'channel', residual, relu)`` in one kernel.
    ``padding`` is (top, bottom, left, right); ``config`` fixes the block sizes (tests)."""
    op = "triton conv_channel"
    if x.dim() != 4 or weight1.dim() != 4 or weight2.dim() != 4 or weight2.shape[-2:] != (1, 1):
        raise ValueError(f"{op}: want x (N, C, H, W), weight1 (r, C, kh, kw), weight2 (n, r, 1, 1); got "
                         f"{tuple(x.shape)}, {tuple(weight1.shape)}, {tuple(weight2.shape)}")
    out = _common.conv_output(op, x, (weight1, weight2), bias, residual, stride, padding, dilation,
                              tuple(weight1.shape[-2:]))
    res_strides = residual.stride() if residual is not None else out.stride()
    launch(x, weight1, weight2, bias, residual, out, tuple(x.shape), tuple(weight1.shape[-2:]), x.stride(),
           weight1.stride(), out.stride(), res_strides, tuple(stride), (padding[0], padding[2]),
           tuple(dilation), relu, _common.dot_precision(x.dtype, conv=True), config)
    return out


_op = _common.register_conv_op("trp::triton_conv_channel", conv_channel, "channel")
