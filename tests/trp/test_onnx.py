"""A compiled model exports to plain ONNX (Conv/Gemm) and ONNX Runtime agrees with it."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import trp
from tests.helpers import rel_err
from trp import models

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_export_and_run_in_onnxruntime(tmp_path, scheme):
    torch.manual_seed(0)
    model = models.resnet_cifar(20).eval()
    models.randomize_batchnorm(model)
    base = trp.default_filter(model)
    trp.compile(model, rank=4, scheme=scheme, overrides={"fc": 4},
                filter_fn=lambda m, q: isinstance(m, nn.Linear) or base(m, q))
    assert isinstance(model.fc, trp.LowRankLinear)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path))  # default settings

    graph = onnx.load(str(path)).graph
    domains = {n.domain for n in graph.node}
    assert domains <= {"", "ai.onnx"}, domains  # no custom (trp) ops
    op_types = {n.op_type for n in graph.node}
    assert "Conv" in op_types
    n_convs = sum(n.op_type == "Conv" for n in graph.node)
    n_lowrank = sum(isinstance(m, trp.LowRankConv2d) for m in model.modules())
    n_dense = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert n_convs == 2 * n_lowrank + n_dense  # each factored conv is two Conv nodes

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert rel_err(torch.from_numpy(np.asarray(got)), expected) < 1e-5
