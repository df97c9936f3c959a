"""The benchmark harness on tiny cases: every provider yields a row, wrong answers are not
timed, unavailable providers say why. No test asserts a speed."""

import json
import os

import pytest
import torch

from trp.benchmark import cases as C
from trp.benchmark import isolated
from trp.benchmark import providers as P
from trp.benchmark import runner

ROW_KEYS = {"suite", "case", "provider", "device", "dtype", "batch", "rank", "macs_dense", "macs", "median_ms",
            "realized_fraction", "status", "reason", "speedup", "baseline", "max_rel_err"}


def _quiet(_):
    pass


def test_layer_rows_for_every_provider():
    case = C.LayerCase(C.ConvShape(("tiny",), 8, 32, 9, 2), 4, "test", 2, "cpu", torch.float32)
    rows = runner.layer_case_rows(case, P.LAYER_PROVIDERS, 0.01, _quiet, torch.Generator().manual_seed(0))
    assert [r["provider"] for r in rows] == list(P.LAYER_PROVIDERS)
    for r in rows:
        assert ROW_KEYS <= set(r)
        if r["provider"].endswith("_cudagraph"):  # CPU case: listed, with the reason
            assert r["status"] == "skipped" and r["reason"] == "CUDA graphs need a CUDA device"
            assert r["baseline"] == "dense_torch_cudagraph"
            continue
        assert r["status"] == "ok", (r["provider"], r["reason"])
        assert r["median_ms"] > 0 and r["max_rel_err"] < 1e-5 and r["baseline"] == "dense_torch"
    dense, low = rows[0], rows[1]
    assert dense["macs"] == dense["macs_dense"] == 2 * 5 * 5 * 32 * 8 * 9
    assert low["macs"] == 2 * 5 * 5 * 4 * (8 * 9 + 32)


def test_tucker_layer_rows_for_every_provider():
    """A Tucker case: three exact stages, every provider (three separate convs, ONNX chains,
    the fused kernel) reproduces the dense conv; the MACs count the first 1x1 at stride²
    times the output pixels of a strided layer (Family.macs_per_pixel)."""
    case = C.LayerCase(C.ConvShape(("tiny",), 8, 32, 9, 2), (4, 6), "test", 2, "cpu", torch.float32, "tucker")
    rows = runner.layer_case_rows(case, P.LAYER_PROVIDERS, 0.01, _quiet, torch.Generator().manual_seed(0))
    for r in rows:
        if not r["provider"].endswith("_cudagraph"):
            assert r["status"] == "ok", (r["provider"], r["reason"])
            assert r["max_rel_err"] < 1e-5 and r["rank"] == [4, 6] and r["case"] == "tiny 8->32 3x3 s2 @9 tucker"
    low = rows[1]
    assert low["macs"] == 2 * 5 * 5 * (2 * 2 * 8 * 4 + 4 * 6 * 9 + 6 * 32)
    assert low["realized_fraction"] == pytest.approx(low["speedup"] / (low["macs_dense"] / low["macs"]))


def test_a_wrong_answer_is_not_timed(monkeypatch):
    real = P.prepare_layer

    def broken(provider, case, t):
        fn = real(provider, case, t)
        return (lambda: fn() * 1.01) if provider == "lowrank_torch" else fn

    monkeypatch.setattr(P, "prepare_layer", broken)
    case = C.LayerCase(C.ConvShape(("tiny",), 8, 16, 7, 1), 4, "test", 1, "cpu", torch.float32)
    rows = runner.layer_case_rows(case, ["dense_torch", "lowrank_torch"], 0.01, _quiet,
                                  torch.Generator().manual_seed(0))
    bad = rows[1]
    assert bad["status"] == "failed" and "differs from the dense reference" in bad["reason"]
    assert bad["median_ms"] is None and bad["speedup"] is None


def test_model_rows_for_every_provider():
    case = C.ModelCase("resnet8", 16, 1, "cpu", torch.float32)
    rows = runner.model_case_rows(case, P.MODEL_PROVIDERS, 0.01, _quiet, torch.Generator().manual_seed(0))
    by = {r["provider"]: r for r in rows}
    assert list(by) == list(P.MODEL_PROVIDERS)
    for name in ("dense_eager", "dense_compile", "dense_compile_frozen", "dense_ort", "dense_openvino",
                 "lowrank_eager", "lowrank_compile", "lowrank_compile_frozen", "lowrank_ort", "lowrank_openvino",
                 "trp_eager", "trp_compile", "trp_compile_frozen", "trp_ort", "trp_openvino"):
        assert by[name]["status"] == "ok", (name, by[name]["reason"])
        assert by[name]["max_rel_err"] < 1e-4 and by[name]["precision"] == "float32"
    for name in ("dense_openvino_default", "lowrank_openvino_default"):  # bfloat16 where the CPU has it
        assert by[name]["status"] == "ok", (name, by[name]["reason"])
        assert by[name]["precision"] in ("float32", "bfloat16", "float16")
        assert by[name]["max_rel_err"] < (1e-4 if by[name]["precision"] == "float32" else 3.2e-2)
    assert {P.pool(p) for p in by} == {"torch"} | {p for p in by if p.endswith("_ort") or "_openvino" in p}
    for name in ("dense_cudagraph", "lowrank_cudagraph", "trp_cudagraph"):
        assert by[name]["status"] == "skipped" and "CUDA" in by[name]["reason"]
    assert by["lowrank_ort"]["baseline"] == "dense_ort" and by["trp_compile"]["baseline"] == "dense_compile"
    assert by["lowrank_eager"]["macs"] < by["lowrank_eager"]["macs_dense"]


