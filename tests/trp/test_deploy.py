"""trp.deploy and ``python -m trp deploy``: a compiled model as an ONNX file of standard
operators, which ONNX Runtime and OpenVINO run to the model's output."""

import numpy as np
import pytest
import torch

import trp
from trp import models
from trp.cli import main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _compiled(scheme="channel"):
    model = models.resnet_cifar(8).eval()
    models.randomize_batchnorm(model, torch.Generator().manual_seed(0))
    return trp.compile(model, rank=4, rank_multiple=1, scheme=scheme)


@pytest.mark.parametrize("scheme", ["channel", ("tucker", "pointwise")])
def test_deploy_writes_standard_onnx_that_onnxruntime_runs(tmp_path, scheme):
    model = _compiled(scheme)
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "m.onnx"
    report = trp.deploy(model, x, path)
    assert report.path == str(path) and report.bytes == path.stat().st_size
    assert report.checked_with.startswith("onnxruntime") and report.rel_err < 1e-5
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}
    stages = sum(m._n_stages for m in model.modules() if isinstance(m, trp.LowRankConv2d))
    dense = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert report.operators["Conv"] == stages + dense  # each factor one Conv node
    # the file alone, in a fresh session, on another input of the same shape
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(2, 3, 16, 16)
    (got,) = session.run(None, {session.get_inputs()[0].name: x2.numpy()})
    with torch.no_grad():
        want = model(x2)
    assert np.abs(got - want.numpy()).max() <= 1e-5 * want.abs().max().item()
    assert "wrote" in str(report) and "relative error" in str(report)


def test_openvino_runs_the_file(tmp_path):
    ov = pytest.importorskip("openvino")
    model = _compiled()
    x = torch.randn(1, 3, 16, 16)
    path = tmp_path / "m.onnx"
    trp.deploy(model, x, path)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(x.numpy())[0]
    with torch.no_grad():
        want = model(x)
    assert np.abs(got - want.numpy()).max() <= 1e-4 * want.abs().max().item()


def test_deploy_checks_its_arguments_and_the_file(tmp_path):
    model = _compiled()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="path must name a .onnx file"):
        trp.deploy(model, x, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="check must be True, False or 'auto'"):
        trp.deploy(model, x, tmp_path / "m.onnx", check="yes")
    with pytest.raises(ValueError, match="rtol must be a number > 0"):
        trp.deploy(model, x, tmp_path / "m.onnx", rtol=0)
    with pytest.raises(TypeError, match="example must be a torch.Tensor"):
        trp.deploy(model, [x], tmp_path / "m.onnx")
    # an impossible tolerance: the check fails, and says so with the error it measured
    with pytest.raises(trp.DeployError, match=r"relative error [0-9.e-]+ \(rtol 1e-15\)"):
        trp.deploy(model, x, tmp_path / "m.onnx", rtol=1e-15)
    report = trp.deploy(model, x, tmp_path / "n.onnx", check=False)
    assert report.checked_with is None and report.operators["Conv"] > 0


def test_cli_deploy_compiles_or_loads(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["deploy", "trp.models:resnet_cifar", "--input", "1,3,16,16", "--rank", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "checked with onnxruntime" in text and out.stat().st_size > 0
    saved = tmp_path / "m.safetensors"
    assert main(["compress", "trp.models:resnet_cifar", "--input", "1,3,16,16", "--rank", "4",
                 "--out", str(saved)]) == 0
    out2 = tmp_path / "m2.onnx"
    assert main(["deploy", "trp.models:resnet_cifar", "--input", "1,3,16,16", "--load", str(saved),
                 "--out", str(out2)]) == 0
    assert "checked with onnxruntime" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["deploy", "trp.models:resnet_cifar", "--input", "1,3,16,16", "--load", str(saved), "--rank", "4",
              "--out", str(out2)])
    assert "--load reads the factors from its file: drop --rank" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["deploy", "trp.models:resnet_cifar", "--input", "1,3,16,16", "--rank", "4", "--out", "m.pt"])
    assert "--out must name a .onnx file, got 'm.pt'" in capsys.readouterr().err


def test_deploy_times_both_when_asked(tmp_path):
    report = trp.deploy(_compiled(), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", time_it=True)
    assert report.ort_ms > 0 and report.model_ms > 0
    assert "ONNX Runtime" in str(report) and "the model in PyTorch" in str(report)
