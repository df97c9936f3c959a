"""Runs the suite: for each case, every provider's output is checked against the float64
dense reference (a wrong answer is never timed), then the checked providers are timed in
turn, each in blocks of its own (its caches hold its own data, as when a user runs one
model), the blocks alternating so that a shared machine's drift reaches them all, and a
block after another thread pool's (an ONNX Runtime session, an OpenVINO compiled model,
PyTorch's) starting after that pool has gone idle (:func:`trp.timing.compare`)."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Iterable, Optional

import torch

from trp import files
from trp.benchmark import cases as C
from trp.benchmark import providers as P
from trp.timing import compare, machine_info, summarize

# Relative-L2 slack on top of twice the dense provider's own error (DESIGN.md, convention 3).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SUITES = ("layers", "models")
MIN_REPEATS, MAX_REPEATS = 5, 200


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a.detach().to("cpu", torch.float64)
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def make_row(suite, case_name, provider, case, rank, rank_rule, macs_dense, macs) -> dict:
    return dict(suite=suite, case=case_name, provider=provider, device=case.device, dtype=_dtype_name(case.dtype),
                batch=case.batch, rank=rank, rank_rule=rank_rule, macs_dense=int(macs_dense), macs=int(macs),
                status="skipped", reason="", median_ms=None, p25_ms=None, p75_ms=None, min_ms=None, max_ms=None,
                repeats=None, prepare_s=None, baseline=None, speedup=None, realized_fraction=None, max_rel_err=None,
                precision=_dtype_name(case.dtype))


def tolerance(dense_err: Optional[float], dtype: torch.dtype, layers: int = 1) -> Optional[float]:
    """Largest relative error a provider may have: twice the dense provider's own error plus
    a per-dtype slack, times ``layers`` (a whole network accumulates rounding)."""
    return None if dense_err is None else 2 * dense_err + layers * ATOL[dtype]


def prepare_checked(row: dict, prepare, ref: torch.Tensor, tol: Optional[float]):
    """Prepare one provider and check its output; returns its callable, or None (the row
    then says why: skipped, crashed, or wrong). A provider that computes in a narrower type
    than the case (OpenVINO's default: bfloat16) says so in ``.precision``; the row records
    it, and its output is held to twice that type's slack (bfloat16: 3.2e-2)."""
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            fn = prepare()
            out = fn()
    except P.Unavailable as e:
        row.update(status="skipped", reason=str(e))
        return None
    except Exception as e:  # noqa: BLE001 - a provider that crashes is reported, not fatal
        row.update(status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0][:300])
        traceback.print_exc()
        return None
    row["prepare_s"] = round(time.perf_counter() - t0, 3)
    err = _rel(out, ref)
    row["max_rel_err"] = err
    precision = getattr(fn, "precision", row["precision"])
    if precision != row["precision"] and tol is not None:
        row["precision"] = precision
        tol = max(tol, 2 * ATOL[getattr(torch, precision)])
    if tol is not None and not err <= tol:
        row.update(status="failed", reason=f"output differs from the dense reference: relative error "
                                           f"{err:.2e} > tolerance {tol:.2e}; not timed")
        return None
    return fn


def _time_side_by_side(rows: list[dict], fns: dict, budget_s: float, device: str, raw: bool = False) -> None:
    """Time every checked provider of a case (:func:`trp.timing.compare`: each in blocks of
    its own, the blocks alternating), about ``budget_s`` of calls per provider; ``raw``: the
    rows also get the call times (``"times_ms"``)."""
    if not fns:
        return
    with torch.inference_mode():
        slowest = 0.0
        for fn in fns.values():  # one more untimed call each: compile/lazy init is behind us
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            slowest = max(slowest, time.perf_counter() - t0)
        repeats = int(min(MAX_REPEATS, max(MIN_REPEATS, budget_s / max(slowest, 1e-6))))
        stats = compare(fns, warmup=1, repeats=repeats, device=device, pools={n: P.pool(n) for n in fns}, raw=raw)
    for row in rows:
        if row["provider"] in stats:
            row.update(stats[row["provider"]], status="ok")


def _finish(rows: list[dict], baseline_of) -> None:
    """Speed-ups against each row's baseline provider, in the same case."""
    def rank(r):
        return tuple(r["rank"]) if isinstance(r["rank"], list) else r["rank"]

    times = {(r["case"], r["batch"], rank(r), r["dtype"], r["provider"]): r["median_ms"]
             for r in rows if r["status"] == "ok"}
    for r in rows:
        base = baseline_of(r["provider"])
        r["baseline"] = base
        t_base = times.get((r["case"], r["batch"], rank(r), r["dtype"], base))
        if r["status"] == "ok" and t_base:
            r["speedup"] = t_base / r["median_ms"]
            r["realized_fraction"] = r["speedup"] / (r["macs_dense"] / r["macs"])


