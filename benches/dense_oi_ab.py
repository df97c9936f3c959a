"""trp.program with dense 1x1 convs read in PyTorch's own (out, in) layout (the dense kernel's
"dense_oi" form, trp_kernels.cpp.reads_as_is) against the same model built without it (every
dense conv's weight in the kernel's [in][out] layout, or left to PyTorch): two copies of the
model suite's case, each built under its own rule, alternating call by call in one process,
medians and the median of per-pair ratios.

    python benches/dense_oi_ab.py MODEL BATCH [SCHEME] [--panel-first]     e.g. resnet50 1
    (results: benches/results/dense-oi.txt)
"""
import sys

import torch

from model_ab import ab_line, bundle_from_args, two_builds
from trp_kernels import cpp


def main() -> None:
    real = cpp.reads_as_is
    # built in this order (--panel-first: the other); a build's dense decisions are timed, and
    # the first build of a process can decide otherwise than the second
    ORDER = [("oi", real), ("panel", lambda w: False)]
    if "--panel-first" in sys.argv:
        sys.argv.remove("--panel-first")
        ORDER.reverse()
    models = {}
    try:
        for label, rule in ORDER:
            cpp.reads_as_is = rule
            case, b = bundle_from_args(sys.argv[1:])
            with torch.inference_mode():
                for _ in range(3):
                    b["trp"](b["x"])
            models[label] = b["trp"], b["x"]
    finally:
        cpp.reads_as_is = real
    calls = 40 if case.batch == 1 else 12
    times, shape = two_builds(models, calls)
    print(f"{case.name} b{case.batch}: (out, in) 1x1s: oi {ab_line(times, shape, 'oi', 'panel', calls)}")

if __name__ == "__main__":
    main()
