"""SPP on the digits: ResNet-20 trained with trp.SPP at the tap fraction that gives 2x (and
4x) fewer conv MACs, counted at the kept taps' cost (what a tap-sparse kernel would run),
for several seeds; the dense model trained alike for reference. Accuracy only (the trained
model as it leaves training); ``python -m trp demo --methods trp,spp`` compiles the same
models to tap-sparse convs and times them (benches/results/methods-digits-spp/).

    python benches/spp_digits.py --seeds 0,1,2 --json benches/results/spp-digits/spp.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import trp
from trp import data, models
from trp.timing import machine_info


def conv_macs(model, x, kept: dict) -> int:
    """Conv MACs of one forward pass on ``x``, each SPP target at its kept taps' share."""
    rows = [r for r in trp.summary(model, x).rows if r["kind"] == "conv"]
    return sum(int(r["macs_dense"] * kept.get(r["name"], 1.0)) for r in rows)


def tap_fraction(model, x, targets, fewer: float) -> float:
    """The pruned fraction of every target's taps that gives ``fewer`` times fewer conv MACs."""
    rows = {r["name"]: r["macs_dense"] for r in trp.summary(model, x).rows if r["kind"] == "conv"}
    total, pruneable = sum(rows.values()), sum(rows[f] for f in targets)
    return 1 - (total / fewer - (total - pruneable)) / pruneable


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budgets", default="2,4")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    train, test = data.digits(128)
    x1 = next(iter(test))[0][:1]
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        dense = models.resnet_cifar(20)
        trp.fit(dense, train, test, epochs=args.epochs, lr=0.05, progress=False)
        rows.append({"method": "dense", "seed": seed, "budget": 1.0, "accuracy": trp.evaluate(dense, test)["accuracy"],
                     "conv_macs": conv_macs(dense, x1, {})})
        print(rows[-1], flush=True)
        for budget in budgets:
            torch.manual_seed(seed)
            model = models.resnet_cifar(20)
            targets = trp.SPP(model).targets
            fraction = tap_fraction(model, x1, targets, budget)
            method = trp.SPP(model, target=fraction, seed=seed)
            history = trp.fit(model, train, test, epochs=args.epochs, lr=0.05, method=method, progress=False)
            rows.append({"method": "spp", "seed": seed, "budget": budget, "target": fraction,
                         "accuracy": trp.evaluate(model, test)["accuracy"], "done": sum(method.done.values()),
                         "layers": len(method.done), "conv_macs": conv_macs(model, x1, method.kept()),
                         "final_record": {k: v for k, v in history[-1].items()}})
            print(rows[-1], flush=True)
    summary = []
    for method, budget in dict.fromkeys((r["method"], r["budget"]) for r in rows):
        acc = [r["accuracy"] for r in rows if r["method"] == method and r["budget"] == budget]
        macs = [r["conv_macs"] for r in rows if r["method"] == method and r["budget"] == budget]
        summary.append({"method": method, "budget": budget, "accuracy": statistics.fmean(acc),
                        "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                        "conv_macs": statistics.fmean(macs)})
        print(f"{method} @ {budget:g}x: {summary[-1]['accuracy']:.2f} ± {summary[-1]['accuracy_std']:.2f}, "
              f"{summary[-1]['conv_macs'] / 1e6:.2f}M conv MACs")
    result = {"rows": rows, "summary": summary, "machine": machine_info(),
              "command": "python benches/spp_digits.py " + " ".join(argv if argv is not None else [])}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
