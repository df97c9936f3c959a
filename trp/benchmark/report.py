"""Render benchmark results: a markdown report, a compact README table and speed-up plots.

Every function takes ``rows``, a list of dicts as produced by the runner, one per
(case, provider) measurement (see :data:`ROW_KEYS` and :data:`OK_KEYS`). Rows whose
``status`` is ``"skipped"`` or ``"failed"`` are always shown, with their reason, never
dropped. Nothing here imports torch; matplotlib is imported only by :func:`plot`, which
draws on the Agg canvas without touching pyplot's global state.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

# keys every row has
ROW_KEYS = ("suite", "case", "provider", "device", "dtype", "batch", "rank", "rank_rule", "macs_dense", "macs",
            "status", "reason")
# keys that hold numbers when status == "ok" (None otherwise)
OK_KEYS = ("median_ms", "p25_ms", "p75_ms", "min_ms", "max_ms", "repeats", "baseline", "speedup",
           "realized_fraction", "max_rel_err")
SUITES = ("layers", "models")
STATUSES = ("ok", "skipped", "failed")

# Display order of providers: dense ones first; a "*_cudagraph" variant right after its base;
# unknown providers after the known ones of their kind, by name.
PROVIDER_ORDER = ("dense_torch", "dense_eager", "dense_eager_cl", "dense_compile", "dense_compile_frozen", "dense_ort",
                  "dense_openvino", "dense_openvino_default",
                  "lowrank_torch", "lowrank_torch_cl", "lowrank_eager", "lowrank_eager_cl", "lowrank_compile",
                  "lowrank_compile_frozen", "lowrank_trp", "lowrank_cpp", "lowrank_ort", "lowrank_openvino",
                  "lowrank_openvino_default", "trp_eager", "trp_compile", "trp_compile_frozen", "cpp_eager",
                  "cpp_compile")
_CUDAGRAPH = "_cudagraph"

DASH = "–"
_TICKS = sorted(m * 10.0 ** k for k in range(-3, 4) for m in (1, 2, 3, 5))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p")


# --------------------------------------------------------------------------- validation

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate(rows, environment=None, command=None, *, check_env: bool = False) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument (and row index and key) at fault."""
    if not isinstance(rows, (list, tuple)):
        raise TypeError(f"rows must be a list of dicts, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"rows[{i}] must be a dict, got {type(row).__name__}")
        for key in ROW_KEYS:
            if key not in row:
                raise ValueError(f"rows[{i}] is missing key {key!r}")
        where = f"rows[{i}] ({row.get('case')!r}, {row.get('provider')!r})"
        if row["suite"] not in SUITES:
            raise ValueError(f"{where}: 'suite' must be one of {SUITES}, got {row['suite']!r}")
        if row["status"] not in STATUSES:
            raise ValueError(f"{where}: 'status' must be one of {STATUSES}, got {row['status']!r}")
        for key in ("case", "provider", "device", "dtype", "rank_rule", "reason"):
            if not isinstance(row[key], str):
                raise TypeError(f"{where}: {key!r} must be a str, got {type(row[key]).__name__}")
        if not row["provider"]:
            raise ValueError(f"{where}: 'provider' must not be empty")
        if not _is_int(row["batch"]) or row["batch"] < 1:
            raise ValueError(f"{where}: 'batch' must be a positive int, got {row['batch']!r}")
        rank = row["rank"]
        if rank is not None and not _is_int(rank) and not (
                isinstance(rank, (list, tuple)) and rank and all(_is_int(r) for r in rank)):
            raise TypeError(f"{where}: 'rank' must be an int, a list of ints (one per stage) or None, got {rank!r}")
        for key in ("macs_dense", "macs"):  # 0: unknown, on a row whose process died before it counted them
            if not _is_int(row[key]) or row[key] < (1 if row["status"] == "ok" else 0):
                raise ValueError(f"{where}: {key!r} must be a positive int"
                                 f"{'' if row['status'] == 'ok' else ' (or 0: unknown)'}, got {row[key]!r}")
        if row["status"] != "ok":
            continue
        for key in OK_KEYS:
            if key not in row:
                raise ValueError(f"rows[{i}] is missing key {key!r} (required when status is 'ok')")
        if not isinstance(row["baseline"], str) or not row["baseline"]:
            raise TypeError(f"{where}: 'baseline' must be a non-empty str, got {row['baseline']!r}")
        if not _is_int(row["repeats"]) or row["repeats"] < 1:
            raise ValueError(f"{where}: 'repeats' must be a positive int, got {row['repeats']!r}")
        for key in ("median_ms", "p25_ms", "p75_ms", "min_ms", "max_ms"):
            v = row[key]
            if not _is_num(v) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{where}: {key!r} must be a finite number >= 0, got {v!r}")
        for key in ("speedup", "realized_fraction"):
            v = row[key]
            if not _is_num(v) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{where}: {key!r} must be a finite number > 0, got {v!r}")
        if not _is_num(row["max_rel_err"]):
            raise TypeError(f"{where}: 'max_rel_err' must be a number, got {row['max_rel_err']!r}")
    if check_env:
        if not isinstance(environment, Mapping):
            raise TypeError(f"environment must be a dict, got {type(environment).__name__}")
        for k in environment:
            if not isinstance(k, str):
                raise TypeError(f"environment keys must be str, got {k!r}")
        if not isinstance(command, str):
            raise TypeError(f"command must be a str, got {type(command).__name__}")


# --------------------------------------------------------------------------- formatting

def _natural(s: str) -> tuple:
    """Sort key that orders the numbers inside ``s`` by value ("64->64" before "128->128")."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t)


def provider_key(provider: str) -> tuple:
    """Sort key for providers: dense first, then :data:`PROVIDER_ORDER`, then by name."""
    graph = provider.endswith(_CUDAGRAPH)
    base = provider[: -len(_CUDAGRAPH)] if graph else provider
    known = PROVIDER_ORDER.index(base) if base in PROVIDER_ORDER else len(PROVIDER_ORDER)
    return (0 if provider.startswith("dense") else 1, known, base, graph, provider)


def rank_text(rank) -> str:
    """A row's rank as shown: an int, or a family's per-stage ranks as ``r1,r2``."""
    return DASH if rank is None else ",".join(map(str, rank)) if isinstance(rank, (list, tuple)) else str(rank)


def _row_key(row: Mapping) -> tuple:
    rank = row["rank"]
    ranks = (-1,) if rank is None else tuple(rank) if isinstance(rank, (list, tuple)) else (rank,)
    return (_natural(row["case"]), row["batch"], len(ranks), ranks, provider_key(row["provider"]))


def _group_key(key: tuple) -> tuple:
    suite, device, dtype = key
    return (SUITES.index(suite), device != "cpu", device, dtype)


def fmt_ms(v: float) -> str:
    """Milliseconds with three significant-ish digits: 0.123, 1.234, 12.34, 123.4."""
    if v >= 100:
        return f"{v:.1f}"
    if v >= 10:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_macs(n: int) -> str:
    """MAC count in G, M or k with two decimals: 1.23G, 45.60M; 0 (unknown) as a dash."""
    if n == 0:
        return DASH
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _cell(text) -> str:
    """A markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _not_run(row: Mapping) -> str:
    return f"{row['status']}: {row['reason'] or '(no reason given)'}"


def geomean(values) -> float:
    values = list(values)
    if not values:
        raise ValueError("geomean of no values")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def realized_summary(rows) -> str:
    """One line: geometric mean of ``realized_fraction`` per provider over ok rows, skipping
    rows whose MACs equal the dense MACs (dense providers)."""
    by_provider: dict[str, list[float]] = {}
    for r in rows:
        if r["status"] == "ok" and r["macs"] != r["macs_dense"]:
            by_provider.setdefault(r["provider"], []).append(r["realized_fraction"])
    if not by_provider:
        return "Realized fraction (geometric mean over ok low-rank rows): no ok low-rank rows."
    parts = [f"{p} {geomean(v):.2f} (n={len(v)})" for p, v in sorted(by_provider.items(),
                                                                     key=lambda kv: provider_key(kv[0]))]
    return "Realized fraction (geometric mean over ok low-rank rows): " + ", ".join(parts) + "."


def _code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


# --------------------------------------------------------------------------- markdown

TABLE_HEADER = ("case", "batch", "rank", "provider", "median ms (p25–p75)", "MACs (low-rank / dense)",
                "speed-up vs baseline", "realized fraction")


def _table_row(r: Mapping) -> list[str]:
    provider = r["provider"]
    if r.get("precision", r["dtype"]) != r["dtype"]:  # a runtime that computes in a narrower type
        provider += f" (computes in {r['precision']}; rel. err. {r['max_rel_err']:.1e})"
    cells = [r["case"], str(r["batch"]), rank_text(r["rank"]), provider]
    macs = f"{fmt_macs(r['macs'])} / {fmt_macs(r['macs_dense'])}"
    if r["status"] == "ok":
        cells += [f"{fmt_ms(r['median_ms'])} ({fmt_ms(r['p25_ms'])}–{fmt_ms(r['p75_ms'])})", macs,
                  f"{r['speedup']:.2f}× vs {r['baseline']}", f"{r['realized_fraction']:.2f}"]
    else:
        cells += [_not_run(r), macs, DASH, DASH]
    return [_cell(c) for c in cells]


def _table(header, body) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def _environment_lines(environment: Mapping) -> list[str]:
    return [f"- {k}: {DASH if v is None else v}" for k, v in environment.items()] or ["- (none given)"]


def markdown(rows, environment, command) -> str:
    """The full report: command, environment, then one table per (suite, device, dtype), each
    followed by the realized-fraction summary."""
    _validate(rows, environment, command, check_env=True)
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    lines = ["# Benchmark report", "", f"Command: {_code(command)}", "",
             f"Rows: {len(rows)} ({counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed)",
             "", "## Environment", ""]
    lines += _environment_lines(environment)
    lines.append("")
    lines += [("Speed-up is t(baseline) / t; realized fraction is speed-up / (dense MACs / low-rank MACs), "
               "1.0 when the MAC reduction is fully turned into speed."), ""]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["suite"], r["device"], r["dtype"]), []).append(r)
    if not groups:
        lines += ["_No rows._", ""]
    for key in sorted(groups, key=_group_key):
        suite, device, dtype = key
        group = sorted(groups[key], key=_row_key)
        lines += [f"## {suite} — {device} — {dtype}", ""]
        lines += _table(TABLE_HEADER, [_table_row(r) for r in group])
        lines += ["", realized_summary(group), ""]
    return "\n".join(lines)