def layer_case_rows(case: C.LayerCase, providers: Iterable[str], budget_s: float, progress, g) -> list[dict]:
    t = P.layer_tensors(case, g)
    ref = P.layer_reference(case, t)
    rows, fns, dense_err = [], {}, None
    for provider in providers:
        row = make_row("layers", case.name, provider, case, case.rank_field, case.rank_rule, case.macs_dense,
                   case.macs_dense if provider.startswith("dense_") else case.macs)
        progress(f"{case.name} b{case.batch} r{case.rank_text} {provider}")
        tol = tolerance(dense_err, case.dtype)
        fn = prepare_checked(row, lambda: P.prepare_layer(provider, case, t), ref, tol)
        if fn is not None:
            fns[provider] = fn
            if provider == "dense_torch":
                dense_err = row["max_rel_err"]
        rows.append(row)
    _time_side_by_side(rows, fns, budget_s, case.device)
    _finish(rows, P.layer_baseline)
    return rows


CHILD_TIMEOUT_S = 1800  # building, checking and timing one provider of one case (torch.compile included)


def _in_own_process(case: C.ModelCase, provider: str, budget_s: float, tol: Optional[float],
                    seed: int) -> tuple[dict, list]:
    """(row, call times in ms) of ``provider`` checked and timed in a new Python process
    (:mod:`trp.benchmark.isolated`); a process that dies or hangs before it reports is a
    failed row saying how (its MACs unknown: 0)."""
    from trp.benchmark import isolated

    spec = isolated.spec(case, provider, budget_s, tol, seed, torch.get_num_threads())
    try:
        proc = subprocess.run([sys.executable, "-m", "trp.benchmark.isolated"], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        row = model_row(case, provider, None)
        row.update(status="failed", reason=f"its process did not finish in {CHILD_TIMEOUT_S} s")
        return row, []
    sys.stderr.write(proc.stderr)  # the provider's warnings and tracebacks, as in one process
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(isolated.RESULT_MARK)]
    if lines:  # reported: a crash while the process shut down does not undo the measurement
        result = json.loads(lines[-1][len(isolated.RESULT_MARK):])
        return result["row"], result["times_ms"]
    row = model_row(case, provider, None)
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    row.update(status="failed", reason=f"its process exited with code {proc.returncode}: {last}")
    return row, []


def model_row(case: C.ModelCase, provider: str, bundle: Optional[dict]) -> dict:
    """A model provider's row before it is checked: the bundle's MACs (dense for a dense_*
    provider), or 0 (unknown) without a bundle."""
    dense = provider.startswith("dense_")
    macs_dense = bundle["macs_dense"] if bundle else 0
    return make_row("models", case.name, provider, case, None, case.rank_rule, macs_dense,
                    macs_dense if dense or not bundle else bundle["macs"])


def model_tolerance(dense_err: Optional[float], dtype: torch.dtype) -> Optional[float]:
    """A whole model's :func:`tolerance` from dense_eager's error: ~20-50 layers of rounding."""
    return tolerance(dense_err, dtype, layers=10)


def model_case_rows(case: C.ModelCase, providers: Iterable[str], budget_s: float, progress, g,
                    isolate: bool = False, rounds: int = 1, seed: int = 0) -> list[dict]:
    """One row per provider. ``isolate``: each provider is checked and timed in a process of
    its own (:mod:`trp.benchmark.isolated`), the case's bundle built there from ``seed``
    (``g`` is then unused), ``rounds`` processes per provider in turn (each with
    ``budget_s / rounds`` of calls; the row's statistics pool their calls), so that drift of
    a shared machine reaches every provider. Otherwise every provider runs in this process,
    timed in blocks of its own (:func:`_time_side_by_side`)."""
    if isolate:
        return _isolated_rows(case, list(providers), budget_s, progress, rounds, seed)
    progress(f"{case.name} b{case.batch}: building")
    bundle = P.model_bundle(case, g)
    rows, fns, dense_err = [], {}, None
    for provider in providers:
        row = model_row(case, provider, bundle)
        progress(f"{case.name} b{case.batch} {provider}")
        tol = model_tolerance(dense_err, case.dtype)
        fn = prepare_checked(row, lambda: P.prepare_model(provider, case, bundle), bundle["ref"], tol)
        if fn is not None:
            fns[provider] = fn
            if provider == "dense_eager":
                dense_err = row["max_rel_err"]
        rows.append(row)
    _time_side_by_side(rows, fns, budget_s, case.device)
    _finish(rows, lambda p: P.MODEL_BASELINE[p])
    return rows


