"""benches/gpu_run.py, the prepared GPU run: its dry run on CPU end to end (the output
format), its refusal without a GPU, and the target arithmetic on synthetic rows."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benches" / "gpu_run.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_one_results_file(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path), "--time-limit", "300"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "dry run: CUDA calls skipped" in run.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["environment"]["dry_run"] is True and results["environment"]["torch"] == torch.__version__
    assert set(results["steps"]) == {"tests", "layers", "models"}
    assert "collected" in results["steps"]["tests"]["summary"] and results["steps"]["tests"]["returncode"] == 0
    for suite in ("layers", "models"):
        step = results["steps"][suite]
        assert step["rows"] >= 2 and step["ok"] >= 2 and step["not_run"] == []
        assert json.loads((tmp_path / step["json"]).read_text())["rows"]
        assert (tmp_path / suite / "report.md").exists()
    assert set(results["targets"]) == {"fused_vs_two_convs_b1_cudagraph", "fused_vs_two_convs_b32_b128",
                                       "resnet50_realized_fraction"}
    assert all(t["met"] is None and "dry run" in t["note"] for t in results["targets"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_asks_for_dry_run(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "no CUDA device here" in run.stderr and "--dry-run" in run.stderr


def test_targets_on_synthetic_rows():
    gpu_run = _module()

    def row(provider, batch, ms, case="c", realized=None):
        return {"case": case, "batch": batch, "rank": 16, "dtype": "float16", "provider": provider, "status": "ok",
                "median_ms": ms, "realized_fraction": realized}

    layers = [row("lowrank_torch_cudagraph", 1, 1.4), row("lowrank_trp_cudagraph", 1, 1.0),
              row("lowrank_torch", 32, 2.0), row("lowrank_trp", 32, 2.0), row("lowrank_torch", 128, 4.0),
              row("lowrank_trp", 128, 2.0)]
    models = [row("trp_cudagraph", 1, 1.0, "resnet50 @224", 0.9), row("trp_cudagraph", 32, 1.0, "resnet50 @224", 0.4),
              row("trp_cudagraph", 1, 1.0, "resnet18 @224", 0.1)]
    t = gpu_run.targets(layers, models, dry_run=False)
    assert t["fused_vs_two_convs_b1_cudagraph"]["value"] == pytest.approx(1.4)
    assert t["fused_vs_two_convs_b1_cudagraph"]["met"] is True
    assert t["fused_vs_two_convs_b32_b128"]["value"] == pytest.approx(2 ** 0.5)
    assert t["resnet50_realized_fraction"]["value"] == pytest.approx(0.6) and t["resnet50_realized_fraction"]["met"] is False
    empty = gpu_run.targets([], [], dry_run=False)
    assert all(v["value"] is None and v["met"] is None and "no rows" in v["note"] for v in empty.values())
