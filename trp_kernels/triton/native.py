"""Compile every fused Triton kernel natively, ahead of time, for real GPUs, on a machine
without one, and report each autotune config's registers, spills and shared memory.

Triton's interpreter runs the kernels as Python: it catches wrong answers, not a kernel
that fails to build, spills registers or asks for more shared memory than the GPU has.
``triton.compile`` with a ``GPUTarget`` runs the real pipeline (TTIR → TTGIR → LLVM → PTX →
cubin through the ``ptxas`` bundled with Triton) with no GPU present; ``ptxas -v``'s report
gives registers and spills, the compiled kernel's metadata its shared memory.

    python -m trp_kernels.triton.native [--full] [--json FILE] [--out DIR] [--jobs N]

Runs only with ``TRITON_INTERPRET`` unset (under the interpreter ``triton.jit`` builds
interpreted functions, which do not compile). Without ``--full``, a representative subset
(every kernel family and architecture, the smallest and the largest rank, every config the
pruning keeps at the largest); with it, every family × architecture × rank × dtype ×
epilogue × config.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Optional

# The largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 166_912, 90: 232_448}
ARCHS = tuple(SHARED_LIMIT)
RANKS = (16, 64, 256, 512)
# Precision classes (``_common.precision_class``): 16-bit inputs, and float32 with TF32 or
# with IEEE (FMA) dots; the conv kernels' default for float32 is TF32, the linear one's IEEE.
PCLASSES = ("fp16", "bf16", "tf32", "fp32")
DEFAULT_FP32 = {"conv_channel": "tf32", "conv_spatial": "tf32", "linear": "fp32"}
FAMILIES = ("conv_channel", "conv_spatial", "linear")
EPILOGUES = ((False, False, False), (True, True, True))  # (HAS_BIAS, HAS_RES, RELU)


@dataclass(frozen=True)
class Job:
    family: str
    arch: int
    pclass: str
    rank: int
    epilogue: tuple
    seg: Optional[int]
    candidate: int    # index into _common.SPACE
    config: dict      # BLOCK_M, BLOCK_K, BLOCK_N, SPLIT_N
    num_warps: int
    num_stages: int

    @property
    def dtype(self) -> str:
        return "fp32" if self.pclass in ("tf32", "fp32") else self.pclass


# The layer each family is compiled for (channels_last, as trp.compile runs them): a launch
# specialises on its integer arguments (those equal to 1 become constants, 16-divisible ones
# are marked so), so the native compile starts from a real launch's arguments.
LAYERS = {  # family, SEG: (input shape, output channels, weight1's kernel, weight2's kernel, padding)
    ("conv_channel", None): ((8, 256, 14, 14), 256, (3, 3), (1, 1), [1, 1, 1, 1]),
    ("conv_spatial", 16): ((8, 512, 7, 7), 512, (3, 1), (1, 3), [1, 1, 1, 1]),
    ("conv_spatial", 64): ((8, 64, 56, 56), 64, (3, 1), (1, 3), [1, 1, 1, 1]),
    ("linear", None): ((32, 2048), 1000, (), (), None),
    # Tucker-2: weight1 (rank, C, 1, 1), the core (rank, rank) with the second kernel, the
    # last 1x1 (n, rank). Not in FAMILIES yet: the clean-config table has no rows for it
    # (its full sweep belongs to the GPU-readiness work), so it autotunes over all of SPACE;
    # tests/trp_kernels/test_triton_native.py compiles it for sm_80 and sm_90.
    ("conv_tucker", None): ((8, 256, 14, 14), 256, (1, 1), (3, 3), [1, 1, 1, 1]),
}


SPATIAL_SEGS = tuple(seg for family, seg in LAYERS if family == "conv_spatial")  # tile-row widths swept


def launch_arguments(job: Job):
    """``(kernel, args, consts)`` of the launch the job's layer makes, captured from the
    public launcher (``_common.capture_launches``) with CPU tensors standing in."""
    import torch

    from trp_kernels.triton import _common, conv_channel, conv_spatial, conv_tucker, linear

    shape, nout, k1, k2, padding = LAYERS[(job.family, job.seg)]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[job.dtype]
    x = torch.empty(shape, dtype=dtype)
    if x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    w1 = torch.empty((job.rank, shape[1], *k1), dtype=dtype)
    w2 = torch.empty((nout, job.rank, *k2), dtype=dtype)
    has_bias, has_res, relu = job.epilogue
    bias = torch.empty(nout, dtype=dtype) if has_bias else None
    with _common.capture_launches() as launches:
        if job.family == "linear":
            res = torch.empty((shape[0], nout), dtype=dtype) if has_res else None
            linear.linear(x, w1, w2, bias, res, relu, config=job.config)
        elif job.family == "conv_tucker":
            core, w3 = torch.empty((job.rank, job.rank, *k2), dtype=dtype), torch.empty((nout, job.rank, 1, 1), dtype=dtype)
            out = conv_tucker.conv_tucker(x, w1, core, w3, None, None, [1, 1], padding, [1, 1], False, config=job.config)
            res = torch.empty_like(out) if has_res else None
            launches.clear()
            conv_tucker.conv_tucker(x, w1, core, w3, bias, res, [1, 1], padding, [1, 1], relu, config=job.config)
        else:
            fn = conv_channel.conv_channel if job.family == "conv_channel" else conv_spatial.conv_spatial
            out = fn(x, w1, w2, None, None, [1, 1], padding, [1, 1], False, config=job.config)
            res = torch.empty_like(out) if has_res else None
            launches.clear()
            fn(x, w1, w2, bias, res, [1, 1], padding, [1, 1], relu, config=job.config)
    (kernel, args, consts), = launches
    if consts.get("SEG", job.seg) != job.seg:
        raise AssertionError(f"{job.family}: the layer for SEG {job.seg} launches with SEG {consts['SEG']}")
    return kernel, args, consts


def source(job: Job):
    """The ``ASTSource`` Triton's JIT would compile for the job's launch: its signature,
    constants (constexprs, the config, integers equal to 1) and 16-divisibility attributes."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    kernel, args, consts = launch_arguments(job)
    return source_of(kernel, args, consts | job.config | {"PRECISION": "tf32" if job.pclass == "tf32" else "ieee"})


