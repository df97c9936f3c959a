"""The fused C++ kernel's speed on 1x1 layers whose input channel count makes NHWC pixels a
multiple of 4 KiB apart (1024, 2048) against neighbouring counts (16 fewer or more), hot,
one process: the L1 set aliasing that the kernels' `crowded` rows (csrc/lowrank_kernels.inc)
answer. Also PyTorch's max-pool and global average pool on ResNet-50's shapes, for the
breakdown of the head and stem.

    cd benches && python channel_stride_probe.py [WORKTREE]   (results: benches/results/channel-stride-probe.txt)

WORKTREE: a worktree with another build of the extension (setup.py build_ext --inplace), run
instead of the installed one.
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import ab_builds as A
import trp_kernels.cpp as cpp


def _median_ms(fn, calls=300, warmup=20):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    lib = A._load(sys.argv[1]) if len(sys.argv) > 1 else cpp._require()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    for cin, r, cout, hw, s in [(2048, 128, 512, 7, 1), (2032, 128, 512, 7, 1), (2064, 128, 512, 7, 1),
                                (1024, 64, 256, 14, 1), (1008, 64, 256, 14, 1), (1040, 64, 256, 14, 1),
                                (1024, 128, 512, 14, 1), (1008, 128, 512, 14, 1),
                                (1024, 256, 2048, 7, 2), (1008, 256, 2048, 7, 2)]:
        case = (f"pw {cin}->{r}->{cout} @{hw} s{s}", cin, (r,), cout, hw, 1, s, False, "channel")
        t = A._tensors(case, 1)
        plan = A._plan(lib, case, t)
        x, out = t[0], t[4]
        ms = _median_ms(lambda: plan.run(x.data_ptr(), out.data_ptr(), 0, threads))
        print(f"{case[0]:28s} b1 {ms:.3f} ms  {hw * hw * r * (cin + cout) / ms / 1e6:6.1f} GMAC/s")
    with torch.inference_mode():
        for b in (1, 8):
            x = torch.randn(b, 64, 112, 112).contiguous(memory_format=torch.channels_last)
            y = torch.randn(b, 2048, 7, 7).contiguous(memory_format=torch.channels_last)
            print(f"F.max_pool2d(3, 2, 1) 64x112x112 channels_last b{b} {_median_ms(lambda: F.max_pool2d(x, 3, 2, 1)):.3f} ms")
            print(f"F.adaptive_avg_pool2d(1) 2048x7x7 channels_last b{b} "
                  f"{_median_ms(lambda: F.adaptive_avg_pool2d(y, 1)):.3f} ms")


if __name__ == "__main__":
    main()
