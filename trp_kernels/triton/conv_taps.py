"""Tap-sparse conv (SPP's pruned convs) in one Triton kernel: the conv over the kept im2col
columns only, as an implicit GEMM whose K loop walks the kept-column list.

A program owns BLOCK_M output pixels and BLOCK_N output channels. Each K step takes
BLOCK_K kept columns: their tap and input channel (from the column list of
``reference.pack_taps``), so each pixel's input element is a computed address (a gather,
masked at the image's border for zero padding), times the packed weight rows (kept columns
× out channels), with fp32 accumulation; then the shared epilogue (bias, residual, ReLU).
Only the kept columns are read or multiplied. Every tensor is addressed through its strides.

No autotuning yet: one config (``CONFIG``), checked to compile natively for sm_80 and sm_90
without spills (tests/trp_kernels/test_triton_taps.py).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from trp_kernels.triton import _common
from trp_kernels.triton._common import dot, epilogue_store, pixel_tile

CONFIG = dict(BLOCK_M=64, BLOCK_K=32, BLOCK_N=64)
WARPS, STAGES = 4, 2


@triton.jit
def _conv_taps_kernel(
        x_ptr, w_ptr, cols_ptr, bias_ptr, res_ptr, out_ptr,
        M, C, H, W, K, NOUT, HO, WO,
        sxn, sxc, sxh, sxw,
        swk, swn,
        srn, src, srh, srw,
        son, soc, soh, sow,
        STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
        KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    m_mask, ow, oh, nb = pixel_tile(tl.program_id(0), M, HO, WO, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < NOUT
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    base = nb * sxn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        col = tl.load(cols_ptr + offs_k, mask=k_mask, other=0)  # (ki * KW + kj) * C + c
        tap = col // C
        ch = col - tap * C
        ki = tap // KW
        kj = tap - ki * KW
        ih = ih0[:, None] + (ki * DIL_H)[None, :]
        iw = iw0[:, None] + (kj * DIL_W)[None, :]
        valid = m_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xt = tl.load(x_ptr + base[:, None] + ih * sxh + iw * sxw + ch[None, :] * sxc, mask=valid, other=0.0)
        wt = tl.load(w_ptr + offs_k[:, None] * swk + offs_n[None, :] * swn,
                     mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = dot(xt, wt, acc, PRECISION)
    epilogue_store(acc, offs_n, n_mask, m_mask, nb * son + oh * soh + ow * sow, nb * srn + oh * srh + ow * srw,
                   bias_ptr, res_ptr, out_ptr, soc, src, HAS_BIAS, HAS_RES, RELU)


def conv_taps(x: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor, bias: Optional[torch.Tensor],
              residual: Optional[torch.Tensor], kernel_size: Sequence[int], stride: Sequence[int],
              padding: Sequence[int], dilation: Sequence[int], relu: bool,
              config: Optional[dict] = None) -> torch.Tensor:
    """``reference.conv_taps`` in one kernel, from ``reference.pack_taps``'s packed weight
    rows ``weight`` (kept columns, out channels) and column list ``kept``. ``padding`` is
    (top, bottom, left, right); ``config`` fixes the block sizes (tests)."""
    op = "triton conv_taps"
    if x.dim() != 4 or weight.dim() != 2 or kept.dim() != 1 or weight.shape[0] != kept.shape[0]:
        raise ValueError(f"{op}: want x (N, C, H, W), weight (kept, n) and kept (kept,); got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(kept.shape)}")
    kh, kw = (int(k) for k in kernel_size)
    from trp_kernels.reference import checked_output_hw

    ho, wo = checked_output_hw(op, x.shape[-2:], (kh, kw), stride, padding, dilation)
    nout = weight.shape[1]
    out = torch.empty((x.shape[0], nout, ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    m = x.shape[0] * ho * wo
    if m == 0 or nout == 0:
        return out
    if residual is not None and tuple(residual.shape) != tuple(out.shape):
        raise ValueError(f"{op}: residual must have the output's shape {tuple(out.shape)}, got {tuple(residual.shape)}")
    cfg = dict(CONFIG) if config is None else dict(config)
    cols = kept.to(device=x.device, dtype=torch.int32).contiguous()
    consts = dict(KW=kw, HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=bool(relu),
                  PRECISION=_common.dot_precision(x.dtype, conv=True))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(nout, meta["BLOCK_N"]))

    res_strides = residual.stride() if residual is not None else out.stride()
    args = (x, weight, cols, bias if bias is not None else out, residual if residual is not None else out, out,
            m, x.shape[1], x.shape[2], x.shape[3], cols.numel(), nout, ho, wo, *x.stride(), *weight.stride(),
            *res_strides, *out.stride(), int(stride[0]), int(stride[1]), int(padding[0]), int(padding[2]),
            int(dilation[0]), int(dilation[1]))
    _common.launch(_conv_taps_kernel, None, grid, args, consts, cfg)
    return out