def source_of(kernel, args: tuple, consts: dict):
    """The ``ASTSource`` of ``kernel`` launched with ``args`` (tensors stand in for pointers)
    and the constexprs ``consts`` (the config included)."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    signature, constexprs, attrs = {}, {}, {}
    values = iter(args)
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", consts[p.name]
            continue
        kind, key = native_specialize_impl(CUDABackend, next(values), False, True, True)
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = key
        elif isinstance(key, str) and key:
            attrs[(i,)] = CUDABackend.parse_attr(key)
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def jobs(full: bool) -> list[Job]:
    """The configs to compile. Full: every candidate (``_common.SPACE``) for every family ×
    architecture × rank × precision class × epilogue (× tile-row width): what the committed
    table of clean configs is built from. Otherwise a subset that runs in CI: per family,
    architecture and tile-row width, every config the table keeps at the largest rank in
    float32 (the family's default precision) with the full epilogue, and at the smallest
    rank in fp16 with none."""
    from trp_kernels.triton import _common

    out = []
    for family, arch in itertools.product(FAMILIES, ARCHS):
        segs = SPATIAL_SEGS if family == "conv_spatial" else (None,)
        if full:
            cases = itertools.product(RANKS, PCLASSES, EPILOGUES, segs)
        else:
            cases = [(r, p, e, seg) for seg in segs for r, p, e in
                     ((RANKS[0], "fp16", EPILOGUES[0]), (RANKS[-1], DEFAULT_FP32[family], EPILOGUES[-1]))]
        for rank, pclass, epilogue, seg in cases:
            r_pad = _common.rank_pad(rank)
            keep = None if full else _common.clean_indices(family, arch, pclass, r_pad)
            for i, (bm, bk, bn, split, warps, stages) in _common.candidates(seg or 16):
                if keep is None or i in keep:
                    out.append(Job(family, arch, pclass, rank, epilogue, seg, i,
                                   dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, SPLIT_N=split), warps, stages))
    return out


def clean(row: dict) -> bool:
    return not row["error"] and not (row["spill_stores"] or row["spill_loads"]) and row["shared"] <= row["shared_limit"]


def table(payload: dict) -> dict:
    """The table ``_common.configs`` reads, from a full sweep: per family, architecture,
    precision class and padded rank, the candidates clean with and without the epilogue and
    (spatial) at every tile-row width swept."""
    from trp_kernels.triton import _common

    if not payload["environment"].get("full"):
        raise ValueError("the table is built from a full sweep (--full)")
    ok: dict = {}
    for r in payload["rows"]:
        key = f"{r['family']}/{r['arch']}/{r['pclass']}/{_common.rank_pad(r['rank'])}"
        ok.setdefault(key, {}).setdefault(r["candidate"], []).append(clean(r))
    return {"command": payload.get("command"), "triton": payload["environment"]["triton"],
            "date": payload["environment"]["date"],
            "kernels": payload["environment"]["kernels"],
            "space": [list(c) for c in _common.SPACE],
            "clean": {key: sorted(i for i, flags in by.items() if all(flags)) for key, by in sorted(ok.items())}}


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(job: Job) -> dict:
    """Compile one config; its row: registers, spill bytes, shared bytes, seconds, error."""
    row = asdict(job) | {"dtype": job.dtype}
    return compile_source(source(job), job.arch, job.num_warps, job.num_stages, row)


def compile_source(src, arch: int, num_warps: int, num_stages: int, row: dict) -> dict:
    """Compile ``src`` for ``arch``; ``row`` with registers, spill bytes, shared bytes,
    seconds and error added."""
    import triton
    from triton.backends.compiler import GPUTarget

    row = row | {"arch": arch, "registers": None, "spill_stores": None, "spill_loads": None, "shared": None,
                 "shared_limit": SHARED_LIMIT[arch], "seconds": None, "error": None}
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1: ptxas -v's report
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:  # noqa: BLE001 - a compile failure is this config's result
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:400]
        return row
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["shared"] = int(compiled.metadata.shared)
    text = log.getvalue()
    regs, spills = _PTXAS.search(text), _SPILL.search(text)
    if regs is None or spills is None:
        row["error"] = "no ptxas report (is TRITON_DUMP_PTXAS_LOG=1 set and the cache empty?)"
        return row
    row["registers"] = int(regs.group(1))
    row["spill_stores"], row["spill_loads"] = int(spills.group(1)), int(spills.group(2))
    return row


def compile_taps() -> list[dict]:
    """The tap-sparse conv kernel (``conv_taps.py``, one config) compiled for every
    architecture, in float32 (TF32) and float16, with the full epilogue, from the launch a
    ResNet 3x3 layer (128 channels at 28x28, half the columns kept) makes."""
    import torch

    from trp_kernels import reference
    from trp_kernels.triton import _common, conv_taps

    rows = []
    for arch, (dtype, precision) in itertools.product(ARCHS, ((torch.float32, "tf32"), (torch.float16, "ieee"))):
        x = torch.empty((8, 128, 28, 28), dtype=dtype).to(memory_format=torch.channels_last)
        keep = torch.arange(128 * 9).reshape(128, 3, 3) % 2 == 0
        packed, cols = reference.pack_taps(torch.empty((128, 128, 3, 3)), keep)
        bias, res = torch.empty(128, dtype=dtype), torch.empty((8, 128, 28, 28), dtype=dtype)
        with _common.capture_launches() as launches:
            conv_taps.conv_taps(x, packed.to(dtype), cols, bias, res, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), True)
        (kernel, args, consts), = launches
        src = source_of(kernel, args, consts | conv_taps.CONFIG | {"PRECISION": precision})
        rows.append(compile_source(src, arch, conv_taps.WARPS, conv_taps.STAGES,
                                   {"family": "conv_taps", "dtype": str(dtype).split(".")[-1]}))
    return rows


def kernel_keys() -> dict:
    """A hash of each ``triton.jit`` function's source in the kernel modules (the kernels and
    the helpers they call): the table records them, so that CI notices a kernel edited after
    the sweep. (Triton's own cache key also hashes line numbers, which any edit above a
    kernel shifts without changing its code.)"""
    import hashlib

    from triton.runtime.jit import JITFunction

    from trp_kernels.triton import _common, conv_channel, conv_spatial

    return {name: hashlib.sha256(fn.src.encode()).hexdigest()[:16]
            for module in (_common, conv_channel, conv_spatial)
            for name, fn in sorted(vars(module).items()) if isinstance(fn, JITFunction)}


def _worker_env(cache_dir: str) -> None:
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # empty: every config goes through ptxas
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def run(full: bool = False, jobs_n: int = 2, progress: bool = True) -> dict:
    """Compile the sweep in ``jobs_n`` processes; ``{"environment", "rows"}``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("native compilation needs TRITON_INTERPRET unset (the interpreter's triton.jit "
                           "builds functions that do not compile)")
    import triton
    import torch
    from tqdm import tqdm

    todo = jobs(full)
    with tempfile.TemporaryDirectory(prefix="trp-native-") as cache:
        _worker_env(cache)
        with ProcessPoolExecutor(max_workers=jobs_n, initializer=_worker_env, initargs=(cache,)) as pool:
            rows = list(tqdm(pool.map(compile_one, todo), total=len(todo), desc="native compile", unit="config",
                             disable=not progress))
    env = {"triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
           "full": full, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "kernels": kernel_keys()}
    return {"environment": env, "rows": rows}


