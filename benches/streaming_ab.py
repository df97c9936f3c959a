"""Outputs stored past the caches (streaming stores, for outputs of at least the
extension's ``stream_bytes``) against plain stores, on a whole compiled model, in one
process, call by call, the order alternating (same caches, same drift).

    python benches/streaming_ab.py [--batch 8] [--calls 40] [--bytes 4000000] [--layers]
    (results: benches/results/streaming-stores.txt)

``--bytes``: the threshold to time (default: the extension's); the other variant never streams.
``--layers``: instead of the model, each of benches/ab_builds.py's layers alone, hot.
"""
import argparse
import statistics

import torch

from model_ab import alternate, pair_ratio, report, resnet50_case
from trp_kernels import cpp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--bytes", type=int, default=None)
    p.add_argument("--layers", action="store_true")
    args = p.parse_args()
    lib = cpp._require()
    default = lib.stream_bytes()
    threshold = default if args.bytes is None else args.bytes
    if args.layers:
        try:
            layers(lib, threshold, args.batch, args.calls)
        finally:
            lib.set_stream_bytes(default)
        return
    case, model, x = resnet50_case(args.batch)
    try:
        times = alternate(lambda: model(x), switch(lib, threshold), args.calls)
    finally:
        lib.set_stream_bytes(default)
    print(f"{case.name} batch {args.batch}: outputs of >= {threshold} bytes streamed, or none; "
          f"{args.calls} calls each, alternating")
    report(times)


def switch(lib, threshold: int) -> dict:
    return {"streamed": lambda: lib.set_stream_bytes(threshold), "cached": lambda: lib.set_stream_bytes(0)}


def layers(lib, threshold: int, batch: int, calls: int) -> None:
    import ab_builds as A

    torch.manual_seed(0)
    for case in A.CASES:
        x, ws, bias, r, out = t = A._tensors(case, batch)
        plan = A._plan(lib, case, t)
        times = alternate(lambda: plan.run(x.data_ptr(), out.data_ptr(), 0 if r is None else r.data_ptr(),
                                           torch.get_num_threads()), switch(lib, threshold), calls, warmup=5)
        print(f"{case[0]:26s} b{batch} output {out.numel() * 4 / 1e6:5.1f} MB  streamed "
              f"{statistics.median(times['streamed']) * 1e3:.3f}  cached {statistics.median(times['cached']) * 1e3:.3f} ms"
              f"  streamed/cached {pair_ratio(times):.3f}")


if __name__ == "__main__":
    main()
