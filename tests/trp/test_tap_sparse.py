"""TapSparseConv2d (SPP's pruned convs): the module against the dense conv with its pruned
taps zeroed on every backend, its gradients, and its way through trp: SPP.plan() into
trp.compile (BN folding, epilogue fusion), the summary, save/load, ONNX export, fine-tuning
and folding again, torch.compile."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trp
from trp import models
from trp.channels import CHANNELS_ATTR
from trp.modules import TapSparseConv2d
from trp.plan import Plan, TapChoice
from trp_kernels import cpp, ops, reference

BACKENDS = ["torch"] + (["cpp"] if cpp.has_fused_kernels() else [])


def _conv_and_keep(c=12, n=20, k=3, stride=1, padding=1, dilation=1, bias=True, kept=0.5, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, n, k, stride, padding, dilation, bias=bias)
    keep = torch.rand(c, k, k) < kept
    return conv, keep


def _expect(conv, keep, x, residual=None, relu=False):
    y = F.conv2d(x.double(), (conv.weight * keep).double(), None if conv.bias is None else conv.bias.double(),
                 conv.stride, conv.padding, conv.dilation)
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", [dict(), dict(stride=2), dict(padding=2, dilation=2), dict(k=5, padding=0),
                                      dict(bias=False)])
@pytest.mark.parametrize("kept", [0.0, 0.3, 1.0])
def test_tap_sparse_conv_is_the_conv_with_its_pruned_taps_zeroed(backend, geometry, kept):
    conv, keep = _conv_and_keep(kept=kept, **geometry)
    layer = TapSparseConv2d.from_conv(conv, keep, backend=backend)
    assert layer.n_kept == int(keep.sum()) and layer.n_taps == keep.numel()
    assert torch.equal(layer.keep_mask(), keep)
    assert torch.equal(layer.dense_weight(), conv.weight.detach() * keep)
    x = torch.randn(2, 12, 11, 9)
    want = _expect(conv, keep, x)
    residual = torch.randn(want.shape)
    with torch.no_grad():
        assert torch.allclose(layer(x).double(), want, atol=1e-5)
        layer.relu = True
        assert torch.allclose(layer(x, residual).double(), _expect(conv, keep, x, residual, True), atol=1e-5)
        assert torch.allclose(layer(x[0], residual[0]).double(), _expect(conv, keep, x[:1], residual[:1], True)[0],
                              atol=1e-5)  # unbatched
        row = residual[:, :, :1]  # a residual that only broadcasts: added outside the kernel
        assert torch.allclose(layer(x, row).double(), _expect(conv, keep, x, row, True), atol=1e-5)


def test_tap_sparse_conv_runs_the_fused_kernel_on_cpu():
    if not cpp.has_fused_kernels():
        pytest.skip("the C++ extension is not built")
    conv, keep = _conv_and_keep()
    layer = TapSparseConv2d.from_conv(conv, keep)
    assert layer.resolved_backend() == "cpp"
    calls = []
    real = cpp.bound_taps
    x = torch.randn(1, 12, 8, 8)
    try:
        cpp.bound_taps = lambda *a, **k: calls.append(1) or real(*a, **k)
        with torch.no_grad():
            out = layer(x)
            again = layer(x.contiguous(memory_format=torch.channels_last))
    finally:
        cpp.bound_taps = real
    assert calls == [1]  # the second call ran the plan the first one kept
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(again, out)
    with torch.no_grad():  # new kept columns (a load): the kept plan is dropped, the call checked anew
        state = layer.state_dict()
        state["kept"] = state["kept"][:-1].clone()
        state["taps"] = state["taps"][:-1].clone()
        smaller = TapSparseConv2d(12, 20, 3, layer.n_kept - 1, padding=1)
        smaller.load_state_dict(state)
        assert torch.allclose(smaller(x).double(), _expect(conv, smaller.keep_mask(), x), atol=1e-5)


def test_training_a_tap_sparse_conv_trains_the_kept_taps_only():
    conv, keep = _conv_and_keep()
    layer = TapSparseConv2d.from_conv(conv, keep)
    dense = nn.Conv2d(12, 20, 3, padding=1)
    with torch.no_grad():
        dense.weight.copy_(conv.weight * keep)
        dense.bias.copy_(conv.bias)
    x = torch.randn(2, 12, 7, 7, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    layer(x).square().sum().backward()
    dense(x2).square().sum().backward()
    taps, _ = reference.pack_taps(dense.weight.grad, keep)
    assert torch.allclose(layer.taps.grad, taps, atol=1e-4)  # the dense gradient at the kept taps
    assert torch.allclose(x.grad, x2.grad, atol=1e-4) and torch.allclose(layer.bias.grad, dense.bias.grad, atol=1e-4)
    torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1).step()
    assert not layer.dense_weight()[:, ~keep].any()  # the pruned taps have no parameter to move


def test_tap_sparse_conv_arguments():
    conv, keep = _conv_and_keep()
    with pytest.raises(ValueError, match=r"kept must be a bool mask of shape \(12, 3, 3\)"):
        TapSparseConv2d(12, 20, 3, torch.ones(12, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"kept must be a bool mask of shape \(12, 3, 3\) or an int in \[0, 108\]"):
        TapSparseConv2d(12, 20, 3, 109)
    with pytest.raises(ValueError, match=r"keep must be a bool mask of shape \(12, 3, 3\) \(in_channels, kh, kw\), "
                                         r"got torch.float32 \(12, 3, 3\)"):
        TapSparseConv2d.from_conv(conv, keep.float())
    with pytest.raises(ValueError, match="cannot make this conv tap-sparse: grouped conv"):
        TapSparseConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2))
    layer = TapSparseConv2d.from_conv(conv, keep)
    with pytest.raises(ValueError, match=r"input must be \(N, 12, H, W\)"):
        layer(torch.randn(1, 3, 8, 8))
    state = layer.state_dict()
    state["kept"] = state["kept"].flip(0)
    with pytest.raises(RuntimeError, match="kept must hold ascending column numbers in \\[0, 108\\)"):
        TapSparseConv2d(12, 20, 3, layer.n_kept).load_state_dict(state)
    # default keep: the columns that are not all zero
    with torch.no_grad():
        conv.weight.mul_(keep)
    assert torch.equal(TapSparseConv2d.from_conv(conv).keep_mask(), keep)


def _pruned_resnet(seed=0, fraction=0.5):
    """A ResNet-8 whose SPP targets have ``fraction`` of their taps pruned (at random), with
    non-trivial BN statistics, in eval mode, and the method."""
    torch.manual_seed(seed)
    model = models.resnet_cifar(8)
    method = trp.SPP(model, target=fraction)
    with torch.no_grad():
        for fqn in method.targets:
            method.pruned[fqn] = torch.rand(method.pruned[fqn].shape) < fraction
        method.epoch_end(0)  # zeroes the pruned columns
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    return model.eval(), method


def _kept(method, fqn, layer):
    """The taps SPP kept at ``fqn``, without the input channels compile removed (every tap pruned)."""
    keep = ~method.pruned[fqn].view(method.targets[fqn][0].weight.shape[1:])
    return keep[keep.flatten(1).any(1)] if layer.in_channels < keep.shape[0] else keep


def test_compile_an_spp_model_into_tap_sparse_convs(tmp_path):
    model, method = _pruned_resnet()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
    plan = method.plan()
    assert set(plan) == set(method.targets) and all(isinstance(c, TapChoice) for c in plan.values())
    assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()
    compiled = trp.compile(model, plan=plan, inplace=False)
    layers = {f: m for f, m in compiled.named_modules() if isinstance(m, TapSparseConv2d)}
    assert set(layers) == set(method.targets)
    for fqn, m in layers.items():
        assert torch.equal(m.keep_mask(), _kept(method, fqn, m))
    assert any(m.relu for m in layers.values())  # the epilogue pass fused their ReLUs / residual adds
    with torch.no_grad():
        got = compiled(x)
    assert torch.allclose(got, want, atol=1e-4)
    rows = {r["name"]: r for r in trp.summary(compiled, x).rows}
    for fqn, m in layers.items():
        r = rows[fqn]
        assert r["scheme"] == "taps" and (r["rank"], r["full_rank"]) == (m.n_kept, m.n_taps)
        built_in, built_out = getattr(m, CHANNELS_ATTR, (m.in_channels, m.out_channels))
        taps_built = built_in * m.kernel_size[0] * m.kernel_size[1]
        # at the kept taps' share (of the layer as built, before compile removed any channel)
        assert r["macs"] == pytest.approx(r["macs_dense"] * m.out_channels / built_out * m.n_kept / taps_built)
        assert "folded" in r["note"]

    path = tmp_path / "spp.safetensors"
    trp.save(compiled, path)
    fresh = models.resnet_cifar(8).eval()
    loaded = trp.load(path, fresh)
    with torch.no_grad():
        assert torch.equal(loaded(x), got)
    assert {f for f, m in loaded.named_modules() if isinstance(m, TapSparseConv2d)} == set(layers)


def test_a_tap_choice_that_does_not_fit_its_layer_is_refused():
    model, method = _pruned_resnet()
    fqn = next(iter(method.targets))
    with pytest.raises(ValueError, match=r"keep mask has shape \(2, 3, 3\); the layer's taps are"):
        trp.compile(model, plan=Plan({fqn: TapChoice(torch.ones(2, 3, 3, dtype=torch.bool))}))
    with pytest.raises(ValueError, match="makes a Linear tap-sparse"):
        trp.compile(model, plan=Plan({"fc": TapChoice(torch.ones(2, 3, 3, dtype=torch.bool))}))
    with pytest.raises(TypeError, match="keep must be a bool tensor"):
        TapChoice(torch.ones(3, 3))


def test_fine_tune_a_tap_sparse_model_then_fold_its_bns():
    model, method = _pruned_resnet()
    tunable = trp.compile(model, plan=method.plan(), fold_bn=False, inplace=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in tunable.modules())
    tunable.train()
    opt = torch.optim.SGD(tunable.parameters(), lr=0.01)
    x = torch.randn(8, 3, 16, 16)
    for _ in range(2):
        opt.zero_grad()
        tunable(x).square().mean().backward()
        opt.step()
    tunable.eval()
    with torch.no_grad():
        want = tunable(x)
    folded = trp.compile(tunable, filter_fn=lambda m, q: False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(x), want, atol=1e-4)
    for fqn, m in folded.named_modules():
        if isinstance(m, TapSparseConv2d):  # still without the pruned taps
            assert torch.equal(m.keep_mask(), _kept(method, fqn, m))


def test_tap_sparse_conv_under_torch_compile():
    conv, keep = _conv_and_keep()
    layer = TapSparseConv2d.from_conv(conv, keep).eval()
    x = torch.randn(1, 12, 8, 8)
    with torch.no_grad():
        want = layer(x)
        got = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    assert torch.allclose(got, want, atol=1e-5)


def test_tap_sparse_model_exports_to_onnx_exactly(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model, method = _pruned_resnet()
    compiled = trp.compile(model, plan=method.plan())
    report = trp.deploy(compiled, torch.randn(1, 3, 16, 16), tmp_path / "spp.onnx")
    assert report.checked_with.startswith("onnxruntime") and report.rel_err < 1e-5
    assert report.operators.get("Conv", 0) >= 1


def test_a_tap_sparse_model_runs_as_one_cpp_program():
    if not cpp.has_fused_kernels():
        pytest.skip("the C++ extension is not built")
    from trp import program

    model, method = _pruned_resnet(fraction=0.75)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        compiled = trp.compile(model, plan=method.plan())
        runner = program.runner(compiled)
        assert runner is not None
        got = [compiled(x) for _ in range(3)]
    assert not runner.refused and x.shape in runner.programs
    steps = {name for seg in runner.programs[x.shape].segments for name in seg.step_names}
    assert set(method.targets) <= steps  # every tap-sparse conv is a step of a C++ program
    for y in got:
        assert torch.allclose(y, want, atol=1e-4)


def _with_dead_channels(model, method, fqn, channels):
    """Prune every tap of input ``channels`` of SPP target ``fqn``."""
    m = method.targets[fqn][0]
    with torch.no_grad():
        pruned = method.pruned[fqn].view(m.weight.shape[1:])
        pruned[channels] = True
        method.epoch_end(0)


def test_input_channels_with_every_tap_pruned_are_removed_with_the_producers_outputs(tmp_path):
    model, method = _pruned_resnet(fraction=0.3)
    _with_dead_channels(model, method, "layer1.0.conv2", [1, 5])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
    compiled = trp.compile(model, plan=method.plan(), inplace=False)
    consumer, producer = compiled.layer1[0].conv2, compiled.layer1[0].conv1
    assert (consumer.in_channels, producer.out_channels) == (14, 14)  # 16 - 2, both sides
    assert consumer.n_kept == int((~method.pruned["layer1.0.conv2"]).sum())  # every kept tap is still there
    with torch.no_grad():
        got = compiled(x)
    assert torch.allclose(got, want, atol=1e-4)
    rows = {r["name"]: r for r in trp.summary(compiled, x).rows}
    assert "channels removed: in 16->14" in rows["layer1.0.conv2"]["note"]
    assert "channels removed: out 16->14" in rows["layer1.0.conv1"]["note"]
    assert rows["layer1.0.conv1"]["macs"] < rows["layer1.0.conv1"]["macs_dense"] * (1 - 0.3) * 15 / 16
    path = tmp_path / "cut.safetensors"
    trp.save(compiled, path)
    loaded = trp.load(path, models.resnet_cifar(8).eval())
    with torch.no_grad():
        assert torch.equal(loaded(x), got)
    assert loaded.layer1[0].conv1.out_channels == 14


def test_a_dense_producer_loses_the_channels_its_consumer_does_not_read(tmp_path):
    torch.manual_seed(0)

    def build():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
                             nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1, bias=False)).eval()

    model = build()
    method = trp.SPP(model, target=0.5)
    assert set(method.targets) == {"3", "5"}  # the stem (0) stays dense
    _with_dead_channels(model, method, "3", [0, 7])
    _with_dead_channels(model, method, "5", [2])
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        want = model(x)
    compiled = trp.compile(model, plan=method.plan(), inplace=False)
    assert type(compiled[0]) is nn.Conv2d and compiled[0].out_channels == 6  # the dense stem, thinner
    assert (compiled[3].in_channels, compiled[3].out_channels, compiled[5].in_channels) == (6, 5, 5)
    with torch.no_grad():
        got = compiled(x)
    assert torch.allclose(got, want, atol=1e-5)
    path = tmp_path / "dense.safetensors"
    trp.save(compiled, path)
    loaded = trp.load(path, build())
    with torch.no_grad():
        assert torch.equal(loaded(x), got)
    with pytest.raises(trp.io.TrpFileError, match=r"'0' is Conv2d \(3 -> 4 channels\), the file has a conv of 3 -> 8"):
        other = build()
        other[0] = nn.Conv2d(3, 4, 3, padding=1)
        trp.load(path, other)
