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
DTYPES = ("fp16", "bf16", "fp32")
FAMILIES = ("conv_channel", "conv_spatial", "linear")
EPILOGUES = ((False, False, False), (True, True, True))  # (HAS_BIAS, HAS_RES, RELU)
SPATIAL_SEGS = (16, 64)  # tile-row widths: a 7-wide and a 56-wide output


@dataclass(frozen=True)
class Job:
    family: str
    arch: int
    dtype: str
    rank: int
    epilogue: tuple
    seg: Optional[int]
    config: dict      # BLOCK_M, BLOCK_K, BLOCK_N, SPLIT_N
    num_warps: int
    num_stages: int


def _kernel_and_consts(job: Job):
    from trp_kernels.triton import _common, conv_channel, conv_spatial

    import torch

    r_pad = _common.rank_pad(job.rank)
    bias, res, relu = job.epilogue
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[job.dtype]
    precision = _common.dot_precision(dtype, conv=job.family != "linear")  # what a launch would pass
    consts = dict(R_PAD=r_pad, HAS_BIAS=bias, HAS_RES=res, RELU=relu, PRECISION=precision)
    if job.family == "conv_spatial":
        consts.update(KH=3, KW=3, SEG=job.seg)
        return conv_spatial._conv_spatial_kernel, consts
    kh = 1 if job.family == "linear" else 3
    consts.update(KH=kh, KW=kh)
    return conv_channel._conv_channel_kernel, consts


def jobs(full: bool) -> list[Job]:
    """The configs to compile: those the kernels' own pruning keeps (``_common.configs``)."""
    from trp_kernels.triton import _common

    out = []
    for family, arch in itertools.product(FAMILIES, ARCHS):
        segs = SPATIAL_SEGS if family == "conv_spatial" else (None,)
        if full:
            cases = itertools.product(RANKS, DTYPES, EPILOGUES, segs)
        else:  # the smallest rank in fp16 without an epilogue, the largest in fp32 with all of it
            cases = [(RANKS[0], "fp16", EPILOGUES[0], segs[-1]), (RANKS[-1], "fp32", EPILOGUES[-1], segs[-1])]
        for rank, dtype, epilogue, seg in cases:
            kept = _common.configs(_common.rank_pad(rank), seg or 16)
            for i, cfg in enumerate(kept):
                if not full and rank == RANKS[0] and i > 0:
                    continue  # the small rank: its first config only
                out.append(Job(family, arch, dtype, rank, epilogue, seg, dict(cfg.kwargs), cfg.num_warps,
                               cfg.num_stages))
    return out


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(job: Job) -> dict:
    """Compile one config; its row: registers, spill bytes, shared bytes, seconds, error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = asdict(job) | {"registers": None, "spill_stores": None, "spill_loads": None, "shared": None,
                         "shared_limit": SHARED_LIMIT[job.arch], "seconds": None, "error": None}
    kernel, consts = _kernel_and_consts(job)
    consts = consts | job.config
    signature = {p.name: ("constexpr" if p.is_constexpr else f"*{job.dtype}" if p.name.endswith("_ptr") else "i32")
                 for p in kernel.params}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1: ptxas -v's report
            compiled = triton.compile(source, target=GPUTarget("cuda", job.arch, 32),
                                      options=dict(num_warps=job.num_warps, num_stages=job.num_stages))
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
           "full": full, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return {"environment": env, "rows": rows}


def problems(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows that fail each target: a compile error, a spill, shared memory over the limit."""
    return {"error": [r for r in rows if r["error"]],
            "spills": [r for r in rows if not r["error"] and (r["spill_stores"] or r["spill_loads"])],
            "shared": [r for r in rows if not r["error"] and r["shared"] > r["shared_limit"]]}


def markdown(payload: dict) -> str:
    rows = payload["rows"]
    found = problems(rows)
    lines = ["# Triton kernels compiled natively (no GPU)", "",
             f"Triton {payload['environment']['triton']}, torch {payload['environment']['torch']}, "
             f"{payload['environment']['date']}, {'full sweep' if payload['environment']['full'] else 'subset'}: "
             f"{len(rows)} configs; {len(found['error'])} failed to compile, {len(found['spills'])} spill registers, "
             f"{len(found['shared'])} need more shared memory than the architecture has.", "",
             "Per kernel, rank and dtype (both architectures, both epilogues): configs that compile with no spill "
             "and within shared memory, of those compiled.", "",
             "| kernel | rank | " + " | ".join(DTYPES) + " |", "|---|---|" + "---|" * len(DTYPES)]
    groups: dict = {}
    for r in rows:
        clean = not r["error"] and not (r["spill_stores"] or r["spill_loads"]) and r["shared"] <= r["shared_limit"]
        g = groups.setdefault((r["family"], r["rank"]), {}).setdefault(r["dtype"], [0, 0])
        g[0] += clean
        g[1] += 1
    for (family, rank), by_dtype in groups.items():
        cells = [f"{by_dtype[d][0]}/{by_dtype[d][1]}" if d in by_dtype else "–" for d in DTYPES]
        lines.append(f"| {family} | {rank} | " + " | ".join(cells) + " |")
    lines += ["", "Every config:", "",
             "| kernel | sm | dtype | rank | epilogue | SEG | BLOCK_M×K×N, SPLIT_N | warps, stages | registers | "
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
        lines.append(f"| {r['family']} | {r['arch']} | {r['dtype']} | {r['rank']} | {epi} | {r['seg'] or '–'} | "
                     f"{shape} | {r['num_warps']}, {r['num_stages']} | {tail}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trp_kernels.triton.native", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="every family × arch × rank × dtype × epilogue × config")
    p.add_argument("--jobs", type=int, default=2, help="compiler processes (default 2)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--out", default=None, help="write report.md to this directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        payload = run(args.full, args.jobs, not args.quiet)
    except RuntimeError as e:
        p.error(str(e))
    payload["command"] = "python -m trp_kernels.triton.native " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(payload)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write(text)
    print(text.split("\n\n")[1])
    found = problems(payload["rows"])
    return 1 if found["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
