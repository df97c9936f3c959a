"""What the fused Triton kernels share: the epilogue, input checks, dot precision, rank
padding and the autotuning config space.

Import this package only through :mod:`trp_kernels.ops` (which records why it cannot be
imported); it needs Triton, and ``TRITON_INTERPRET=1`` must be set before Triton is first
imported for the kernels to run on CPU tensors.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Set by capture_launches(): launches are recorded here instead of run.
_captured: Optional[list] = None


@contextlib.contextmanager
def capture_launches():
    """Within this block the launchers accept CPU tensors and, instead of launching, record
    each launch as ``(kernel, args, consts)``: the exact arguments a GPU launch would pass,
    from which :mod:`trp_kernels.triton.native` derives the specialisation Triton's JIT
    would compile (integers equal to 1 as constants, 16-divisible values and pointers)."""
    global _captured
    outer, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = outer

# The r-wide intermediate of a tile lives in registers: BLOCK_M x R_PAD fp32 values.
MAX_RANK = 512
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rank_pad(rank: int) -> int:
    """Rank rounded up to a power of two (a tl.arange extent) and to at least 16 (tl.dot's
    smallest K); the extra columns are masked to zero inside the kernel."""
    return max(16, triton.next_power_of_2(rank))


def bucket(n: int) -> int:
    """Power-of-two bucket of a size: autotuning is keyed on it, so shapes that differ only
    a little (another batch size, an odd image size) share one tuned config."""
    return triton.next_power_of_2(max(1, n))


def dot_precision(dtype: torch.dtype, conv: bool) -> str:
    """How the kernels' :func:`dot` multiplies: ``tl.dot``'s input precision, TF32 for
    float32 only where torch itself would use it (cuDNN's switch for convolutions, the
    matmul precision for linear layers); or "upcast" for bfloat16 under the interpreter,
    whose bfloat16 ``tl.dot`` returns garbage (Triton 3.9): the operands are widened to
    float32 first, which is exact (bf16 products fit in fp32) and still accumulates in fp32."""
    if INTERPRET:
        return "upcast" if dtype == torch.bfloat16 else "ieee"
    if dtype != torch.float32:
        return "ieee"  # ignored for 16-bit inputs: tensor cores take them as they are
    allowed = torch.backends.cudnn.allow_tf32 if conv else torch.get_float32_matmul_precision() != "highest"
    return "tf32" if allowed else "ieee"


def check_tensors(op: str, x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                  bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                  out_shape: tuple, names: tuple = ("weight1", "weight2")) -> None:
    """Device, dtype and shape checks shared by every launcher, for one link of a chain
    (``weight1`` feeding ``weight2``, called ``names`` in errors); errors name the argument."""
    if x.dtype not in DTYPES:
        raise TypeError(f"{op}: x must be float16, bfloat16 or float32, got {x.dtype}")
    for name, t in ((names[0], weight1), (names[1], weight2), ("bias", bias), ("residual", residual)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")
    if x.device.type != "cuda" and not ((INTERPRET or _captured is not None) and x.device.type == "cpu"):
        raise ValueError(f"{op}: x must be a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), "
                         f"got one on {x.device}")
    rank = weight1.shape[0]
    if weight2.shape[1] != rank:
        raise ValueError(f"{op}: {names[1]} must have {rank} input channels ({names[0]}'s rank), "
                         f"got shape {tuple(weight2.shape)}")
    if rank > MAX_RANK:
        raise ValueError(f"{op}: rank {rank} exceeds the fused kernels' maximum {MAX_RANK}")
    if bias is not None and tuple(bias.shape) != (weight2.shape[0],):
        raise ValueError(f"{op}: bias must have shape ({weight2.shape[0]},), got {tuple(bias.shape)}")
    if residual is not None and tuple(residual.shape) != tuple(out_shape):
        raise ValueError(f"{op}: residual must have the output's shape {tuple(out_shape)}, "
                         f"got {tuple(residual.shape)}")


def conv_output(op: str, x: torch.Tensor, weights, bias: Optional[torch.Tensor],
                residual: Optional[torch.Tensor], stride, padding, dilation, kernel: tuple) -> torch.Tensor:
    """The checks every conv kernel shares (``weights``: its chain, each link checked as
    :func:`check_tensors` does, bias and residual against the last), then its output
    (empty, in x's layout); ``kernel`` is the (kh, kw) the geometry applies to."""
    from trp_kernels import reference

    reference.check_geometry(op, stride, padding, dilation)
    if weights[0].shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weight1 has {weights[0].shape[1]} input channels, x has {x.shape[1]}")
    ho, wo = reference.checked_output_hw(op, x.shape[-2:], kernel, stride, padding, dilation)
    out_shape = (x.shape[0], weights[-1].shape[0], ho, wo)
    for i in range(len(weights) - 1):
        last = i == len(weights) - 2
        check_tensors(op, x, weights[i], weights[i + 1], bias if last else None, residual if last else None,
                      out_shape, (f"weight{i + 1}", f"weight{i + 2}"))
    return torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=reference.output_memory_format(x))


