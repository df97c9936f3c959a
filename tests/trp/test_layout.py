"""trp.compile's channels_last entry/exit conversion (trp/layout.py)."""

import copy

import pytest
import torch
import torch.nn as nn

import trp
from trp import layout, models
from trp_kernels import ops

CPP = pytest.mark.skipif(bool(ops.refusals("cpp", "cpu", torch.float32)) or not ops.is_fused("cpp"),
                         reason="the C++ extension with fused kernels is not built")


def resnet20(seed=0):
    torch.manual_seed(seed)
    model = models.resnet_cifar(20).eval()
    models.randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    return model


class Residual(nn.Module):
    """Input used twice (conv and shortcut) and a 4-D output: no single entry module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


def formats_seen(model, fqn):
    """Record whether each call's first argument at module ``fqn`` is channels_last."""
    seen = []
    model.get_submodule(fqn).register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                    and not args[0].is_contiguous()))
    return seen


@pytest.mark.parametrize("backend", ["auto", pytest.param("cpp", marks=CPP)])
def test_fused_backends_compute_in_channels_last(backend):
    model = resnet20()
    x = torch.randn(2, 3, 32, 32)
    plain = trp.compile(copy.deepcopy(model), ratio=0.5, backend=backend, channels_last=False)
    compiled = trp.compile(copy.deepcopy(model), ratio=0.5, backend=backend)
    assert layout.is_channels_last(compiled) and not layout.is_channels_last(plain)
    assert layout.entry_module(compiled) == "conv1"
    stem, inner = formats_seen(compiled, "conv1"), formats_seen(compiled, "layer2.0.conv1")
    with torch.no_grad():
        y, y_plain = compiled(x), plain(x)
    assert stem == [True] and inner == [True]
    torch.testing.assert_close(y, y_plain, rtol=1e-4, atol=1e-5)


def test_torch_backend_keeps_the_layout_unless_asked():
    model = resnet20()
    assert not layout.is_channels_last(trp.compile(copy.deepcopy(model), ratio=0.5, backend="torch"))
    assert layout.is_channels_last(trp.compile(copy.deepcopy(model), ratio=0.5, backend="torch", channels_last=True))


def test_no_lowrank_conv_no_conversion():
    model = resnet20()
    dense = trp.compile(copy.deepcopy(model), filter_fn=lambda m, q: False)  # fold BN only
    assert not layout.is_channels_last(dense)


def test_four_d_output_comes_back_nchw_and_entry_falls_back_to_the_model():
    model = Residual().eval()
    x = torch.randn(2, 8, 6, 6)
    compiled = trp.compile(copy.deepcopy(model), rank=2, filter_fn=lambda m, q: True, channels_last=True)
    plain = trp.compile(copy.deepcopy(model), rank=2, filter_fn=lambda m, q: True, channels_last=False)
    # The fused epilogue passes x to the conv twice (input and residual): one entry module.
    assert layout.entry_module(compiled) == "conv"
    with torch.no_grad():
        y = compiled(x)
        y_cl = compiled(x.contiguous(memory_format=torch.channels_last))
        y_plain = plain(x)
    assert y.is_contiguous() and y_cl.is_contiguous()
    torch.testing.assert_close(y, y_plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_cl, y)

    # Without the epilogue pass the input feeds the conv and the add: hooks on the model.
    unfused = trp.compile(copy.deepcopy(model), rank=2, filter_fn=lambda m, q: True, channels_last=True,
                          fuse_epilogue=False)
    assert layout.entry_module(unfused) is None
    seen = formats_seen(unfused, "conv")
    with torch.no_grad():
        assert unfused(x).is_contiguous()
    assert seen == [True]


def test_deepcopy_keeps_and_disable_removes():
    for model in (resnet20(), Residual().eval()):
        filt = None if isinstance(model, models.ResNet) else (lambda m, q: True)
        compiled = trp.compile(model, rank=2, filter_fn=filt, channels_last=True)
        copied = copy.deepcopy(compiled)
        assert layout.is_channels_last(copied)
        entry = layout.entry_module(copied) or ""
        hooks = copied.get_submodule(entry)._forward_pre_hooks.values()
        assert sum(fn is layout._entry for fn in hooks) == 1  # not doubled by the copy
        layout.set_channels_last(copied, False)
        assert not layout.is_channels_last(copied)
        assert not any(fn is layout._entry for m in copied.modules() for fn in m._forward_pre_hooks.values())
        layout.set_channels_last(copied, True)
        layout.set_channels_last(copied, True)  # idempotent
        assert sum(fn is layout._exit for fn in copied._forward_hooks.values()) == 1


def test_save_load_carries_the_layout(tmp_path):
    compiled = trp.compile(resnet20(), ratio=0.5, channels_last=True)
    trp.save(compiled, tmp_path / "m.safetensors")
    loaded = trp.load(tmp_path / "m.safetensors", models.resnet_cifar(20).eval())
    assert layout.is_channels_last(loaded)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), compiled(x))

    plain = trp.compile(resnet20(), ratio=0.5, channels_last=False)
    trp.save(plain, tmp_path / "p.safetensors")
    assert not layout.is_channels_last(trp.load(tmp_path / "p.safetensors", models.resnet_cifar(20).eval()))


def test_bad_arguments():
    with pytest.raises(TypeError, match="channels_last must be True, False or None"):
        trp.compile(resnet20(), ratio=0.5, channels_last="yes")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        layout.set_channels_last(lambda x: x)
    with pytest.raises(TypeError, match="enabled must be True or False"):
        layout.set_channels_last(resnet20(), enabled="yes")
