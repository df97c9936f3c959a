"""trp.compile's ResNet-50 tucker+pointwise (the model suite's case, seed 0) layer by layer against ONNX
Runtime running the same factor convs and epilogue: each distinct low-rank layer (one of each shape, ranks,
family, stride and epilogue) on the input and residual it gets in the model (captured by forward hooks),
hot. trp: the compiled module's call (its Python included) and its kernel alone (cpp.fused_chain on the
kernel-layout weights); ONNX Runtime: the same layer of the bundle's plain-conv model (its factor convs, the
bias, + residual, ReLU) exported as the model suite's lowrank_ort provider exports that model. Every trp
timing runs before the first ORT session exists, so ORT's spinning thread pool never overlaps trp's calls.

    python benches/layers_vs_ort.py [batch]   (results: benches/results/ort-layers/)
"""
import statistics
import sys
import time

import onnxruntime as ort
import torch

from model_ab import resnet50_bundle
from ort_layers import ort_runs
from trp.benchmark import providers as P
from trp.modules import LowRankConv2d
from trp_kernels import cpp, ops


def median_ms(fn, budget_s: float = 0.5, min_calls: int = 20) -> float:
    for _ in range(3):
        fn()
    ts, start = [], time.perf_counter()
    while len(ts) < min_calls or time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> None:
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    _, b = resnet50_bundle(batch)
    model, x = b["trp"], b["x"]
    seen, layers = set(), []
    captured, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankConv2d):
            def hook(m, args, kwargs, out, name=name):
                captured[name] = (args[0], kwargs.get("residual", args[1] if len(args) > 1 else None))
            handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    for name, mod in model.named_modules():
        if name not in captured:
            continue
        xi, res = captured[name]
        key = (mod.scheme, mod.in_channels, mod.out_channels, tuple(mod.ranks), tuple(mod.stride),
               tuple(xi.shape[2:]), res is not None)
        if key not in seen:
            seen.add(key)
            layers.append((name, mod, xi, res))

    rows = []
    with torch.inference_mode():
        for name, mod, xi, res in layers:  # trp first, every layer
            laid = [cpp.kernel_layout(w.detach()) for w in mod.stage_weights()]
            shapes = [w.shape for w in laid]
            kernel = ops.backend_kernel("cpp", shapes, mod._strides, mod._paddings, mod._dilations)
            t_mod = median_ms(lambda: mod(xi, residual=res) if res is not None else mod(xi))
            t_kernel = median_ms(lambda: cpp.fused_chain(xi, laid, mod.bias, *kernel, res, mod.relu))
            rows.append([name, mod, xi, res, t_mod, t_kernel])
    for row in rows:  # then ORT (its sessions made only now: no ORT pool spins during trp's calls)
        name, mod, xi, res = row[:4]
        plain = b["lowrank"].get_submodule(name)  # the same layer as plain convs, as lowrank_ort exports it
        args = (xi.contiguous(),) if res is None else (xi.contiguous(), res.contiguous())
        data = P._onnx_bytes(plain, *args)
        session = P._ort_session(data)
        feed = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
        row.append(median_ms(lambda: session.run(None, feed)))
        del session
        # Node times without the layout reorders: inside a model ORT converts to and from
        # its blocked layout once, and session.run's own time is paid once a model.
        runs = ort_runs(data, args, 60, warmup=5)
        row.append(statistics.median(sum(e["dur"] for e in nodes if not e["args"].get("op_name", "").startswith("Reorder"))
                                     / 1e3 for _, nodes in runs))
    print(f"ResNet-50 @224 tucker+pointwise ratio=0.25, batch {batch}, {torch.get_num_threads()} threads, each distinct "
          f"low-rank layer on its input from the model, hot; torch {torch.__version__}, onnxruntime {ort.__version__}")
    print("module: trp.compile's module call; kernel: cpp.fused_chain alone; ORT run: session.run (with its own "
          "time and the conversions to and from ORT's blocked layout); ORT nodes: the profiled node times of one "
          "run without the layout reorders")
    print(f"{'layer':24s} {'family':9s} {'shape':28s} {'module':>7s} {'kernel':>7s} {'ORT run':>8s} {'ORT nodes':>9s} "
          f"{'nodes/kernel':>12s}")
    for name, mod, xi, res, t_mod, t_kernel, t_ort, t_nodes in rows:
        shape = (f"{mod.in_channels}->{'/'.join(map(str, mod.ranks))}->{mod.out_channels} @{xi.shape[2]}"
                 f"{' s2' if mod.stride != (1, 1) else ''}{' +res' if res is not None else ''}")
        print(f"{name:24s} {mod.scheme:9s} {shape:28s} {t_mod:7.3f} {t_kernel:7.3f} {t_ort:8.3f} {t_nodes:9.3f} "
              f"{t_nodes / t_kernel:12.2f}")
    for col, label in ((6, "ORT run"), (7, "ORT nodes")):
        g = statistics.geometric_mean([r[col] / r[5] for r in rows])
        print(f"geometric mean {label} / kernel over {len(rows)} layers: {g:.2f}")
    print(f"sum over the layers (ms): module {sum(r[4] for r in rows):.3f}, kernel {sum(r[5] for r in rows):.3f}, "
          f"ORT run {sum(r[6] for r in rows):.3f}, ORT nodes {sum(r[7] for r in rows):.3f}")


if __name__ == "__main__":
    main()
