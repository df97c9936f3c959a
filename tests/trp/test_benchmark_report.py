"""trp.benchmark.report on synthetic rows: markdown tables, README headline, plots, validation."""

import copy
import struct

import pytest

from trp.benchmark import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV = {"cpu": "Test CPU @ 3GHz", "cores": 2, "torch_threads": 2, "torch": "2.13.0+cpu", "triton": "3.9.0",
       "onnxruntime": "1.31.1", "gpu": None, "platform": "Linux-x86_64"}
CMD = "python -m trp bench --quick"

# 4x fewer MACs for every low-rank row, so realized fraction = speed-up / 4
DENSE, LOW = 2_000_000_000, 500_000_000
L64, L128 = "resnet18 64->64 3x3 s1 @56", "resnet18 128->128 3x3 s1 @28"


def row(suite, case, provider, *, batch=1, rank=None, device="cpu", dtype="float32", macs=DENSE, median=1.0,
        baseline=None, status="ok", reason=""):
    r = {"suite": suite, "case": case, "provider": provider, "device": device, "dtype": dtype, "batch": batch,
         "rank": rank, "rank_rule": "" if rank is None else f"1/4 of full rank ({rank})", "macs_dense": DENSE,
         "macs": macs, "status": status, "reason": reason}
    timing = dict.fromkeys(report.OK_KEYS)
    if status == "ok":
        base_ms = 2.0
        speedup = base_ms / median
        timing = {"median_ms": median, "p25_ms": median * 0.95, "p75_ms": median * 1.1, "min_ms": median * 0.9,
                  "max_ms": median * 1.5, "repeats": 10, "baseline": baseline, "speedup": speedup,
                  "realized_fraction": speedup / (DENSE / macs), "max_rel_err": 1e-6}
    r.update(timing)
    return r


def layer_rows():
    b = "dense_torch"
    return [
        # listed out of order on purpose
        row("layers", L128, "lowrank_trp", rank=32, macs=LOW, status="failed",
            reason="Triton | kernel\ncompile error", baseline=b),
        row("layers", L128, "lowrank_torch", rank=32, macs=LOW, median=1.5625, baseline=b),  # 1.28x -> 0.32
        row("layers", L128, "lowrank_compile", rank=32, macs=LOW, median=2 / 3.6, baseline=b),  # 3.6x -> 0.9
        row("layers", L128, "dense_torch", median=2.0, baseline=b),
        row("layers", L64, "lowrank_ort", rank=16, macs=LOW, status="skipped", reason="onnxruntime not installed"),
        row("layers", L64, "lowrank_torch", rank=16, macs=LOW, median=1.0, baseline=b),  # 2x -> 0.5
        row("layers", L64, "lowrank_compile", rank=16, macs=LOW, median=2 / 0.4, baseline=b),  # 0.4x -> 0.1
        row("layers", L64, "dense_torch", median=2.0, baseline=b),
    ]


def model_rows():
    b = "dense_eager"
    rows = []
    for batch in (1, 8):
        rows += [
            row("models", "resnet18 @224", "dense_eager", batch=batch, median=2.0, baseline=b),
            row("models", "resnet18 @224", "dense_compile", batch=batch, median=1.6, baseline=b),
            row("models", "resnet18 @224", "lowrank_eager", batch=batch, macs=LOW, median=1.25, baseline=b),
            row("models", "resnet18 @224", "trp_eager", batch=batch, macs=LOW, median=0.625, baseline=b),
            row("models", "resnet18 @224", "trp_compile", batch=batch, macs=LOW, status="skipped",
                reason="no C++ compiler"),
        ]
    rows.append(row("models", "resnet18 @224", "dense_ort", batch=1, status="failed", reason="export failed"))
    rows += [
        row("models", "resnet20 @32", "dense_eager", device="cuda", dtype="float16", median=2.0, baseline=b),
        row("models", "resnet20 @32", "trp_eager", device="cuda", dtype="float16", macs=LOW, median=0.5, baseline=b),
        row("models", "resnet20 @32", "trp_eager_cudagraph", device="cuda", dtype="float16", macs=LOW, median=0.25,
            baseline=b),
    ]
    return rows


def all_rows():
    return layer_rows() + model_rows()


def section(md, title):
    """The text of one '## ' section of the markdown."""
    start = md.index(f"## {title}\n")
    end = md.find("\n## ", start + 1)
    return md[start:] if end < 0 else md[start:end]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    return struct.unpack(">II", data[16:24])