def problems(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows that fail each target: a compile error, a spill, shared memory over the limit."""
    return {"error": [r for r in rows if r["error"]],
            "spills": [r for r in rows if not r["error"] and (r["spill_stores"] or r["spill_loads"])],
            "shared": [r for r in rows if not r["error"] and r["shared"] > r["shared_limit"]]}


def markdown(payload: dict) -> str:
    rows = payload["rows"]
    found = problems(rows)
    env = payload["environment"]
    lines = ["# Triton kernels compiled natively (no GPU)", "",
             f"Triton {env['triton']}, torch {env['torch']}, {env['date']}, "
             f"{'full sweep' if env['full'] else 'subset'}: "
             f"{len(rows)} configs; {len(found['error'])} failed to compile, {len(found['spills'])} spill registers, "
             f"{len(found['shared'])} need more shared memory than the architecture has.", "",
             "Per kernel and rank, for each precision class (both architectures, both epilogues, both tile-row "
             "widths of the spatial kernel): configs that compile with no spill and within shared memory, of "
             "those compiled.", "",
             "| kernel | rank | " + " | ".join(PCLASSES) + " |", "|---|---|" + "---|" * len(PCLASSES)]
    groups: dict = {}
    for r in rows:
        g = groups.setdefault((r["family"], r["rank"]), {}).setdefault(r["pclass"], [0, 0])
        g[0] += clean(r)
        g[1] += 1
    for (family, rank), by_class in groups.items():
        cells = [f"{by_class[d][0]}/{by_class[d][1]}" if d in by_class else "–" for d in PCLASSES]
        lines.append(f"| {family} | {rank} | " + " | ".join(cells) + " |")
    lines += ["", "Every config:", "",
              "| kernel | sm | precision | rank | epilogue | SEG | BLOCK_M×K×N, SPLIT_N | warps, stages | registers | "
              "spill stores / loads (bytes) | shared (bytes) | compile s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        epi = "bias+res+relu" if all(r["epilogue"]) else "none" if not any(r["epilogue"]) else str(r["epilogue"])
        shape = f"{c['BLOCK_M']}×{c['BLOCK_K']}×{c['BLOCK_N']}, {c['SPLIT_N']}"
        if r["error"]:
            tail = f"error: {r['error']} | – | – | – |"
        else:
            over = " (over)" if r["shared"] > r["shared_limit"] else ""
            tail = (f"{r['registers']} | {r['spill_stores']} / {r['spill_loads']} | {r['shared']}{over} | "
                    f"{r['seconds']} |")
        lines.append(f"| {r['family']} | {r['arch']} | {r['pclass']} | {r['rank']} | {epi} | {r['seg'] or '–'} | "
                     f"{shape} | {r['num_warps']}, {r['num_stages']} | {tail}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trp_kernels.triton.native", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="every family × arch × rank × dtype × epilogue × config")
    p.add_argument("--jobs", type=int, default=2, help="compiler processes (default 2)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--out", default=None, help="write report.md to this directory")
    p.add_argument("--table", action="store_true",
                   help="with --full: write the clean-config table the kernels' autotuning reads "
                        "(trp_kernels/triton/clean_configs.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.table and not args.full:
        p.error("--table needs --full (the table is built from every candidate)")
    try:
        payload = run(args.full, args.jobs, not args.quiet)
    except RuntimeError as e:
        p.error(str(e))
    payload["command"] = "python -m trp_kernels.triton.native " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(payload)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    if args.table:
        from trp_kernels.triton import _common

        with open(_common.CLEAN_TABLE, "w") as f:
            json.dump(table(payload), f, indent=1)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write(text)
    print(text.split("\n\n")[1])
    found = problems(payload["rows"])
    return 1 if found["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
