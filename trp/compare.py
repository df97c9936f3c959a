"""The methods side by side on one task: ``python -m trp demo --methods ...``.

ResNet-20 on scikit-learn's digits, the same training budget and seed for every method, at
matched conv-MAC budgets (``budgets``: how many times fewer conv MACs than the dense model).
Per seed:

- ``dense``: trained for ``epochs``; the post-training methods start from it;
- ``trp``: TRP trained from scratch for ``epochs`` at the channel ranks that meet the budget;
- ``admm``: ADMM (tensor train) trained from scratch for ``epochs`` at the tucker ranks that
  meet it;
- ``eigendamage``: EigenDamage on the dense model, its global ratio searched to meet it;
- ``svd``: the dense model's channel SVD at the budget's ranks (no training);
- ``tucker-svd``: the dense model's Tucker-2 (HOSVD + HOOI) at the budget's ranks;
- ``spp``: SPP trained from scratch for ``epochs``, pruning the fraction of every target's
  taps that meets the budget (counted at the kept taps' cost), compiled to tap-sparse convs.

Each compressed model is scored with no fine-tuning and after ``finetune_epochs`` of
``trp.fit`` on its factors with its BatchNorms kept (``trp.compile(..., fold_bn=False)``; the
same for every method), its BNs then folded by compiling it again, and timed at batch 1 and 8 on the
fused kernels, in blocks of its own. A budget is met by the largest uniform rank ratio (or
EigenDamage ratio) whose conv MACs are at most the dense model's / budget, counted as
``trp.compile`` counts them (a layer whose factors would not cut MACs stays dense).
"""

from __future__ import annotations

import copy
import math
import statistics
from typing import Callable, Sequence

import torch
import torch.nn as nn

METHODS = ("trp", "admm", "eigendamage", "svd", "tucker-svd", "spp")
# the family whose targets a method takes (SPP's: the k×k convs but the stem, as channel's)
FAMILY = {"trp": "channel", "svd": "channel", "admm": "tucker", "tucker-svd": "tucker", "eigendamage": "tucker",
          "spp": "channel"}
LABELS = {"dense": "dense", "trp": "TRP", "admm": "ADMM (tensor train)", "eigendamage": "EigenDamage",
          "svd": "post-hoc SVD", "tucker-svd": "post-hoc Tucker-2", "spp": "SPP (tap-sparse)"}
# The authors' rho (1e-3) assumes ~78k steps (CIFAR, 200 epochs of 391); 30 epochs of the
# digits are 360 steps, at which 1e-3 barely pulls (compiled accuracy 9.7%, chance): 0.1 is
# what a sweep of 1e-3, 0.1 and 1 on this task kept (96.4% compiled, seed 0:
# benches/results/methods-digits/admm-rho.txt).
DIGITS_RHO = 0.1


