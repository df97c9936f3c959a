"""Small reference architectures for the demo, the tests and the benchmarks.

Written here (no torchvision dependency); the layouts follow the usual definitions:
torchvision-style ResNet-18/50 (BasicBlock/Bottleneck, 1×1 projection shortcuts), the
CIFAR ResNet-20/56 of He et al. (3 stages of 16/32/64 channels), a VGG with BatchNorm,
and a MobileNetV2 (inverted residuals with depthwise 3×3 convs).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, planes, 3, stride)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(*_conv_bn(c_in, planes, 1, stride)) \
            if stride != 1 or c_in != planes else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1, self.bn1 = _conv_bn(c_in, planes, 1)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3, stride)
        self.conv3, self.bn3 = _conv_bn(planes, out, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(*_conv_bn(c_in, out, 1, stride)) if stride != 1 or c_in != out else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """ResNet with an ImageNet stem (7×7/2 + max-pool) or a CIFAR stem (3×3/1)."""

    def __init__(self, block, layers: Sequence[int], widths: Sequence[int], num_classes: int = 1000,
                 in_channels: int = 3, cifar_stem: bool = False):
        super().__init__()
        w0 = widths[0]
        if cifar_stem:
            self.conv1, self.bn1 = _conv_bn(in_channels, w0, 3)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, w0, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(w0)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.relu = nn.ReLU(inplace=True)
        c, stages = w0, []
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(block(c, w, 2 if (j == 0 and i > 0) else 1))
                c = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages[:3]
        self.layer4 = stages[3] if len(stages) > 3 else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, width: int = 64) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], [width, 2 * width, 4 * width, 8 * width], num_classes)


def resnet50(num_classes: int = 1000, width: int = 64) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], [width, 2 * width, 4 * width, 8 * width], num_classes)


def resnet_cifar(depth: int = 20, num_classes: int = 10, width: int = 16, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-(6n+2): ResNet-20 (n=3), ResNet-56 (n=9)."""
    if (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, [n, n, n], [width, 2 * width, 4 * width], num_classes, in_channels, cifar_stem=True)


