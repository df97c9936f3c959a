"""`python -m trp demo` end to end (small settings)."""

import json
import subprocess
import sys

import pytest

from trp.cli import main


def test_demo_writes_what_it_prints(tmp_path, capsys):
    out = tmp_path / "demo.json"
    main(["demo", "--model", "resnet20", "--repeats", "2", "--warmup", "1", "--json", str(out)])
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["macs"] < data["macs_dense"] and data["params"] < data["params_dense"]
    assert 0 < data["rel_l2_error"] < 0.5
    assert data["dense_ms"]["median_ms"] > 0 and data["compiled_ms"]["median_ms"] > 0
    assert "output error vs dense" in text and "latency" in text and "layer1.0.conv1" in text


def test_module_entry_point_and_bad_arguments():
    run = subprocess.run([sys.executable, "-m", "trp", "demo", "--energy", "1.5"], capture_output=True, text=True)
    assert run.returncode == 2 and "--energy: must be in (0, 1]" in run.stderr
    run = subprocess.run([sys.executable, "-m", "trp", "demo", "--model", "alexnet"], capture_output=True, text=True)
    assert run.returncode == 2 and "invalid choice: 'alexnet'" in run.stderr


def test_no_command_is_an_error():
    with pytest.raises(SystemExit):
        main([])
