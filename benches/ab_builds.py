"""Two builds of the C++ extension on the same layers, in one process, call by call.

    git worktree add /tmp/before <commit> && (cd /tmp/before && python setup.py build_ext --inplace)
    python benches/ab_builds.py /tmp/before [--batch 1] [--select pw] [--cold-mb 150]

Each case builds one ``_C.LowRankPlan`` per build on the same tensors and runs them
alternately (the order swapping every round), so that both see the same caches and the
same drift of a shared machine; the ratio is the median of the per-round ratios.
Separate processes, one per build, could not tell 2% apart on this kind of machine, where
the same process run twice differed by up to 30%. ``--cold-mb``: each round runs on the
next of as many copies of weights, input, residual and output as fill that many MB, so the
kernels meet them cold, as in a whole model; each build then has copies of its own. The build under test is the installed one
(``trp_kernels._C``); outputs of the two builds are compared when run hot.
"""
import argparse
import glob
import importlib.util
import math
import os
import statistics
import time

import torch

import trp_kernels.cpp as cpp

# (name, in channels, ranks, out channels, output size, kernel, stride, residual, kernel name):
# ResNet-50's pointwise and Tucker layers at ratio 0.25.
CASES = [
    ("pw 64->16->256 @56", 64, (16,), 256, 56, 1, 1, True, "channel"),
    ("pw 256->16->64 @56", 256, (16,), 64, 56, 1, 1, False, "channel"),
    ("pw 128->32->512 @28", 128, (32,), 512, 28, 1, 1, True, "channel"),
    ("pw 1024->64->256 @14", 1024, (64,), 256, 14, 1, 1, False, "channel"),
    ("pw 256->64->1024 @14", 256, (64,), 1024, 14, 1, 1, True, "channel"),
    ("pw 1024->256->2048 @7 s2", 1024, (256,), 2048, 7, 1, 2, False, "channel"),
    ("pw 512->128->2048 @7", 512, (128,), 2048, 7, 1, 1, True, "channel"),
    ("pw 2048->128->512 @7", 2048, (128,), 512, 7, 1, 1, False, "channel"),
    ("pw 1024->128->512 @14", 1024, (128,), 512, 14, 1, 1, False, "channel"),
    ("fc 2048->256->1000", 2048, (256,), 1000, 1, 1, 1, False, "channel"),  # the head, as a 1x1 image
    ("tucker 64 r16 @56", 64, (16, 16), 64, 56, 3, 1, False, "tucker"),
    ("tucker 64 r32 @56", 64, (32, 32), 64, 56, 3, 1, False, "tucker"),
    ("tucker 128 r32 @28", 128, (32, 32), 128, 28, 3, 1, False, "tucker"),
    ("tucker 128 r64 @28", 128, (64, 64), 128, 28, 3, 1, False, "tucker"),
    ("tucker 256 r64 @14", 256, (64, 64), 256, 14, 3, 1, False, "tucker"),
    ("tucker 512 r128 @7", 512, (128, 128), 512, 7, 3, 1, False, "tucker"),
    ("tucker 128 r32 @28 s2", 128, (32, 32), 128, 28, 3, 2, False, "tucker"),
    ("tucker 128 r64 @28 s2", 128, (64, 64), 128, 28, 3, 2, False, "tucker"),
    ("tucker 512 r128 @7 s2", 512, (128, 128), 512, 7, 3, 2, False, "tucker"),
    ("channel 64 r16 @56", 64, (16,), 64, 56, 3, 1, True, "channel"),
    ("channel 256 r64 @14", 256, (64,), 256, 14, 3, 1, True, "channel"),
]


def _load(worktree: str):
    paths = glob.glob(os.path.join(worktree, "trp_kernels", "_C*.so"))
    if not paths:
        raise SystemExit(f"no built extension under {worktree}/trp_kernels (run setup.py build_ext --inplace there)")
    spec = importlib.util.spec_from_file_location("ab_before._C", paths[0])
    lib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lib)
    return lib


