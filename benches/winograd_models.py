"""A whole compiled model with Winograd F(2x2, 3x3) first stages where they win (the
extension's default, 'auto') against the same model with none ('never'): two copies of the
model suite's case (seed 0), each built (trp.program, its dense-conv decisions included) and
run under its own mode, alternating call by call (the pair's order swapping every round),
under inference_mode, medians and the median of per-pair ratios.

    python benches/winograd_models.py MODEL BATCH [SCHEME]     e.g. resnet18 1
    (results: benches/results/winograd/models.txt)
"""
import sys

import torch

from model_ab import ab_line, bundle_from_args, two_builds
from trp_kernels import cpp


def main() -> None:
    lib = cpp._require()
    old = lib.winograd()
    models = {}
    try:
        for mode in ("never", "auto"):
            lib.winograd(mode)
            case, b = bundle_from_args(sys.argv[1:])
            models[mode] = b["trp"], b["x"]
            with torch.inference_mode():
                for _ in range(3):
                    b["trp"](b["x"])
        calls = 60 if case.batch == 1 else 16
        times, shape = two_builds(models, calls, lambda mode: lib.winograd(mode))
    finally:
        lib.winograd(old)
    print(f"{case.name} b{case.batch}: winograd auto {ab_line(times, shape, 'auto', 'never', calls)}")

if __name__ == "__main__":
    main()
