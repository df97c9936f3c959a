"""The Tucker-2 and pointwise families end to end: planted ranks recovered on every model,
compile/summary/overrides, save and load, ONNX, torch.compile/export, autograd, TRP training."""

import copy

import onnx
import pytest
import torch
import torch.nn as nn

import trp
from tests.helpers import rel_err
from trp import families, models
from trp.compile import NOTE_ATTR
from trp.training import TRP
from trp_kernels import ops

TUCKER_PW = ("tucker", "pointwise")
# Every architecture trp.models builds, narrow enough for CI, with an input it takes.
MODELS = {
    "resnet18": (lambda: models.resnet18(num_classes=10, width=16), (1, 3, 64, 64)),
    "resnet50": (lambda: models.resnet50(num_classes=10, width=16), (1, 3, 64, 64)),
    "resnet20": (lambda: models.resnet_cifar(20), (2, 3, 32, 32)),
    "vgg": (lambda: models.vgg(), (2, 3, 32, 32)),
    "mobilenet_v2_small": (lambda: models.mobilenet_v2_small(), (2, 3, 32, 32)),
}


def _planted(name, scheme=TUCKER_PW, ratio=0.25, seed=0):
    torch.manual_seed(seed)
    make, shape = MODELS[name]
    model = make().eval()
    models.randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    planted = models.plant_ranks(model, scheme, ratio, 16)
    return model, torch.randn(shape), planted


@pytest.mark.parametrize("name", list(MODELS))
def test_planted_tucker_ranks_are_recovered_and_the_output_matches_dense(name):
    model, x, planted = _planted(name)
    assert any(len(r) == 2 for r in planted.values()), "no layer planted in Tucker form"
    with torch.no_grad():
        ref = model(x)
        compiled = trp.compile(copy.deepcopy(model), scheme=TUCKER_PW, ratio=0.25, rank_multiple=16)
        out = compiled(x)
    assert rel_err(out, ref) <= 1e-4
    factored = {n: m for n, m in compiled.named_modules() if isinstance(m, (trp.LowRankConv2d, trp.LowRankLinear))}
    assert factored
    for n, m in factored.items():
        assert m.ranks == planted[n], n
    tucker = [m for m in factored.values() if getattr(m, "scheme", None) == "tucker"]
    assert tucker and all(len(m.stage_weights()) == 3 for m in tucker)


def test_the_family_of_each_layer_and_the_summary():
    model, x, _ = _planted("resnet50")
    compiled = trp.compile(copy.deepcopy(model), scheme=TUCKER_PW, ratio=0.25, rank_multiple=16)
    kinds = {type(m).__name__ + ":" + str(getattr(m, "scheme", "")) for m in compiled.modules()
             if isinstance(m, (trp.LowRankConv2d, trp.LowRankLinear))}
    assert {"LowRankConv2d:tucker", "LowRankConv2d:pointwise"} <= kinds
    text = str(trp.summary(compiled, x[:1]))
    row = next(line for line in text.splitlines() if line.startswith("layer3.1.conv2 ")).split()
    assert row[2:4] == ["tucker", "16/64,16/64"]  # the family; each stage's rank / full rank
    # a 1x1 conv whose factored form would not cut MACs says so
    assert "pointwise rank 16/16 (ratio=0.25) would not cut MACs" in getattr(compiled.layer1[0].conv1, NOTE_ATTR)


def test_mobilenet_pointwise_cuts_macs_and_says_why_layers_stay_dense():
    model = models.mobilenet_v2_small().eval()
    x = torch.randn(1, 3, 32, 32)
    compiled = trp.compile(copy.deepcopy(model), scheme=("channel", "pointwise"), ratio=0.25)
    s = trp.summary(compiled, x)
    assert s.macs_dense / s.macs >= 1.5
    notes = [getattr(m, NOTE_ATTR, "") for m in compiled.modules() if isinstance(m, nn.Conv2d)]
    assert any("depthwise" in n or "grouped" in n for n in notes), notes
    channel_only = trp.summary(trp.compile(copy.deepcopy(model), ratio=0.25), x)
    assert s.macs < channel_only.macs


def test_overrides_choose_any_family_per_layer():
    model, x, _ = _planted("resnet20", scheme="channel")
    compiled = trp.compile(copy.deepcopy(model), ratio=0.5, rank_multiple=1, overrides={
        r"layer1\.0\.conv1": {"ratio": 0.25, "scheme": "tucker"},
        r"layer1\.0\.conv2": {"rank": [3, 5], "scheme": "tucker"},
        r"layer2\.0\.conv1": {"ratio": 0.25, "scheme": "spatial"},
    })
    assert compiled.layer1[0].conv1.scheme == "tucker" and len(compiled.layer1[0].conv1.ranks) == 2
    assert compiled.layer1[0].conv2.ranks == (3, 5)
    assert compiled.layer2[0].conv1.scheme == "spatial"
    assert compiled.layer3[0].conv1.scheme == "channel"
    with pytest.raises(ValueError, match="scheme 'tucker' has 2"):
        trp.compile(copy.deepcopy(model), overrides={r"layer1\.0\.conv1": {"rank": [3, 5, 7], "scheme": "tucker"}})


