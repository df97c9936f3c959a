"""One prepared GPU run, for the few minutes a GPU machine is lent (about 10 on an H100/H200).

    python benches/gpu_run.py --out benches/results/gpu-<date>      # on the GPU machine
    python benches/gpu_run.py --dry-run --out /tmp/gpu-dry         # anywhere: the same steps on CPU

Steps, each with its share of ``--time-limit`` (no new case starts past it):

1. environment: GPU, compute capability, driver, CUDA, torch, Triton;
2. the native GPU tests: ``pytest tests/trp_kernels`` with ``TRITON_INTERPRET`` unset;
3. the layer suite: fused Triton kernel against two cuDNN convs, eager and under CUDA graphs,
   at batch 1, 32 and 128;
4. the model suite: ResNet-18/50 dense cuDNN, two convs and fused, float16 and float32, eager
   and under CUDA graphs;
5. the targets: fused >= 1.3x over two cuDNN convs at batch 1 under CUDA graphs and >= 1.15x
   at 32/128; ResNet-50 realising >= 0.8 of its MAC reduction against dense cuDNN.

Everything goes into one ``results.json`` (plus the suites' reports). Nothing is installed
or downloaded: it runs from the checkout with whatever torch and Triton the machine has
(the lent one: Python 3.12, torch 2.11, Triton 3.6), without the C++ extension if it is
not built. ``--dry-run`` runs every step on the CPU with tiny cases, to test the script and
its output; the CUDA-only parts are skipped with a message saying so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout, installed or not

LAYER_PROVIDERS = ["dense_torch", "lowrank_torch", "lowrank_trp", "dense_torch_cudagraph", "lowrank_torch_cudagraph",
                   "lowrank_trp_cudagraph"]
MODEL_PROVIDERS = ["dense_eager", "lowrank_eager", "trp_eager", "dense_cudagraph", "lowrank_cudagraph", "trp_cudagraph"]
TARGETS = {"fused_vs_two_convs_b1_cudagraph": 1.3, "fused_vs_two_convs_b32_b128": 1.15,
           "resnet50_realized_fraction": 0.8}
SHARES = {"tests": 0.25, "layers": 0.4, "models": 0.35}


def _geomean(values):
    """report.geomean over the positive values, None when there are none (a target not reached)."""
    from trp.benchmark.report import geomean

    values = [v for v in values if v and v > 0]
    return geomean(values) if values else None


def environment(dry_run: bool) -> dict:
    import torch

    from trp.timing import machine_info

    env = machine_info() | {"dry_run": dry_run,
                            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"compute_capability": f"{props.major}.{props.minor}", "gpu_memory_gib": round(props.total_memory / 2**30, 1)}
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            env["driver"] = None
    return env


def run_tests(dry_run: bool, limit_s: float) -> dict:
    """The kernel tests natively on the GPU (the interpreter off); a dry run collects them only."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # not the ahead-of-time compile check (a CPU-side check of the committed sweep): here the
    # kernels compile for the GPU itself
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/trp_kernels",
           "--ignore=tests/trp_kernels/test_triton_native.py"]
    if dry_run:
        cmd.append("--collect-only")
    t0 = time.monotonic()
    try:
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(limit_s, 10))
        rc, out = run.returncode, run.stdout + run.stderr
    except subprocess.TimeoutExpired as e:  # its output comes back as bytes even in text mode
        rc, out = "timeout", e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    lines = [line for line in out.strip().splitlines() if line.strip()]
    return {"command": " ".join(cmd[1:]), "returncode": rc, "seconds": round(time.monotonic() - t0, 1),
            "summary": lines[-1] if lines else "", "failures": [line for line in lines if line.startswith("FAILED")][:50],
            "note": "dry run: the tests were collected, not run (CUDA is needed to run them natively)" if dry_run
            else ""}


def run_suite(suite: str, dry_run: bool, out: Path, budget_s: float, deadline: float) -> dict:
    from trp.benchmark import runner

    if dry_run:  # tiny CPU cases, only to exercise the code path and the output format
        return runner.run(suite, "cpu", quick=True, json_path=out / f"{suite}.json", out_dir=out / suite,
                          providers=["lowrank_torch"] if suite == "layers" else ["lowrank_eager"],
                          budget_s=0.02, command=f"gpu_run --dry-run ({suite})", show_progress=False,
                          deadline=deadline)
    providers = LAYER_PROVIDERS if suite == "layers" else MODEL_PROVIDERS
    dtypes = None
    if suite == "models":
        import torch
        dtypes = (torch.float16, torch.float32)
    payload = runner.run(suite, "cuda", json_path=out / f"{suite}.json", out_dir=out / suite, providers=providers,
                         select="resnet" if suite == "layers" else None, budget_s=budget_s,
                         command=f"benches/gpu_run.py ({suite})",
                         show_progress=False, deadline=deadline, dtypes=dtypes,
                         # one process: a process per provider would start CUDA and autotune again
                         # each time, out of a device budget of minutes; GPU work runs on the GPU's
                         # queue, not the CPU pools that made the CPU suite isolate its runtimes
                         isolate=False)
    if suite == "models":  # ResNet-18/50 only: drop the CIFAR cases' rows if any ran
        payload["rows"] = [r for r in payload["rows"] if r["case"].startswith(("resnet18", "resnet50"))]
    return payload