def _isolated_rows(case: C.ModelCase, providers: list[str], budget_s: float, progress, rounds: int,
                   seed: int) -> list[dict]:
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    order = sorted(providers, key=lambda p: p != "dense_eager")  # its error sets the others' tolerance
    rows: dict[str, dict] = {}
    times: dict[str, list] = {p: [] for p in order}
    tol, built = None, None  # built: the fingerprint of the case as the first process built it
    for r in range(rounds):
        for provider in order:
            if r and rows[provider]["status"] != "ok":
                continue  # skipped or failed: once is enough
            progress(f"{case.name} b{case.batch} {provider} (own process{f', round {r + 1}' if rounds > 1 else ''})")
            row, t = _in_own_process(case, provider, budget_s / rounds, tol, seed)
            reason = row["reason"]
            if row["status"] == "ok" and built is not None and row.get("fingerprint") != built:
                reason = (f"its process built another case (fingerprint {row.get('fingerprint')!r}, the first "
                          f"process's {built!r}); not pooled")
            elif row["status"] != "ok" and r:
                reason = f"round {r + 1}: {reason}"
            if reason != row["reason"]:  # failed now: the round-1 row (its MACs) says why, untimed
                rows[provider] = dict(rows.get(provider, row), status="failed", reason=reason)
                times[provider] = []
                continue
            if r == 0:
                rows[provider] = row
                if provider == "dense_eager" and row["max_rel_err"] is not None:
                    tol = model_tolerance(row["max_rel_err"], case.dtype)
            if row["status"] == "ok" and built is None:
                built = row.get("fingerprint")
            times[provider] += t
    out = []
    for provider in providers:
        row = rows[provider]
        if row["status"] == "ok":
            row.update(summarize(times[provider]), rounds=rounds)
        out.append(row)
    _finish(out, lambda p: P.MODEL_BASELINE[p])
    return out


