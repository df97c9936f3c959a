"""A layer's repeated call through what its last call kept (``trp_kernels.ops.run_kept``)
against the checked way (``ops.conv_chain`` finding its plan by key), on a whole compiled
model, in one process, call by call, the order alternating (same caches, same drift).

    python benches/kept_ab.py [--batch 1] [--calls 300]
    (results: benches/results/kept-plans.txt)
"""
import argparse
import statistics
import time

import torch

from trp.benchmark import cases as C, providers as P
from trp_kernels import ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args()
    case = C.ModelCase("resnet50", 224, args.batch, "cpu", torch.float32, scheme=("tucker", "pointwise"))
    bundle = P.model_bundle(case, torch.Generator().manual_seed(0))
    model, x = bundle["trp"], bundle["x"]
    kept = ops.run_kept
    hits = [0]

    def counting(*a, **k):
        out = kept(*a, **k)
        hits[0] += out is not None
        return out

    variants = {"kept": counting, "checked": lambda *a, **k: None}
    times = {name: [] for name in variants}
    try:
        with torch.inference_mode():
            ops.run_kept = counting
            model(x)
            hits[0] = 0
            model(x)
            layers = hits[0]
            for i in range(args.calls):
                for name in (("kept", "checked") if i % 2 else ("checked", "kept")):
                    ops.run_kept = variants[name]
                    t0 = time.perf_counter()
                    model(x)
                    times[name].append(time.perf_counter() - t0)
    finally:
        ops.run_kept = kept
    ratio = statistics.median(a / b for a, b in zip(times["kept"], times["checked"]))
    print(f"{case.name} batch {args.batch}: {layers} layers run what their last call kept; "
          f"{args.calls} calls each, alternating")
    for name, t in times.items():
        print(f"  {name:8s} median {statistics.median(t) * 1e3:.3f} ms")
    print(f"  kept / checked, median of per-pair ratios: {ratio:.3f}")
    print(f"  torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