def headline(rows, suite: str = "models", case_contains: str = "resnet18") -> str:
    """A compact table for the README: one row per (case, batch) of ``suite`` whose case contains
    ``case_contains``, one column per provider, cells "median ms (speed-up×)", "–" where the
    provider has no ok row. Device and dtype columns are added when the rows span several."""
    _validate(rows)
    sel = [r for r in rows if r["suite"] == suite and case_contains in r["case"]]
    if not sel:
        return f"_No {suite} rows whose case contains {case_contains!r}._\n"
    extra = [k for k in ("device", "dtype") if len({r[k] for r in sel}) > 1]
    providers = sorted({r["provider"] for r in sel}, key=provider_key)

    def key(r):
        return (r["case"], *(r[k] for k in extra), r["batch"])

    cells: dict[tuple, dict[str, str]] = {}
    baselines: set[str] = set()
    for r in sel:
        line = cells.setdefault(key(r), {})
        if r["status"] != "ok":
            continue
        if r["provider"] in line:
            raise ValueError(f"rows: more than one ok row for case {r['case']!r}, batch {r['batch']}, provider "
                             f"{r['provider']!r}" + (f" ({', '.join(f'{k} {r[k]}' for k in extra)})" if extra else "")
                             + "; filter rows (e.g. by rank rule) before calling headline")
        line[r["provider"]] = f"{fmt_ms(r['median_ms'])} ({r['speedup']:.2f}×)"
        baselines.add(r["baseline"])
    order = sorted(cells, key=lambda k: (_natural(k[0]), *k[1:]))
    body = [[_cell(k[0]), *(_cell(v) for v in k[1:])] + [cells[k].get(p, DASH) for p in providers] for k in order]
    lines = _table(["case", *extra, "batch", *providers], body)
    if baselines:
        lines += ["", f"Cells: median ms (speed-up vs {', '.join(sorted(baselines, key=provider_key))})."]
    return "\n".join(lines) + "\n"


