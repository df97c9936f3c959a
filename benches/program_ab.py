"""trp.compile's model with its whole-model program (trp.program) against the same model layer by layer
(trp.program.disabled()): one model, one process, the two alternating call by call (the pair's order
swapping every round), under inference_mode, medians. The model suite's case (seed 0).

    python benches/program_ab.py MODEL BATCH [SCHEME]     e.g. resnet50 1 tucker+pointwise
"""
import statistics
import sys
import time

import torch

from model_ab import bundle_from_args
from trp import program


def main() -> None:
    case, b = bundle_from_args(sys.argv[1:])
    batch = case.batch
    model, x = b["trp"], b["x"]
    calls = 60 if batch == 1 else 16
    times = {"program": [], "per-module": []}
    with torch.inference_mode():
        for _ in range(5):
            model(x)
            with program.disabled():
                model(x)
        runner = program.runner(model)
        before = runner.calls
        for i in range(calls):
            for label in (("program", "per-module") if i % 2 else ("per-module", "program")):
                t0 = time.perf_counter()
                if label == "program":
                    model(x)
                else:
                    with program.disabled():
                        model(x)
                times[label].append(time.perf_counter() - t0)
        assert runner.calls == before + calls
    prog = runner.programs[x.shape]
    steps = [len(s.step_names) for s in prog.segments]
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{case.name} b{batch}: program {med['program']:.3f} ms, per-module {med['per-module']:.3f} ms, "
          f"{med['per-module'] / med['program']:.2f}x ({len(steps)} segments, {sum(steps)} C++ steps; "
          f"{calls} calls each)")


if __name__ == "__main__":
    main()