def test_save_and_load_round_trip_without_pickle(tmp_path):
    model, x, _ = _planted("resnet50")
    compiled = trp.compile(copy.deepcopy(model), scheme=TUCKER_PW, ratio=0.25, rank_multiple=16)
    path = tmp_path / "m.safetensors"
    trp.io.save(compiled, path)
    assert b"pickle" not in path.read_bytes()[:4096]
    back = trp.io.load(path, MODELS["resnet50"][0]())
    with torch.no_grad():
        assert torch.equal(back(x), compiled(x))
    layers = [n for n, m in compiled.named_modules() if isinstance(m, trp.LowRankConv2d)]
    assert {compiled.get_submodule(n).scheme for n in layers} == {"tucker", "pointwise"}
    for n in layers:
        a, b = compiled.get_submodule(n), back.get_submodule(n)
        assert (type(b), b.scheme, b.ranks) == (type(a), a.scheme, a.ranks), n


def test_onnx_export_is_plain_conv_nodes(tmp_path):
    model, x, _ = _planted("resnet20", scheme="tucker")
    compiled = trp.compile(model, scheme="tucker", ratio=0.25, rank_multiple=16)
    path = tmp_path / "m.onnx"
    torch.onnx.export(compiled, (x,), str(path))
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}
    stages = sum(len(m.stage_weights()) for m in compiled.modules() if isinstance(m, trp.LowRankConv2d))
    dense = sum(isinstance(m, nn.Conv2d) for m in compiled.modules())
    assert sum(n.op_type == "Conv" for n in graph.node) == stages + dense
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(got), compiled(x)) < 1e-5


@pytest.mark.parametrize("backend", [b for b in ("cpp", "torch") if not ops.refusals(b, "cpu", torch.float32)])
def test_torch_compile_and_export_with_no_graph_break(backend):
    model, x, _ = _planted("resnet20", scheme=TUCKER_PW)
    compiled = trp.compile(model, scheme=TUCKER_PW, ratio=0.25, rank_multiple=16, backend=backend)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(compiled)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        eager = compiled(x)
        out = torch.compile(compiled, fullgraph=True, backend="aot_eager")(x)
    assert rel_err(out, eager) < 1e-6
    if backend == "cpp":
        ep = torch.export.export(compiled, (x,))
        assert any("trp.conv_chain" in str(n.target) for n in ep.graph.nodes)
        with torch.no_grad():
            assert rel_err(ep.module()(x), eager) < 1e-6


def test_gradients_reach_every_stage():
    model, x, _ = _planted("resnet20", scheme="tucker")
    compiled = trp.compile(model, scheme="tucker", ratio=0.25, rank_multiple=16).train()
    compiled(x).square().mean().backward()
    layer = next(m for m in compiled.modules() if isinstance(m, trp.LowRankConv2d))
    assert layer.scheme == "tucker"
    assert [w.grad is not None and w.grad.abs().sum() > 0 for w in layer.stage_weights()] == [True] * 3


def test_trp_training_projects_in_the_tucker_form():
    torch.manual_seed(0)
    model = models.resnet_cifar(8)
    controller = TRP(model, energy=0.8, scheme="tucker", nuclear_weight=1e-3)
    controller.project()
    tucker = families.get("tucker")
    assert controller.targets
    for fqn, (m, _, _) in controller.targets.items():
        ranks = controller.ranks[fqn]
        assert isinstance(ranks, tuple) and len(ranks) == 2
        for s, r in zip(tucker.spectra(m.weight), ranks):
            assert r == len(s) or s[r:].max() < 1e-5 * s[0]  # each mode exactly at its rank
    # the regularizer adds the sub-gradient of both modes' nuclear norms
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {f: m.weight.grad.clone() for f, (m, _, _) in controller.targets.items()}
    controller.regularize()
    assert any(not torch.equal(m.weight.grad, grads[f]) for f, (m, _, _) in controller.targets.items())


def test_planting_refuses_what_it_cannot_plant():
    model = models.resnet_cifar(8)
    with pytest.raises(ValueError, match="set_conv_spectra plants one spectrum, and scheme 'tucker' has 2 rank modes"):
        models.set_conv_spectra(model, lambda full: torch.ones(full), scheme="tucker")
    with pytest.raises(ValueError, match=r"scheme must be one of \('channel', 'spatial', 'tucker', 'pointwise'\)"):
        models.plant_ranks(model, "cp", 0.25)
    with pytest.raises(ValueError, match="scheme names a family twice"):
        models.plant_ranks(model, ("tucker", "tucker"), 0.25)