def run_ranges(runs, providers, suite: str = "models") -> str:
    """A table of medians over separate runs: one row per (case, batch) of ``suite``, one
    column per provider in ``providers``, cells "lowest–highest median ms" over ``runs``
    (each a list of rows, as one run of the suite writes), the single value where they
    agree to the digits shown, "–" where no run has an ok row. The header says how many
    runs each cell could draw on."""
    if not isinstance(runs, (list, tuple)) or not runs:
        raise ValueError("runs must be a non-empty list of row lists, one per run")
    for rows in runs:
        _validate(rows)
    if isinstance(providers, str) or not providers:
        raise ValueError(f"providers must be a non-empty list of provider names, got {providers!r}")
    medians: dict[tuple, dict[str, list[float]]] = {}
    for rows in runs:
        for r in rows:
            if r["suite"] == suite:
                cell = medians.setdefault((r["case"], r["batch"]), {})
                if r["status"] == "ok" and r["provider"] in providers:
                    cell.setdefault(r["provider"], []).append(r["median_ms"])

    def fmt(values):
        if not values:
            return DASH
        lo, hi = fmt_ms(min(values)), fmt_ms(max(values))
        return lo if lo == hi else f"{lo}–{hi}"

    order = sorted(medians, key=lambda k: (_natural(k[0]), k[1]))
    body = [[_cell(case), str(batch)] + [fmt(medians[(case, batch)].get(p, [])) for p in providers]
            for case, batch in order]
    return "\n".join(_table(["case", "batch", *(_code(p) for p in providers)], body) +
                     ["", f"Cells: median ms, lowest–highest over {len(runs)} runs."]) + "\n"


