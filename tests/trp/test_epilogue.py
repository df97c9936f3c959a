"""trp.compile's epilogue pass: which patterns fuse, which must not, and that fusing never
changes what the model computes (forward, gradients, save/load)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trp
from tests.helpers import rel_err
from trp import models
from trp.epilogue import EPILOGUE_ATTR


class TorchvisionBasicBlock(nn.Module):
    """torchvision's BasicBlock forward: a shared inplace ReLU, `out += identity`, and the
    shortcut computed after conv2."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class TorchvisionBottleneck(nn.Module):
    def __init__(self, c_in, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, planes * 4, 1, stride, bias=False),
                                        nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x)
        out += identity
        return self.relu(out)


def tv_net():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        TorchvisionBasicBlock(8, 8), TorchvisionBasicBlock(8, 16, stride=2),
                        TorchvisionBottleneck(16, 8), TorchvisionBottleneck(32, 8, stride=2))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def epilogues(model):
    return {fqn: getattr(m, EPILOGUE_ATTR) for fqn, m in model.named_modules() if getattr(m, EPILOGUE_ATTR, None)}


def compile_both(model, **kw):
    kw.setdefault("rank_multiple", 1)
    fused = trp.compile(model, inplace=False, **kw)
    plain = trp.compile(model, inplace=False, fuse_epilogue=False, **kw)
    return fused, plain


def test_torchvision_style_blocks_fuse_and_compute_the_same():
    model = tv_net()
    x = torch.randn(2, 3, 16, 16)
    fused, plain = compile_both(model, ratio=0.5)
    assert epilogues(fused) == {
        "3.conv1": "relu", "3.conv2": "residual+relu", "4.conv1": "relu", "4.conv2": "residual+relu",
        "5.conv2": "relu", "6.conv2": "relu"}   # bottleneck: conv3 (1x1) stays dense, so no residual
    assert epilogues(plain) == {}
    with torch.no_grad():
        assert rel_err(fused(x), plain(x)) < 1e-6
    assert type(fused[3]).__name__ == "TorchvisionBasicBlock"       # a GraphModule named like the block
    assert set(fused.state_dict()) == set(plain.state_dict())


def test_cifar_resnet_every_block_fused():
    model = models.resnet_cifar(20).eval()
    models.randomize_batchnorm(model, torch.Generator().manual_seed(0))
    fused, plain = compile_both(model, ratio=0.5)
    found = epilogues(fused)
    assert len(found) == 18  # 9 blocks, the stem stays dense
    assert all(found[f"layer{s}.{b}.conv1"] == "relu" and found[f"layer{s}.{b}.conv2"] == "residual+relu"
               for s in (1, 2, 3) for b in range(3))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(fused(x), plain(x)) < 1e-6
    text = str(trp.summary(fused, x))
    assert text.count("epilogue: residual+relu") == 9 and text.count("epilogue: relu") == 9


def test_sequential_stays_sequential():
    model = models.vgg().eval()
    fused, plain = compile_both(model, rank=8)
    assert type(fused.features) is nn.Sequential
    relus = [i for i, m in enumerate(plain.features) if isinstance(m, nn.ReLU)]
    lowrank = [i for i, m in enumerate(fused.features) if isinstance(m, trp.LowRankConv2d)]
    assert lowrank and all(m.relu for m in fused.features if isinstance(m, trp.LowRankConv2d))
    # each fused layer's ReLU slot (past its folded BN) is now an Identity
    assert sum(isinstance(fused.features[i], nn.Identity) for i in relus) == len(lowrank)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(fused(x), plain(x)) < 1e-6


class NotFusable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.d = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        y = F.relu(y) + y                 # a's output used twice: no fusion
        z = self.b(y)
        z = z + torch.sigmoid(z)          # the residual depends on b itself
        w = torch.tanh(self.c(z))         # not a ReLU
        return F.relu(self.d(w) + 1.0)    # a scalar add is no residual


def test_patterns_that_must_not_fuse():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), NotFusable()).eval()
    fused, plain = compile_both(model, rank=2)
    assert epilogues(fused) == {}
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert rel_err(fused(x), plain(x)) < 1e-7


def test_unfolded_batchnorm_blocks_fusion():
    model = models.resnet_cifar(8).train()     # training mode: BNs are not folded
    with pytest.warns(UserWarning, match="training mode"):
        fused = trp.compile(model, ratio=0.5, rank_multiple=1, inplace=False)
    assert epilogues(fused) == {}


def test_gradients_match_unfused():
    model = tv_net()
    fused, plain = compile_both(model, ratio=0.5)
    x = torch.randn(2, 3, 16, 16)
    for m in (fused, plain):
        m(x).square().mean().backward()
    grads = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        assert rel_err(p.grad, grads[name].grad) < 1e-5, name


def test_save_load_restores_epilogues(tmp_path):
    model = tv_net()
    fused = trp.compile(model, ratio=0.5, rank_multiple=1, inplace=False)
    trp.save(fused, tmp_path / "m.safetensors")
    restored = trp.load(tmp_path / "m.safetensors", tv_net())
    assert epilogues(restored) == epilogues(fused)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(restored(x), fused(x))


def test_broadcasting_residual_is_added_outside_the_kernel():
    layer = trp.LowRankConv2d(4, 6, 3, rank=2, padding=1)
    layer.relu = True
    x, r = torch.randn(2, 4, 5, 5), torch.randn(6, 1, 1)
    ref = torch.relu(layer.to_dense()(x) + r)
    assert rel_err(layer(x, r), ref) < 1e-6

    with pytest.raises(ValueError, match=r"residual must have \(or broadcast to\) the output's shape \(2, 6, 5, 5\)"):
        layer(x, torch.randn(2, 3, 5, 5))
