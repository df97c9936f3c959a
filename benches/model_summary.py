"""One line per model case of a model-suite results.json: trp.compile (trp_eager), the peers on the same
factors (lowrank_ort, lowrank_openvino, lowrank_compile_frozen), trp.deploy's file in ONNX Runtime (trp_ort),
dense ONNX Runtime, and the fastest peer's median over trp.compile's.

    python benches/model_summary.py results.json
"""
import json, sys
d = json.load(open(sys.argv[1]))
rows = d["rows"]
by = {}
for r in rows:
    by.setdefault((r["case"], r["batch"]), {})[r["provider"]] = r
print(f"{'case':32s} {'b':>2s} {'trp.compile':>11s} {'ORT':>8s} {'OV f32':>8s} {'Ind.fr':>8s} {'trp->ONNX->ORT':>14s} {'dense ORT':>9s}  fastest peer / trp")
for (case, batch), ps in by.items():
    def ms(p):
        r = ps.get(p); return r["median_ms"] if r and r["status"] == "ok" else float("nan")
    peers = {p: ms(p) for p in ("lowrank_ort", "lowrank_openvino", "lowrank_compile_frozen")}
    best = min(peers, key=peers.get)
    print(f"{case:32s} {batch:2d} {ms('trp_eager'):11.3f} {peers['lowrank_ort']:8.3f} {peers['lowrank_openvino']:8.3f} {peers['lowrank_compile_frozen']:8.3f} {ms('trp_ort'):14.3f} {ms('dense_ort'):9.3f}  {peers[best]/ms('trp_eager'):.2f} ({best})")
