"""trp.breakdown of the ResNet-50 tucker+pointwise model case (batch 1): where trp.compile's time goes.

    python benches/breakdown_tucker.py   (results: benches/results/cpu-breakdown-tucker.txt)
"""
import torch, trp
from trp.benchmark import cases as C, providers as P
case = C.ModelCase("resnet50", 224, 1, "cpu", torch.float32, scheme=("tucker","pointwise"))
b = P.model_bundle(case, torch.Generator().manual_seed(0))
bd = trp.breakdown(b["trp"], b["x"], repeats=20)
print(bd)
mods = sorted(bd.modules.items(), key=lambda kv: -kv[1])[:12]
for n, t in mods:
    m = b["trp"].get_submodule(n)
    print(n, type(m).__name__, getattr(m, "scheme", ""), getattr(m, "ranks", ""), f"{t:.3f}")
