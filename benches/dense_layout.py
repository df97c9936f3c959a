"""PyTorch's conv (oneDNN, channels_last input) with its weight contiguous against the same weight in trp's
kernel layout (trp_kernels.cpp.kernel_layout: same values and shape, permuted strides), which a dense conv's
weight takes when it joins a whole-model program (trp/program.py, FALLBACK_SLOWDOWN). Median ms of 100 calls
after 10, under inference_mode.

    python benches/dense_layout.py > results/dense-layout.txt
"""
import torch
import torch.nn.functional as F

from channel_stride_probe import _median_ms
from trp_kernels import cpp


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'batch, conv':34s} {'contiguous':>10s} {'trp layout':>10s} {'ratio':>6s}")
    torch.manual_seed(0)
    for b, c, n, hw, k in [(1, 16, 16, 32, 3), (1, 64, 64, 56, 3), (1, 256, 64, 56, 1), (1, 512, 2048, 7, 1),
                           (1, 1024, 2048, 14, 1), (8, 256, 256, 14, 3), (8, 64, 256, 56, 1)]:
        x = torch.randn(b, c, hw, hw).contiguous(memory_format=torch.channels_last)
        w = torch.randn(n, c, k, k)
        laid = cpp.kernel_layout(w)
        with torch.inference_mode():
            a = _median_ms(lambda: F.conv2d(x, w, None, 1, k // 2), calls=100, warmup=10)
            z = _median_ms(lambda: F.conv2d(x, laid, None, 1, k // 2), calls=100, warmup=10)
        print(f"b{b} {c}->{n} {k}x{k} @{hw:<3d}{'':14s} {a:10.3f} {z:10.3f} {z / a:6.2f}")


if __name__ == "__main__":
    main()
