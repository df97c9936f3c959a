"""`python -m trp demo` end to end (one epoch), and argument errors."""

import json
import subprocess
import sys

import pytest

from trp.cli import main


def test_demo_writes_what_it_prints(tmp_path, capsys):
    out, plot = tmp_path / "demo.json", tmp_path / "spectra.png"
    main(["demo", "--epochs", "1", "--quick", "--quiet", "--json", str(out), "--plot", str(plot)])
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert set(data) >= {"dense", "trp", "svd", "meta"}
    for key in ("dense", "trp", "svd"):
        assert set(data[key]) >= {"accuracy", "macs", "params", "latency_ms"}
        assert 0 <= data[key]["accuracy"] <= 100 and data[key]["latency_ms"] > 0
    assert data["trp"]["macs"] == data["svd"]["macs"] < data["dense"]["macs"]
    assert data["meta"]["ranks"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TRP + trp.compile (no fine-tune)" in text and "post-hoc SVD" in text


def test_module_entry_point_and_bad_arguments():
    run = subprocess.run([sys.executable, "-m", "trp", "demo", "--energy", "1.5"], capture_output=True, text=True)
    assert run.returncode == 2 and "--energy: must be in (0, 1]" in run.stderr
    run = subprocess.run([sys.executable, "-m", "trp", "bench", "--suite", "kernels"], capture_output=True,
                         text=True)
    assert run.returncode == 2 and "invalid choice: 'kernels'" in run.stderr


def test_no_command_is_an_error():
    with pytest.raises(SystemExit):
        main([])


@pytest.mark.parametrize("args, message", [
    (["--nuclear-weight", "-1"], "--nuclear-weight: must be >= 0, got -1"),
    (["--lr", "nan"], "--lr: must be a finite number, got nan"),
    (["--energy", "inf"], "--energy: must be a finite number"),
    (["--epochs", "x"], "--epochs: must be a number, got 'x'"),
])
def test_demo_arguments_are_checked_before_any_training(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_verify(tmp_path, capsys):
    import torch.nn as nn

    import trp

    path = tmp_path / "m.safetensors"
    digest = trp.save(trp.compile(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)), rank=2), path)
    assert main(["verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"sha256 {digest}" in out and "1 factored layers" in out
    assert main(["verify", str(path), "--sha256", digest]) == 0 and "(matches --sha256)" in capsys.readouterr().out
    assert main(["verify", str(path), "--sha256", "1" * 64]) == 1
    assert "FAILED" in capsys.readouterr().err
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert main(["verify", str(path)]) == 1 and "does not match its checksum" in capsys.readouterr().err


def test_breakdown_writes_what_it_prints(tmp_path, capsys):
    from trp.breakdown import PARTS

    out, report_dir = tmp_path / "bd.json", tmp_path / "bd"
    main(["breakdown", "--quick", "--repeats", "3", "--json", str(out), "--out", str(report_dir)])
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["parts"] == list(PARTS) and data["command"].startswith("python -m trp breakdown --quick")
    assert [r["provider"] for r in data["rows"]] == ["trp_eager", "lowrank_eager_cl", "dense_eager_cl"]
    for r in data["rows"]:
        assert r["status"] == "ok" and r["case"] == "resnet20 @32" and r["batch"] == 1 and r["repeats"] == 3
        assert set(r["parts"]) <= set(PARTS) and "glue" in r["parts"] and r["plain_ms"] > 0
        assert r["sum_ms"] == pytest.approx(sum(p["median_ms"] for p in r["parts"].values()))
        assert r["discrepancy"] == pytest.approx(r["sum_ms"] / r["plain_ms"] - 1)
    assert "low-rank layers" in data["rows"][0]["parts"] and "low-rank layers" not in data["rows"][2]["parts"]
    assert (report_dir / "report.md").read_text() in text and "| sum / plain − 1 |" in text


def test_breakdown_arguments():
    run = subprocess.run([sys.executable, "-m", "trp", "breakdown", "--providers", "trp_compile"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "breakdown providers must be eager model providers" in run.stderr
    run = subprocess.run([sys.executable, "-m", "trp", "breakdown", "--repeats", "0"], capture_output=True, text=True)
    assert run.returncode == 2 and "--repeats: must be > 0" in run.stderr
