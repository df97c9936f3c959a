"""Command line: ``python -m trp demo | summary | compress | verify | bench | breakdown``.

``summary`` and ``compress`` take the user's own model, named as ``package.module:callable``
(``torchvision.models:resnet18``) or ``path/to/file.py:callable``: the callable is called
with no arguments and must return an ``nn.Module``. Weights come from ``--weights`` (a
safetensors file or a ``torch.save``'d state dict, read with ``weights_only=True``); a
whole pickled model is read only with ``--allow-pickle``, which runs code from the file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch


def _spectra_plot(dense, trained, layers, path, scheme) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from trp import families

    fig = Figure(figsize=(4 * len(layers), 3.4))
    for i, name in enumerate(layers):
        ax = fig.add_subplot(1, len(layers), i + 1)
        for model, label, style in ((dense, "dense", "-"), (trained, "TRP", "--")):
            layer = dict(model.named_modules())[name]
            family = families.family_for(layer, families.parse_scheme(scheme))
            spectra = family.spectra(layer.weight)
            for m, s in enumerate(spectra):
                mode = f" (mode {m + 1})" if len(spectra) > 1 else ""
                ax.semilogy(range(1, len(s) + 1), (s / s[0]).clamp_min(1e-8).numpy(), style, label=label + mode)
        ax.set_title(name)
        ax.set_xlabel("index i")
        ax.set_ylabel("sigma_i / sigma_1")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"singular values of the {scheme} unfoldings, dense vs TRP-trained")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def demo(args: argparse.Namespace) -> dict:
    """Train ResNet-20 on the digits three ways with one budget and seed; compare."""
    import copy

    import trp
    from trp import data, models
    from trp.compare import conv_macs_params, no_grad_call as _no_grad
    from trp.timing import compare, machine_info

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.methods:
        return demo_methods(args)
    epochs = args.epochs or (3 if args.quick else 30)
    repeats = 5 if args.quick else args.repeats
    train, test = data.digits(args.batch)
    x1 = next(iter(test))[0][:1]

    def trained(controller_kw):
        torch.manual_seed(args.seed)
        model = models.resnet_cifar(20)
        controller = trp.TRP(model, **controller_kw) if controller_kw is not None else None
        trp.fit(model, train, test, epochs=epochs, lr=args.lr, method=controller, progress=not args.quiet)
        return model.eval(), controller

    print(f"trp demo: ResNet-20 on scikit-learn digits (1,438 train / 359 test, 32x32), {epochs} epochs, "
          f"seed {args.seed}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("[1/3] dense baseline")
    dense, _ = trained(None)
    print(f"[2/3] TRP (energy {args.energy}, nuclear_weight {args.nuclear_weight}, period {args.period})")
    trp_model, controller = trained(dict(energy=args.energy, nuclear_weight=args.nuclear_weight,
                                         period=args.period, scheme=args.scheme))
    plan = controller.plan()
    compiled_trp = trp.compile(copy.deepcopy(trp_model), plan=plan)
    print("[3/3] post-hoc SVD of the dense baseline at the TRP ranks (no training)")
    compiled_svd = trp.compile(copy.deepcopy(dense), plan=plan)
    # BN folded and computing in channels_last, as the others (trp.compile's default for them)
    folded_dense = trp.compile(copy.deepcopy(dense), filter_fn=lambda m, q: False, channels_last=True)

    timed = compare({"dense": lambda: _no_grad(folded_dense, x1), "trp": lambda: _no_grad(compiled_trp, x1),
                     "svd": lambda: _no_grad(compiled_svd, x1)}, warmup=3, repeats=repeats)
    result = {}
    for key, model in (("dense", dense), ("trp", compiled_trp), ("svd", compiled_svd)):
        macs, params = conv_macs_params(model, x1)
        result[key] = {"accuracy": trp.evaluate(model, test)["accuracy"], "macs": macs, "params": params,
                       "latency_ms": timed[key]["median_ms"]}
    base = result["dense"]
    chance = 100.0 / 10  # ten digit classes
    print(f"\n{'model':<34} {'test acc %':>10} {'conv MACs':>9} {'fewer':>6} {'params':>8} "
          f"{'latency, batch 1':>16} {'faster':>6}")
    labels = {"dense": "dense baseline", "trp": "TRP + trp.compile (no fine-tune)",
              "svd": "dense + post-hoc SVD, same ranks"}
    broken = []
    for key, r in result.items():
        works = r["accuracy"] > 2 * chance
        if not works:
            broken.append(labels[key])
        speed = f"{base['latency_ms'] / r['latency_ms']:>5.2f}x" if works else "   (*)"
        print(f"{labels[key]:<34} {r['accuracy']:>10.2f} {r['macs'] / 1e6:>8.2f}M {base['macs'] / r['macs']:>5.2f}x"
              f" {r['params'] / 1e3:>7.1f}K {r['latency_ms']:>13.3f} ms {speed}")
    print(f"latency: median ms of one CPU forward pass on a batch of 1 image, each model timed in blocks of its own; "
          f"'fewer' and 'faster' are against the dense baseline")
    if broken:
        print(f"(*) {'; '.join(broken)}: at most twice chance ({chance:.0f}% for ten classes), so not a working "
              "model and its speed is not a result (factoring a normally trained network at low rank destroys it; "
              "a TRP run too short to converge, as with --quick, is not yet accurate)")
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


def demo_methods(args: argparse.Namespace) -> dict:
    """``demo --methods``: every method at every budget and seed (:mod:`trp.compare`)."""
    from trp import compare
    from trp.timing import machine_info

    epochs = args.epochs or (3 if args.quick else 30)
    finetune = args.finetune_epochs if args.finetune_epochs is not None else (1 if args.quick else 5)
    seeds = args.seeds if args.seeds is not None else ([args.seed] if args.quick else [0, 1, 2])
    repeats = 5 if args.quick else args.repeats
    print(f"trp demo --methods: ResNet-20 on scikit-learn digits, {epochs} training epochs and {finetune} fine-tune "
          f"epochs for every method, budgets {', '.join(f'{b:g}x' for b in args.budgets)} fewer conv MACs, seeds "
          f"{seeds}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    result = compare.run(args.methods, args.budgets, seeds, epochs=epochs, finetune_epochs=finetune, lr=args.lr,
                         finetune_lr=args.finetune_lr, batch=args.batch, admm_rho=args.admm_rho, repeats=repeats,
                         progress=not args.quiet)
    print()
    print(compare.table(result["summary"], finetune))
    print(f"accuracy: test %, mean ± std over {len(seeds)} seed(s); latency: median ms of one CPU forward pass "
          f"through trp.compile's model, each model timed in blocks of its own")
    plot = args.plot if args.plot != DEFAULT_PLOT else "trp_methods.png"
    if plot:
        compare.plot(result["summary"], plot)
        print(f"wrote {plot}")
    result["meta"] = {"epochs": epochs, "finetune_epochs": finetune, "seeds": seeds, "budgets": args.budgets,
                      "lr": args.lr, "finetune_lr": args.finetune_lr, "batch": args.batch, "admm_rho": args.admm_rho,
                      "machine": machine_info(), "command": "python -m trp " + " ".join(args.argv)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


def bench(args: argparse.Namespace) -> dict:
    from trp.benchmark import runner

    command = "python -m trp " + " ".join(args.argv)
    if args.one_process and args.rounds != 1:
        raise UsageError(f"--rounds {args.rounds} counts processes per model provider; with --one-process there is "
                         f"one process: drop one of the two")
    payload = runner.run(args.suite, args.device, args.quick, args.json, args.out, args.threads,
                         args.providers, args.select, args.budget, command, isolate=not args.one_process,
                         rounds=args.rounds)
    from trp.benchmark.report import markdown

    rows = payload["rows"]
    print(markdown(rows, payload["environment"], command))
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{len(rows)} rows: {ok} timed, {sum(r['status'] == 'skipped' for r in rows)} skipped, "
          f"{sum(r['status'] == 'failed' for r in rows)} failed")
    for r in rows:
        if r["status"] == "failed":
            print(f"  failed: {r['case']} b{r['batch']} {r['provider']}: {r['reason']}")
    skipped: dict[str, set] = {}
    for r in rows:
        if r["status"] == "skipped":
            skipped.setdefault(r["reason"], set()).add(r["provider"])
    for reason, names in skipped.items():
        print(f"  skipped ({', '.join(sorted(names))}): {reason}")
    if args.json:
        print(f"wrote {args.json}")
    if args.out:
        print(f"wrote {', '.join(payload['report'].values())}")
    return payload


def breakdown(args: argparse.Namespace) -> dict:
    from trp.benchmark import runner
    from trp.benchmark.report import breakdown_markdown

    command = "python -m trp " + " ".join(args.argv)
    try:
        payload = runner.run_breakdown("cpu", args.quick, args.json, args.out, args.threads, args.providers,
                                       args.select, args.repeats, command)
    except ValueError as e:  # bad arguments: said before anything is built or timed
        raise UsageError(str(e)) from None
    print(breakdown_markdown(payload))
    for path in [args.json, *payload.get("report", {}).values()]:
        if path:
            print(f"wrote {path}")
    return payload


class UsageError(Exception):
    """Bad command-line input found after parsing: reported like argparse's own errors (exit 2)."""