class VGG(nn.Module):
    def __init__(self, cfg: Sequence, num_classes: int = 10, in_channels: int = 3, hidden: int = 256):
        super().__init__()
        layers, c = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [*_conv_bn(c, v, 3), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg(cfg: Sequence = (32, "M", 64, "M", 128, 128, "M"), num_classes: int = 10, in_channels: int = 3,
        hidden: int = 256) -> VGG:
    return VGG(cfg, num_classes, in_channels, hidden)


def vgg16(num_classes: int = 1000) -> VGG:
    return VGG(VGG16_CFG, num_classes, hidden=4096)


class InvertedResidual(nn.Module):
    """MobileNetV2 block; ``fused`` makes it a Fused-MBConv (EfficientNetV2, MobileNet-EdgeTPU):
    one full 3×3 expansion conv instead of 1×1 expansion + depthwise 3×3."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int, fused: bool = False):
        super().__init__()
        hidden = c_in * expand
        if fused:
            layers = [*_conv_bn(c_in, hidden, 3, stride), nn.ReLU6(inplace=True)]
        else:
            layers = [*_conv_bn(c_in, hidden, 1), nn.ReLU6(inplace=True)] if expand != 1 else []
            layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True)]
        layers += _conv_bn(hidden, c_out, 1)
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2; ``settings`` rows are (expansion, channels, repeats, stride[, fused])."""

    def __init__(self, num_classes: int = 1000, settings=None, stem: int = 32, last: int = 1280,
                 in_channels: int = 3):
        super().__init__()
        settings = settings or [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                                (6, 160, 3, 2), (6, 320, 1, 1)]
        layers, c = [*_conv_bn(in_channels, stem, 3, 2), nn.ReLU6(inplace=True)], stem
        for t, ch, n, s, *fused in settings:
            for i in range(n):
                layers.append(InvertedResidual(c, ch, s if i == 0 else 1, t, bool(fused and fused[0])))
                c = ch
        layers += [*_conv_bn(c, last, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def mobilenet_v2_small(num_classes: int = 10, in_channels: int = 3) -> MobileNetV2:
    """A narrow, shallow MobileNetV2 for tests: one Fused-MBConv stage (full 3×3 convs),
    then depthwise stages."""
    return MobileNetV2(num_classes, [(2, 24, 2, 2, True), (4, 32, 2, 2), (4, 48, 1, 1)], stem=16,
                       last=128, in_channels=in_channels)


def set_conv_spectra(model: nn.Module, spectrum, scheme: str = "channel", skip=("stem",),
                     generator: torch.Generator | None = None) -> None:
    """Give every full k×k Conv2d of ``model`` (depthwise/grouped and 1×1 ones excluded, the
    stem too unless ``skip`` is empty) a synthetic weight whose ``scheme`` unfolding has
    singular values ``spectrum(full_rank)`` (a 1-D tensor, descending) and random singular
    vectors, scaled to the layer's original weight norm.

    For tests (an exact planted rank) and the demo (a decaying spectrum like a trained
    network's); real weights come from training.
    """
    from trp import families
    from trp.compile import find_stem

    family = families.get(scheme)
    modes = family.modes()
    if len(modes) != 1:
        raise ValueError(f"set_conv_spectra plants one spectrum, and scheme {scheme!r} has {len(modes)} rank "
                         "modes; use plant_ranks for it")
    mode = modes[0]
    stem = find_stem(model) if "stem" in skip else None
    for fqn, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or m.groups != 1 or m.kernel_size == (1, 1) or fqn == stem:
            continue
        shape = tuple(m.weight.shape)
        rows, cols = mode.unfold(torch.empty(shape, device="meta")).shape
        full = min(rows, cols)
        s = torch.as_tensor(spectrum(full), dtype=torch.float64)
        if s.shape != (full,):
            raise ValueError(f"spectrum({full}) must return {full} values, got shape {tuple(s.shape)}")
        u, _ = torch.linalg.qr(torch.randn(rows, full, dtype=torch.float64, generator=generator))
        v, _ = torch.linalg.qr(torch.randn(cols, full, dtype=torch.float64, generator=generator))
        w = mode.fold((u * s) @ v.T, shape)
        with torch.no_grad():
            norm = m.weight.norm()
            m.weight.copy_((w * (norm / w.norm().clamp_min(1e-30))).to(m.weight.dtype))


def plant_ranks(model: nn.Module, scheme="channel", ratio: float = 0.25, rank_multiple: int = 16,
                skip=("stem",)) -> dict:
    """Make the weight of every layer a family of ``scheme`` takes (a name or a sequence
    tried per layer, as in :func:`trp.compile`; the stem skipped unless ``skip`` is empty)
    exactly of the ranks ``ratio`` gives it in that family's form: the weight projected onto
    them (:meth:`trp.families.Family.project`, TRP's projection), so that factoring at that
    ratio is exact. Returns ``{name: ranks}`` of the layers planted.

    For tests and benchmarks (a planted rank that trp.compile must recover, an output that
    must match the dense model); real low-rank weights come from training.
    """
    from trp import families
    from trp.compile import find_stem
    from trp.decompose import RankSpec

    schemes = families.parse_scheme(scheme)
    stem = find_stem(model) if "stem" in skip else None
    spec = RankSpec(ratio=ratio, rank_multiple=rank_multiple)
    planted = {}
    for fqn, m in model.named_modules():
        plain = isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)
        family = families.family_for(m, schemes) if plain else None
        if family is None or fqn == stem or family.accepts(m) is not None:
            continue
        low, _, ranks = family.project(m.weight, spec, fqn)
        with torch.no_grad():
            m.weight.copy_(low)
        planted[fqn] = ranks
    return planted


def randomize_batchnorm(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, as a trained network has, so
    that BN folding is exercised (fresh BNs are the identity in eval mode)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=generator)
                    m.bias.normal_(0, 0.1, generator=generator)
