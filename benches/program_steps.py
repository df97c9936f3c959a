"""Where the time goes in trp.compile's whole-model program (trp.program), step by step, against ONNX
Runtime running the same factors node by node: a model suite case (seed 0), in one process, trp first.

trp: the compiled model called under inference_mode (its program: the stretches of C++ steps in one call
each, the stem and fc in PyTorch between); each C++ step's time from the program's own clock reads
(_C.Program.set_profile: a steady_clock read between steps, no Python), median over the runs; "outside
the segments" is the whole call's median less the segments' step sums (the stem conv, the fc layer, the
Python of the call and its checks). At the end, the same per part of the model (trp.breakdown's parts): the
modules PyTorch runs between the segments timed by hooks on them (which leave the program in place), glue
the rest of the call (Python, the checks, the adds and ReLUs outside the kernels). ONNX Runtime: the lowrank_ort provider's export of the same factors,
its profiler's node times counted to modules as benches/ort_layers.py does, after trp is done.

    python benches/program_steps.py MODEL BATCH [SCHEME] [--threads=N]     e.g. resnet50 1 tucker+pointwise
"""
import collections
import statistics
import sys
import time

import torch

from model_ab import bundle_from_args
from ort_layers import node_module, node_times, onnx_modules, ort_runs
from trp import program
from trp.breakdown import GLUE, PARTS, part_of
from trp.compile import find_stem
from trp.benchmark import providers as P


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--threads=")]
    for a in sys.argv[1:]:
        if a.startswith("--threads="):
            torch.set_num_threads(int(a.split("=", 1)[1]))  # both trp and ORT (the providers' session)
    case, b = bundle_from_args(args)
    batch = case.batch
    model, x = b["trp"], b["x"]
    runs = 40 if batch == 1 else 12
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        prog = program.runner(model).programs[x.shape]
        whole = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            whole.append((time.perf_counter() - t0) * 1e3)
        for seg in prog.segments:
            seg.program.set_profile(True)
        # the modules PyTorch runs between the segments (stem, fc, dense convs it runs faster),
        # each between two clock reads (hooks there leave the program as it is)
        outside = {n.target: [] for n in prog.module.graph.nodes
                   if n.op == "call_module" and not n.target.startswith("_trp_segment")}
        clock = {}
        hooks = []
        for fqn in outside:
            m = model.get_submodule(fqn)
            hooks.append(m.register_forward_pre_hook(lambda mod, a, fqn=fqn: clock.__setitem__(fqn, time.perf_counter())))
            hooks.append(m.register_forward_hook(
                lambda mod, a, out, fqn=fqn: outside[fqn].append((time.perf_counter() - clock[fqn]) * 1e3)))
        calls_before = program.runner(model).calls
        for _ in range(runs):
            model(x)
        assert program.runner(model).calls == calls_before + runs  # the program ran every profiled call
        for h in hooks:
            h.remove()
    steps = []  # (segment, name, median ms)
    for k, seg in enumerate(prog.segments):
        samples = seg.program.profile()
        seg.program.set_profile(False)
        for j, name in enumerate(seg.step_names):
            steps.append((k, name, statistics.median(s[j] for s in samples) * 1e3))
    whole_ms = statistics.median(whole)

    data = P._onnx_bytes(b["lowrank"], x)
    scopes = onnx_modules(data)
    ort = ort_runs(data, [x], runs, warmup=5)
    node_ms = node_times(ort)
    ort_module = collections.defaultdict(float)
    for (name, op), ds in node_ms.items():
        fqn = node_module(name, op, scopes) or f"({op})"
        ort_module[fqn] += statistics.median(ds)
    ort_whole = statistics.median(ms for ms, _ in ort)

    print(f"{case.name} batch {batch}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"whole model: trp.compile (program) {whole_ms:.3f} ms, ONNX Runtime {ort_whole:.3f} ms "
          f"(medians of {runs} calls; ORT: profiled model_run)")
    in_steps = sum(ms for _, _, ms in steps)
    print(f"trp: {len(steps)} C++ steps in {len(prog.segments)} segments {in_steps:.3f} ms; outside them "
          f"{whole_ms - in_steps:.3f} ms")
    matched = 0.0
    print(f"{'step':28s} {'trp ms':>8s} {'ORT ms':>8s} {'trp/ORT':>8s}")
    for k, name, ms in steps:
        o = ort_module.pop(name, None)
        if o is not None:
            matched += o
        ratio = f"{ms / o:8.2f}" if o else f"{'':8s}"
        print(f"{name:28s} {ms:8.3f} {o if o is not None else float('nan'):8.3f} {ratio}")
    print(f"ORT nodes of modules outside trp's steps (stem, fc, ...) and ORT's own: "
          + ", ".join(f"{k} {v:.3f}" for k, v in sorted(ort_module.items(), key=lambda kv: -kv[1])[:12]))
    print(f"sum over the matched steps: trp {sum(ms for _, n, ms in steps if n not in ('add', 'relu')):.3f} ms, "
          f"ORT {matched:.3f} ms")

    # per part of the model (trp.breakdown's parts): trp's steps and outside modules, ORT's nodes
    stem = find_stem(b["lowrank"])
    trp_part, ort_part = collections.defaultdict(float), collections.defaultdict(float)
    for _, name, ms in steps:
        part = None
        if name not in ("add", "relu"):
            part = part_of(name, model.get_submodule(name), stem)
        trp_part[part or GLUE] += ms
    for fqn, ts in outside.items():
        trp_part[part_of(fqn, model.get_submodule(fqn), stem) or GLUE] += statistics.median(ts)
    trp_part[GLUE] += whole_ms - sum(trp_part.values())  # Python between the calls, the checks, the rest
    for (name, op), ds in node_ms.items():
        fqn = node_module(name, op, scopes)
        try:
            module = b["lowrank"].get_submodule(fqn) if fqn else None
        except AttributeError:
            module = None
        ort_part[(part_of(fqn, module, stem) if module is not None else None) or GLUE] += statistics.median(ds)
    ort_part[GLUE] += ort_whole - sum(ort_part.values())
    print(f"\n{'part':18s} {'trp ms':>8s} {'ORT ms':>8s}")
    for part in PARTS:
        if trp_part.get(part) or ort_part.get(part):
            print(f"{part:18s} {trp_part.get(part, 0.0):8.3f} {ort_part.get(part, 0.0):8.3f}")
    print(f"{'whole':18s} {whole_ms:8.3f} {ort_whole:8.3f}")


if __name__ == "__main__":
    main()
