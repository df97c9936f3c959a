"""Command line: ``python -m trp demo``."""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

MODELS = ("resnet18", "resnet50", "resnet20", "resnet56", "vgg16")


def _build(name: str):
    from trp import models

    if name == "resnet18":
        return models.resnet18(), 224
    if name == "resnet50":
        return models.resnet50(), 224
    if name == "vgg16":
        return models.vgg16(), 224
    return models.resnet_cifar(int(name[len("resnet"):])), 32


def demo(args: argparse.Namespace) -> dict:
    import trp
    from trp import models
    from trp.timing import compare, machine_info

    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model, size = _build(args.model)
    size = args.size or size
    model.eval()
    models.randomize_batchnorm(model, g)
    # Trained networks have decaying spectra (TRP training makes them decay much faster);
    # random init has flat ones. Until the demo trains (TRP training), it plants one.
    tau = args.decay
    models.set_conv_spectra(model, lambda full: torch.exp(-torch.arange(full) / (tau * full)),
                            scheme=args.scheme, generator=g)
    x = torch.randn(args.batch, 3, size, size, generator=g)
    with torch.no_grad():
        ref = model(x)
    compiled = trp.compile(model, energy=args.energy, scheme=args.scheme, inplace=False)
    table = trp.summary(compiled, x)
    with torch.no_grad():
        out = compiled(x)
    rel_l2 = ((out - ref).norm() / ref.norm()).item()
    rel_max = ((out - ref).abs().max() / ref.abs().max()).item()
    timed = compare({"dense": lambda: _no_grad(model, x), "compiled": lambda: _no_grad(compiled, x)},
                    warmup=args.warmup, repeats=args.repeats)
    dense_t, low_t = timed["dense"], timed["compiled"]

    print(f"trp demo: {args.model}, input {tuple(x.shape)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"weights: random, k x k conv spectra set to sigma_i = exp(-i / ({tau} * full rank)) "
          f"(synthetic stand-in for a trained network), BatchNorm statistics random")
    print(f"trp.compile(model, energy={args.energy}, scheme={args.scheme!r})\n")
    print(table)
    print(f"\noutput error vs dense: relative L2 {rel_l2:.3e}, max |diff| / max |y| {rel_max:.3e}")
    speedup = dense_t["median_ms"] / low_t["median_ms"]
    print(f"latency (median of {args.repeats} interleaved calls each after {args.warmup} warm-up, CPU): dense "
          f"{dense_t['median_ms']:.2f} ms, compiled {low_t['median_ms']:.2f} ms -> {speedup:.2f}x "
          f"(conv/linear MACs {table.macs_dense / table.macs:.2f}x fewer)")
    result = {"model": args.model, "input_shape": list(x.shape), "energy": args.energy, "scheme": args.scheme,
              "macs_dense": table.macs_dense, "macs": table.macs, "params_dense": table.params_dense,
              "params": table.params, "rel_l2_error": rel_l2, "rel_max_error": rel_max,
              "dense_ms": dense_t, "compiled_ms": low_t, "speedup": speedup, "machine": machine_info(),
              "command": "python -m trp " + " ".join(args.argv), "rows": table.rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


def bench(args: argparse.Namespace) -> dict:
    from trp.benchmark import runner

    command = "python -m trp " + " ".join(args.argv)
    payload = runner.run(args.suite, args.device, args.quick, args.json, args.out, args.threads,
                         args.providers, args.select, args.budget, command)
    rows = payload["rows"]
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{len(rows)} rows: {ok} timed, {sum(r['status'] == 'skipped' for r in rows)} skipped, "
          f"{sum(r['status'] == 'failed' for r in rows)} failed")
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['status']}: {r['case']} b{r['batch']} {r['provider']}: {r['reason']}")
    if args.json:
        print(f"wrote {args.json}")
    if args.out:
        print(f"wrote {', '.join(payload['report'].values())}")
    if not args.json and not args.out:
        from trp.benchmark.report import markdown
        print(markdown(rows, payload["environment"], command))
    return payload


def _no_grad(model, x):
    with torch.no_grad():
        return model(x)


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _fraction(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trp", description="Trained Rank Pruning for CNNs.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="compress a ResNet, print the summary, the output error and the latency")
    d.add_argument("--model", choices=MODELS, default="resnet18")
    d.add_argument("--energy", type=_fraction, default=0.9, help="energy kept per layer (default 0.9)")
    d.add_argument("--scheme", choices=("channel", "spatial"), default="channel")
    d.add_argument("--decay", type=_fraction, default=0.1,
                   help="planted spectrum decay, as a fraction of full rank (default 0.1)")
    d.add_argument("--batch", type=_positive(int), default=1)
    d.add_argument("--size", type=_positive(int), default=None, help="input height/width (default: model's)")
    d.add_argument("--repeats", type=_positive(int), default=20)
    d.add_argument("--warmup", type=int, default=5)
    d.add_argument("--threads", type=_positive(int), default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    d.set_defaults(func=demo)

    b = sub.add_parser("bench", help="benchmark dense vs low-rank layers and models against torch.compile and ONNX Runtime")
    b.add_argument("--suite", choices=("layers", "models", "all"), default="all")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    b.add_argument("--quick", action="store_true", help="a few cases, in under 5 minutes on 2 CPU cores")
    b.add_argument("--json", default=None, help="write the rows (and environment) to this JSON file")
    b.add_argument("--out", default=None, help="write report.md and the speed-up plots to this directory")
    b.add_argument("--threads", type=_positive(int), default=None, help="CPU threads for every provider")
    b.add_argument("--providers", nargs="+", default=None,
                   help="only these providers (the dense baselines always run)")
    b.add_argument("--select", default=None, help="only cases whose name contains this text")
    b.add_argument("--budget", type=_positive(float), default=None,
                   help="seconds of timed calls per measurement (default 0.3 quick, 1.0 full)")
    b.set_defaults(func=bench)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