def _shape(text):
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive ints like 1,3,224,224, got {text!r}") \
            from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive ints like 1,3,224,224, got {text!r}")
    return dims


def load_user_model(spec: str, weights=None, allow_pickle: bool = False) -> torch.nn.Module:
    """The model named by ``spec`` ("package.module:callable" or "file.py:callable", or with
    ``allow_pickle`` a file written by ``torch.save(model)``), with ``weights`` loaded."""
    import importlib
    import importlib.util
    from pathlib import Path

    import torch.nn as nn

    if ":" not in spec:
        if not allow_pickle:
            raise UsageError(f"MODEL must be 'package.module:callable' or 'file.py:callable', got {spec!r} "
                             "(a whole pickled model needs --allow-pickle, which runs code from the file)")
        if not Path(spec).is_file():
            raise UsageError(f"MODEL file {spec!r} does not exist")
        model = torch.load(spec, map_location="cpu", weights_only=False)
    else:
        where, _, name = spec.rpartition(":")
        if not where or not name.isidentifier():
            raise UsageError(f"MODEL must be 'package.module:callable' or 'file.py:callable', got {spec!r}")
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise UsageError(f"MODEL file {where!r} does not exist")
            module_spec = importlib.util.spec_from_file_location(f"_trp_user_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.path.insert(0, str(path.resolve().parent))  # its own imports of neighbouring files
            try:
                module_spec.loader.exec_module(module)
            finally:
                sys.path.remove(str(path.resolve().parent))
        else:
            try:
                module = importlib.import_module(where)
            except ImportError as e:
                raise UsageError(f"MODEL: cannot import {where!r}: {e}") from None
        build = getattr(module, name, None)
        if not callable(build):
            raise UsageError(f"MODEL: {where!r} has no callable {name!r}")
        model = build()
    if not isinstance(model, nn.Module):
        raise UsageError(f"MODEL {spec!r} gave a {type(model).__name__}, not an nn.Module")
    if weights:
        if not Path(weights).is_file():
            raise UsageError(f"--weights file {weights!r} does not exist")
        if str(weights).endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(weights)
        else:
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - not a plain state dict: say what to do
                raise UsageError(f"--weights {weights!r} is not a state dict that loads with weights_only=True "
                                 f"({type(e).__name__}); save model.state_dict(), or a .safetensors file") from None
        if not isinstance(state, dict):
            raise UsageError(f"--weights {weights!r} holds a {type(state).__name__}, not a state dict")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UsageError(f"--weights {weights!r} does not fit MODEL: {str(e).splitlines()[0]}") from None
    return model.eval()


def _compiled(args: argparse.Namespace):
    import trp

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_user_model(args.model, args.weights, args.allow_pickle)
    x = torch.randn(*args.input)
    with torch.no_grad():
        try:
            ref = model(x)
        except Exception as e:  # noqa: BLE001 - a wrong --input is the usual cause
            raise UsageError(f"MODEL does not run on an input of shape {tuple(args.input)} (--input): "
                             f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
    options = {k: getattr(args, k) for k in ("energy", "rank", "ratio") if getattr(args, k) is not None}
    if len(options) > 1:
        raise UsageError(f"give at most one of --energy, --rank, --ratio, got {sorted(options)}")
    try:
        compiled = trp.compile(model, **options, rank_multiple=args.rank_multiple, scheme=args.scheme,
                               backend=args.backend, inplace=True)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    with torch.no_grad():
        out = compiled(x)
    err = None
    if isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor):
        err = ((out - ref).float().norm() / ref.float().norm().clamp_min(1e-30)).item()
    return compiled, x, err


def _print_compiled(compiled, x, err) -> None:
    import trp

    print(trp.summary(compiled, x))
    if err is not None:
        print(f"relative output error against the model before compile, on a random input: {err:.3g} "
              "(random weights and inputs make this large; on a trained model and real data, measure accuracy)")


def summary(args: argparse.Namespace) -> int:
    """What trp.compile does to the user's model: the per-layer table, nothing written."""
    compiled, x, err = _compiled(args)
    _print_compiled(compiled, x, err)
    return 0


def compress(args: argparse.Namespace) -> int:
    """trp.compile the user's model and save it (trp.save: safetensors, no pickle)."""
    import trp

    compiled, x, err = _compiled(args)
    _print_compiled(compiled, x, err)
    digest = trp.save(compiled, args.out)
    print(f"wrote {args.out} (sha256 {digest})")
    print(f"load it with: trp.load({args.out!r}, <a fresh {args.model} model>, expected_sha256={digest[:12]!r}...)")
    return 0


def deploy(args: argparse.Namespace) -> int:
    """The user's model, compiled (or loaded with --load), as an ONNX file, checked in ONNX Runtime."""
    import trp
    from trp.deploy import DeployError

    if not args.out.endswith(".onnx"):  # before any work: compiling a big model takes a while
        raise UsageError(f"--out must name a .onnx file, got {args.out!r}")
    if args.load:
        if args.threads:
            torch.set_num_threads(args.threads)
        given = [f"--{k}" for k in ("weights", "energy", "rank", "ratio") if getattr(args, k) is not None]
        if given:
            raise UsageError(f"--load reads the factors from its file: drop {', '.join(given)}")
        model = load_user_model(args.model, None, args.allow_pickle)
        try:
            compiled = trp.load(args.load, model)
        except Exception as e:  # noqa: BLE001 - a file that does not fit MODEL, or a bad file
            raise UsageError(f"--load {args.load}: {type(e).__name__}: {e}") from None
        x = torch.randn(*args.input)
    else:
        compiled, x, err = _compiled(args)
        _print_compiled(compiled, x, err)
    try:
        report = trp.deploy(compiled, x, args.out, check=False if args.no_check else "auto", time_it=args.time)
    except (DeployError, ValueError) as e:
        print(f"trp deploy: FAILED: {e}", file=sys.stderr)
        return 1
    print(report)
    return 0


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


DEFAULT_PLOT = "trp_demo_spectra.png"


def _method_names():
    from trp.compare import METHODS

    return METHODS


def _methods(text):
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in _method_names()]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names from {','.join(_method_names())}, got {text!r}")
    return names


