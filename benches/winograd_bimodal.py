"""The dense Winograd path's time on one layer, in several fresh processes: ResNet's 256->256
3x3 at 14x14, batch 1, bias + ReLU, Winograd ('always') and direct ('never') interleaved call
by call in each process, median ms. Seen while measuring the tap-sparse kernel: Winograd
took 0.35 ms in some processes and 0.60 in others; unexplained so far.

    python benches/winograd_bimodal.py > benches/results/winograd/bimodal.txt
"""

from __future__ import annotations

import subprocess
import sys

CHILD = r'''
import torch
from trp_kernels import cpp
from trp.timing import compare
lib = cpp._require()
x = torch.randn(1, 256, 14, 14).contiguous(memory_format=torch.channels_last)
w = cpp.kernel_layout(torch.randn(256, 256, 3, 3) / 48); bias = torch.randn(256)
def run(mode):
    def f():
        lib.winograd(mode)
        try: return cpp.fused_chain(x, [w], bias, "dense", (1, 1), (1, 1, 1, 1), (1, 1), None, True)
        finally: lib.winograd("auto")
    return f
t = compare({"always": run("always"), "never": run("never")}, warmup=3, repeats=40, interleave=True)
print(f"{t['always']['median_ms']:.3f} {t['never']['median_ms']:.3f} {torch.get_num_threads()}")
'''


def main(processes: int = 8) -> None:
    print(f"# python benches/winograd_bimodal.py; {processes} processes")
    print("| process | Winograd ms | direct ms | Winograd / direct | threads |")
    print("|---|---|---|---|---|")
    for i in range(processes):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout.split()
        wino, direct = float(out[0]), float(out[1])
        print(f"| {i} | {wino:.3f} | {direct:.3f} | {wino / direct:.2f} | {out[2]} |", flush=True)


if __name__ == "__main__":
    main()
