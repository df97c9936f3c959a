"""trp.compile's ResNet-50 tucker+pointwise (the model suite's case, seed 0) alone in this process: the median
of 30 calls at batch 1 (12 at batch 8) after 5 warm-up calls. Two builds compare by running it once per build
in turn, each in a process of its own:

    for r in 1 2 3; do PYTHONPATH=/tmp/before python benches/model_time.py 8 before; python benches/model_time.py 8 after; done
"""
import sys

import torch

from channel_stride_probe import _median_ms
from model_ab import resnet50_case


def main() -> None:
    batch, label = int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else ""
    _, m, x = resnet50_case(batch)
    with torch.inference_mode():
        ms = _median_ms(lambda: m(x), calls=30 if batch == 1 else 12, warmup=5)
    print(f"{label} b{batch} {ms:.2f} ms")


if __name__ == "__main__":
    main()
