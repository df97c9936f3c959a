"""trp.program: a compiled model's stretches of C++-run layers in one C++ call each.

The program's output against the same model run layer by layer (``program.disabled()``),
for ResNet-style models with and without a max pool, the checks that send a call back to
the per-module forward (gradients, replaced or moved parameters, hooks, flags, another
input shape or dtype, tracing), in-place weight updates seen, copies and pickles, two
threads at once; and the C++ steps (max pool, global average pool, add/ReLU) against
PyTorch for every instruction-set build, with the binding's checks.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
from torch import nn

import trp
from trp import models, program
from trp_kernels import cpp

pytestmark = pytest.mark.skipif(not cpp.has_fused_kernels(),
                                reason=f"fused C++ kernels not built ({cpp.unavailable_reason()})")


def _cifar(depth=8):
    return trp.compile(models.resnet_cifar(depth).eval(), rank=4, rank_multiple=1)


def _imagenet_style():
    """A small torchvision-style ResNet (7x7 stem, ReLU, 3x3 max pool, bottlenecks)."""
    m = models.resnet50(num_classes=10, width=8)
    models.randomize_batchnorm(m.eval(), torch.Generator().manual_seed(1))
    return trp.compile(m, ratio=0.5, rank_multiple=1, scheme=("tucker", "pointwise"))


def _per_module(model, x):
    with program.disabled():
        return model(x)


def _run(model, x):
    with torch.inference_mode():
        return model(x)


@pytest.mark.parametrize("build, shape", [(_cifar, (2, 3, 16, 16)), (_imagenet_style, (1, 3, 64, 64))])
def test_program_matches_the_per_module_forward(build, shape):
    model = build()
    runner = program.runner(model)
    assert runner is not None
    x = torch.randn(shape)
    with torch.inference_mode():
        first = model(x)       # builds the program (the per-module forward, recorded)
        second = model(x)      # runs it
        want = _per_module(model, x)
    assert runner.refused == {} and runner.calls == 1
    prog = runner.programs[x.shape]
    assert sum(s.program.steps for s in prog.segments) >= 6
    assert torch.equal(first, want)
    assert (second - want).abs().max() <= 1e-5 * want.abs().max()
    assert second.is_contiguous()  # the model's exit conversion still applies


def test_max_pool_and_relu_are_steps(monkeypatch):
    monkeypatch.setattr(program, "DENSE_MARGIN", 0.0)     # no dense conv joins (whether one would is timed)
    monkeypatch.setattr(program, "RESIDUAL_MARGIN", 0.0)
    model = _imagenet_style()
    x = torch.randn(1, 3, 64, 64)
    _run(model, x)
    prog = program.runner(model).programs[x.shape]
    code = prog.module.code
    assert "maxpool" not in code and "avgpool" not in code  # inside the segments
    assert "self.conv1(" in code                              # the stem stays PyTorch's


def test_grad_mode_and_other_inputs_take_the_per_module_forward():
    model = _cifar()
    x = torch.randn(2, 3, 16, 16)
    runner = program.runner(model)
    _run(model, x)
    _run(model, x)
    assert runner.calls == 1
    y = model(x)                                    # grad enabled: the per-module forward
    assert runner.calls == 1 and y.requires_grad
    with torch.inference_mode():
        model(x.double().float().to(torch.float64).float())  # a float32 copy: the program
        assert runner.calls == 2
        model(torch.randn(1, 3, 16, 16))                     # a new shape: built
        assert set(runner.programs) == {x.shape, torch.Size((1, 3, 16, 16))}
        with program.disabled():
            model(x)
        assert runner.calls == 2


def test_in_place_weight_updates_are_seen():
    model = _cifar()
    x = torch.randn(2, 3, 16, 16)
    _run(model, x)
    layer = model.layer1[0].conv1
    with torch.no_grad():
        layer.weight1.mul_(1.5)
        layer.bias.add_(0.25)
    got = _run(model, x)
    assert program.runner(model).calls == 1
    want = _per_module(model, x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("change", ["replace", "data", "relu", "backend", "hook", "block_hook", "train"])
def test_changes_after_build_fall_back(change):
    model = _cifar()
    x = torch.randn(2, 3, 16, 16)
    runner = program.runner(model)
    _run(model, x)
    layer = model.layer1[0].conv1
    fired = []
    if change == "replace":
        layer.weight1 = nn.Parameter(layer.weight1.detach().clone() * 2)
    elif change == "data":
        layer.weight2.data = layer.weight2.data.clone() * 2
    elif change == "relu":
        layer.relu = not layer.relu
    elif change == "backend":
        layer.backend = "torch"
    elif change == "hook":
        layer.register_forward_hook(lambda *a: fired.append(1))
    elif change == "block_hook":
        model.layer1[0].register_forward_hook(lambda *a: fired.append(1))
    elif change == "train":
        model.layer1[0].train()
    got = _run(model, x)
    want = _per_module(model, x)
    assert runner.calls == 0
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    if change in ("hook", "block_hook"):
        assert fired == [1, 1]  # once per call, the program's call included


def test_first_call_runs_the_model_once():
    model = _imagenet_style()
    calls = []
    model.conv1.register_forward_hook(lambda *a: calls.append(1))   # the stem: outside the segments
    _run(model, torch.randn(1, 3, 64, 64))
    assert calls == [1]


def test_copies_and_pickles_start_without_programs():
    model = _cifar()
    x = torch.randn(2, 3, 16, 16)
    want = _run(model, x)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        runner = program.runner(other)
        assert runner is not None and runner is not program.runner(model) and runner.model is other
        assert runner.programs == {}
        _run(other, x)
        got = _run(other, x)
        assert runner.calls == 1
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_load_installs_the_runner(tmp_path):
    model = _cifar()
    path = tmp_path / "m.safetensors"
    trp.save(model, path)
    loaded = trp.load(path, models.resnet_cifar(8).eval())
    assert program.runner(loaded) is not None
    x = torch.randn(2, 3, 16, 16)
    _run(loaded, x)
    assert (_run(loaded, x) - _run(model, x)).abs().max() <= 1e-5


def test_torch_compile_and_export_trace_the_model():
    model = _cifar()
    x = torch.randn(2, 3, 16, 16)
    want = _run(model, x)
    ep = torch.export.export(model, (x,))
    assert (ep.module()(x) - want).abs().max() <= 1e-4
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False)
    assert buf.tell() > 0


def test_two_threads_at_once():
    model = _cifar()
    xs = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    wants = [_per_module(model, x) for x in xs]
    _run(model, xs[0])
    errors = []

    def work(k):
        with torch.inference_mode():
            for _ in range(30):
                got = model(xs[k])
                if not (got - wants[k]).abs().max() <= 1e-5 * wants[k].abs().max():
                    errors.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_model_without_lowrank_convs_has_no_runner():
    assert program.runner(trp.compile(nn.Sequential(nn.Conv2d(3, 4, 1)), rank=1)) is None


def test_install_checks_its_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module, got int"):
        program.install(3)
    with pytest.raises(TypeError, match="enabled must be True or False, got 1"):
        program.install(_cifar(), 1)
    model = _cifar()
    assert program.runner(program.install(model, False)) is None and "forward" not in model.__dict__


# ---- the C++ steps


ISAS = ("avx512", "avx2", "generic")  # the isa fixture (tests/conftest.py) takes each


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape, k, s, p, relu", [((2, 19, 9, 11), 3, 2, 1, True), ((1, 64, 8, 8), 3, 2, 1, False),
                                                   ((1, 35, 7, 6), 2, 1, 0, False), ((3, 16, 5, 5), (3, 1), (1, 2), (1, 0), True)])
def test_max_pool_step(isa, threads, shape, k, s, p, relu):
    lib = cpp._require()
    x = _cl(torch.randn(shape))
    x[0, 0, 0, 0] = float("nan")
    ref = torch.nn.functional.max_pool2d(torch.relu(x) if relu else x, k, s, p)
    n, c, h, w = shape
    out = _cl(torch.empty_like(ref))
    pair = nn.modules.utils._pair
    prog = lib.Program([x.numel(), ref.numel()], 1, 1)
    prog.add_max_pool(0, 1, n, h, w, c, ref.shape[2], ref.shape[3], *pair(k), *pair(s), *pair(p), relu)
    prog.run([x.data_ptr()], [out.data_ptr()], threads)
    assert torch.equal(out.isnan(), ref.isnan()) and ref.isnan().any()
    assert torch.equal(out.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("threads", [1, 2])
def test_average_pool_and_add_steps(isa, threads):
    lib = cpp._require()
    a, b = _cl(torch.randn(3, 37, 5, 4)), _cl(torch.randn(3, 37, 5, 4))
    gap = torch.empty(3, 37, 1, 1)
    added = _cl(torch.empty_like(a))
    # slots: a, b (inputs); gap, added (outputs); one buffer
    prog = lib.Program([a.numel(), b.numel(), gap.numel(), a.numel(), a.numel()], 2, 2)
    prog.add_add(0, 1, 4, a.numel(), True)        # buffer = relu(a + b)
    prog.add_add(4, -1, 3, a.numel(), False)      # added = buffer
    prog.add_global_avg_pool(4, 2, 3, 5, 4, 37)   # gap = mean(buffer)
    assert prog.steps == 3
    prog.run([a.data_ptr(), b.data_ptr()], [gap.data_ptr(), added.data_ptr()], threads)
    want = torch.relu(a + b)
    assert torch.equal(added, want)
    assert (gap - want.mean((2, 3), keepdim=True)).abs().max() <= 1e-6


def test_program_checks_its_steps():
    lib = cpp._require()
    with pytest.raises(ValueError, match="n_inputs and n_outputs"):
        lib.Program([4], 1, 1)
    prog = lib.Program([16, 16, 8], 1, 1)
    with pytest.raises(ValueError, match="x slot 3 does not exist"):
        prog.add_add(3, -1, 1, 4, False)
    with pytest.raises(ValueError, match="out slot 2 holds 8 floats, the step needs 16"):
        prog.add_add(0, -1, 2, 16, False)
    with pytest.raises(ValueError, match="one of the caller's inputs"):
        prog.add_add(1, -1, 0, 4, False)
    with pytest.raises(ValueError, match="padding must be within"):
        prog.add_max_pool(0, 1, 1, 4, 4, 1, 2, 2, 3, 3, 2, 2, 2, 2, False)
    with pytest.raises(ValueError, match="another slot"):
        prog.add_global_avg_pool(1, 1, 1, 4, 4, 1)
    prog.add_add(0, -1, 1, 16, True)
    with pytest.raises(ValueError, match="takes 1 input and 1 output pointers, got 0 and 1"):
        prog.run([], [1], 1)
    with pytest.raises(ValueError, match="slot 0 is a null pointer"):
        prog.run([0], [1], 1)


# ---- dense convs as steps


def _dense_layer1():
    """CIFAR ResNet-8 whose 16-channel layer stays dense (ratio 0.25 rounded up to 16: full rank)."""
    model = models.resnet_cifar(8).eval()
    models.randomize_batchnorm(model, torch.Generator().manual_seed(0))
    return trp.compile(model, ratio=0.25)


@pytest.mark.parametrize("margin", [1e9, 0.0])
def test_dense_convs_join_the_program_when_faster(monkeypatch, margin):
    monkeypatch.setattr(program, "DENSE_MARGIN", margin)  # always faster / never faster
    monkeypatch.setattr(program, "RESIDUAL_MARGIN", margin)
    monkeypatch.setattr(program, "FALLBACK_SLOWDOWN", 1e9)  # (the layout check is timed too: not under test here)
    model = _dense_layer1()
    conv = model.layer1[0].conv2
    assert type(conv) is nn.Conv2d
    x = torch.randn(2, 3, 16, 16)
    _run(model, x)
    got = _run(model, x)
    assert program.runner(model).calls == 1
    names = [n for s in program.runner(model).programs[x.shape].segments for n in s.step_names]
    if margin:
        # the dense convs are steps, their residual add and ReLU in the conv's epilogue
        assert "layer1.0.conv1" in names and "layer1.0.conv2" in names and "add" not in names
        assert cpp.in_kernel_layout(conv.weight) and not conv.weight.is_inference()
    else:
        assert "layer1.0.conv2" not in names and conv.weight.is_contiguous()
    want = _per_module(model, x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


class _Pointwise(nn.Module):
    """A low-rank 3x3 between a dense stem and a dense 1x1 conv (ResNet-50's pattern)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.mid = nn.Conv2d(24, 24, 3, padding=1)
        self.pw = nn.Conv2d(24, 40, 1)

    def forward(self, x):
        return self.pw(torch.relu(self.mid(torch.relu(self.stem(x)))))


@pytest.mark.parametrize("stride, limit", [(1, 256), (2, 256), (1, 142)])
def test_a_dense_1x1_joins_with_its_weight_as_it_is(monkeypatch, stride, limit):
    """A contiguous 1x1 conv with few output pixels (at most AS_IS_MAX_PIXELS) is read in
    PyTorch's own (out, in) layout, so it joins the program without being relaid, even where
    a relayout would be refused (the layout check set to refuse any); writes to it through
    .data are seen. With more pixels it is not offered so (and stays in PyTorch here)."""
    monkeypatch.setattr(program, "DENSE_MARGIN", 1e9)
    monkeypatch.setattr(program, "RESIDUAL_MARGIN", 1e9)
    monkeypatch.setattr(program, "FALLBACK_SLOWDOWN", 0.0)
    monkeypatch.setattr(program, "AS_IS_MAX_PIXELS", limit)
    torch.manual_seed(0)
    net = _Pointwise()
    net.pw.stride = (stride, stride)
    model = trp.compile(net.eval(), rank=4, rank_multiple=1)
    x = torch.randn(1, 3, 11, 13)  # 143 output pixels at stride 1, 42 at stride 2
    _run(model, x)
    names = [n for s in program.runner(model).programs[x.shape].segments for n in s.step_names]
    assert "stem" not in names  # the 3x3 stem would need its weight relaid
    if limit < 143 and stride == 1:
        assert "pw" not in names
        return
    assert "pw" in names
    assert model.pw.weight.is_contiguous() and not cpp.in_kernel_layout(model.pw.weight)
    model.pw.weight.data.mul_(-1.5)
    got = _run(model, x)
    assert program.runner(model).calls == 1
    want = _per_module(model, x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_dense_step_sees_writes_to_its_weight(monkeypatch):
    monkeypatch.setattr(program, "DENSE_MARGIN", 1e9)
    monkeypatch.setattr(program, "FALLBACK_SLOWDOWN", 1e9)
    model = _dense_layer1()
    x = torch.randn(2, 3, 16, 16)
    _run(model, x)
    conv = model.layer1[0].conv1
    conv.weight.data.mul_(-1.5)          # through .data: no version counter sees it
    got = _run(model, x)
    assert program.runner(model).calls == 1
    want = _per_module(model, x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    y = model(x)                          # grad mode: the per-module forward, and backward through the relaid weight
    y.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.shape == conv.weight.shape


def test_a_dense_conv_called_twice_stays_in_pytorch(monkeypatch):
    monkeypatch.setattr(program, "DENSE_MARGIN", 1e9)
    monkeypatch.setattr(program, "FALLBACK_SLOWDOWN", 1e9)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.low = trp.LowRankConv2d(8, 8, 3, rank=2, padding=1)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(self.low(self.conv(x)))

    model = trp.compile(Twice().eval(), rank=2)
    x = torch.randn(1, 8, 8, 8)
    _run(model, x)
    got = _run(model, x)
    assert program.runner(model).calls == 1
    names = [n for s in program.runner(model).programs[x.shape].segments for n in s.step_names]
    assert names == ["low"] and model.conv.weight.is_contiguous()
    want = _per_module(model, x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_dense_conv_that_its_layout_would_slow_stays_in_pytorch(monkeypatch):
    monkeypatch.setattr(program, "DENSE_MARGIN", 1e9)        # trp's kernel "faster"
    monkeypatch.setattr(program, "RESIDUAL_MARGIN", 1e9)
    monkeypatch.setattr(program, "FALLBACK_SLOWDOWN", 0.0)   # but PyTorch "slower" with the new layout
    model = _dense_layer1()
    x = torch.randn(2, 3, 16, 16)
    _run(model, x)
    names = [n for s in program.runner(model).programs[x.shape].segments for n in s.step_names]
    assert "layer1.0.conv2" not in names and model.layer1[0].conv2.weight.is_contiguous()
