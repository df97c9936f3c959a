"""The Tucker-2 layer 64->64 3x3 @56 with ranks (16, 16) at batch 8, stage by stage: each
stage alone as the fused C++ kernel's one-stage (dense) form against PyTorch's oneDNN conv,
and the fused three-stage kernel against the three oneDNN convs; hot, one process. Then the
same MACs per pixel as the core (144) as one 1x1 stage of 16, 32 or 64 output channels: the
register-blocked loop with one vector of columns against two.

    python benches/tucker_stages.py   (results: benches/results/cpu-layers-tucker-epyc-streaming/summary.txt)
"""
import torch
import torch.nn.functional as F

from channel_stride_probe import _median_ms
from trp_kernels import cpp


def main() -> None:
    torch.manual_seed(0)
    cl, batch = torch.channels_last, 8
    x = torch.randn(batch, 64, 56, 56).contiguous(memory_format=cl)
    w1, w2, w3 = torch.randn(16, 64, 1, 1) * 0.1, torch.randn(16, 16, 3, 3) * 0.1, torch.randn(64, 16, 1, 1) * 0.1
    h1 = F.conv2d(x, w1).contiguous(memory_format=cl)
    h2 = F.conv2d(h1, w2, padding=1).contiguous(memory_format=cl)
    laid = [cpp.kernel_layout(w) for w in (w1, w2, w3)]
    one, same = ((1, 1), (0, 0, 0, 0), (1, 1)), ((1, 1), (1, 1, 1, 1), (1, 1))
    pixels = batch * 56 * 56
    cases = [
        ("stage 1: 64->16 1x1", 64 * 16, lambda: cpp.fused_chain(x, [laid[0]], None, "dense", *one),
         lambda: F.conv2d(x, w1)),
        ("core: 16->16 3x3", 16 * 9 * 16, lambda: cpp.fused_chain(h1, [laid[1]], None, "dense", *same),
         lambda: F.conv2d(h1, w2, padding=1)),
        ("stage 3: 16->64 1x1", 16 * 64, lambda: cpp.fused_chain(h2, [laid[2]], None, "dense", *one),
         lambda: F.conv2d(h2, w3)),
        ("fused Tucker-2", 64 * 16 + 16 * 9 * 16 + 16 * 64, lambda: cpp.fused_chain(x, laid, None, "tucker", *same),
         lambda: F.conv2d(F.conv2d(F.conv2d(x, w1), w2, padding=1), w3)),
    ]
    with torch.inference_mode():
        for name, macs, ours, theirs in cases:
            a, b = _median_ms(ours), _median_ms(theirs)
            print(f"{name:22s} trp C++ {a:.3f} ms ({pixels * macs / a / 1e6:5.0f} GMAC/s)  oneDNN {b:.3f} ms "
                  f"({pixels * macs / b / 1e6:5.0f} GMAC/s)")
        for cout in (16, 32, 64):
            xi = torch.randn(batch, 144, 56, 56).contiguous(memory_format=cl)
            w = torch.randn(cout, 144, 1, 1) * 0.1
            lw = cpp.kernel_layout(w)
            a = _median_ms(lambda: cpp.fused_chain(xi, [lw], None, "dense", *one))
            b = _median_ms(lambda: F.conv2d(xi, w))
            macs = pixels * 144 * cout
            print(f"1x1 144->{cout:<3d}            trp C++ {a:.3f} ms ({macs / a / 1e6:5.0f} GMAC/s)  oneDNN {b:.3f} ms "
                  f"({macs / b / 1e6:5.0f} GMAC/s)")


if __name__ == "__main__":
    main()
