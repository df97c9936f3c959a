"""The model suite's second target, one line per case of a results.json: each runtime's
time on trp.compile's model against the same runtime on the two-conv form of the same
factors (PyTorch eager, NCHW and channels_last; torch.compile; torch.compile with freezing;
ONNX Runtime; OpenVINO f32), as two-conv / trp (>= 1: trp.compile's model is not slower).
A runtime a results file lacks is left out.

    python benches/same_runtime_summary.py results.json [more.json ...]
"""
import json
import sys

PAIRS = [("eager", "trp_eager", "lowrank_eager"), ("eager_cl", "trp_eager", "lowrank_eager_cl"),
         ("compile", "trp_compile", "lowrank_compile"), ("frozen", "trp_compile_frozen", "lowrank_compile_frozen"),
         ("ort", "trp_ort", "lowrank_ort"), ("openvino", "trp_openvino", "lowrank_openvino")]


def main() -> None:
    by = {}
    for path in sys.argv[1:]:
        for r in json.load(open(path))["rows"]:
            if r["status"] == "ok":
                by.setdefault((r["case"], r["batch"]), {}).setdefault(path, {})[r["provider"]] = r["median_ms"]
    print(f"two-conv form / trp.compile's model, same runtime, same results file (>= 1: trp not slower); "
          f"files: {', '.join(sys.argv[1:])}")
    print(f"{'case':32s} {'b':>2s} " + " ".join(f"{name:>9s}" for name, _, _ in PAIRS))
    worst = []
    for (case, batch), files in by.items():
        cells = []
        for name, trp_p, two in PAIRS:
            ratio = next((f[two] / f[trp_p] for f in files.values() if trp_p in f and two in f), None)
            cells.append(f"{ratio:9.2f}" if ratio is not None else f"{'-':>9s}")
            if ratio is not None:
                worst.append((ratio, f"{case} b{batch} {name}"))
        print(f"{case:32s} {batch:2d} " + " ".join(cells))
    below = sorted(w for w in worst if w[0] < 1)
    print(f"pairs below 1: {len(below)} of {len(worst)}" + (": " + "; ".join(f"{n} {r:.2f}" for r, n in below)
                                                           if below else ""))


if __name__ == "__main__":
    main()