# --------------------------------------------------------------------------- plot

def plot(rows, path, title) -> Path:
    """Scatter of speed-up over baseline against MAC reduction (dense MACs / MACs), log-log, one
    point per ok row with fewer MACs than dense, with the ideal y = x and y = 1 for reference.
    Writes a PNG to ``path`` (saying "no low-rank rows" when there are no such points)."""
    _validate(rows)
    if not isinstance(title, str):
        raise TypeError(f"title must be a str, got {type(title).__name__}")
    path = Path(path)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    pts = [r for r in rows if r["status"] == "ok" and r["macs"] < r["macs_dense"]]
    fig = Figure(figsize=(7.5, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    if not pts:
        ax.text(0.5, 0.5, "no low-rank rows", ha="center", va="center", fontsize=16, transform=ax.transAxes)
        ax.set_axis_off()
    else:
        several_dtypes = len({r["dtype"] for r in pts}) > 1
        series: dict[tuple, list] = {}
        for r in pts:
            series.setdefault((r["provider"], r["dtype"]), []).append((r["macs_dense"] / r["macs"], r["speedup"]))
        xs = [x for s in series.values() for x, _ in s]
        ys = [y for s in series.values() for _, y in s]
        lo = min(min(xs), min(ys), 1.0) / 1.25
        x_hi = max(xs) * 1.25
        y_hi = max(max(ys), max(xs), 1.0) * 1.25
        ax.plot([lo, x_hi], [lo, x_hi], "k--", lw=1, label="ideal (speed-up = MAC reduction)")
        ax.axhline(1.0, color="k", ls=":", lw=1, label="no speed-up")
        colors = [f"C{i % 10}" for i in range(len(series))]
        for i, ((provider, dtype), s) in enumerate(sorted(series.items(),
                                                         key=lambda kv: (provider_key(kv[0][0]), kv[0][1]))):
            label = f"{provider} ({dtype})" if several_dtypes else provider
            ax.scatter([x for x, _ in s], [y for _, y in s], label=label, color=colors[i],
                       marker=_MARKERS[i % len(_MARKERS)], s=36, alpha=0.85, edgecolors="none")
        ax.set_xscale("log")
        ax.set_yscale("log")
        limits = ((min(min(xs), 1.0) / 1.25, x_hi), (lo, y_hi))
        ax.set_xlim(*limits[0])
        ax.set_ylim(*limits[1])
        # plain-number ticks (0.5, 1, 2, 3, 5, ...) instead of 2×10⁰
        for axis, (a, b) in zip((ax.xaxis, ax.yaxis), limits):
            axis.set_major_locator(FixedLocator([t for t in _TICKS if a <= t <= b]))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("MAC reduction (dense MACs / low-rank MACs)")
        ax.set_ylabel("speed-up over baseline (t_baseline / t)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------- all together

def write_report(rows, environment, command, out_dir) -> dict[str, Path]:
    """Write ``report.md`` and one ``speedup_<suite>_<device>.png`` per (suite, device) into
    ``out_dir`` (created if needed). Returns the written paths keyed by file name."""
    _validate(rows, environment, command, check_env=True)
    if not isinstance(out_dir, (str, Path)):
        raise TypeError(f"out_dir must be a str or Path, got {type(out_dir).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report.md": out / "report.md"}
    paths["report.md"].write_text(markdown(rows, environment, command), encoding="utf-8")
    pairs = sorted({(r["suite"], r["device"]) for r in rows}, key=lambda sd: (SUITES.index(sd[0]), sd[1] != "cpu",
                                                                                sd[1]))
    for suite, device in pairs:
        name = f"speedup_{suite}_{device}.png"
        sel = [r for r in rows if r["suite"] == suite and r["device"] == device]
        paths[name] = plot(sel, out / name, f"{suite} on {device}: speed-up vs MAC reduction")
    return paths


# --------------------------------------------------------------------------- time breakdown

def breakdown_markdown(payload: Mapping) -> str:
    """The report of ``python -m trp breakdown``: per model case, one column per provider,
    the median ms of each part and its share, then the sum of the parts against the plain
    model's median (the check that the instrumentation did not distort the total)."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get("rows"), list):
        raise TypeError("payload must be a dict with a 'rows' list, as run_breakdown returns")
    env, rows = payload.get("environment") or {}, payload["rows"]
    lines = ["# Time breakdown", "", f"Command: {_code(payload.get('command') or '')}", "", "## Environment", ""]
    lines += _environment_lines(env)
    lines += ["", "Median ms of each part over the instrumented calls (share of their sum). \"glue\" is the rest "
              "of each call: residual adds and ReLUs outside the fused kernels, layout conversions, Python "
              "dispatch. The last row compares the sum of the parts with the model's median timed without "
              "instrumentation, interleaved with the instrumented calls.", ""]
    cases: dict[tuple, list] = {}
    for r in rows:
        cases.setdefault((r["case"], r["batch"], r["dtype"]), []).append(r)
    for (case, batch, dtype), group in cases.items():
        group = sorted(group, key=lambda r: provider_key(r["provider"]))
        parts = list(payload.get("parts") or [])  # the runner's order; then any other, as met
        for r in group:
            parts += [p for p in r.get("parts", {}) if p not in parts]
        header = ["part"] + [_code(r["provider"]) for r in group]
        body = []
        for part in [p for p in parts if any(p in r.get("parts", {}) for r in group)]:
            cells = [part]
            for r in group:
                p = r.get("parts", {}).get(part)
                cells.append(f"{fmt_ms(p['median_ms'])} ({p['median_ms'] / r['sum_ms']:.0%})" if p else DASH)
            body.append(cells)
        ok = [r for r in group if r["status"] == "ok"]
        body.append(["sum of the parts"] + [fmt_ms(r["sum_ms"]) if r in ok else DASH for r in group])
        body.append(["the model, plain"] + [fmt_ms(r["plain_ms"]) if r in ok else _not_run(r) for r in group])
        body.append(["sum / plain − 1"] + [f"{r['discrepancy']:+.1%}" + ("" if r["ok"] else " (distorted)")
                                           if r in ok else DASH for r in group])
        lines += [f"## {case}, batch {batch}, {dtype}", ""] + _table(header, body) + [""]
    if not cases:
        lines += ["_No rows._", ""]
    return "\n".join(lines)