def targets(layer_rows: list, model_rows: list, dry_run: bool) -> dict:
    """Each target's measured value (geometric mean over cases) against its threshold."""
    def ratio(rows, fast, slow, batches):
        t = {(r["case"], r["batch"], r["rank"], r["dtype"], r["provider"]): r["median_ms"]
             for r in rows if r["status"] == "ok" and not isinstance(r["rank"], list)}  # two-stage cases
        return _geomean([t[k[:4] + (slow,)] / v for k, v in t.items()
                         if k[4] == fast and k[1] in batches and k[:4] + (slow,) in t])

    values = {
        "fused_vs_two_convs_b1_cudagraph": ratio(layer_rows, "lowrank_trp_cudagraph", "lowrank_torch_cudagraph", {1}),
        "fused_vs_two_convs_b32_b128": ratio(layer_rows, "lowrank_trp", "lowrank_torch", {32, 128}),
        "resnet50_realized_fraction": _geomean([r["realized_fraction"] for r in model_rows if r["status"] == "ok"
                                                and r["case"].startswith("resnet50") and r["provider"] == "trp_cudagraph"]),
    }
    out = {}
    for name, threshold in TARGETS.items():
        v = values[name]
        out[name] = {"value": v, "threshold": threshold,
                     "met": None if (v is None or dry_run) else v >= threshold,
                     "note": "dry run on CPU: not a GPU measurement" if dry_run else
                     ("" if v is not None else "no rows to compute it from (cases skipped or not reached)")}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benches/gpu_run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for results.json and the suites' reports")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny cases (tests this script)")
    p.add_argument("--time-limit", type=float, default=540.0, help="seconds for the whole run (default 540)")
    p.add_argument("--budget", type=float, default=0.2, help="seconds of timed calls per measurement (default 0.2)")
    args = p.parse_args(argv)
    if args.time_limit <= 0 or args.budget <= 0:
        p.error("--time-limit and --budget must be > 0")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device here (torch.cuda.is_available() is False); use --dry-run to test the script")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    results = {"environment": environment(args.dry_run), "command": "python benches/gpu_run.py " +
               " ".join(argv if argv is not None else sys.argv[1:]), "steps": {}}

    def save():
        (out / "results.json").write_text(json.dumps(results, indent=1))

    save()
    if args.dry_run:
        print("dry run: CUDA calls skipped; the steps run on the CPU with tiny cases to check the script")
    results["steps"]["tests"] = run_tests(args.dry_run, SHARES["tests"] * args.time_limit)
    print(f"tests: {results['steps']['tests']['summary']}")
    save()
    rows = {}
    ends = {"layers": start + (SHARES["tests"] + SHARES["layers"]) * args.time_limit,
            "models": start + args.time_limit}
    for suite in ("layers", "models"):
        deadline = ends[suite]
        t0 = time.monotonic()
        payload = run_suite(suite, args.dry_run, out, args.budget, deadline)
        rows[suite] = payload["rows"]
        results["steps"][suite] = {"rows": len(payload["rows"]),
                                   "ok": sum(r["status"] == "ok" for r in payload["rows"]),
                                   "not_run": payload.get("not_run", []), "seconds": round(time.monotonic() - t0, 1),
                                   "json": f"{suite}.json"}
        print(f"{suite}: {results['steps'][suite]['ok']} of {results['steps'][suite]['rows']} rows timed, "
              f"{len(results['steps'][suite]['not_run'])} cases not reached")
        save()
    results["targets"] = targets(rows["layers"], rows["models"], args.dry_run)
    results["seconds"] = round(time.monotonic() - start, 1)
    save()
    for name, t in results["targets"].items():
        value = "–" if t["value"] is None else f"{t['value']:.2f}"
        print(f"target {name}: {value} (want >= {t['threshold']}) {t['note'] or ('met' if t['met'] else 'NOT met')}")
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