# The autotuning candidates: BLOCK_M, BLOCK_K, BLOCK_N, SPLIT_N, warps, stages. Small blocks
# with 4 warps and deep pipelining for narrow ranks, thin K and N slices with 8 warps and
# little pipelining for wide ones; SPLIT_N > 1 spreads a small batch's few pixel tiles over
# more programs (each recomputing the intermediate for its share of output channels).
SPACE = (
    (32, 32, 64, 1, 4, 3), (64, 32, 64, 1, 4, 3), (64, 64, 64, 1, 4, 3), (64, 32, 128, 1, 8, 3),
    (128, 32, 64, 1, 8, 3), (32, 64, 64, 2, 4, 3), (16, 64, 64, 4, 4, 3), (16, 32, 64, 1, 4, 2),
    (64, 32, 64, 1, 8, 2), (16, 16, 32, 4, 8, 1), (32, 16, 32, 4, 8, 1),
)
# Which candidates compile cleanly (no register spill, shared memory within the limit), from
# the native sweep: ``python -m trp_kernels.triton.native --full --table``.
CLEAN_TABLE = os.path.join(os.path.dirname(__file__), "clean_configs.json")
TABLE_ARCHS = (80, 90)
FALLBACK = 9  # 16 x 16 x 32, 8 warps, 1 stage: the config that spills least


def precision_class(dtype: torch.dtype, precision: str) -> str:
    """What decides a config's register use besides its blocks: the input dtype, and for
    float32 whether the dots run on tensor cores (``tf32``) or as FMAs (``fp32``)."""
    if dtype == torch.float32:
        return "tf32" if precision == "tf32" else "fp32"
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def candidates(min_block_m: int = 16) -> list[tuple]:
    """SPACE with BLOCK_M raised to ``min_block_m`` (the spatial kernel's tile row), in order;
    a candidate that raising makes equal to an earlier one is left out (its index stays)."""
    out, seen = [], set()
    for i, (bm, bk, bn, split, warps, stages) in enumerate(SPACE):
        cfg = (max(bm, min_block_m), bk, bn, split, warps, stages)
        if cfg not in seen:
            seen.add(cfg)
            out.append((i, cfg))
    return out


@functools.lru_cache(maxsize=None)
def clean_table() -> dict:
    """The committed table (``{}`` if it is missing or was built for another SPACE)."""
    import json

    try:
        with open(CLEAN_TABLE) as f:
            table = json.load(f)
    except FileNotFoundError:
        return {}
    return table if [tuple(c) for c in table.get("space", [])] == list(SPACE) else {}


def table_arch(capability: tuple) -> int:
    """The swept architecture whose table a GPU uses: sm_90 for Hopper and later, sm_80 below."""
    return 90 if capability[0] >= 9 else 80


def clean_indices(family: str, arch: int, pclass: str, r_pad: int) -> Optional[list[int]]:
    """Indices into SPACE of the candidates clean for ``family`` on ``arch`` at ``r_pad``; a
    padded rank between two swept ones takes the candidates clean at both. None without a table."""
    table = clean_table().get("clean")
    if not table:
        return None
    swept = sorted({int(k.split("/")[3]) for k in table if k.startswith(f"{family}/{arch}/{pclass}/")})
    if not swept:
        return None
    near = [r for r in swept if r == r_pad] or [r for r in (max([r for r in swept if r < r_pad], default=None),
                                                             min([r for r in swept if r > r_pad], default=None))
                                                if r is not None]
    keep = None
    for r in near:
        got = set(table[f"{family}/{arch}/{pclass}/{r}"])
        keep = got if keep is None else keep & got
    return sorted(keep)


