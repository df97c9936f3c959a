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
