"""Command line: ``python -m trp demo | bench | breakdown | verify``."""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch


def _conv_macs_params(model, x) -> tuple[int, int]:
    import trp

    rows = trp.summary(model, x).rows
    return (sum(r["macs"] for r in rows if r["kind"] == "conv"),
            sum(p.numel() for p in model.parameters()))


def _spectra_plot(dense, trained, layers, path, scheme) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from trp.decompose import conv_singular_values

    fig = Figure(figsize=(4 * len(layers), 3.4))
    for i, name in enumerate(layers):
        ax = fig.add_subplot(1, len(layers), i + 1)
        for model, label, style in ((dense, "dense", "-"), (trained, "TRP", "--")):
            s = conv_singular_values(dict(model.named_modules())[name].weight, scheme)
            ax.semilogy(range(1, len(s) + 1), (s / s[0]).clamp_min(1e-8).numpy(), style, label=label)
        ax.set_title(name)
        ax.set_xlabel("index i")
        ax.set_ylabel("sigma_i / sigma_1")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"singular values of the {scheme} unfolding, dense vs TRP-trained")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def demo(args: argparse.Namespace) -> dict:
    """Train ResNet-20 on the digits three ways with one budget and seed; compare."""
    import copy

    import trp
    from trp import data, models
    from trp.timing import compare, machine_info

    if args.threads:
        torch.set_num_threads(args.threads)
    epochs = args.epochs or (3 if args.quick else 30)
    repeats = 5 if args.quick else args.repeats
    train, test = data.digits(args.batch)
    x1 = next(iter(test))[0][:1]

    def trained(controller_kw):
        torch.manual_seed(args.seed)
        model = models.resnet_cifar(20)
        controller = trp.TRP(model, **controller_kw) if controller_kw is not None else None
        trp.fit(model, train, test, epochs=epochs, lr=args.lr, trp=controller, progress=not args.quiet)
        return model.eval(), controller

    print(f"trp demo: ResNet-20 on scikit-learn digits (1,438 train / 359 test, 32x32), {epochs} epochs, "
          f"seed {args.seed}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("[1/3] dense baseline")
    dense, _ = trained(None)
    print(f"[2/3] TRP (energy {args.energy}, nuclear_weight {args.nuclear_weight}, period {args.period})")
    trp_model, controller = trained(dict(energy=args.energy, nuclear_weight=args.nuclear_weight,
                                         period=args.period, scheme=args.scheme))
    overrides = controller.compile_overrides()
    compiled_trp = trp.compile(copy.deepcopy(trp_model), overrides=overrides, rank_multiple=1, scheme=args.scheme)
    print("[3/3] post-hoc SVD of the dense baseline at the TRP ranks (no training)")
    compiled_svd = trp.compile(copy.deepcopy(dense), overrides=overrides, rank_multiple=1, scheme=args.scheme)
    # BN folded and computing in channels_last, as the others (trp.compile's default for them)
    folded_dense = trp.compile(copy.deepcopy(dense), filter_fn=lambda m, q: False, channels_last=True)

    timed = compare({"dense": lambda: _no_grad(folded_dense, x1), "trp": lambda: _no_grad(compiled_trp, x1),
                     "svd": lambda: _no_grad(compiled_svd, x1)}, warmup=3, repeats=repeats)
    result = {}
    for key, model in (("dense", dense), ("trp", compiled_trp), ("svd", compiled_svd)):
        macs, params = _conv_macs_params(model, x1)
        result[key] = {"accuracy": trp.evaluate(model, test)["accuracy"], "macs": macs, "params": params,
                       "latency_ms": timed[key]["median_ms"]}
    base = result["dense"]
    print(f"\n{'model':<34} {'test acc %':>10} {'conv MACs':>12} {'params':>10} {'CPU latency (b1)':>18}")
    labels = {"dense": "dense baseline", "trp": "TRP + trp.compile (no fine-tune)",
              "svd": "dense + post-hoc SVD, same ranks"}
    for key, r in result.items():
        print(f"{labels[key]:<34} {r['accuracy']:>10.2f} {r['macs'] / 1e6:>8.2f}M {base['macs'] / r['macs']:>4.2f}x"
              f" {r['params'] / 1e3:>8.1f}K {r['latency_ms']:>9.3f} ms {base['latency_ms'] / r['latency_ms']:>4.2f}x")
    ranks = ", ".join(f"{k}:{v}" for k, v in list(controller.ranks.items())[:6])
    print(f"TRP ranks (first layers): {ranks}, ...")
    layers = ["layer1.0.conv1", "layer2.1.conv1", "layer3.2.conv2"]
    if args.plot:
        _spectra_plot(dense, trp_model, layers, args.plot, args.scheme)
        print(f"wrote {args.plot}")
    result["meta"] = {"epochs": epochs, "seed": args.seed, "energy": args.energy,
                      "nuclear_weight": args.nuclear_weight, "period": args.period, "scheme": args.scheme,
                      "lr": args.lr, "batch": args.batch, "ranks": controller.ranks, "machine": machine_info(),
                      "command": "python -m trp " + " ".join(args.argv)}
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


def breakdown(args: argparse.Namespace) -> dict:
    from trp.benchmark import runner
    from trp.benchmark.report import breakdown_markdown

    command = "python -m trp " + " ".join(args.argv)
    try:
        payload = runner.run_breakdown("cpu", args.quick, args.json, args.out, args.threads, args.providers,
                                       args.select, args.repeats, command)
    except ValueError as e:  # bad arguments: said before anything is built or timed
        print(f"python -m trp breakdown: error: {e}", file=sys.stderr)
        return 2
    print(breakdown_markdown(payload))
    for path in [args.json, *payload.get("report", {}).values()]:
        if path:
            print(f"wrote {path}")
    return payload


def verify(args: argparse.Namespace) -> int:
    """Check a saved model file's checksums (and its SHA-256 against --sha256)."""
    from trp.io import TrpFileError, verify as verify_file

    try:
        info = verify_file(args.file, args.sha256)
    except (TrpFileError, FileNotFoundError, ValueError) as e:
        print(f"trp verify: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"{info['path']}: ok ({info['format']}, {info['layers']} factored layers, {info['tensors']} tensors, "
          f"{info['bytes']} bytes)")
    print(f"sha256 {info['sha256']}" + ("  (matches --sha256)" if args.sha256 else
                                         "  (keep it elsewhere and pass it as --sha256 to detect tampering)"))
    if not info["structure_digest"]:
        print("warning: an older format: the tensors are checksummed, the structure is not; save it again")
    return 0


def _no_grad(model, x):
    with torch.no_grad():
        return model(x)


def _number(kind, text):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive(kind):
    def parse(text):
        value = _number(kind, text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _nonnegative(text):
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fraction(text):
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trp", description="Trained Rank Pruning for CNNs.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train ResNet-20 on the digits: dense, TRP + trp.compile, post-hoc SVD")
    d.add_argument("--epochs", type=_positive(int), default=None, help="training epochs (default 30, --quick 3)")
    d.add_argument("--quick", action="store_true", help="3 epochs and fewer timing repeats")
    d.add_argument("--energy", type=_fraction, default=0.95, help="TRP projection energy (default 0.95)")
    d.add_argument("--nuclear-weight", type=_nonnegative, default=3e-4, help="nuclear-norm weight (default 3e-4)")
    d.add_argument("--period", type=_positive(int), default=2, help="TRP projection period (default 2)")
    d.add_argument("--scheme", choices=("channel", "spatial"), default="channel")
    d.add_argument("--lr", type=_positive(float), default=0.05)
    d.add_argument("--batch", type=_positive(int), default=128)
    d.add_argument("--repeats", type=_positive(int), default=50, help="latency repeats (default 50)")
    d.add_argument("--threads", type=_positive(int), default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--plot", default="trp_demo_spectra.png", help="PNG of singular-value spectra ('' for none)")
    d.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    d.set_defaults(func=demo)

    b = sub.add_parser("bench", help="benchmark dense vs low-rank layers and models against torch.compile, ONNX Runtime and OpenVINO")
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

    k = sub.add_parser("breakdown", help="split each benchmark model's CPU time into stem, low-rank layers, "
                                         "dense 1x1 convs, pooling and head, and glue")
    k.add_argument("--quick", action="store_true", help="the quick model case only (CIFAR ResNet-20, batch 1)")
    k.add_argument("--select", default=None, help="only cases whose name contains this text")
    k.add_argument("--providers", nargs="+", default=None,
                   help="eager model providers to break down (default: trp_eager lowrank_eager_cl dense_eager_cl)")
    k.add_argument("--repeats", type=_positive(int), default=30, help="instrumented calls per model (default 30)")
    k.add_argument("--threads", type=_positive(int), default=None, help="CPU threads")
    k.add_argument("--json", default=None, help="write the rows (and environment) to this JSON file")
    k.add_argument("--out", default=None, help="write report.md to this directory")
    k.set_defaults(func=breakdown)

    v = sub.add_parser("verify", help="check a file written by trp.save: its checksums, and its SHA-256 with --sha256")
    v.add_argument("file", help="the .safetensors file")
    v.add_argument("--sha256", default=None, help="the file's SHA-256 as kept elsewhere (what trp.save returned)")
    v.set_defaults(func=verify)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    rc = args.func(args)
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
