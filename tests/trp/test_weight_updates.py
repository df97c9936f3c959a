"""A low-rank layer always computes with its parameters' current values, however they were
written: every optimizer in torch.optim (fused, foreach or neither), ``.data`` writes,
``copy_``, ``load_state_dict``, numpy views, a replaced ``.data``, device and layout
conversions. The fused C++ kernels read the factors in place (no packed copy to fall
behind), so these hold on every backend; the reference is the dense conv / linear that the
factors multiply out to, computed by PyTorch from the same parameters.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn as nn

import trp
from trp_kernels import cpp, ops

torch.manual_seed(0)


def _layers():
    conv = trp.LowRankConv2d.from_conv(nn.Conv2d(16, 32, 3, padding=1), rank=8)  # the layer
    odd = trp.LowRankConv2d.from_conv(nn.Conv2d(6, 21, 3, stride=2, padding=1), rank=5, scheme="spatial")
    linear = trp.LowRankLinear.from_linear(nn.Linear(24, 19), rank=7)
    return {"conv": (conv, torch.randn(2, 16, 8, 8)), "spatial": (odd, torch.randn(2, 6, 9, 7)),
            "linear": (linear, torch.randn(5, 24))}


def _contiguous(layer: nn.Module) -> nn.Module:
    kind = type(layer)
    cfg = {**layer.config(), "backend": "torch"}
    fresh = kind(**cfg)
    fresh.load_state_dict(layer.state_dict())
    assert all(p.is_contiguous() for p in fresh.parameters())
    fresh.backend = "auto"
    return fresh


def _mismatch(layer: nn.Module, x: torch.Tensor) -> float:
    """Relative difference between the layer's output and its dense form's, in eval."""
    was = layer.training
    layer.eval()
    with torch.no_grad():
        out = layer(x)
        again = layer(x)  # the second call runs what the first one kept
        want = layer.to_dense()(x)
    layer.train(was)
    assert torch.equal(out, again)
    return ((out - want).norm() / want.norm()).item()


def _optimizers():
    """(name, class, extra kwargs) for every optimizer torch.optim has, and each of its
    fused / foreach switches."""
    for name in sorted(dir(torch.optim)):
        cls = getattr(torch.optim, name)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or cls is torch.optim.Optimizer:
            continue
        params = inspect.signature(cls.__init__).parameters
        variants = [{}]
        if "foreach" in params:
            variants += [{"foreach": True}, {"foreach": False}]
        if "fused" in params:
            variants += [{"fused": True}]
        for kw in variants:
            yield pytest.param(cls, kw, id=name + "".join(f"-{k}" for k in kw))


def _make(cls, params, kw):
    lr = 1.0 if cls is torch.optim.Adadelta else 0.05
    params = list(params)
    if cls is torch.optim.SGD:
        kw = {**kw, "momentum": 0.9}
    if cls is torch.optim.LBFGS:
        kw = {**kw, "max_iter": 1}  # more inner iterations amplify rounding into the weights compared below
    if cls is torch.optim.Muon:
        params = [p for p in params if p.dim() == 2]  # Muon is for matrices: the bias stays put
    return cls(params, lr=lr, **kw)


@pytest.mark.parametrize("cls, kw", list(_optimizers()))
@pytest.mark.parametrize("which", ["conv", "spatial", "linear"])
def test_every_optimizer_updates_what_the_layer_computes(which, cls, kw):
    if cls is torch.optim.SparseAdam:
        pytest.skip("SparseAdam takes sparse gradients only; a factor's gradient is dense")
    layer, x = _layers()[which]
    if cls is torch.optim.Muon and layer.weight1.dim() != 2:
        pytest.skip("Muon takes 2-D parameters only")
    if cls is torch.optim.LBFGS:
        # LBFGS flattens gradients with .view(-1), which needs contiguous parameters (it
        # fails on a channels_last nn.Conv2d alike): a layer built for the torch backend
        # keeps them so, and set to auto afterwards still runs the fused kernel.
        layer = _contiguous(layer)
    plain = copy.deepcopy(layer)
    plain.backend = "torch"
    target = torch.randn_like(layer(x))
    opts = [_make(cls, m.parameters(), kw) for m in (layer, plain)]
    assert _mismatch(layer, x) < 1e-5
    for _ in range(3):
        for m, opt in zip((layer, plain), opts):
            def closure(m=m, opt=opt):
                opt.zero_grad()
                loss = (m(x) - target).square().mean()
                loss.backward()
                return loss

            opt.step(closure)
        assert _mismatch(layer, x) < 1e-5, f"{cls.__name__} {kw}: the layer computes with stale weights"
    # The kernels' layout of the factors must not confuse the optimizer's state (a fused
    # optimizer indexes parameter, gradient and state memory alike): the same steps on the
    # same layer run by the torch backend give the same weights.
    for a, b in zip(layer.parameters(), plain.parameters()):
        assert (a - b).abs().max() <= 1e-4 * (1 + b.abs().max()), f"{cls.__name__} {kw}"


def _writes(layer: nn.Module, donor: nn.Module):
    w1 = layer.weight1
    yield ".data in place", lambda: w1.data.mul_(-0.5)
    yield ".data copy_", lambda: w1.data.copy_(donor.weight1)
    yield "copy_ under no_grad", lambda: w1.copy_(donor.weight1 * 2)
    yield "load_state_dict", lambda: layer.load_state_dict(donor.state_dict())
    yield "numpy view", lambda: w1.detach().numpy().__setitem__(..., 0.125)
    yield "foreach lerp (EMA)", lambda: torch._foreach_lerp_([p.data for p in layer.parameters()],
                                                              [p.data for p in donor.parameters()], 0.5)
    yield "bias .data", lambda: layer.bias.data.add_(1.0)
    yield "weight2 .data", lambda: layer.weight2.data.neg_()
    yield "replaced .data", lambda: setattr(w1, "data", donor.weight1.detach().clone().contiguous())
    yield "vector_to_parameters", lambda: nn.utils.vector_to_parameters(
        torch.cat([p.detach().reshape(-1) for p in donor.parameters()]) * 3, layer.parameters())
    yield "replaced parameter", lambda: setattr(layer, "weight1", nn.Parameter(donor.weight1.detach() - 1))


@pytest.mark.parametrize("which", ["conv", "spatial", "linear"])
def test_every_kind_of_write_is_seen(which):
    layer, x = _layers()[which]
    donor, _ = _layers()[which]
    for how, write in _writes(layer, donor):
        assert _mismatch(layer, x) < 1e-5
        with torch.no_grad():
            write()
        assert _mismatch(layer, x) < 1e-5, f"after {how}, the layer computes with stale weights"


def test_factors_live_in_the_kernel_layout():
    """Built, converted, copied or loaded, a layer's factors stay where the C++ kernels read
    them in place; with the torch backend they keep PyTorch's layout."""
    if not ops.is_fused("cpp"):
        pytest.skip("the fused C++ kernels are not built")
    layer, x = _layers()["conv"]

    def laid(m):
        return all(cpp.in_kernel_layout(p) for p in (m.weight1, m.weight2))

    assert laid(layer)
    layer.weight1.grad = torch.randn(layer.weight1.shape)  # contiguous: it follows the factor's layout
    for convert in (lambda m: m.to(memory_format=torch.channels_last), lambda m: m.cpu().float(),
                    copy.deepcopy, lambda m: m.double().float()):
        layer = convert(layer)
        assert laid(layer)
        assert layer.weight1.grad is None or layer.weight1.grad.stride() == layer.weight1.stride()
        assert _mismatch(layer, x) < 1e-5
    torch_layer = trp.LowRankConv2d(16, 32, 3, rank=8, padding=1, backend="torch")
    assert torch_layer.weight1.is_contiguous()
    compiled = trp.compile(nn.Sequential(nn.Conv2d(3, 16, 3), torch_layer), backend="auto")
    assert laid(compiled[1])  # trp.compile lays a layer out for the backend it sets
