"""trp.compile: planted ranks found, BN folding, skip reasons, overrides, backends, errors."""

import copy

import pytest
import torch
import torch.nn as nn

import trp
from tests.helpers import rel_err
from trp import models
from trp.compile import FOLDED_ATTR, NOTE_ATTR
from trp_kernels import ops

MODELS = {
    "resnet20": lambda: models.resnet_cifar(20),
    "vgg": lambda: models.vgg(),
    "mobilenet": lambda: models.mobilenet_v2_small(),
}


def planted(name, scheme, fraction=4, seed=0):
    """An eval-mode model whose k×k conv weights have exact rank full_rank // fraction under
    ``scheme`` and whose BatchNorms have random statistics."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    models.set_conv_spectra(model, lambda full: (torch.arange(full) < full // fraction).double(),
                            scheme=scheme, generator=g)
    models.randomize_batchnorm(model, g)
    return model


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("name", list(MODELS))
def test_planted_ranks_are_found_and_outputs_kept(name, scheme):
    model = planted(name, scheme)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    compiled = trp.compile(model, energy=0.99999, rank_multiple=1, scheme=scheme, inplace=False)
    lowrank = [m for m in compiled.modules() if isinstance(m, trp.LowRankConv2d)]
    assert lowrank, "nothing was factored"
    for m in lowrank:
        assert m.rank == m.full_rank // 4 and m.scheme == scheme
    s = trp.summary(compiled, x)
    assert s.macs < s.macs_dense
    assert not any(isinstance(m, nn.BatchNorm2d) for m in compiled.modules())  # all folded
    with torch.no_grad():
        assert rel_err(compiled(x), expected) <= 1e-4


def test_planted_rank_found_with_kernel_rounding():
    model = planted("resnet20", "channel", fraction=2)  # ranks 8, 16, 32 of 16, 32, 64
    compiled = trp.compile(model, energy=0.99999, rank_multiple=16, inplace=False)
    ranks = sorted({m.rank for m in compiled.modules() if isinstance(m, trp.LowRankConv2d)})
    assert ranks == [16, 32]  # 8 rounds up to 16 = full rank at width 16: no MAC cut, stays dense
    notes = [getattr(m, NOTE_ATTR, "") for m in compiled.layer1.modules()]
    assert any("would not cut MACs" in n for n in notes)


def test_energy_09_on_random_weights_cuts_conv_macs():
    model = models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    compiled = trp.compile(model, inplace=False)  # default: energy 0.9
    s = trp.summary(compiled, x)
    factored = [r for r in s.rows if r["rank"] is not None]
    assert factored and s.macs < s.macs_dense
    assert all(r["macs"] < r["macs_dense"] for r in factored)


def test_skip_reasons_are_recorded_and_summarised():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3, padding=1)
            self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
            self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=2)
            self.reflect = nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect")
            self.pw = nn.Conv2d(32, 32, 1)
            self.big = nn.Conv2d(32, 64, 3, padding=1)
            self.up = nn.ConvTranspose2d(64, 64, 2, stride=2)
            self.c1d = nn.Conv1d(64, 64, 3, padding=1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = self.big(self.pw(self.reflect(self.grouped(self.dw(self.stem(x))))))
            x = self.up(x)
            x = self.c1d(x.flatten(2)).mean(-1)
            return self.fc(x)

    net = Net().eval()
    compiled = trp.compile(net, ratio=0.25, inplace=False)
    notes = {n: getattr(m, NOTE_ATTR, None) for n, m in compiled.named_children()}
    assert "stem" in notes["stem"]
    assert "depthwise conv (groups=32)" in notes["dw"]
    assert "grouped conv (groups=2)" in notes["grouped"]
    assert "padding_mode='reflect'" in notes["reflect"]
    assert "1x1 conv" in notes["pw"]
    assert isinstance(compiled.big, trp.LowRankConv2d)
    assert "ConvTranspose2d is not supported" in notes["up"]
    assert "Conv1d is not supported" in notes["c1d"]
    assert "linear layers are not factored by default" in notes["fc"]
    rows = {r["name"]: r for r in trp.summary(compiled, torch.randn(1, 3, 8, 8)).rows}
    assert rows["dw"]["note"].startswith("depthwise") and rows["dw"]["kind"] == "dwconv"
    assert rows["big"]["rank"] == 16 and rows["big"]["macs"] < rows["big"]["macs_dense"]
    assert rows["up"]["macs"] == 64 * 64 * 2 * 2 * 8 * 8  # per input pixel: c_out * k * k


def test_bn_folding_alone_is_exact():
    model = planted("resnet20", "channel")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    folded = trp.compile(model, filter_fn=lambda m, fqn: False, inplace=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert getattr(folded.layer1[0].conv1, FOLDED_ATTR) == "layer1.0.bn1"
    assert folded.layer1[0].conv1.bias is not None
    with torch.no_grad():
        assert rel_err(folded(x), expected) <= 1e-5
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # inplace=False


def test_training_mode_keeps_batchnorm_and_warns():
    model = models.resnet_cifar(20).train()
    with pytest.warns(UserWarning, match="training mode, so BatchNorm layers were not folded"):
        trp.compile(model, ratio=0.25)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, trp.LowRankConv2d) for m in model.modules())


def test_bn_not_folded_when_conv_output_is_used_elsewhere():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    net = Net().eval()
    models.randomize_batchnorm(net)
    trp.compile(net, filter_fn=lambda m, q: False)
    assert isinstance(net.bn, nn.BatchNorm2d)


def test_untraceable_model_folds_only_inside_sequential():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.seq(x)
            if y.sum() > 0:  # data-dependent control flow: fx cannot trace this
                y = self.bn(self.conv(y))
            return y

    net = Net().eval()
    models.randomize_batchnorm(net)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = net(x)
    trp.compile(net, filter_fn=lambda m, q: False)
    assert isinstance(net.seq[1], nn.Identity)
    assert isinstance(net.bn, nn.BatchNorm2d)  # not provably fed by self.conv alone
    with torch.no_grad():
        assert rel_err(net(x), expected) <= 1e-5


def test_not_factored_twice_and_backend_updated():
    model = planted("resnet20", "channel")
    trp.compile(model, energy=0.99999, rank_multiple=1)
    before = {n: (id(m), m.rank) for n, m in model.named_modules() if isinstance(m, trp.LowRankConv2d)}
    trp.compile(model, rank=1, backend="torch")
    after = {n: (id(m), m.rank) for n, m in model.named_modules() if isinstance(m, trp.LowRankConv2d)}
    assert before == after
    assert all(m.backend == "torch" for m in model.modules() if isinstance(m, trp.LowRankConv2d))


def test_overrides():
    model = planted("resnet20", "channel")
    compiled = trp.compile(model, energy=0.99999, rank_multiple=1, inplace=False, overrides={
        r"layer1\..*": None,
        r"layer2\.0\.conv1": 3,
        r"layer2\.0\.conv2": {"ratio": 0.25, "scheme": "spatial"},
        r"layer3\..*": 0.5,
    })
    assert not any(isinstance(m, trp.LowRankConv2d) for m in compiled.layer1.modules())
    assert "kept dense by override" in getattr(compiled.layer1[0].conv1, NOTE_ATTR)
    assert compiled.layer2[0].conv1.rank == 3
    c = compiled.layer2[0].conv2
    assert c.scheme == "spatial" and c.rank == c.full_rank // 4
    assert compiled.layer2[1].conv1.rank == 8  # default: planted rank
    assert all(m.rank < m.full_rank // 4 for m in compiled.layer3.modules() if isinstance(m, trp.LowRankConv2d))


def test_filter_fn_can_admit_linear_and_the_stem():
    model = models.vgg().eval()
    base = trp.default_filter(model)
    assert base.stem == "features.0"
    compiled = trp.compile(model, rank=4, inplace=False,
                           filter_fn=lambda m, q: isinstance(m, nn.Linear) or base(m, q))
    assert isinstance(compiled.classifier[0], trp.LowRankLinear)
    assert isinstance(compiled.features[0], nn.Conv2d)
    everything = trp.compile(model, rank=4, inplace=False, filter_fn=lambda m, q: True)
    assert isinstance(everything.features[0], trp.LowRankConv2d)
    excluded = trp.compile(model, rank=4, inplace=False, filter_fn=lambda m, q: "features.4" != q)
    assert getattr(excluded.features[4], NOTE_ATTR) == "excluded by filter_fn"


def test_shared_layer_is_swapped_everywhere():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3, padding=1)
            self.a = nn.Conv2d(32, 32, 3, padding=1)
            self.b = self.a

        def forward(self, x):
            return self.b(self.a(self.stem(x)))

    net = trp.compile(Net(), rank=4)
    assert isinstance(net.a, trp.LowRankConv2d) and net.a is net.b


def test_explicit_backends():
    model = models.resnet_cifar(20).eval()
    compiled = trp.compile(model, ratio=0.25, backend="torch", inplace=False)
    assert {m.resolved_backend() for m in compiled.modules() if isinstance(m, trp.LowRankConv2d)} == {"torch"}
    with pytest.raises(trp.BackendError, match="backend 'cpp' cannot run torch.float64"):
        trp.compile(model.double(), ratio=0.25, backend="cpp", inplace=False)
    assert not any(isinstance(m, trp.LowRankConv2d) for m in model.modules())  # nothing touched


def test_nothing_changes_when_a_layer_cannot_be_factored():
    model = planted("resnet20", "channel")
    with torch.no_grad():
        model.layer3[2].conv2.weight[0, 0, 0, 0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="weight of 'layer3.2.conv2' has non-finite values"):
        trp.compile(model)
    assert all(torch.equal(before[k], v, ) or torch.isnan(v).any() for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, trp.LowRankConv2d) for m in model.modules())


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(energy=1.5), ValueError, r"energy must be a number in \(0, 1\]"),
    (dict(rank=0), ValueError, "rank must be an int >= 1"),
    (dict(ratio=2.0), ValueError, "ratio must be"),
    (dict(energy=0.9, ratio=0.5), ValueError, "at most one of energy, rank, ratio"),
    (dict(rank_multiple=0), ValueError, "rank_multiple must be an int >= 1"),
    (dict(scheme="tensor-train"), ValueError, "scheme must be one of"),
    (dict(backend="cudnn"), ValueError, "backend must be one of"),
    (dict(filter_fn="all"), TypeError, "filter_fn must be callable"),
    (dict(fold_bn="yes"), TypeError, "fold_bn must be a bool"),
    (dict(overrides=[("a", 1)]), TypeError, "overrides must be a dict"),
    (dict(overrides={"layer1.*": "high"}), ValueError, r"overrides\['layer1.\*'\] must be an int rank"),
    (dict(overrides={"layer1.*": {"rnk": 2}}), ValueError, "unknown keys"),
    (dict(overrides={"layer1.*": {"energy": 2.0}}), ValueError, r"overrides\['layer1.\*'\]: energy"),
    (dict(overrides={"(": 2}), ValueError, "not a valid regex"),
    (dict(overrides={"lyer1.*": 2}), ValueError, "matches no conv or linear layer"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        trp.compile(models.resnet_cifar(20).eval(), **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        trp.compile(lambda x: x)


# --- torch.compile / torch.export over a compiled model --------------------------------

def _compiled_resnet(backend):
    model = planted("resnet20", "channel")
    return trp.compile(model, energy=0.99999, rank_multiple=1, backend=backend)


def _backends_here():
    return [b for b in ("cpp", "torch") if not ops.refusals(b, "cpu", torch.float32)]


@pytest.mark.parametrize("backend", _backends_here())
def test_dynamo_sees_no_graph_break(backend):
    model = _compiled_resnet(backend)
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    ops_in_graph = {str(n.target) for g in explanation.graphs for n in g.graph.nodes}
    if backend == "cpp":
        assert any("trp.conv_chain" in t for t in ops_in_graph), ops_in_graph


@pytest.mark.parametrize("backend", _backends_here())
def test_torch_compile_fullgraph_matches_eager(backend):
    model = _compiled_resnet(backend)
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x)
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert rel_err(out, eager) < 1e-6
    # training through the compiled graph: the op's autograd formula is traced too
    torch._dynamo.reset()
    model.train()
    loss = torch.compile(model, fullgraph=True, backend="aot_eager")(x).square().mean()
    loss.backward()
    assert model.layer2[0].conv1.weight1.grad is not None


@pytest.mark.parametrize("backend", _backends_here())
def test_torch_compile_inductor(backend):
    model = _compiled_resnet(backend)
    x = torch.randn(1, 3, 32, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True)(x)
        assert rel_err(out, model(x)) < 1e-4


def test_torch_export_keeps_the_op():
    if "cpp" not in _backends_here():
        pytest.skip("cpp backend not available here")
    model = _compiled_resnet("cpp")
    x = torch.randn(1, 3, 32, 32)
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes}
    assert any("trp.conv_chain" in t for t in targets)
    with torch.no_grad():
        assert rel_err(ep.module()(x), model(x)) < 1e-6


# --- the Triton backend (interpreted on CPU; native where CUDA is present) ----------------

def _triton_resnet():
    """A small CIFAR ResNet with fused epilogues, so the interpreter gets through it quickly."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = models.resnet_cifar(8, width=8).eval()
    models.randomize_batchnorm(model, torch.Generator().manual_seed(0))
    model = model.to(device)
    kw = dict(ratio=0.5, rank_multiple=1, inplace=False)
    return trp.compile(model, backend="triton", **kw), trp.compile(model, backend="torch", **kw), \
        torch.randn(2, 3, 8, 8, device=device)


