"""Outputs stored past the caches (streaming stores, for outputs of at least the
extension's ``stream_bytes``) against plain stores, on a whole compiled model, in one
process, call by call, the order alternating (same caches, same drift).

    python benches/streaming_ab.py [--batch 8] [--calls 40] [--bytes 4000000]
    (results: benches/results/streaming-stores.txt)

``--bytes``: the threshold to time (default: the extension's); the other variant never streams.
"""
import argparse

from model_ab import alternate, report, resnet50_case
from trp_kernels import cpp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--bytes", type=int, default=None)
    args = p.parse_args()
    lib = cpp._require()
    default = lib.stream_bytes()
    threshold = default if args.bytes is None else args.bytes
    case, model, x = resnet50_case(args.batch)
    try:
        times = alternate(model, x, {"streamed": lambda: lib.set_stream_bytes(threshold),
                                     "cached": lambda: lib.set_stream_bytes(0)}, args.calls)
    finally:
        lib.set_stream_bytes(default)
    print(f"{case.name} batch {args.batch}: outputs of >= {threshold} bytes streamed, or none; "
          f"{args.calls} calls each, alternating")
    report(times)


if __name__ == "__main__":
    main()
