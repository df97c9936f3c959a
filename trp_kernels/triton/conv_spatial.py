"""Fused spatial-scheme low-rank conv: kh×1 conv c→r, then 1×kw conv r→n, in one kernel.

The second factor reads the intermediate at kw horizontally shifted positions, so a tile
must hold the intermediate for its output columns plus a halo. A program owns ROWS output
rows × SEG intermediate columns (SEG a power of two covering TILE_W output columns and
the (kw−1)·dilation halo); the intermediate is built there once, as in the channel scheme,
and each of the kw taps of the second factor reads its shifted columns from registers with
``tl.gather``. Neighbouring tiles recompute the halo columns; nothing is written to memory
but the output.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from trp_kernels.triton import _common
from trp_kernels.triton._common import dot, epilogue_store, first_factor

# Widest tile row: wider images are split into several tiles along the width.
MAX_SEG = 64
# Most rank columns held at once: the second factor gathers shifted copies of the
# intermediate, so a wider one spills registers (natively compiled for sm_80/sm_90, every
# config spills at rank 256 without chunks); wider ranks run R_CHUNK columns at a time.
RANK_CHUNK = 64


@triton.jit
def _second_factor(acc, h_in, w2_ptr, r0, R, offs_n, n_mask, row, col, s2r, s2n, s2w, STRIDE_W, DIL_W,
                   KW: tl.constexpr, SEG: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                   PRECISION: tl.constexpr):
    """``acc`` plus the 1×kw second factor over rank columns ``r0 .. r0 + R_CHUNK`` (held in
    ``h_in``): output column ``col`` of a tile row reads intermediate columns
    col·stride + j·dilation of the same row, j < kw."""
    offs_r = r0 + tl.arange(0, R_CHUNK)
    r_mask = offs_r < R
    for j in tl.static_range(KW):
        src_idx = row * SEG + tl.minimum(col * STRIDE_W + j * DIL_W, SEG - 1)
        shifted = tl.gather(h_in, tl.broadcast_to(src_idx[:, None], (BLOCK_M, R_CHUNK)), 0)
        w2t = tl.load(w2_ptr + offs_r[:, None] * s2r + offs_n[None, :] * s2n + j * s2w,
                      mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = dot(shifted, w2t, acc, PRECISION)
    return acc


@triton.jit
def _conv_spatial_kernel(
        x_ptr, w1_ptr, w2_ptr, bias_ptr, res_ptr, out_ptr,
        ROWS_TOTAL, C, H, W, R, NOUT, HO, WO, TILE_W,
        sxn, sxc, sxh, sxw,
        s1r, s1c, s1h,
        s2n, s2r, s2w,
        srn, src, srh, srw,
        son, soc, soh, sow,
        STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W,
        M_BUCKET,
        KH: tl.constexpr, KW: tl.constexpr, R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, SEG: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr):
    ROWS: tl.constexpr = BLOCK_M // SEG
    pid_row = tl.program_id(0)
    pid_w = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs = tl.arange(0, BLOCK_M)
    row = offs // SEG
    col = offs % SEG
    orow = pid_row * ROWS + row            # over batch × output rows
    row_ok = orow < ROWS_TOTAL
    oh = orow % HO
    nb = (orow // HO).to(tl.int64)
    ow0 = pid_w * TILE_W
    iw = ow0 * STRIDE_W - PAD_L + col      # the intermediate's (= the input's) column
    ow = ow0 + col
    m_mask = row_ok & (col < TILE_W) & (ow < WO)
    out_rows = nb * son + oh * soh + ow * sow
    res_rows = nb * srn + oh * srh + ow * srw
    ih0 = oh * STRIDE_H - PAD_T

    # First factor (kh×1, vertical geometry) at every column of the tile, halo included;
    # columns outside the image are the second factor's zero padding.
    if R_CHUNK == R_PAD:  # the whole intermediate fits: built once, read for every block of outputs
        h_in = first_factor(x_ptr, w1_ptr, nb * sxn, ih0, iw, row_ok, C, H, W, sxc, sxh, sxw, s1c, s1r, s1h, 0,
                            DIL_H, 0, R, 0, KH, 1, R_CHUNK, BLOCK_M, BLOCK_K, PRECISION).to(x_ptr.dtype.element_ty)
        for nblk in range(pid_n, tl.cdiv(NOUT, BLOCK_N), SPLIT_N):
            offs_n = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < NOUT
            acc = _second_factor(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), h_in, w2_ptr, 0, R, offs_n,
                                 n_mask, row, col, s2r, s2n, s2w, STRIDE_W, DIL_W, KW, SEG, R_CHUNK, BLOCK_M,
                                 PRECISION)
            epilogue_store(acc, offs_n, n_mask, m_mask, out_rows, res_rows, bias_ptr, res_ptr, out_ptr,
                           soc, src, HAS_BIAS, HAS_RES, RELU)
    else:  # a wide rank, R_CHUNK columns at a time (each block of outputs rebuilds them)
        for nblk in range(pid_n, tl.cdiv(NOUT, BLOCK_N), SPLIT_N):
            offs_n = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < NOUT
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, R, R_CHUNK):
                h_in = first_factor(x_ptr, w1_ptr, nb * sxn, ih0, iw, row_ok, C, H, W, sxc, sxh, sxw, s1c, s1r,
                                    s1h, 0, DIL_H, 0, R, r0, KH, 1, R_CHUNK, BLOCK_M, BLOCK_K,
                                    PRECISION).to(x_ptr.dtype.element_ty)
                acc = _second_factor(acc, h_in, w2_ptr, r0, R, offs_n, n_mask, row, col, s2r, s2n, s2w, STRIDE_W,
                                     DIL_W, KW, SEG, R_CHUNK, BLOCK_M, PRECISION)
            epilogue_store(acc, offs_n, n_mask, m_mask, out_rows, res_rows, bias_ptr, res_ptr, out_ptr,
                           soc, src, HAS_BIAS, HAS_RES, RELU)


_KEY = ["C", "NOUT", "M_BUCKET", "KH", "KW", "R_PAD", "R_CHUNK", "SEG", "HAS_BIAS", "HAS_RES", "RELU", "PRECISION"]


@functools.lru_cache(maxsize=None)
def _tuned(r_pad: int, pclass: str, arch: int, seg: int):
    return triton.autotune(_common.configs("conv_spatial", r_pad, pclass, arch, min_block_m=seg),
                           key=_KEY)(_conv_spatial_kernel)


def tile_width(wo: int, stride_w: int, kw: int, dil_w: int) -> tuple[int, int]:
    """(SEG, TILE_W): intermediate columns per tile row and the output columns they serve."""
    halo = (kw - 1) * dil_w
    seg = min(triton.next_power_of_2((wo - 1) * stride_w + halo + 1), max(MAX_SEG, triton.next_power_of_2(halo + 1)))
    return seg, (seg - 1 - halo) // stride_w + 1


def conv_spatial(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor, bias: Optional[torch.Tensor],
                 residual: Optional[torch.Tensor], stride: list[int], padding: list[int], dilation: list[int],
                 relu: bool, config: Optional[dict] = None) -> torch.Tensor:
    """``reference.lowrank_conv2d(..., 'spatial', residual, relu)`` in one kernel.
    ``padding`` is (top, bottom, left, right); ``config`` fixes the block sizes (tests), and
    its ``R_CHUNK`` (a power of two, at least 16) the rank columns held at once."""
    op = "triton conv_spatial"
    if (x.dim() != 4 or weight1.dim() != 4 or weight2.dim() != 4 or weight1.shape[-1] != 1
            or weight2.shape[-2] != 1):
        raise ValueError(f"{op}: want x (N, C, H, W), weight1 (r, C, kh, 1), weight2 (n, r, 1, kw); got "
                         f"{tuple(x.shape)}, {tuple(weight1.shape)}, {tuple(weight2.shape)}")
    kh, kw = weight1.shape[2], weight2.shape[3]
    out = _common.conv_output(op, x, (weight1, weight2), bias, residual, stride, padding, dilation, (kh, kw))
    ho, wo = out.shape[-2:]
    nb, c, h, w = x.shape
    rank, nout = weight1.shape[0], weight2.shape[0]
    rows = nb * ho
    if rows == 0 or wo == 0 or nout == 0:
        return out
    seg, tile_w = tile_width(wo, stride[1], kw, dilation[1])
    r_pad = _common.rank_pad(rank)
    if config is not None and "R_CHUNK" in config:  # tests: the chunked path at a small rank
        config = dict(config)
        r_chunk = config.pop("R_CHUNK")
    else:
        r_chunk = min(r_pad, RANK_CHUNK)
    consts = dict(KH=kh, KW=kw, R_PAD=r_pad, R_CHUNK=r_chunk, SEG=seg, HAS_BIAS=bias is not None,
                  HAS_RES=residual is not None, RELU=bool(relu),
                  PRECISION=_common.dot_precision(x.dtype, conv=True))

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"] // seg), triton.cdiv(wo, tile_w), meta["SPLIT_N"])

    res = residual if residual is not None else out
    args = (x, weight1, weight2, bias if bias is not None else out, res, out,
            rows, c, h, w, rank, nout, ho, wo, tile_w, *x.stride(), *weight1.stride()[:3],
            weight2.stride(0), weight2.stride(1), weight2.stride(3), *res.stride(), *out.stride(),
            stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
            _common.bucket(nb * ho * wo))
    pclass = _common.precision_class(x.dtype, consts["PRECISION"])
    _common.launch(_conv_spatial_kernel, lambda: _tuned(r_pad, pclass, _common.device_arch(x.device), seg), grid,
                   args, consts, config)
    return out


_op = _common.register_conv_op("trp::triton_conv_spatial", conv_spatial, "spatial")