def _tensors(case, batch):
    _, cin, ranks, cout, ohw, k, s, res, kernel = case
    cl = torch.channels_last
    x = torch.randn(batch, cin, ohw * s, ohw * s).contiguous(memory_format=cl)
    if kernel == "tucker":
        ws = [torch.randn(ranks[0], cin, 1, 1), torch.randn(ranks[1], ranks[0], k, k), torch.randn(cout, ranks[1], 1, 1)]
    else:
        ws = [torch.randn(ranks[0], cin, k, k), torch.randn(cout, ranks[0], 1, 1)]
    ws = [cpp.kernel_layout(w * 0.1) for w in ws]
    bias = torch.randn(cout)
    r = torch.randn(batch, cout, ohw, ohw).contiguous(memory_format=cl) if res else None
    return x, ws, bias, r, torch.empty(batch, cout, ohw, ohw).contiguous(memory_format=cl)


def _copy(v):
    if v is None:
        return None
    if isinstance(v, list):
        return [_copy(w) for w in v]
    return v.clone(memory_format=torch.preserve_format)


def _plan(lib, case, t):
    _, _, _, _, _, k, s, _, kernel = case
    x, ws, bias, r, out = t
    arrays = [cpp._panel(w, "weight")[0] for w in ws] + [None] * (3 - len(ws))
    pad = (k // 2, k // 2)
    return lib.LowRankPlan(cpp._nhwc(x), arrays[0], arrays[1], bias.numpy(), None if r is None else cpp._nhwc(r),
                           cpp._nhwc(out), kernel, k, k, (s, s), pad, (1, 1), True, arrays[2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", help="a worktree with the other build (setup.py build_ext --inplace)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--select", default="", help="only cases whose name contains this")
    p.add_argument("--cold-mb", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=300)
    args = p.parse_args()
    builds = (_load(args.before), cpp._require())
    torch.manual_seed(0)
    ratios = []
    for case in CASES:
        if args.select not in case[0]:
            continue
        first = _tensors(case, args.batch)
        mb = sum(t.numel() for t in (first[0], *first[1], first[4], *(() if first[3] is None else (first[3],)))) * 4e-6
        n_sets = max(1, int(args.cold_mb / mb)) if args.cold_mb else 1
        sets = [first] + [_tensors(case, args.batch) for _ in range(n_sets - 1)]
        # Cold: each build its own copies (equal values), so that neither finds in cache what
        # the other just read (a per-round ratio would otherwise pair a cold call with a warm one).
        own = [sets, [tuple(_copy(v) for v in t) for t in sets] if args.cold_mb else sets]
        plans = [[_plan(lib, case, own[b][j]) for b, lib in enumerate(builds)] for j in range(len(sets))]
        outs = [[own[0][j][4], torch.empty_like(own[0][j][4])] for j in range(len(sets))]  # each build its own output
        times = ([], [])
        for i in range(args.rounds + 20):
            j = i % len(sets)
            for b in ((0, 1) if i % 2 == 0 else (1, 0)):
                x, _, _, r, _ = own[b][j]
                t0 = time.perf_counter()
                plans[j][b].run(x.data_ptr(), outs[j][b].data_ptr(), 0 if r is None else r.data_ptr(),
                                torch.get_num_threads())
                if i >= 20:
                    times[b].append(time.perf_counter() - t0)
        if not torch.allclose(outs[0][0], outs[0][1], rtol=1e-4, atol=1e-4):
            raise SystemExit(f"{case[0]}: the two builds disagree")
        ratio = statistics.median(b / a for a, b in zip(*times))
        ratios.append(ratio)
        print(f"{case[0]:26s} b{args.batch} copies {len(sets):3d}  before {statistics.median(times[0]) * 1e3:.3f}  "
              f"after {statistics.median(times[1]) * 1e3:.3f} ms  after/before {ratio:.3f}")
    if ratios:
        print(f"geomean after/before {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f} over {len(ratios)} cases")


if __name__ == "__main__":
    main()
