"""ResNet-50 (dense 1x1s) under trp.compile with trp.program's dense-conv margins set from the
command line: what the whole model would gain if every dense 1x1 conv ran in the program
(FALLBACK_SLOWDOWN=1e9 lets a weight take the kernel's layout however much that slows
PyTorch's own per-module conv, which the default 1.1 refuses; DENSE_MARGIN/RESIDUAL_MARGIN as in
trp/program.py). A probe, not a setting to ship: median of 30 (batch 1) or 8 calls.

    python benches/dense_policy_probe.py MODEL BATCH DENSE_MARGIN RESIDUAL_MARGIN FALLBACK_SLOWDOWN
    (results: benches/results/dense-policy-probe.txt)
"""
import sys, statistics, time, torch
sys.path.insert(0, "benches")
from model_ab import bundle_from_args
from trp import program
margins = dict(DENSE_MARGIN=float(sys.argv[3]), RESIDUAL_MARGIN=float(sys.argv[4]), FALLBACK_SLOWDOWN=float(sys.argv[5]))
for k, v in margins.items(): setattr(program, k, v)
case, b = bundle_from_args(sys.argv[1:3])
model, x = b["trp"], b["x"]
with torch.inference_mode():
    for _ in range(3): model(x)
    t = []
    for _ in range(30 if case.batch == 1 else 8):
        t0 = time.perf_counter(); model(x); t.append(time.perf_counter() - t0)
prog = program.runner(model).programs[x.shape]
print(case.name, case.batch, margins, f"{statistics.median(t)*1e3:.3f} ms", sum(len(s.step_names) for s in prog.segments), "steps", len(prog.segments), "segments")
