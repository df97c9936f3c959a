"""Why the suite times each provider in blocks of its own: CIFAR ResNet-20 at batch 1 under
eight PyTorch providers, each timed alone, then all together interleaved call by call
(``interleave=True``) and in blocks (the default). Run from the repository root:

    python benches/results/timing-method/interleaving.py > benches/results/timing-method/interleaving.txt
"""

import torch

from trp.benchmark import cases as C
from trp.benchmark import providers as P
from trp.timing import compare, machine_info

case = C.ModelCase("resnet20", 32, 1, "cpu", torch.float32)
bundle = P.model_bundle(case, torch.Generator().manual_seed(0))
names = ["trp_eager", "dense_eager_cl", "lowrank_eager_cl", "dense_eager", "lowrank_eager", "cpp_eager",
         "lowrank_compile_frozen", "trp_compile"]
fns = {p: P.prepare_model(p, case, bundle) for p in names}
with torch.inference_mode():
    for f in fns.values():
        f()
    alone = {p: compare({p: fns[p]}, repeats=100)[p]["median_ms"] for p in names}
    together = compare(fns, repeats=100, interleave=True)
    blocks = compare(fns, repeats=100)
print(machine_info())
print(f"{'provider':<24} {'alone':>8} {'call by call':>13} {'ratio':>6} {'blocks':>8} {'ratio':>6}  (median ms)")
for p in names:
    t, b = together[p]["median_ms"], blocks[p]["median_ms"]
    print(f"{p:<24} {alone[p]:>8.3f} {t:>13.3f} {t / alone[p]:>6.2f} {b:>8.3f} {b / alone[p]:>6.2f}")
