"""The fused Tucker-2 kernel (lowrank_cpp) against its three stages as oneDNN convs in
channels_last (lowrank_torch_cl), from a layer-suite JSON file: t(torch_cl) / t(cpp) per
batch, the geometric mean over the cases and the two slowest; with a second argument,
also each case whose name and ranks contain it.

    python -m trp bench --suite layers --select tucker --providers lowrank_torch_cl lowrank_cpp --json run.json
    python benches/tucker_summary.py run.json ["64->64 3x3 s1 @56 tucker [16, 16]"]
"""
import collections
import json
import math
import sys


def main() -> None:
    d = json.load(open(sys.argv[1]))
    by = collections.defaultdict(dict)
    for r in d["rows"]:
        if r["status"] == "ok":
            by[(r["case"], r["batch"], str(r["rank"]))][r["provider"]] = r["median_ms"]
    for b in sorted({k[1] for k in by}):
        rs = sorted((v["lowrank_torch_cl"] / v["lowrank_cpp"], c, k) for (c, bb, k), v in by.items()
                    if bb == b and {"lowrank_cpp", "lowrank_torch_cl"} <= set(v))
        g = math.exp(sum(math.log(r[0]) for r in rs) / len(rs))
        print(f"b{b}: geomean {g:.3f} min {rs[0][0]:.3f} {rs[0][1]} {rs[0][2]} | next {rs[1][0]:.3f} {rs[1][1]} {rs[1][2]}")
        for ratio, case, rank in rs:
            if len(sys.argv) > 2 and sys.argv[2] in f"{case} {rank}":
                print(f"    {ratio:.3f} {case} {rank}")


if __name__ == "__main__":
    main()
