"""Fold what follows a low-rank layer into its kernel's epilogue: ``+ residual`` and ReLU.

After BN folding, a ResNet block ends in ``relu(conv(x) + shortcut)`` (the BN is an
``nn.Identity``); the fused kernels add the shortcut and apply the ReLU before they store,
saving a full read and write of the activation per op. This pass finds, in each module's
own forward (traced with torch.fx, its children as leaves), a low-rank layer whose output
flows, through folded-BN identities only, into

- an add with another tensor, then optionally a ReLU (residual [+ ReLU]);
- or a ReLU (ReLU alone);

with no other use of the intermediate values, and rewrites the module's forward so that
the layer is called with ``residual=`` and has ``relu=True``. A rewritten module becomes a
``torch.fx.GraphModule`` with the same class name, children, parameters and buffers (so
``state_dict`` keys do not change). Modules that cannot be traced are left alone. An
``nn.Sequential`` is not traced: a ReLU that follows a low-rank layer there is taken into
the layer and its slot becomes ``nn.Identity``, so the container stays a Sequential.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from trp.modules import LAYER_TYPES

EPILOGUE_ATTR = "_trp_epilogue"  # on a low-rank layer: "residual", "relu" or "residual+relu"

_ADDS = {operator.add, operator.iadd, torch.add}
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}


@dataclass
class Fusion:
    parent: str   # fqn of the module whose forward is rewritten ("" for the root)
    layer: str    # fqn of the low-rank layer
    residual: bool
    relu: bool

    @property
    def kind(self) -> str:
        return "+".join(k for k, on in (("residual", self.residual), ("relu", self.relu)) if on)


class _ChildrenAsLeaves(torch.fx.Tracer):
    """Traces one module's own forward: every child module is a leaf."""

    def __init__(self, root: Optional[nn.Module] = None):
        # (no root: a GraphModule being unpickled retraces with a subclass of its tracer
        # whose every module is a leaf)
        super().__init__()
        self._children = set() if root is None else {id(m) for m in root.children()}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self._children or super().is_leaf_module(m, qualname)


def _is_relu(node: torch.fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _add_operand(node: torch.fx.Node, value: torch.fx.Node) -> Optional[torch.fx.Node]:
    """If ``node`` is ``value + other`` (either order, no alpha) with ``other`` a tensor
    node, return ``other``."""
    is_add = (node.op == "call_function" and node.target in _ADDS) or \
        (node.op == "call_method" and node.target in ("add", "add_"))
    if not is_add or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    other = b if a is value else a if b is value else None
    return other if isinstance(other, torch.fx.Node) and other is not value else None


def _depends_on(node: torch.fx.Node, ancestor: torch.fx.Node) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is ancestor:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _only_user(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _rewrite(root: nn.Module, graph: torch.fx.Graph, prefix: str, once: set) -> list[Fusion]:
    modules = dict(root.named_children())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fusions = []
    for node in list(graph.nodes):
        layer = modules.get(node.target) if node.op == "call_module" else None
        if (not isinstance(layer, LAYER_TYPES) or layer.relu or calls[node.target] != 1
                or id(layer) not in once or len(node.args) != 1 or node.kwargs):
            continue
        chain, cur = [node], node
        while (user := _only_user(cur)) is not None and user.op == "call_module" \
                and type(modules.get(user.target)) is nn.Identity:
            chain.append(user)
            cur = user
        user = _only_user(cur)
        if user is None:
            continue
        residual = _add_operand(user, cur)
        if residual is not None and _depends_on(residual, node):
            residual = None
        if residual is not None:
            chain.append(user)
            cur = user
            relu_node = _only_user(cur)
            relu = relu_node is not None and _is_relu(relu_node, modules)
        else:
            relu_node, relu = user, _is_relu(user, modules)
            if not relu:
                continue
        if relu:
            chain.append(relu_node)
        end = chain[-1]
        with graph.inserting_before(end):
            fused = graph.call_module(node.target, (node.args[0],),
                                      {"residual": residual} if residual is not None else {})
        end.replace_all_uses_with(fused)
        for n in reversed(chain):
            graph.erase_node(n)
        layer.relu = relu
        fusion = Fusion(prefix, f"{prefix}.{node.target}" if prefix else node.target, residual is not None, relu)
        setattr(layer, EPILOGUE_ATTR, fusion.kind)
        fusions.append(fusion)
    return fusions


def _fuse_sequential(seq: nn.Sequential, prefix: str, once: set) -> list[Fusion]:
    """In an ``nn.Sequential`` (whose forward is known) a low-rank layer followed, past
    folded-BN identities, by an ``nn.ReLU`` takes the ReLU, whose slot becomes an
    ``nn.Identity``: the container keeps its type, indexing and state_dict."""
    names = list(seq._modules)
    fusions = []
    for i, name in enumerate(names):
        layer = seq._modules[name]
        if not isinstance(layer, LAYER_TYPES) or layer.relu or id(layer) not in once:
            continue
        j = i + 1
        while j < len(names) and type(seq._modules[names[j]]) is nn.Identity:
            j += 1
        if j < len(names) and type(seq._modules[names[j]]) is nn.ReLU:
            seq._modules[names[j]] = nn.Identity()
            layer.relu = True
            fusion = Fusion(prefix, f"{prefix}.{name}" if prefix else name, residual=False, relu=True)
            setattr(layer, EPILOGUE_ATTR, fusion.kind)
            fusions.append(fusion)
    return fusions


def _as_graph_module(root: nn.Module, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    gm = torch.fx.GraphModule(root, graph, class_name=type(root).__name__)
    # GraphModule keeps only what the graph uses; keep everything, so state_dict is unchanged.
    for name, child in root.named_children():
        if name not in gm._modules:
            gm.add_module(name, child)
    for name, p in root._parameters.items():
        if name not in gm._parameters:
            gm.register_parameter(name, p)
    for name, b in root._buffers.items():
        if name not in gm._buffers:
            gm.register_buffer(name, b, persistent=name not in root._non_persistent_buffers_set)
    gm.train(root.training)
    return gm


def fuse(model: nn.Module) -> tuple[nn.Module, list[Fusion]]:
    """Fold residual adds and ReLUs into the epilogue of the model's low-rank layers.

    Returns ``(model, fusions)``: the root is returned anew if its own forward was
    rewritten (it is then a GraphModule); rewritten submodules are swapped in place.
    """
    counts: dict[int, int] = {}
    for m in model.modules():
        counts[id(m)] = counts.get(id(m), 0) + 1
    once = {i for i, c in counts.items() if c == 1}  # a layer registered twice is left alone
    fusions, swaps = [], []
    for fqn, m in list(model.named_modules()):
        if isinstance(m, LAYER_TYPES) or not any(isinstance(c, LAYER_TYPES) for c in m.children()):
            continue
        if type(m) is nn.Sequential:
            fusions += _fuse_sequential(m, fqn, once)
            continue
        try:
            graph = _ChildrenAsLeaves(m).trace(m)
        except Exception:  # noqa: BLE001 - an untraceable forward keeps its unfused form
            continue
        found = _rewrite(m, graph, fqn, once)
        if found:
            graph.lint()
            fusions += found
            swaps.append((fqn, m, _as_graph_module(m, graph)))
    for fqn, _old, new in swaps:
        if not fqn:
            model = new
            continue
        parent, _, attr = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model, fusions
