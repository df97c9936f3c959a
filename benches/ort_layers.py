"""Where the time goes, trp.compile against ONNX Runtime running the same factors: ResNet-50 @224
tucker+pointwise at ratio=0.25 (the model suite's case, seed 0), part by part and module by module.

trp: trp.breakdown of the compiled model (each part module's forward between two clock reads).
ONNX Runtime: the low-rank model exported as the model suite's lowrank_ort provider exports it, run with
ORT's profiler on, in this process after trp is done (ORT's thread pool only then); each ORT node's median
over the profiled runs, counted to the module its ONNX node came from (the exporter's name scopes; a node
ORT fused into a Conv, e.g. its ReLU or residual Add, counts to that Conv's module), and a node of no
module (ORT's layout reorders) to glue.

    python benches/ort_layers.py [batch]   (results: benches/results/ort-layers/)
"""
import collections
import json
import os
import statistics
import sys
import tempfile

import onnx
import onnxruntime as ort
import torch

import trp
from model_ab import resnet50_bundle
from trp.benchmark import providers as P
from trp.breakdown import PARTS, part_of
from trp.compile import find_stem

CONV_OPS = ("Conv", "FusedConv", "NchwcConv")


def onnx_modules(model_bytes: bytes) -> dict:
    """ONNX node name, and its first output's name -> (the module fqn it came from, the module of the
    Conv it ends: itself if a Conv, the Conv that produced its input if a ReLU or Add), as ORT fuses
    a Conv with the ReLU or residual Add after it and names the fused node after the last one."""
    graph = onnx.load_from_string(model_bytes).graph
    producer = {out: n for n in graph.node for out in n.output}

    def scope(node):
        props = {p.key: p.value for p in node.metadata_props}
        scopes = json.loads(props.get("pkg.torch.onnx.name_scopes", "[]").replace("'", '"'))
        mods = [s for s in scopes[:-1] if s]
        return mods[-1] if mods else None

    def conv_scope(node, depth=0):
        if node.op_type == "Conv":
            return scope(node)
        if depth < 2 and node.op_type in ("Relu", "Add"):
            for i in node.input:
                if i in producer:
                    s = conv_scope(producer[i], depth + 1)
                    if s:
                        return s
        return None

    out = {}
    for n in graph.node:  # ORT names a node it rewrites after the node's first output, the others as they are
        for key in (n.name, *n.output[:1]):
            out[key] = (scope(n), conv_scope(n))
    return out


def ort_runs(model_bytes: bytes, inputs, runs: int, warmup: int = 0) -> list:
    """ONNX Runtime (the providers' session, its profiler on) called ``warmup`` + ``runs``
    times on ``inputs``: per timed run, (its ms, its node events: each a profiler event with
    "dur" in us and "args"["op_name"])."""
    session = P._ort_session(model_bytes, os.path.join(tempfile.mkdtemp(), "ort"))
    feed = {i.name: t.contiguous().numpy() for i, t in zip(session.get_inputs(), inputs)}
    for _ in range(warmup + runs):
        session.run(None, feed)
    events = json.load(open(session.end_profiling()))
    model_runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][warmup:]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return [(r["dur"] / 1e3, [e for e in nodes if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]]) for r in model_runs]


def node_times(runs: list) -> dict:
    """(node name, op) -> that node's ms in each of ``runs`` (what :func:`ort_runs` gives)."""
    node_ms = collections.defaultdict(list)
    for _, nodes in runs:
        for e in nodes:
            node_ms[(e["name"][: -len("_kernel_time")], e["args"].get("op_name", ""))].append(e["dur"] / 1e3)
    return node_ms


def node_module(name: str, op: str, scopes: dict):
    """The fqn of the module an ORT node's time counts to (:func:`onnx_modules`' ``scopes``:
    a Conv with what ORT fused into it counts to the Conv's module), or None."""
    base = name[: -len("_nchwc")] if name.endswith("_nchwc") else name
    plain, conv = scopes.get(base, (None, None))
    return conv if op in CONV_OPS and conv else plain


def main() -> None:
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    _, b = resnet50_bundle(batch)
    bd = trp.breakdown(b["trp"], b["x"], repeats=30)
    lowrank = b["lowrank"]
    stem = find_stem(lowrank)

    data = P._onnx_bytes(lowrank, b["x"])
    scopes = onnx_modules(data)
    runs = ort_runs(data, [b["x"]], 40 if batch == 1 else 12)
    node_ms = node_times(runs)
    whole = statistics.median(ms for ms, _ in runs)

    ort_module = collections.defaultdict(float)
    ort_part = collections.defaultdict(float)
    for (name, op), ds in node_ms.items():
        fqn = node_module(name, op, scopes)
        module = None
        if fqn:
            try:
                module = lowrank.get_submodule(fqn)
            except AttributeError:
                module = None
        part = part_of(fqn, module, stem) if module is not None else None
        ms = statistics.median(ds)
        ort_part[part or "glue"] += ms
        if part:
            ort_module[fqn] += ms
    ort_part["glue"] += whole - sum(ort_part.values())  # between nodes: the executor's own time

    print(f"ResNet-50 @224 tucker+pointwise ratio=0.25, batch {batch}, {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}")
    print(f"whole model: trp.compile {bd.plain_ms:.3f} ms (plain call, median of {bd.repeats}); "
          f"ONNX Runtime {whole:.3f} ms (profiled model_run, median of {len(runs)})")
    print(f"{'part':18s} {'trp ms':>8s} {'ORT ms':>8s} {'trp/ORT':>8s}")
    for part in PARTS:
        t = bd.parts[part]["median_ms"] if part in bd.parts else 0.0
        o = ort_part.get(part, 0.0)
        if t or o:
            print(f"{part:18s} {t:8.3f} {o:8.3f} {t / o if o else float('nan'):8.2f}")
    print(f"{'sum':18s} {bd.sum_ms:8.3f} {sum(ort_part.values()):8.3f}")
    print("\nlow-rank and dense modules, trp against ORT's nodes of the same module, largest gap first:")
    rows = []
    for fqn, t in bd.modules.items():
        m = b["trp"].get_submodule(fqn)
        o = ort_module.get(fqn, 0.0)
        desc = f"{type(m).__name__} {getattr(m, 'scheme', '')} {getattr(m, 'ranks', '')}".strip()
        rows.append((t - o, fqn, desc, t, o))
    for gap, fqn, desc, t, o in sorted(rows, reverse=True):
        print(f"{fqn:26s} {desc:38s} trp {t:6.3f}  ORT {o:6.3f}  gap {gap:+6.3f} ms")


if __name__ == "__main__":
    main()