def test_number_formats():
    assert report.fmt_macs(1_814_073_344) == "1.81G"
    assert report.fmt_macs(115_605_504) == "115.61M"
    assert report.fmt_macs(12_500) == "12.50k"
    assert report.fmt_macs(999) == "999"
    assert report.fmt_ms(0.1234) == "0.123"
    assert report.fmt_ms(2.5) == "2.500"
    assert report.fmt_ms(12.5) == "12.50"
    assert report.fmt_ms(123.4) == "123.4"
    assert report.geomean([0.5, 0.32]) == pytest.approx(0.4)


def test_markdown_header_and_every_row():
    rows = all_rows()
    md = report.markdown(rows, ENV, CMD)
    assert md.startswith("# Benchmark report\n")
    assert f"Command: `{CMD}`" in md
    assert "Rows: 22 (17 ok, 3 skipped, 2 failed)" in md
    for k, v in ENV.items():
        assert f"- {k}: {'–' if v is None else v}\n" in md
    for r in rows:
        assert r["provider"] in md
    assert md.count("skipped: onnxruntime not installed") == 1
    assert md.count("skipped: no C++ compiler") == 2
    assert "failed: Triton \\| kernel compile error" in md  # one line, pipe escaped
    assert "failed: export failed" in md
    # one section per (suite, device, dtype), layers first
    titles = [line for line in md.splitlines() if line.startswith("## ")]
    assert titles == ["## Environment", "## layers — cpu — float32", "## models — cpu — float32",
                      "## models — cuda — float16"]


def test_markdown_layer_table():
    md = report.markdown(layer_rows(), ENV, CMD)
    sec = section(md, "layers — cpu — float32")
    table = [line for line in sec.splitlines() if line.startswith("| ")]
    assert table[0] == ("| case | batch | rank | provider | median ms (p25–p75) | MACs (low-rank / dense) "
                        "| speed-up vs baseline | realized fraction |")
    # every row kept; sorted by case (numbers by value), batch, rank, then dense-first provider order
    assert [line.split(" | ")[3] for line in table[1:]] == [
        "dense_torch", "lowrank_torch", "lowrank_compile", "lowrank_ort",
        "dense_torch", "lowrank_torch", "lowrank_compile", "lowrank_trp"]
    assert table[1] == (f"| {L64} | 1 | – | dense_torch | 2.000 (1.900–2.200) | 2.00G / 2.00G "
                        "| 1.00× vs dense_torch | 1.00 |")
    assert table[2] == (f"| {L64} | 1 | 16 | lowrank_torch | 1.000 (0.950–1.100) | 500.00M / 2.00G "
                        "| 2.00× vs dense_torch | 0.50 |")
    assert table[3] == (f"| {L64} | 1 | 16 | lowrank_compile | 5.000 (4.750–5.500) | 500.00M / 2.00G "
                        "| 0.40× vs dense_torch | 0.10 |")
    assert table[4] == (f"| {L64} | 1 | 16 | lowrank_ort | skipped: onnxruntime not installed "
                        "| 500.00M / 2.00G | – | – |")
    assert table[8] == (f"| {L128} | 1 | 32 | lowrank_trp | failed: Triton \\| kernel compile error "
                        "| 500.00M / 2.00G | – | – |")
    # by hand: lowrank_torch sqrt(0.5 * 0.32) = 0.4, lowrank_compile sqrt(0.1 * 0.9) = 0.3;
    # dense_torch (macs == macs_dense) and lowrank_trp/ort (no ok row) left out
    assert ("Realized fraction (geometric mean over ok low-rank rows): lowrank_torch 0.40 (n=2), "
            "lowrank_compile 0.30 (n=2).") in sec


def test_markdown_model_summaries():
    md = report.markdown(model_rows(), ENV, CMD)
    cpu = section(md, "models — cpu — float32")
    # lowrank_eager 1.6x / 4 = 0.4, trp_eager 3.2x / 4 = 0.8 on both batches
    assert "lowrank_eager 0.40 (n=2), trp_eager 0.80 (n=2)." in cpu
    assert "dense_compile" not in cpu.split("Realized fraction")[1]
    cuda = section(md, "models — cuda — float16")
    # 4x / 4 = 1.0 and 8x / 4 = 2.0; the cudagraph variant follows its base provider
    assert "trp_eager 1.00 (n=1), trp_eager_cudagraph 2.00 (n=1)." in cuda
    only_dense = report.markdown([row("layers", L64, "dense_torch", baseline="dense_torch")], {}, "x")
    assert "no ok low-rank rows" in only_dense
    assert "_No rows._" in report.markdown([], ENV, CMD)


