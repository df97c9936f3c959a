"""Two probes behind the methods comparison's notes (docs/methods.md), ResNet-20 on the
digits, seed 0, 30 epochs:

- ``admm-rho``: ADMM from scratch at rank ratio 0.35 for several rho, then compiled with its
  plan, no fine-tune: the authors' 1e-3 assumes ~200x the steps;
- ``eigendamage-ratios``: EigenDamage on the trained dense model, the accuracy of the compiled
  model with no fine-tune at several fractions of all directions pruned.

    python benches/method_probes.py admm-rho > benches/results/methods-digits/admm-rho.txt
    python benches/method_probes.py eigendamage-ratios > benches/results/methods-digits/eigendamage-ratios.txt
"""

from __future__ import annotations

import copy
import sys

import torch

import trp
from trp import data, models
from trp.timing import machine_info


def admm_rho(rhos=(1e-3, 0.1, 1.0)) -> None:
    train, test = data.digits(128)
    print("| rho | admm_residual at the end | admm_gap at the end | accuracy, trained | accuracy, compiled |")
    print("|---|---|---|---|---|")
    for rho in rhos:
        torch.manual_seed(0)
        model = models.resnet_cifar(20)
        admm = trp.ADMM(model, ratio=0.35, rho=rho)
        history = trp.fit(model, train, test, epochs=30, lr=0.05, method=admm, progress=False)
        compiled = trp.compile(copy.deepcopy(model).eval(), plan=admm.plan())
        last = history[-1]
        print(f"| {rho:g} | {last['admm_residual']:.3f} | {last['admm_gap']:.3f} | {last['val_accuracy']:.2f} "
              f"| {trp.evaluate(compiled, test)['accuracy']:.2f} |", flush=True)


def eigendamage_ratios(ratios=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5)) -> None:
    train, test = data.digits(128)
    torch.manual_seed(0)
    model = models.resnet_cifar(20)
    trp.fit(model, train, test, epochs=30, lr=0.05, progress=False)
    model.eval()
    print(f"dense: {trp.evaluate(model, test)['accuracy']:.2f}%")
    ed = trp.EigenDamage(model)
    ed.prune(model, train)
    print("| directions pruned | accuracy, no fine-tune | ranks of layer3.2.conv2 (of 64, 64) |")
    print("|---|---|---|")
    for ratio in ratios:
        ed.select(ratio)
        compiled = trp.compile(copy.deepcopy(model), plan=ed.plan(), fold_bn=False)
        print(f"| {ratio:.0%} | {trp.evaluate(compiled, test)['accuracy']:.2f} | {ed.ranks['layer3.2.conv2']} |",
              flush=True)


if __name__ == "__main__":
    info = machine_info()
    print(f"# python benches/method_probes.py {sys.argv[1]}; {info['cpu']}, torch {info['torch']}, "
          f"{torch.get_num_threads()} threads")
    {"admm-rho": admm_rho, "eigendamage-ratios": eigendamage_ratios}[sys.argv[1]]()
