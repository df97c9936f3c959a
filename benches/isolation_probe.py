"""Does a runtime that ran earlier in the same process slow the next model, even after its
thread pool has gone idle? trp.compile's model of a benchmark case, timed in fresh
processes: alone, and after another provider of the suite ran the case in that process
(5 calls, then 1 s of sleep), the kinds of process alternating round by round.

    python benches/isolation_probe.py [--case "resnet50 @224 tucker+pointwise"] [--batch 8] [--rounds 5]
    (results: benches/results/timing-method/isolation.txt)

Why the suite times each model provider in a process of its own (trp/benchmark/isolated.py).
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

OTHERS = ("dense_ort", "dense_openvino", "dense_eager")


def child(case_name: str, batch: int, before: str, calls: int) -> None:
    import torch

    from trp.benchmark import cases as C
    from trp.benchmark import providers as P

    case = next(c for c in C.model_cases("cpu") if c.name == case_name and c.batch == batch)
    bundle = P.seeded_bundle(case)
    model, x = bundle["trp"], bundle["x"]
    with torch.inference_mode():
        if before != "alone":
            fn = P.prepare_model(before, case, bundle)
            for _ in range(5):
                fn()
            time.sleep(1.0)
        for _ in range(3):
            model(x)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"median_ms": statistics.median(times)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="resnet50 @224 tucker+pointwise")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.case, args.batch, args.child, args.calls)
        return
    kinds = ("alone", *OTHERS)
    medians = {k: [] for k in kinds}
    for r in range(args.rounds):
        for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # the order rotating
            out = subprocess.run([sys.executable, __file__, "--case", args.case, "--batch", str(args.batch),
                                  "--calls", str(args.calls), "--child", k], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1]
            medians[k].append(json.loads(out)["median_ms"])
            print(f"round {r + 1} {k:15s} trp.compile {args.case} b{args.batch}: {medians[k][-1]:.2f} ms", flush=True)
    alone = statistics.median(medians["alone"])
    for k in kinds:
        m = statistics.median(medians[k])
        print(f"{k:15s} median of {args.rounds} process medians {m:7.2f} ms  ({m / alone:.2f}x alone)  "
              f"all: {' '.join(f'{v:.1f}' for v in medians[k])}")


if __name__ == "__main__":
    main()