def conv_macs_params(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Conv MACs of one forward pass on ``x`` (trp.summary's count) and the parameter count."""
    import trp

    rows = trp.summary(model, x).rows
    return (sum(r["macs"] for r in rows if r["kind"] == "conv"), sum(p.numel() for p in model.parameters()))


class Budget:
    """Conv MACs of a model as a function of each target layer's ranks, counted as
    ``trp.compile`` does (a layer whose factors would not cut MACs stays dense)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, targets: dict):
        import trp

        rows = {r["name"]: r for r in trp.summary(model, x).rows if r["kind"] == "conv"}
        self.dense_total = sum(r["macs_dense"] for r in rows.values())
        self.layers = {}
        for fqn, (m, _, family) in targets.items():
            shape = tuple(m.weight.shape)
            pixels = rows[fqn]["macs_dense"] // math.prod(shape)
            self.layers[fqn] = (family, shape, tuple(m.stride), pixels, rows[fqn]["macs_dense"])
        self.fixed = self.dense_total - sum(v[4] for v in self.layers.values())

    def macs(self, ranks: dict) -> int:
        total = self.fixed
        for fqn, (family, shape, stride, pixels, dense) in self.layers.items():
            total += min(dense, pixels * family.macs_per_pixel(shape, stride, ranks[fqn]))
        return total

    def tap_fraction(self, fewer: float) -> float:
        """The fraction of every target's taps (im2col columns) to prune for ``fewer`` times
        fewer conv MACs, a tap-sparse conv costing its kept taps' share of the dense one."""
        pruneable = sum(v[4] for v in self.layers.values())
        fraction = 1 - (self.dense_total / fewer - self.fixed) / pruneable
        if not 0 < fraction < 1:
            raise ValueError(f"no tap fraction meets a budget of {fewer}x fewer conv MACs")
        return fraction

    def uniform_ranks(self, ratio: float) -> dict:
        """Each target at ``ratio`` of each of its full ranks (rounded up, at least 1)."""
        from trp.decompose import RankSpec, select_rank

        spec = RankSpec(ratio=ratio, rank_multiple=1)
        return {fqn: tuple(select_rank(torch.ones(f), spec) for f in family.full_ranks(shape))
                for fqn, (family, shape, _, _, _) in self.layers.items()}

    def search(self, fewer: float, ranks_at: Callable[[float], dict], low: float = 1e-3, high: float = 1.0,
               increasing: bool = True) -> tuple[float, dict]:
        """The ratio in [low, high] whose ranks give the most MACs within dense/``fewer`` (MACs
        grow with the ratio when ``increasing``, else fall), and those ranks."""
        target = self.dense_total / fewer
        fits = lambda r: self.macs(ranks_at(r)) <= target  # noqa: E731
        good = low if increasing else high
        if not fits(good):
            raise ValueError(f"no ratio meets a budget of {fewer}x fewer conv MACs")
        bad = high if increasing else low
        for _ in range(40):
            mid = (good + bad) / 2
            good, bad = (mid, bad) if fits(mid) else (good, mid)
        return good, ranks_at(good)


def _plan(family: str, ranks: dict):
    from trp.plan import LayerChoice, Plan

    return Plan({fqn: LayerChoice(family, r if len(r) > 1 else r[0]) for fqn, r in ranks.items()})


def run(methods: Sequence[str] = METHODS, budgets: Sequence[float] = (2.0, 4.0), seeds: Sequence[int] = (0, 1, 2),
        epochs: int = 30, finetune_epochs: int = 5, lr: float = 0.05, finetune_lr: float = 0.02, batch: int = 128,
        admm_rho: float = DIGITS_RHO, repeats: int = 50, progress: bool = True, log: Callable = print) -> dict:
    """Train, compress, fine-tune and time every method at every budget for every seed; the
    per-seed rows and their mean ± std (see the module docstring)."""
    import trp
    from trp import data, models
    from trp.compile import CompileConfig, select_targets
    from trp.timing import compare

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be some of {METHODS}, got {list(methods)}")
    if not budgets or any(isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 1 for b in budgets):
        raise ValueError(f"budgets must be numbers > 1 (times fewer conv MACs), got {list(budgets)}")
    train, test = data.digits(batch)
    xs = next(iter(test))[0]
    x1, x8 = xs[:1], xs[:8]
    rows = []

    def fit(model, epochs_, lr_, method=None):
        return trp.fit(model, train, test, epochs=epochs_, lr=lr_, method=method, progress=progress)

    def score(name, budget, seed, source, plan, extra):
        """Compile ``source`` with ``plan``, its BNs kept (the form to fine-tune), score it,
        fine-tune it, fold its BNs (compile again) and score that."""
        tunable = trp.compile(copy.deepcopy(source).eval(), plan=plan, fold_bn=False)
        acc = trp.evaluate(tunable, test)["accuracy"]
        torch.manual_seed(seed)
        fit(tunable, finetune_epochs, finetune_lr)
        compiled = trp.compile(tunable.eval(), filter_fn=lambda m, q: False)  # fold the BNs, factor nothing new
        tuned = trp.evaluate(compiled, test)["accuracy"]
        macs, params = conv_macs_params(compiled, x1)
        row = {"method": name, "budget": budget, "seed": seed, "accuracy": acc, "accuracy_finetuned": tuned,
               "conv_macs": macs, "params": params, **extra}
        log(f"  {name} @ {budget}x: {acc:.2f}% -> {tuned:.2f}% after {finetune_epochs} fine-tune epochs, "
            f"{macs / 1e6:.2f}M conv MACs")
        return row, compiled

    for seed in seeds:
        log(f"seed {seed}: dense, {epochs} epochs")
        torch.manual_seed(seed)
        dense = models.resnet_cifar(20)
        fit(dense, epochs, lr)
        dense.eval()
        dense_acc = trp.evaluate(dense, test)["accuracy"]
        dense_macs, dense_params = conv_macs_params(dense, x1)
        folded = trp.compile(copy.deepcopy(dense), filter_fn=lambda m, q: False, channels_last=True)
        timed_models = {}
        rows.append({"method": "dense", "budget": 1.0, "seed": seed, "accuracy": dense_acc,
                     "accuracy_finetuned": dense_acc, "conv_macs": dense_macs, "params": dense_params})
        timed_models[("dense", 1.0)] = folded
        eigen = None
        for budget in budgets:
            for name in methods:
                family = FAMILY[name]
                targets = select_targets(dense, CompileConfig(scheme=family, rank_multiple=1))
                if name == "eigendamage":
                    if eigen is None:
                        eigen = trp.EigenDamage(dense)
                        eigen.prune(dense, train)
                    budget_of = Budget(dense, x1, eigen.targets)
                    ratio, _ = budget_of.search(budget, lambda r: eigen.select(r), low=0.0, high=0.999,
                                                increasing=False)
                    eigen.select(ratio)
                    source, plan = dense, eigen.plan()
                    extra = {"ratio": ratio, "ranks": {f: list(r) for f, r in eigen.ranks.items()}}
                elif name == "spp":
                    fraction = Budget(dense, x1, targets).tap_fraction(budget)
                    log(f"seed {seed}: spp at {budget}x fewer conv MACs ({fraction:.3f} of the taps pruned), "
                        f"{epochs} epochs")
                    torch.manual_seed(seed)
                    model = models.resnet_cifar(20)
                    method = trp.SPP(model, target=fraction, seed=seed)
                    history = fit(model, epochs, lr, method)
                    extra = {"target": fraction, "final_record": dict(history[-1]),
                             "layers_done": sum(method.done.values()), "layers": len(method.done)}
                    if extra["layers_done"] < extra["layers"]:
                        log(f"  spp: only {extra['layers_done']} of {extra['layers']} layers reached their target in "
                            f"{epochs} epochs: the budget is not met (train longer)")
                    source, plan = model.eval(), method.plan()
                else:
                    budget_of = Budget(dense, x1, targets)
                    ratio, ranks = budget_of.search(budget, budget_of.uniform_ranks)
                    extra = {"ratio": ratio}
                    if name in ("svd", "tucker-svd"):
                        source, plan = dense, _plan(family, ranks)
                    else:
                        log(f"seed {seed}: {name} at {budget}x fewer conv MACs (rank ratio {ratio:.3f}), "
                            f"{epochs} epochs")
                        torch.manual_seed(seed)
                        model = models.resnet_cifar(20)
                        if name == "trp":
                            method = trp.TRP(model, ratio=ratio)
                        else:
                            method = trp.ADMM(model, ratio=ratio, rho=admm_rho)
                        history = fit(model, epochs, lr, method)
                        extra["final_record"] = {k: v for k, v in history[-1].items() if k != "ranks"}
                        source, plan = model.eval(), method.plan()
                row, compiled = score(name, budget, seed, source, plan, extra)
                rows.append(row)
                timed_models[(name, budget)] = compiled
        for batch_size, x in ((1, x1), (8, x8)):
            fns = {f"{n}@{b}": (lambda m=m, x=x: no_grad_call(m, x)) for (n, b), m in timed_models.items()}
            timed = compare(fns, warmup=3, repeats=repeats)
            for row in rows:
                if row["seed"] == seed:
                    row[f"latency_b{batch_size}_ms"] = timed[f"{row['method']}@{row['budget']}"]["median_ms"]
    return {"rows": rows, "summary": summarize(rows)}


def no_grad_call(model, x):
    """``model(x)`` under ``torch.no_grad`` (what the timed calls run)."""
    with torch.no_grad():
        return model(x)


def _mean_std(values: list) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list) -> list:
    """Mean ± std over seeds per (method, budget)."""
    keys = []
    for r in rows:
        if (r["method"], r["budget"]) not in keys:
            keys.append((r["method"], r["budget"]))
    out = []
    for method, budget in keys:
        group = [r for r in rows if r["method"] == method and r["budget"] == budget]
        entry = {"method": method, "budget": budget, "seeds": len(group)}
        for key in ("accuracy", "accuracy_finetuned", "conv_macs", "params", "latency_b1_ms", "latency_b8_ms"):
            values = [r[key] for r in group if key in r]
            if values:
                entry[key], entry[key + "_std"] = _mean_std(values)
        out.append(entry)
    return out


def table(summary: list, finetune_epochs: int) -> str:
    """The summary as a Markdown table (accuracy mean ± std over seeds)."""
    dense = next(s for s in summary if s["method"] == "dense")
    lines = [f"| method | budget | conv MACs (fewer) | params | accuracy, no fine-tune | accuracy, "
             f"{finetune_epochs}-epoch fine-tune | latency b1 (ms) | latency b8 (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        budget = "-" if s["method"] == "dense" else f"{s['budget']:g}x"
        lines.append(f"| {LABELS[s['method']]} | {budget} | {s['conv_macs'] / 1e6:.2f}M "
                     f"({dense['conv_macs'] / s['conv_macs']:.2f}x) | {s['params'] / 1e3:.1f}K "
                     f"| {s['accuracy']:.2f} ± {s['accuracy_std']:.2f} "
                     f"| {s['accuracy_finetuned']:.2f} ± {s['accuracy_finetuned_std']:.2f} "
                     f"| {s.get('latency_b1_ms', float('nan')):.3f} | {s.get('latency_b8_ms', float('nan')):.3f} |")
    return "\n".join(lines)


def plot(summary: list, path: str) -> None:
    """Accuracy after fine-tuning against measured batch-1 latency, one marker per method
    and budget (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    markers = dict(zip(["dense", *METHODS], "o^sDvPX"))
    for method in dict.fromkeys(s["method"] for s in summary):
        group = [s for s in summary if s["method"] == method]
        ax.errorbar([s["latency_b1_ms"] for s in group], [s["accuracy_finetuned"] for s in group],
                    yerr=[s["accuracy_finetuned_std"] for s in group], marker=markers[method], linestyle="",
                    capsize=3, label=LABELS[method])
        for s in group:
            if method != "dense":
                ax.annotate(f"{s['budget']:g}x", (s["latency_b1_ms"], s["accuracy_finetuned"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("latency, batch 1 (ms, median; trp.compile on this CPU)")
    ax.set_ylabel("test accuracy after fine-tune (%)")
    ax.set_title("ResNet-20 on digits: accuracy vs measured latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
