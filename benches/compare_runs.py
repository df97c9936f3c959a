"""Before/after a kernel change: per provider and batch size, each pass's after/before
ratio of the median times (geometric mean over the cases both runs have), with
dense_torch as the control, also as a ratio normalised by the same run's dense_torch.

    python benches/compare_runs.py DIR [--all-ranks]

DIR holds before1.json, after1.json, before2.json, ... (``python -m trp bench --json``
outputs, alternated before/after in separate processes). Only the cases with one rank (the
channel and spatial ones) count unless --all-ranks, which adds the Tucker cases (a rank per
mode). Used by benches/results/chain-refactor/ and benches/results/prefetch/.
"""
import argparse
import json
import math
from pathlib import Path


def load(path: Path, all_ranks: bool) -> dict:
    rows = json.loads(path.read_text())["rows"]
    return {(r["case"], r["batch"], str(r["rank"]), r["provider"]): r["median_ms"] for r in rows
            if r["status"] == "ok" and (all_ranks or not isinstance(r["rank"], list))}


def geomean(xs) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--all-ranks", action="store_true", help="count the Tucker cases too")
    ap.add_argument("--providers", nargs="+", default=["lowrank_cpp", "lowrank_trp"])
    args = ap.parse_args()
    passes = []
    i = 1
    while (args.dir / f"before{i}.json").exists():
        if not (args.dir / f"after{i}.json").exists():
            raise SystemExit(f"{args.dir} has before{i}.json but no after{i}.json")
        passes.append((load(args.dir / f"before{i}.json", args.all_ranks),
                       load(args.dir / f"after{i}.json", args.all_ranks)))
        i += 1
    if not passes:
        raise SystemExit(f"no before1.json/after1.json in {args.dir}")
    for prov in (*args.providers, "dense_torch"):
        for batch in (1, 8):
            line, every = [f"{prov:12s} batch {batch}:"], []
            for n, (b, a) in enumerate(passes, 1):
                ratios = [a[k] / b[k] for k in b if k[3] == prov and k[1] == batch and k in a]
                if not ratios:
                    continue
                every += ratios
                line.append(f"pass {n}: after/before geomean {geomean(ratios):.3f} over {len(ratios)} cases "
                            f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
            if every:
                line.append(f"all passes: {geomean(every):.3f}")
                print("  ".join(line))
    print()
    print("normalised by dense_torch of the same run (t_provider / t_dense, after over before):")
    for prov in args.providers:
        for batch in (1, 8):
            rs = []
            for b, a in passes:
                for k in b:
                    d = k[:3] + ("dense_torch",)
                    if k[3] == prov and k[1] == batch and k in a and d in a and d in b:
                        rs.append((a[k] / a[d]) / (b[k] / b[d]))
            if rs:
                print(f"{prov:12s} batch {batch}: geomean {geomean(rs):.3f} over {len(rs)} case-passes")


if __name__ == "__main__":
    main()