@functools.lru_cache(maxsize=None)
def configs(family: str, r_pad: int, pclass: str, arch: int = 90, min_block_m: int = 16) -> list:
    """The autotuning configs of one kernel family: the candidates that the native sweep found
    clean for this architecture, precision class and padded rank (all of SPACE when no table
    applies; the smallest candidate if none is clean)."""
    keep = clean_indices(family, arch, pclass, r_pad)
    chosen = [cfg for i, cfg in candidates(min_block_m) if keep is None or i in keep]
    if not chosen:
        chosen = [cfg for i, cfg in candidates(min_block_m) if i == FALLBACK]
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, SPLIT_N=split), num_warps=warps,
                          num_stages=stages) for bm, bk, bn, split, warps, stages in chosen]


def device_arch(device: torch.device) -> int:
    """:func:`table_arch` of the GPU ``device``."""
    return table_arch(torch.cuda.get_device_capability(device))


def interpreter_config(min_block_m: int = 16, **override) -> dict:
    """The one config used under TRITON_INTERPRET=1 (no timing there, so no tuning): small
    blocks, so that the CPU tests' awkward shapes span several tiles."""
    cfg = dict(BLOCK_M=max(16, min_block_m), BLOCK_K=16, BLOCK_N=16, SPLIT_N=1)
    cfg.update(override)
    return cfg


def register_op(name: str):
    """Decorator registering a launcher as the op ``name``.

    On a GPU: ``torch.library.triton_op``, so that torch.compile sees (and Inductor can
    schedule) the kernels and torch.export keeps the op. Under the interpreter,
    ``wrap_triton`` hands interpreted kernels back unwrapped, so tracing would run them on
    fake tensors: there the op is an opaque ``custom_op`` whose fake kernel is the same
    launcher, which skips the launch for fake tensors (see :func:`launch`).
    """
    def dec(fn):
        if not INTERPRET:
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op
    return dec


def register_conv_op(name: str, launcher, kernel: str):
    """Register ``launcher`` (``conv_channel`` or ``conv_spatial``) as the conv op ``name``,
    with the shared autograd; both two-stage kernels' ops have this one signature."""
    from trp_kernels import _autograd

    def op(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor, bias: Optional[torch.Tensor],
           residual: Optional[torch.Tensor], stride: list[int], padding: list[int], dilation: list[int],
           relu: bool) -> torch.Tensor:
        return launcher(x, weight1, weight2, bias, residual, stride, padding, dilation, relu)

    op.__name__ = name.split("::")[1]
    registered = register_op(name)(op)
    _autograd.register(registered, "conv", kernel=kernel)
    return registered


