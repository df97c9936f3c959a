"""The tap-sparse conv (SPP) against the dense conv, layer by layer: ResNet-18's 3x3 stride-1
shapes at batch 1 and 8, with 50% and 75% of the im2col columns pruned (random columns),
bias + residual + ReLU epilogue, float32, channels_last. One process; trp's kernels timed
call by call in rotating order (trp.timing.compare, interleave=True), PyTorch's oneDNN conv
in blocks of its own (its thread pool is not trp's), median ms.

Columns: trp's dense kernel with Winograd where it wins (its default), the same direct (no
Winograd: the multiplies the tap-sparse kernel is measured against), PyTorch's oneDNN conv,
and the tap-sparse kernel; the speed-up over the direct dense kernel as a fraction of the
ideal (columns / kept columns), the issue's target being 0.8.

    python benches/taps_layers.py > benches/results/taps-layers.txt
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from trp.timing import compare, machine_info
from trp_kernels import cpp, reference

SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]  # (channels, size): ResNet-18's 3x3 stride-1 convs


def main(repeats: int = 30) -> None:
    lib = cpp._require()
    info = machine_info()
    print(f"# {' '.join(sys.argv)}; {info['cpu']}, {torch.get_num_threads()} threads, torch {info['torch']}, "
          f"ISA {lib.isa()}")
    print("| layer | batch | pruned | dense Winograd | dense direct | oneDNN | tap-sparse | speed-up over direct "
          "| ideal | fraction of ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for c, size in SHAPES:
        for batch in (1, 8):
            x = torch.randn(batch, c, size, size, generator=g).contiguous(memory_format=torch.channels_last)
            w = torch.randn(c, c, 3, 3, generator=g) / (9 * c) ** 0.5
            bias = torch.randn(c, generator=g)
            res = torch.randn(batch, c, size, size, generator=g).contiguous(memory_format=torch.channels_last)
            wl = cpp.kernel_layout(w)
            for pruned in (0.5, 0.75):
                keep = torch.rand(c, 3, 3, generator=g) >= pruned
                packed, cols = reference.pack_taps(w, keep)
                wz = (w * keep).contiguous(memory_format=torch.channels_last)

                def dense(mode):
                    def run():
                        lib.winograd(mode)
                        try:
                            return cpp.fused_chain(x, [wl], bias, "dense", (1, 1), (1, 1, 1, 1), (1, 1), res, True)
                        finally:
                            lib.winograd("auto")
                    return run

                fns = {"winograd": dense("auto"), "direct": dense("never"),
                       "onednn": lambda: torch.relu(F.conv2d(x, wz, bias, 1, 1) + res),
                       "taps": lambda: cpp.conv_taps(x, packed, cols, bias, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), res,
                                                     True)}
                with torch.no_grad():
                    exact = torch.relu(F.conv2d(x.double(), wz.double(), bias.double(), 1, 1) + res.double())
                    err = (fns["taps"]().double() - exact).abs().max().item() / exact.abs().max().item()
                    assert err < 1e-5, err
                    # trp's kernels (its OpenMP pool) call by call; PyTorch's conv in blocks of its
                    # own, after its pool and trp's have gone idle
                    pools = {"winograd": "trp", "direct": "trp", "taps": "trp", "onednn": "torch"}
                    t = compare(fns, warmup=3, repeats=repeats, interleave=True, pools=pools)
                ms = {k: v["median_ms"] for k, v in t.items()}
                ideal = cols.numel() and keep.numel() / cols.numel()
                speed = ms["direct"] / ms["taps"]
                print(f"| {c}->{c} @{size} | {batch} | {pruned:.0%} | {ms['winograd']:.3f} | {ms['direct']:.3f} "
                      f"| {ms['onednn']:.3f} | {ms['taps']:.3f} | {speed:.2f} | {ideal:.2f} | {speed / ideal:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