def _budgets(text):
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        values = []
    if not values or any(not math.isfinite(v) or v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 1 (times fewer conv MACs), got {text!r}")
    return values


def _seeds(text):
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _scheme(text):
    """``--scheme``: one family name, or several separated by commas (tried in order per layer)."""
    from trp import families

    names = tuple(n.strip() for n in text.split(","))
    try:
        families.parse_scheme(names)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(families.NAMES)} or a comma-separated "
                                         f"list of them, got {text!r}") from None
    return names[0] if len(names) == 1 else names


def build_parser() -> argparse.ArgumentParser:
    from trp.compare import DIGITS_RHO

    p = argparse.ArgumentParser(prog="python -m trp", description="Trained Rank Pruning for CNNs.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train ResNet-20 on the digits: dense, TRP + trp.compile, post-hoc SVD "
                                       "(or, with --methods, every method at matched MAC budgets)")
    d.add_argument("--epochs", type=_positive(int), default=None, help="training epochs (default 30, --quick 3)")
    d.add_argument("--quick", action="store_true", help="3 epochs and fewer timing repeats")
    d.add_argument("--energy", type=_fraction, default=0.95, help="TRP projection energy (default 0.95)")
    d.add_argument("--nuclear-weight", type=_nonnegative, default=3e-4, help="nuclear-norm weight (default 3e-4)")
    d.add_argument("--period", type=_positive(int), default=2, help="TRP projection period (default 2)")
    d.add_argument("--scheme", type=_scheme, default="channel",
                   help="factored structure: channel (default: k×k to rank r, then 1×1), spatial (k×1 then 1×k) "
                        "or tucker (1×1, k×k core, 1×1)")
    d.add_argument("--lr", type=_positive(float), default=0.05, help="SGD learning rate (default 0.05)")
    d.add_argument("--batch", type=_positive(int), default=128, help="training batch size (default 128)")
    d.add_argument("--repeats", type=_positive(int), default=50, help="latency repeats (default 50)")
    d.add_argument("--threads", type=_positive(int), default=None, help="CPU threads (default: torch's)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--plot", default=DEFAULT_PLOT,
                   help="PNG of singular-value spectra, or with --methods of accuracy against latency "
                        "(default trp_methods.png); '' for none")
    d.add_argument("--methods", type=_methods, default=None,
                   help="compare these methods instead, comma-separated, from: " + ",".join(_method_names()) +
                        " (each at every --budgets, for every --seeds, with the same training and fine-tune epochs)")
    d.add_argument("--budgets", type=_budgets, default=[2.0, 4.0],
                   help="with --methods: conv-MAC budgets, times fewer than dense (default 2,4)")
    d.add_argument("--seeds", type=_seeds, default=None, help="with --methods: seeds (default 0,1,2; --quick: --seed)")
    d.add_argument("--finetune-epochs", type=_positive(int), default=None,
                   help="with --methods: fine-tune epochs of every compressed model (default 5, --quick 1)")
    d.add_argument("--finetune-lr", type=_positive(float), default=0.02, help="fine-tune learning rate (default 0.02)")
    d.add_argument("--admm-rho", type=_positive(float), default=DIGITS_RHO,
                   help=f"ADMM's rho for this short schedule (default {DIGITS_RHO:g}; the authors' 1e-3 assumes ~200x "
                        "the steps)")
    d.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    d.set_defaults(func=demo)

    from trp.benchmark.providers import PROVIDER_HELP

    b = sub.add_parser("bench", help="benchmark dense vs low-rank layers and models against torch.compile, ONNX "
                       "Runtime and OpenVINO", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="providers (a model provider is KIND_RUNTIME; docs/benchmarks.md says more):\n"
                       + "\n".join(f"  {name:<26} {text}" for name, text in PROVIDER_HELP.items()))
    b.add_argument("--suite", choices=("layers", "models", "all"), default="all",
                   help="single factored layers, whole models, or both (default)")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    b.add_argument("--quick", action="store_true", help="a few cases, in under 5 minutes on 2 CPU cores")
    b.add_argument("--json", default=None, help="write the rows (and environment) to this JSON file")
    b.add_argument("--out", default=None, help="write report.md and the speed-up plots to this directory")
    b.add_argument("--threads", type=_positive(int), default=None, help="CPU threads for every provider")
    b.add_argument("--providers", nargs="+", default=None, choices=list(PROVIDER_HELP), metavar="PROVIDER",
                   help="only these providers, with their dense baselines (and dense_torch / dense_eager, which set the "
                        "error tolerance); the names are listed below")
    b.add_argument("--select", default=None, help="only cases whose name contains this text")
    b.add_argument("--budget", type=_positive(float), default=None,
                   help="seconds of timed calls per measurement (default 0.3 quick, 1.0 full)")
    b.add_argument("--rounds", type=_positive(int), default=1,
                   help="processes per model provider, in turn, their calls pooled (default 1)")
    b.add_argument("--one-process", action="store_true",
                   help="time the model providers in this process, in blocks of their own, instead of each in a "
                        "process of its own (faster; a runtime that ran before can slow the next: "
                        "docs/benchmarks.md)")
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

    for name, what, func in (("summary", "what trp.compile does to your model: per-layer MACs, params, rank, "
                                          "scheme, backend and notes", summary),
                             ("compress", "trp.compile your model and save it as a .safetensors file", compress),
                             ("deploy", "trp.compile your model (or --load the file compress wrote) and write it as an "
                                        "ONNX file of standard operators for ONNX Runtime or OpenVINO, checked in ONNX "
                                        "Runtime on a random input", deploy)):
        c = sub.add_parser(name, help=what, description=what + ". MODEL is 'package.module:callable' "
                           "(e.g. torchvision.models:resnet18) or 'file.py:callable'; the callable is called with "
                           "no arguments and returns an nn.Module (any nn.Module: torchvision, timm, your own).")
        c.add_argument("model", metavar="MODEL", help="package.module:callable or file.py:callable")
        c.add_argument("--input", type=_shape, required=True, metavar="SHAPE",
                       help="the input shape to trace and measure with, e.g. 1,3,224,224")
        c.add_argument("--weights", default=None, metavar="FILE",
                       help="load this state dict first: .safetensors, or a torch.save'd state dict (weights only)")
        c.add_argument("--allow-pickle", action="store_true",
                       help="let MODEL be a file written by torch.save(model); unpickling runs code from the file")
        ranks = c.add_argument_group("ranks (at most one; default: --energy 0.9)")
        ranks.add_argument("--energy", type=_fraction, default=None, help="keep this fraction of sum(sigma^2)")
        ranks.add_argument("--rank", type=_positive(int), default=None, help="this rank for every factored layer")
        ranks.add_argument("--ratio", type=_fraction, default=None, help="this fraction of each layer's full rank")
        c.add_argument("--rank-multiple", type=_positive(int), default=16,
                       help="round energy/ratio ranks up to a multiple of this (default 16; a layer whose rounded "
                            "rank reaches full rank stays dense)")
        c.add_argument("--scheme", type=_scheme, default="channel",
                       help="factored structure, or a comma-separated list tried in order per layer: channel "
                            "(default: k×k to rank r, then 1×1), spatial (k×1 then 1×k), tucker (1×1, k×k core, "
                            "1×1), pointwise (a 1×1 conv or linear layer as two thin ones), e.g. tucker,pointwise")
        c.add_argument("--backend", choices=("auto", "cpp", "triton", "torch"), default="auto",
                       help="kernels the layers run on (default auto: the fused kernel the device has)")
        c.add_argument("--threads", type=_positive(int), default=None, help="CPU threads")
        if name == "compress":
            c.add_argument("--out", required=True, metavar="FILE.safetensors", help="where to write the model")
        if name == "deploy":
            c.add_argument("--out", required=True, metavar="FILE.onnx", help="where to write the ONNX file")
            c.add_argument("--load", default=None, metavar="FILE.safetensors",
                           help="the compressed model that compress (or trp.save) wrote: MODEL is built fresh and "
                                "this file's factors loaded into it, instead of compiling")
            c.add_argument("--no-check", action="store_true", help="do not run the file in ONNX Runtime")
            c.add_argument("--time", action="store_true",
                           help="also time the model and the ONNX Runtime session on the input (a rough reading)")
        c.set_defaults(func=func)

    v = sub.add_parser("verify", help="check a file written by trp.save: its checksums, and its SHA-256 with --sha256")
    v.add_argument("file", help="the .safetensors file")
    v.add_argument("--sha256", default=None, help="the file's SHA-256 as kept elsewhere (what trp.save returned)")
    v.set_defaults(func=verify)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        rc = args.func(args)
    except UsageError as e:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        sub.error(str(e))  # usage line and message on stderr, exit status 2
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