def launch(kernel, tuned, grid, args: tuple, consts: dict, config: Optional[dict]) -> None:
    """Launch ``kernel``: under the interpreter (or with an explicit ``config``, as tests do)
    with that config, else through the autotuner ``tuned()`` returns (built only when needed)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.library import wrap_triton

    if INTERPRET and any(isinstance(a, FakeTensor) for a in args):
        return  # the fake kernel of an interpreted op: output metadata only
    if _captured is not None:
        _captured.append((kernel, args, consts))
        return
    if config is not None or INTERPRET:
        cfg = config if config is not None else interpreter_config(consts.get("SEG", 16))
        wrap_triton(kernel)[grid](*args, **consts, **cfg)
    else:
        wrap_triton(tuned())[grid](*args, **consts)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation; PRECISION from :func:`dot_precision`."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def first_factor(x_ptr, w1_ptr, base, ih0, iw0, ok, C, H, W, sxc, sxh, sxw, s1c, s1r, s1h, s1w, DIL_H, DIL_W,
                 R, r0, KH: tl.constexpr, KW: tl.constexpr, R_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """The first factor at a tile's rows, rank columns ``r0 .. r0 + R_CHUNK``: ``h[m, r] =
    sum over (kh, kw, c) of x[row m's window] * w1[r, c, kh, kw]``, fp32, as one loop over
    taps x BLOCK_K channel slices (one software-pipelined loop, whatever the kernel size).

    Row m's input offset at tap (kh, kw) is ``base + (ih0 + kh·DIL_H)·sxh + (iw0 + kw·DIL_W)·sxw``,
    masked by ``ok`` and the image bounds (zero padding). Columns past the rank (weights
    masked to 0) hold x·0, which is NaN where x is inf or NaN: they are set to exactly 0."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = r0 + tl.arange(0, R_CHUNK)
    r_mask = offs_r < R
    nk = tl.cdiv(C, BLOCK_K)
    h = tl.zeros((BLOCK_M, R_CHUNK), dtype=tl.float32)
    for t in range(0, KH * KW * nk):
        tap = t // nk
        c0 = (t - tap * nk) * BLOCK_K
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * DIL_H
        iw = iw0 + kw * DIL_W
        valid = ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offs_c = c0 + offs_k
        c_mask = offs_c < C
        xt = tl.load(x_ptr + (base + ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc,
                     mask=valid[:, None] & c_mask[None, :], other=0.0)
        wt = tl.load(w1_ptr + offs_c[:, None] * s1c + offs_r[None, :] * s1r + kh * s1h + kw * s1w,
                     mask=c_mask[:, None] & r_mask[None, :], other=0.0)
        h = dot(xt, wt, h, PRECISION)
    return tl.where(r_mask[None, :], h, 0.0)


@triton.jit
def pixel_tile(pid_m, M, HO, WO, BLOCK_M: tl.constexpr):
    """Program ``pid_m``'s BLOCK_M output pixels of the flattened (batch, row, column):
    (in range, column, row, image)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ow = offs_m % WO
    oh = (offs_m // WO) % HO
    nb = (offs_m // (WO * HO)).to(tl.int64)
    return offs_m < M, ow, oh, nb


@triton.jit
def last_pointwise(h, w_ptr, swr, swn, offs_r, r_mask, pid_n, NOUT, m_mask, nb, oh, ow, son, soh, sow,
                   srn, srh, srw, soc, src, bias_ptr, res_ptr, out_ptr, HAS_BIAS: tl.constexpr,
                   HAS_RES: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr):
    """A chain's last stage when it is a 1×1 (``w[n, r]``, strides ``swn``, ``swr``), and the
    epilogue: out = epilogue(h @ wᵀ) at the tile's pixels (image ``nb``, row ``oh``,
    column ``ow``), BLOCK_N output channels at a time, every SPLIT_N-th block from ``pid_n``."""
    out_rows = nb * son + oh * soh + ow * sow
    res_rows = nb * srn + oh * srh + ow * srw
    for nblk in range(pid_n, tl.cdiv(NOUT, BLOCK_N), SPLIT_N):
        offs_n = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < NOUT
        wt = tl.load(w_ptr + offs_r[:, None] * swr + offs_n[None, :] * swn,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = dot(h, wt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION)
        epilogue_store(acc, offs_n, n_mask, m_mask, out_rows, res_rows, bias_ptr, res_ptr, out_ptr,
                       soc, src, HAS_BIAS, HAS_RES, RELU)


@triton.jit
def epilogue_store(acc, offs_n, n_mask, m_mask, out_rows, res_rows, bias_ptr, res_ptr, out_ptr,
                   soc, src, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr):
    """acc (BLOCK_M x BLOCK_N, fp32) + bias[n] + residual, ReLU, stored in out's dtype.
    ``out_rows``/``res_rows`` are each output pixel's offset, ``soc``/``src`` the channel
    strides."""
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + res_rows[:, None] + offs_n[None, :] * src, mask=mask, other=0.0).to(tl.float32)
    if RELU:  # not tl.maximum, which may turn NaN into 0: torch.relu keeps it
        acc = tl.where(acc < 0.0, 0.0, acc)
    tl.store(out_ptr + out_rows[:, None] + offs_n[None, :] * soc, acc.to(out_ptr.dtype.element_ty), mask=mask)
