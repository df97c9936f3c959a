"""A layer's repeated call through what its last call kept (``trp_kernels.ops.run_kept``)
against the checked way (``ops.conv_chain`` finding its plan by key), on a whole compiled
model, in one process, call by call, the order alternating (same caches, same drift).

    python benches/kept_ab.py [--batch 1] [--calls 300]
    (results: benches/results/kept-plans.txt)
"""
import argparse

import torch

from model_ab import alternate, report, resnet50_case
from trp_kernels import ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args()
    case, model, x = resnet50_case(args.batch)
    kept = ops.run_kept
    hits = [0]

    def counting(*a, **k):
        out = kept(*a, **k)
        hits[0] += out is not None
        return out

    def use(fn):
        def switch():
            ops.run_kept = fn
        return switch

    try:
        with torch.inference_mode():
            ops.run_kept = counting
            model(x)
            hits[0] = 0
            model(x)
            layers = hits[0]
        times = alternate(lambda: model(x), {"kept": use(counting), "checked": use(lambda *a, **k: None)},
                          args.calls)
    finally:
        ops.run_kept = kept
    print(f"{case.name} batch {args.batch}: {layers} layers run what their last call kept; "
          f"{args.calls} calls each, alternating")
    report(times)


if __name__ == "__main__":
    main()