def test_headline():
    text = report.headline(all_rows())
    lines = text.strip().splitlines()
    assert lines[0] == ("| case | batch | dense_eager | dense_compile | dense_ort | lowrank_eager | trp_eager "
                        "| trp_compile |")
    cells = "2.000 (1.00×) | 1.600 (1.25×) | – | 1.250 (1.60×) | 0.625 (3.20×) | –"
    assert lines[2] == f"| resnet18 @224 | 1 | {cells} |"
    assert lines[3] == f"| resnet18 @224 | 8 | {cells} |"
    assert lines[-1] == "Cells: median ms (speed-up vs dense_eager)."
    assert len(lines) == 6 and "resnet20" not in text and "layers" not in text
    # rows on several devices get device and dtype columns
    both = report.headline(all_rows(), case_contains="@")
    assert both.splitlines()[0].startswith("| case | device | dtype | batch | dense_eager |")
    assert "| resnet20 @32 | cuda | float16 | 1 | 2.000 (1.00×) |" in both
    assert report.headline(all_rows(), suite="layers", case_contains="vgg") == (
        "_No layers rows whose case contains 'vgg'._\n")
    dup = model_rows() + [row("models", "resnet18 @224", "trp_eager", macs=LOW, median=0.7, baseline="dense_eager")]
    with pytest.raises(ValueError, match="more than one ok row for case 'resnet18 @224', batch 1, "
                                         "provider 'trp_eager'"):
        report.headline(dup)


def test_write_report(tmp_path):
    out = tmp_path / "bench" / "run1"
    paths = report.write_report(all_rows(), ENV, CMD, out)
    assert list(paths) == ["report.md", "speedup_layers_cpu.png", "speedup_models_cpu.png",
                           "speedup_models_cuda.png"]
    for name, p in paths.items():
        assert p == out / name and p.is_file() and p.stat().st_size > 0
    assert paths["report.md"].read_text(encoding="utf-8") == report.markdown(all_rows(), ENV, CMD)
    for name in list(paths)[1:]:
        w, h = png_size(paths[name])
        assert w > 300 and h > 200


def test_plot_without_lowrank_points(tmp_path):
    rows = [row("layers", L64, "dense_torch", baseline="dense_torch"),
            row("layers", L64, "lowrank_ort", rank=16, macs=LOW, status="skipped", reason="no onnxruntime")]
    p = report.plot(rows, tmp_path / "empty.png", "nothing to plot")
    assert p == tmp_path / "empty.png"
    png_size(p)
    png_size(report.plot([], str(tmp_path / "none.png"), "no rows at all"))


def test_validation_errors(tmp_path):
    good = all_rows()
    with pytest.raises(TypeError, match="rows must be a list of dicts, got dict"):
        report.markdown(good[0], ENV, CMD)
    with pytest.raises(TypeError, match=r"rows\[1\] must be a dict, got str"):
        report.headline([good[0], "oops"])

    def broken(i, **change):
        rows = copy.deepcopy(good)
        for k, v in change.items():
            if v is KeyError:
                del rows[i][k]
            else:
                rows[i][k] = v
        return rows

    with pytest.raises(ValueError, match=r"rows\[3\] is missing key 'macs'"):
        report.markdown(broken(3, macs=KeyError), ENV, CMD)
    with pytest.raises(ValueError, match=r"rows\[5\] is missing key 'median_ms' \(required when status is 'ok'\)"):
        report.plot(broken(5, median_ms=KeyError), tmp_path / "x.png", "t")
    # a non-ok row may leave the timing keys out
    report.markdown(broken(0, median_ms=KeyError, speedup=KeyError), ENV, CMD)
    with pytest.raises(ValueError, match=r"rows\[2\].*'status' must be one of"):
        report.markdown(broken(2, status="done"), ENV, CMD)
    with pytest.raises(ValueError, match=r"rows\[2\].*'suite' must be one of"):
        report.markdown(broken(2, suite="kernels"), ENV, CMD)
    with pytest.raises(ValueError, match=r"rows\[1\].*'speedup' must be a finite number > 0, got None"):
        report.write_report(broken(1, speedup=None), ENV, CMD, tmp_path)
    with pytest.raises(ValueError, match=r"rows\[4\].*'batch' must be a positive int"):
        report.markdown(broken(4, batch=0), ENV, CMD)
    for bad in ("16", [], [16, "8"], [16.0]):
        with pytest.raises(TypeError, match=r"rows\[4\].*'rank' must be an int, a list of ints \(one per stage\) or None"):
            report.markdown(broken(4, rank=bad), ENV, CMD)
    assert "| 16,32 |" in report.markdown(broken(4, rank=[16, 32]), ENV, CMD)  # a family's per-stage ranks
    with pytest.raises(TypeError, match="environment must be a dict, got list"):
        report.markdown(good, [("cpu", "x")], CMD)
    with pytest.raises(TypeError, match="command must be a str, got list"):
        report.write_report(good, ENV, ["python", "-m", "trp"], tmp_path)
    with pytest.raises(TypeError, match="out_dir must be a str or Path, got NoneType"):
        report.write_report(good, ENV, CMD, None)
    assert not (tmp_path / "report.md").exists()