def _write_json(path: Path, payload: dict) -> None:
    """Atomic: a crash mid-run leaves the previous complete file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(path, json.dumps(payload, indent=1).encode())


def run(suite: str = "all", device: str = "cpu", quick: bool = False, json_path=None, out_dir=None,
        threads: Optional[int] = None, providers: Optional[list[str]] = None, select: Optional[str] = None,
        budget_s: Optional[float] = None, command: str = "", show_progress: bool = True,
        deadline: Optional[float] = None, dtypes: Optional[tuple] = None, isolate: bool = True,
        rounds: int = 1) -> dict:
    """Run the suite and return ``{"environment", "command", "rows"}``; the JSON file (if
    given) is rewritten after every case, so an interrupted run keeps what it measured.
    ``deadline`` (a ``time.monotonic()`` value): no case starts after it, and the payload's
    ``"not_run"`` lists the cases left; ``dtypes`` keeps only cases of those dtypes.
    ``isolate``: every model provider is checked and timed in a process of its own,
    ``rounds`` processes each (:func:`model_case_rows`); the layer suite runs in this one."""
    if suite not in (*SUITES, "all"):
        raise ValueError(f"suite must be one of {(*SUITES, 'all')}, got {suite!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if rounds < 1 or (rounds != 1 and not isolate):
        raise ValueError(f"rounds must be >= 1 (processes per model provider), and 1 when isolate is False, "
                         f"got rounds={rounds}, isolate={isolate}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch.cuda.is_available() is False")
    known = set(P.LAYER_PROVIDERS) | set(P.MODEL_PROVIDERS)
    for p in providers or []:
        if p not in known:
            raise ValueError(f"unknown provider {p!r}; known: {sorted(known)}")
    if threads:
        torch.set_num_threads(threads)
    budget_s = budget_s if budget_s is not None else (0.3 if quick else 1.0)
    payload = {"environment": machine_info() | {"device": device, "quick": quick,
                                                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                                    timespec="seconds")},
               "command": command, "rows": []}
    payload["environment"]["model_timing"] = (f"each provider in a process of its own, {rounds} round(s)" if isolate
                                              else "every provider in one process, in blocks of its own")
    from tqdm import tqdm
    bar = tqdm(desc="trp bench", unit="run", disable=not show_progress, dynamic_ncols=True)

    def progress(text):
        bar.set_postfix_str(text, refresh=False)
        bar.update(1)

    suites = SUITES if suite == "all" else (suite,)
    g = torch.Generator().manual_seed(0)
    try:
        for s in suites:
            names = P.LAYER_PROVIDERS if s == "layers" else P.MODEL_PROVIDERS
            # the chosen providers, their baselines, and the dense provider that sets the tolerance
            base = P.layer_baseline if s == "layers" else P.MODEL_BASELINE.get
            wanted = {*(providers or ()), *(base(p) for p in providers or () if p in names),
                      "dense_torch" if s == "layers" else "dense_eager"}
            chosen = [p for p in names if not providers or p in wanted]
            if s == "layers":
                todo = [(c, layer_case_rows) for c in C.layer_cases(device, quick)
                        if not select or select in c.name]
            else:
                todo = [(c, model_case_rows) for c in C.model_cases(device, quick) if not select or select in c.name]
            if dtypes:
                todo = [(c, f) for c, f in todo if c.dtype in dtypes]
            for case, case_rows in todo:
                if deadline is not None and time.monotonic() > deadline:
                    payload.setdefault("not_run", []).append(
                        f"{s} {getattr(case, 'name', None) or case.shape.name} b{case.batch} {_dtype_name(case.dtype)}")
                    continue
                if case_rows is model_case_rows:
                    payload["rows"] += model_case_rows(case, chosen, budget_s, progress, g, isolate, rounds)
                else:
                    payload["rows"] += case_rows(case, chosen, budget_s, progress, g)
                if json_path:
                    _write_json(Path(json_path), payload)
    finally:
        bar.close()
        if json_path:
            _write_json(Path(json_path), payload)
    if out_dir:
        from trp.benchmark.report import write_report
        payload["report"] = {k: str(v) for k, v in write_report(payload["rows"], payload["environment"],
                                                                command, out_dir).items()}
    return payload


BREAKDOWN_PROVIDERS = ("trp_eager", "lowrank_eager_cl", "dense_eager_cl")


def run_breakdown(device: str = "cpu", quick: bool = False, json_path=None, out_dir=None,
                  threads: Optional[int] = None, providers: Optional[list[str]] = None, select: Optional[str] = None,
                  repeats: int = 30, command: str = "", show_progress: bool = True) -> dict:
    """The time of each model case split into parts (:func:`trp.breakdown.breakdown`), for the
    eager providers of the model suite: ``trp.compile``'s model and the PyTorch models it is
    measured against. Each provider's output is checked against the float64 reference first.
    Returns ``{"environment", "command", "rows"}``, one row per (case, provider); the JSON
    file (if given) is rewritten after every row."""
    from trp.breakdown import PARTS, breakdown

    if device != "cpu":
        raise ValueError(f"the breakdown times CPU models only, got device={device!r}")
    providers = list(providers or BREAKDOWN_PROVIDERS)
    for p in providers:
        if p not in P.EAGER_MODEL_PROVIDERS:
            raise ValueError(f"breakdown providers must be eager model providers {P.EAGER_MODEL_PROVIDERS}, got {p!r}")
    if threads:
        torch.set_num_threads(threads)
    payload = {"environment": machine_info() | {"device": device, "quick": quick,
                                                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                                    timespec="seconds")},
               "command": command, "parts": list(PARTS), "rows": []}
    from tqdm import tqdm
    cases = [c for c in C.model_cases(device, quick) if not select or select in c.name]
    g = torch.Generator().manual_seed(0)
    with tqdm(total=len(cases) * len(providers), desc="trp breakdown", unit="model", disable=not show_progress,
              dynamic_ncols=True) as bar:
        try:
            for case in cases:
                bundle = P.model_bundle(case, g)
                for provider in providers:
                    bar.set_postfix_str(f"{case.name} b{case.batch} {provider}", refresh=False)
                    row = {"case": case.name, "batch": case.batch, "provider": provider, "dtype": _dtype_name(case.dtype),
                           "status": "skipped", "reason": ""}
                    check = make_row("models", case.name, provider, case, None, case.rank_rule, 1, 1)
                    if prepare_checked(check, lambda: P.prepare_model(provider, case, bundle), bundle["ref"],
                                       tolerance(0.0, case.dtype, layers=10)) is None:
                        row.update(status=check["status"], reason=check["reason"])
                    else:
                        model, x = P.eager_model(provider, bundle)
                        row.update(breakdown(model, x, repeats=repeats).to_dict(), status="ok",
                                   max_rel_err=check["max_rel_err"])
                    payload["rows"].append(row)
                    bar.update(1)
                    if json_path:
                        _write_json(Path(json_path), payload)
        finally:
            if json_path:
                _write_json(Path(json_path), payload)
    if out_dir:
        from trp.benchmark.report import breakdown_markdown
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(breakdown_markdown(payload), encoding="utf-8")
        payload["report"] = {"report.md": str(out / "report.md")}
    return payload
