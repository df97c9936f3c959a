"""Channels that a tap-sparse conv no longer reads, removed (SPP, issue 18): an input channel
whose k×k taps are all pruned contributes nothing, so :func:`trp.compile` drops it from the
tap-sparse conv, and drops the matching output channel of the conv that produces it when
that conv feeds nothing else (through nothing but channel-wise, zero-preserving steps: a
folded BatchNorm's ``nn.Identity``, ReLU). The producer then computes fewer channels.

A layer that lost channels carries ``CHANNELS_ATTR``, the (in, out) channels it was built
with, which ``trp.summary`` reports and ``trp.save`` records, so that ``trp.load`` builds
the thinner layer on a freshly built model.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from trp.modules import TapSparseConv2d

CHANNELS_ATTR = "_trp_channels"  # (in_channels, out_channels) as the layer was before channels were removed
_RELU_FNS = (torch.relu, torch.relu_, F.relu)


def _channelwise(node: torch.fx.Node, modules: dict) -> bool:
    """Whether ``node`` maps each channel of its one input to the same channel, zero to zero."""
    if node.op == "call_module":
        return type(modules.get(node.target)) in (nn.Identity, nn.ReLU) and len(node.args) == 1 and not node.kwargs
    if node.op == "call_function":
        return node.target in _RELU_FNS and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _trp_attrs(old: nn.Module, new: nn.Module) -> None:
    for k, v in vars(old).items():
        if k.startswith("_trp_"):
            setattr(new, k, v)
    if getattr(old, CHANNELS_ATTR, None) is None:
        setattr(new, CHANNELS_ATTR, (old.in_channels, old.out_channels))


def conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int, bias: bool, device=None,
              dtype=None) -> nn.Conv2d:
    """A new ``nn.Conv2d`` with ``conv``'s geometry and these channels (what a thinner layer
    is built as, here and by ``trp.load``)."""
    return nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, bias=bias, padding_mode=conv.padding_mode, device=device, dtype=dtype)


def conv_without_outputs(conv: nn.Conv2d, live: torch.Tensor) -> nn.Conv2d:
    """``conv`` computing only its output channels ``live`` (bool (out,))."""
    p = conv.weight
    new = conv_like(conv, conv.in_channels, int(live.sum()), conv.bias is not None, p.device, p.dtype)
    with torch.no_grad():
        new.weight.copy_(conv.weight[live.to(p.device)])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[live.to(p.device)])
    new.train(conv.training)
    new.weight.requires_grad_(p.requires_grad)
    return new


def drop_dead_channels(model: nn.Module, graph: Optional[torch.fx.Graph]) -> None:
    """Remove, in place, the input channels no tap of a tap-sparse conv reads and the
    producing conv's matching output channels (see the module docstring). ``graph``: the
    model's fx graph with trp's layers as leaves (None: nothing is done)."""
    if graph is None:
        return
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    counts: dict[int, int] = {}
    for m in model.modules():
        counts[id(m)] = counts.get(id(m), 0) + 1

    def once(target) -> bool:
        return calls.get(target) == 1 and counts.get(id(modules[target])) == 1

    def replace(fqn: str, new: nn.Module) -> None:
        parent, _, attr = fqn.rpartition(".")
        setattr(modules[parent] if parent else model, attr, new)
        modules[fqn] = new
        counts[id(new)] = 1  # (it may be cut again, as the consumer or the producer of a later cut)

    for node in graph.nodes:
        consumer = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(consumer, TapSparseConv2d) or not once(node.target) or not node.args:
            continue
        live = consumer.keep_mask().flatten(1).any(1).cpu()
        if bool(live.all()) or not bool(live.any()):  # nothing to remove, or nothing left to compute with
            continue
        cur = node.args[0]
        while isinstance(cur, torch.fx.Node) and len(cur.users) == 1 and _channelwise(cur, modules):
            cur = cur.args[0]
        if not (isinstance(cur, torch.fx.Node) and cur.op == "call_module" and len(cur.users) == 1
                and once(cur.target)):
            continue
        producer = modules[cur.target]
        plain = type(producer) is nn.Conv2d and producer.groups == 1
        if not (plain or isinstance(producer, TapSparseConv2d)) or producer.out_channels != consumer.in_channels:
            continue
        if isinstance(producer, TapSparseConv2d) and (producer.relu or len(cur.args) != 1 or cur.kwargs):
            continue  # (an epilogue's residual has the full width)
        thin = conv_without_outputs(producer, live) if plain else producer.select_channels(outputs=live)
        _trp_attrs(producer, thin)
        new = consumer.select_channels(inputs=live)
        _trp_attrs(consumer, new)
        replace(cur.target, thin)
        replace(node.target, new)
