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


def test_bench_rounds_need_processes_of_their_own(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--suite", "models", "--quick", "--one-process", "--rounds", "2"])
    assert exit_info.value.code == 2
    assert "--rounds 2 counts processes per model provider; with --one-process there is one process" in \
        capsys.readouterr().err


def test_no_command_is_an_error():
    with pytest.raises(SystemExit):
        main([])


@pytest.mark.parametrize("args, message", [
    (["--nuclear-weight", "-1"], "--nuclear-weight: must be >= 0, got -1"),
    (["--lr", "nan"], "--lr: must be a finite number, got nan"),
    (["--energy", "inf"], "--energy: must be a finite number"),
    (["--epochs", "x"], "--epochs: must be a number, got 'x'"),
    (["--scheme", "cp"], "--scheme: must be one of channel, spatial, tucker, pointwise or a comma-separated list"),
    (["--scheme", "tucker,tucker"], "--scheme: must be one of"),
    (["--methods", "trp,obs"], "--methods: expected distinct names from trp,admm,eigendamage,svd,tucker-svd,spp"),
    (["--methods", "trp", "--budgets", "2,0.5"], "--budgets: expected comma-separated numbers > 1"),
    (["--methods", "trp", "--seeds", "a"], "--seeds: expected comma-separated integers"),
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


BUILD_PY = '''
import torch.nn as nn


def build():
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
'''


def test_summary_of_a_model_named_by_module_and_callable(capsys):
    assert main(["summary", "trp.models:resnet_cifar", "--input", "1,3,32,32", "--ratio", "0.25"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["layer", "kind", "scheme", "rank"]
    assert "12 of 22 conv/linear layers factored" in out
    assert "rank_multiple rounded 4 to 16 (rank_multiple=1 would factor it at 4)" in out
    assert "6 layer(s) stayed dense only because rank_multiple rounded their rank" in out
    assert "relative output error against the model before compile" in out
    assert main(["summary", "trp.models:resnet_cifar", "--input", "1,3,32,32", "--ratio", "0.25",
                 "--rank-multiple", "1"]) == 0
    out = capsys.readouterr().out
    assert "18 of 22 conv/linear layers factored" in out and "stayed dense only because" not in out


def test_compress_a_file_py_model_with_weights_and_load_it(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    import trp
    from trp.cli import load_user_model

    (tmp_path / "net.py").write_text(BUILD_PY)
    spec = f"{tmp_path / 'net.py'}:build"
    trained = load_user_model(spec)
    for p in trained.parameters():
        p.data.normal_(generator=torch.Generator().manual_seed(1))
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    for weights in ("w.pt", "w.safetensors"):
        loaded = load_user_model(spec, str(tmp_path / weights))
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))
    out = tmp_path / "net.safetensors"
    assert main(["compress", spec, "--input", "2,3,16,16", "--rank", "8", "--weights", str(tmp_path / "w.pt"),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out} (sha256 " in text and "1 of 3 conv/linear layers factored" in text
    restored = trp.load(out, load_user_model(spec))
    expected = trp.compile(load_user_model(spec, str(tmp_path / "w.pt")), rank=8)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), expected(x))


def test_a_pickled_model_needs_allow_pickle(tmp_path, capsys):
    import torch

    import trp.models

    path = tmp_path / "whole.pt"
    torch.save(trp.models.resnet_cifar(8), path)
    with pytest.raises(SystemExit) as e:
        main(["summary", str(path), "--input", "1,3,32,32"])
    assert e.value.code == 2 and "needs --allow-pickle, which runs code from the file" in capsys.readouterr().err
    assert main(["summary", str(path), "--input", "1,3,32,32", "--allow-pickle", "--rank", "4"]) == 0


@pytest.mark.parametrize("args, message", [
    (["summary", "trp.models:nope", "--input", "1,3,32,32"], "'trp.models' has no callable 'nope'"),
    (["summary", "no_such_pkg.mod:build", "--input", "1,3,32,32"], "cannot import 'no_such_pkg.mod'"),
    (["summary", "missing.py:build", "--input", "1,3,32,32"], "MODEL file 'missing.py' does not exist"),
    (["summary", "trp.models:resnet_cifar", "--input", "1,5,32,32"], "does not run on an input of shape (1, 5, 32, 32)"),
    (["summary", "trp.models:resnet_cifar", "--input", "1,3,32,32", "--rank", "4", "--ratio", "0.5"],
     "give at most one of --energy, --rank, --ratio"),
    (["summary", "trp.models:resnet_cifar", "--input", "1,3,a"], "--input: must be comma-separated positive ints"),
    (["summary", "trp.models:resnet_cifar"], "the following arguments are required: --input"),
    (["compress", "trp.models:resnet_cifar", "--input", "1,3,32,32"], "the following arguments are required: --out"),
    (["summary", "trp.models:resnet_cifar", "--input", "1,3,32,32", "--weights", "none.pt"],
     "--weights file 'none.pt' does not exist"),
])
def test_bad_model_arguments_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "usage: python -m trp" in err


def test_every_flag_has_help_and_bench_lists_every_provider(capsys):
    import argparse

    from trp.benchmark import providers as P
    from trp.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [(name, a.dest) for name, p in sub.choices.items() for a in p._actions if not a.help]
    assert not missing
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    for name in (*P.LAYER_PROVIDERS, *P.MODEL_PROVIDERS):
        assert f"\n  {name} " in text
    with pytest.raises(SystemExit) as e:
        main(["bench", "--providers", "nope"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_fit_prints_a_line_per_epoch_for_people():
    from trp.training import _epoch_line

    line = _epoch_line({"epoch": 3, "train_loss": 0.78391, "lr": 0.0005, "val_accuracy": 51.2535,
                        "val_loss": 1.45992, "ranks": {"a": 10, "b": 13}}, 30)
    assert line == ("epoch 3/30: train loss 0.7839, val accuracy 51.25%, val loss 1.4599, lr 0.0005, "
                    "mean rank 11.5 over 2 layers")


def test_bench_prints_its_table_even_with_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    main(["bench", "--suite", "layers", "--quick", "--providers", "lowrank_torch", "--budget", "0.02",
          "--json", str(out)])
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert rows and {r["provider"] for r in rows if r["status"] == "ok"} == {"dense_torch", "lowrank_torch"}
    assert "| case | batch | rank | provider |" in text and "## layers — cpu — float32" in text
    assert f"wrote {out}" in text


def test_summary_with_a_list_of_families(capsys):
    assert main(["summary", "trp.models:resnet50", "--input", "1,3,64,64", "--ratio", "0.25",
                 "--scheme", "tucker,pointwise"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["layer3.0.conv2"][2:4] == ["tucker", "64/256,64/256"]
    assert rows["layer3.0.conv1"][2] == "pointwise"
