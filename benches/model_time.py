"""trp.compile's ResNet-50 tucker+pointwise (the model suite's case, seed 0) alone in this process: the median
of 30 calls at batch 1 (12 at batch 8) after 5 warm-up calls. Two builds compare by running it once per build
in turn, each in a process of its own:

    for r in 1 2 3; do PYTHONPATH=/tmp/before python benches/model_time.py 8 before; python benches/model_time.py 8 after; done
"""
import statistics
import sys
import time

import torch

from trp.benchmark import cases as C, providers as P


def main() -> None:
    batch, label = int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else ""
    case = C.ModelCase("resnet50", 224, batch, "cpu", torch.float32, scheme=("tucker", "pointwise"))
    b = P.model_bundle(case, torch.Generator().manual_seed(0))
    m, x = b["trp"], b["x"]
    with torch.inference_mode():
        for _ in range(5):
            m(x)
        ts = []
        for _ in range(30 if batch == 1 else 12):
            t0 = time.perf_counter()
            m(x)
            ts.append(time.perf_counter() - t0)
    print(f"{label} b{batch} {statistics.median(ts) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