def test_breakdown_markdown():
    parts = {"stem": {"median_ms": 1.0, "p25_ms": 1.0, "p75_ms": 1.0, "modules": 1},
             "glue": {"median_ms": 0.5, "p25_ms": 0.5, "p75_ms": 0.5, "modules": 0}}
    ok = {"case": "resnet18 @224", "batch": 1, "dtype": "float32", "provider": "trp_eager", "status": "ok",
          "reason": "", "parts": parts, "sum_ms": 1.5, "plain_ms": 1.6, "discrepancy": 1.5 / 1.6 - 1, "ok": False}
    low = dict(ok, provider="dense_eager_cl", parts={"low-rank layers": parts["stem"]} | parts, sum_ms=2.5,
               plain_ms=2.5, discrepancy=0.0, ok=True)
    skipped = {"case": "resnet18 @224", "batch": 1, "dtype": "float32", "provider": "lowrank_eager_cl",
               "status": "failed", "reason": "output differs"}
    text = report.breakdown_markdown({"environment": ENV, "command": "python -m trp breakdown",
                                      "parts": ["stem", "low-rank layers", "glue"], "rows": [ok, low, skipped]})
    lines = text.splitlines()
    assert "## resnet18 @224, batch 1, float32" in lines
    assert "| part | `dense_eager_cl` | `lowrank_eager_cl` | `trp_eager` |" in lines
    assert "| stem | 1.000 (40%) | – | 1.000 (67%) |" in lines
    assert lines.index("| stem | 1.000 (40%) | – | 1.000 (67%) |") < lines.index(
        "| low-rank layers | 1.000 (40%) | – | – |") < lines.index("| glue | 0.500 (20%) | – | 0.500 (33%) |")
    assert "| the model, plain | 2.500 | failed: output differs | 1.600 |" in lines
    assert "| sum / plain − 1 | +0.0% | – | -6.2% (distorted) |" in lines
    with pytest.raises(TypeError, match="payload must be a dict with a 'rows' list"):
        report.breakdown_markdown([ok])


def test_run_ranges():
    run1 = [row("models", "resnet18 @224", "trp_eager", median=5.0, baseline="dense_eager"),
            row("models", "resnet18 @224", "lowrank_ort", median=3.0, baseline="dense_ort"),
            row("models", "resnet18 @224", "trp_eager", batch=8, median=31.0, baseline="dense_eager")]
    run2 = [row("models", "resnet18 @224", "trp_eager", median=5.5, baseline="dense_eager"),
            row("models", "resnet18 @224", "lowrank_ort", median=3.0001, baseline="dense_ort"),
            row("models", "resnet18 @224", "trp_eager", batch=8, status="failed", reason="crashed")]
    lines = report.run_ranges([run1, run2], ["trp_eager", "lowrank_ort"]).splitlines()
    assert lines[0] == "| case | batch | `trp_eager` | `lowrank_ort` |"
    assert lines[2] == "| resnet18 @224 | 1 | 5.000–5.500 | 3.000 |"
    assert lines[3] == "| resnet18 @224 | 8 | 31.00 | – |"
    assert lines[-1] == "Cells: median ms, lowest–highest over 2 runs."
    with pytest.raises(ValueError, match="runs must be a non-empty list"):
        report.run_ranges([], ["trp_eager"])
    with pytest.raises(ValueError, match="providers must be a non-empty list"):
        report.run_ranges([run1], "trp_eager")
