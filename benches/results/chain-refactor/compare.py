"""Before/after the chain refactor: lowrank_cpp and lowrank_trp medians per channel case,
each pass's after/before ratio and the geometric mean per batch; dense_torch as a control."""
import json, math, sys
from collections import defaultdict

def load(p):
    rows = json.load(open(p))["rows"]
    return {(r["case"], r["batch"], r["rank"], r["provider"]): r["median_ms"] for r in rows
            if r["status"] == "ok" and not isinstance(r["rank"], list)}

passes = [(load(f"benches/results/chain-refactor/before{i}.json"), load(f"benches/results/chain-refactor/after{i}.json")) for i in (1, 2)]
out = []
for prov in ("lowrank_cpp", "lowrank_trp", "dense_torch"):
    for batch in (1, 8):
        line = [f"{prov:12s} batch {batch}:"]
        allr = []
        for i, (b, a) in enumerate(passes, 1):
            ratios = [a[k] / b[k] for k in b if k[3] == prov and k[1] == batch and k in a]
            g = math.exp(sum(map(math.log, ratios)) / len(ratios))
            allr.append(ratios)
            line.append(f"pass {i}: after/before geomean {g:.3f} over {len(ratios)} cases (min {min(ratios):.2f}, max {max(ratios):.2f})")
        both = [x for r in allr for x in r]
        line.append(f"both passes: {math.exp(sum(map(math.log, both)) / len(both)):.3f}")
        out.append("  ".join(line))
print("\n".join(out))

print()
print("normalised by dense_torch of the same run (t_fused / t_dense, after over before):")
for prov in ("lowrank_cpp", "lowrank_trp"):
    for batch in (1, 8):
        rs = []
        for b, a in passes:
            for k in b:
                d = k[:3] + ("dense_torch",)
                if k[3] == prov and k[1] == batch and k in a and d in a and d in b:
                    rs.append((a[k] / a[d]) / (b[k] / b[d]))
        print(f"{prov:12s} batch {batch}: geomean {math.exp(sum(map(math.log, rs)) / len(rs)):.3f} over {len(rs)} "
              f"case-passes")