def test_model_rows_each_in_a_process_of_its_own():
    """The suite's default for models: every provider checked and timed in a new process that
    builds the case's bundle from the seed, rounds of processes pooled into one row."""
    pytest.importorskip("onnxruntime")
    case = C.ModelCase("resnet8", 16, 1, "cpu", torch.float32)
    providers = ["trp_eager", "dense_eager", "lowrank_ort"]  # dense_eager runs first: it sets the tolerance
    seen = []
    rows = runner.model_case_rows(case, providers, 0.05, seen.append, None, isolate=True, rounds=2)
    assert [r["provider"] for r in rows] == providers
    assert [t.split(" (")[0].split()[-1] for t in seen] == ["dense_eager", "trp_eager", "lowrank_ort"] * 2
    pids = [r["pid"] for r in rows]
    assert len(set(pids)) == 3 and os.getpid() not in pids
    with torch.random.fork_rng():
        here = isolated.fingerprint(P.seeded_bundle(case))
    for r in rows:
        assert ROW_KEYS <= set(r) and r["status"] == "ok", (r["provider"], r["reason"])
        assert r["rounds"] == 2 and r["repeats"] >= 2 * runner.MIN_REPEATS
        assert r["min_ms"] <= r["p25_ms"] <= r["median_ms"] <= r["p75_ms"] <= r["max_ms"]
        assert r["fingerprint"] == pytest.approx(here, rel=1e-12)  # the case as built here from seed 0
        assert r["max_rel_err"] < 1e-4
    by = {r["provider"]: r for r in rows}
    assert by["trp_eager"]["speedup"] == pytest.approx(by["dense_eager"]["median_ms"] / by["trp_eager"]["median_ms"])


def test_a_provider_whose_process_dies_is_a_failed_row():
    from trp.benchmark import report

    case = C.ModelCase("resnet-nosuch", 16, 1, "cpu", torch.float32)
    rows = runner.model_case_rows(case, ["dense_eager", "trp_eager"], 0.01, _quiet, None, isolate=True)
    for r in rows:
        assert r["status"] == "failed" and r["median_ms"] is None and r["macs"] == 0  # never counted
        assert r["reason"].startswith("its process exited with code 1: ValueError")
    assert "| resnet-nosuch @16 | 1 | – | dense_eager | failed" in report.markdown(rows, {}, "")
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        runner.model_case_rows(case, ["dense_eager"], 0.01, _quiet, None, isolate=True, rounds=0)
    with pytest.raises(ValueError, match="rounds must be >= 1 .* and 1 when isolate is False"):
        runner.run("models", isolate=False, rounds=2, show_progress=False)


def test_case_lists():
    full = C.layer_cases("cpu")
    assert {c.batch for c in full} == {1, 8} and {c.dtype for c in full} == {torch.float32}
    names = {c.shape.name for c in full}
    assert any("resnet18" in n for n in names) and any("resnet50" in n for n in names)
    assert any("vgg16" in n for n in names) and any(" s2 " in n for n in names)
    channel = [c for c in full if c.scheme == "channel"]
    assert all(c.rank % 16 == 0 and c.rank <= c.shape.full_rank for c in channel)
    tucker = [c for c in full if c.scheme == "tucker"]  # ResNet-18/50's 3x3 shapes at 1/4 and 1/2 per mode
    assert {c.shape for c in tucker} == {c.shape for c in channel if {"resnet18", "resnet50"} & set(c.shape.nets)}
    assert {(c.rank[0] / c.shape.c_in, c.rank[1] / c.shape.c_out) for c in tucker} == {(0.25, 0.25), (0.5, 0.5)}
    assert all(c.name.endswith(" tucker") and c.macs < c.macs_dense for c in tucker)
    gpu = C.layer_cases("cuda")
    assert {c.batch for c in gpu} == {1, 32, 128}
    assert {c.dtype for c in gpu} == {torch.float16, torch.bfloat16, torch.float32}
    assert C.lowrank_rank(64, 1 / 8) == 16 and C.lowrank_rank(512, 1 / 2) == 256 and C.lowrank_rank(27, 1) == 27
    assert {m.model for m in C.model_cases("cpu")} == {"resnet18", "resnet50", "resnet20", "resnet56"}
    assert {m.name for m in C.model_cases("cpu") if m.scheme != "channel"} == {
        "resnet50 @224 tucker+pointwise", "resnet50 @224 channel+pointwise"}


def test_run_writes_json_and_report(tmp_path, monkeypatch):
    tiny = [C.LayerCase(C.ConvShape(("tiny",), 8, 16, 7, 1), 4, "test", 1, "cpu", torch.float32)]
    monkeypatch.setattr(C, "layer_cases", lambda device, quick: tiny)
    path = tmp_path / "out.json"
    payload = runner.run("layers", "cpu", quick=True, json_path=path, out_dir=tmp_path / "report",
                         budget_s=0.01, command="test", show_progress=False)
    data = json.loads(path.read_text())
    assert len(data["rows"]) == len(P.LAYER_PROVIDERS) and data["environment"]["torch"] == torch.__version__
    assert (tmp_path / "report" / "report.md").is_file() and payload["report"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(suite="kernels"), "suite must be one of"),
    (dict(device="tpu"), "device must be 'cpu' or 'cuda'"),
    (dict(providers=["cudnn"]), "unknown provider 'cudnn'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        runner.run(show_progress=False, **kwargs)
