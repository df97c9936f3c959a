"""The first call of trp.compile's model for an input shape, which builds its whole-model program (trp.program:
the traced run, each stretch's checks, the timing of each dense conv it might take), against the calls
after it and the model layer by layer. The model suite's cases (seed 0), each in this process in turn.

    python benches/program_first_call.py > results/cpu-models-program/first-call.txt
"""
import time

import torch

from model_ab import suite_bundle
from trp import program

CASES = [("resnet20", 1, "channel"), ("resnet56", 1, "channel"), ("resnet18", 1, "channel"), ("resnet50", 1, "channel"),
         ("resnet50", 8, "channel"), ("resnet50", 1, ("tucker", "pointwise")), ("resnet50", 8, ("tucker", "pointwise"))]


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, batch, scheme in CASES:
        case, b = suite_bundle(name, batch, scheme)
        model, x = b["trp"], b["x"]
        with torch.inference_mode():
            with program.disabled():
                model(x)
                t0 = time.perf_counter()
                model(x)
                plain = time.perf_counter() - t0
            t0 = time.perf_counter()
            model(x)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            model(x)
            after = time.perf_counter() - t0
        segments = program.runner(model).programs[x.shape].segments
        print(f"{case.name} b{batch}: first call {first * 1e3:.0f} ms (builds the program), the next "
              f"{after * 1e3:.2f} ms, layer by layer {plain * 1e3:.2f} ms ({len(segments)} segments)")


if __name__ == "__main__":
    main()