@pytest.mark.skipif(bool(ops.refusals("triton", "cuda" if torch.cuda.is_available() else "cpu", torch.float32)),
                    reason="the triton backend cannot run here")
def test_triton_backend_under_torch_compile_and_export():
    model, reference_model, x = _triton_resnet()
    fused = [m for m in model.modules() if isinstance(m, trp.LowRankConv2d)]
    assert len(fused) == 6 and all(m.relu for m in fused)      # epilogues fused, so exercised
    with torch.no_grad():
        eager = model(x)
        assert rel_err(eager, reference_model(x)) < 1e-5
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        targets = {str(n.target) for g in explanation.graphs for n in g.graph.nodes}
        assert any("trp.triton_conv_channel" in t for t in targets), targets
        for backend in ("aot_eager", "inductor"):
            torch._dynamo.reset()
            assert rel_err(torch.compile(model, fullgraph=True, backend=backend)(x), eager) < 1e-5, backend
        ep = torch.export.export(model, (x,))
        assert any("trp.triton_conv_channel" in str(n.target) for n in ep.graph.nodes)
        assert rel_err(ep.module()(x), eager) < 1e-6
    # training through the compiled graph: the same gradients as the torch backend
    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend="aot_eager")(x).square().mean().backward()
    reference_model(x).square().mean().backward()
    grads = dict(reference_model.named_parameters())
    for name, p in model.named_parameters():
        assert rel_err(p.grad, grads[name].grad) < 1e-4, name
