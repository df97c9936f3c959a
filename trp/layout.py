"""The memory layout a compiled model computes in: channels_last from entry to exit.

The fused kernels (C++ on CPU, Triton on CUDA) read and write channels_last (NHWC), and so
do most of PyTorch's fast CPU paths: in ``benches/results/cpu-models.json`` (2-core Intel
Xeon) the low-rank ResNet-18 run as plain PyTorch takes 15.02 ms at batch 1 in NCHW and
11.36 ms in channels_last (its 7×7 stem conv and max-pool are the slowest in NCHW;
PyTorch's 1×1 convs are sometimes slower in channels_last at batch 1, so ResNet-50 gains
less). So a model
compiled for a fused backend converts its 4-D inputs to channels_last once, on entry (every
layer after keeps the layout), and its 4-D outputs back to the standard contiguous (NCHW)
format on exit: callers see the same shapes, values and strides as before.

Both conversions are stateless module hooks (``torch.compile`` and ``torch.export`` trace
them like any other op): the entry one on the module that takes the model's input, the
exit one on the model; :func:`set_channels_last` installs or removes them,
:func:`is_channels_last` reports them, and ``trp.save`` / ``trp.load`` carry the setting.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx
from torch import nn

def _to_channels_last(t):
    if isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point():
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _to_contiguous(t):
    if isinstance(t, torch.Tensor) and t.dim() == 4:
        return t.contiguous()
    if isinstance(t, tuple) and not hasattr(t, "_fields"):
        return tuple(_to_contiguous(e) for e in t)
    if isinstance(t, list):
        return [_to_contiguous(e) for e in t]
    if isinstance(t, dict):
        return {k: _to_contiguous(v) for k, v in t.items()}
    return t


def _entry(module: nn.Module, args: tuple, kwargs: dict):
    return tuple(_to_channels_last(a) for a in args), {k: _to_channels_last(v) for k, v in kwargs.items()}


def _exit(module: nn.Module, args: tuple, output):
    return _to_contiguous(output)


def entry_module(model: nn.Module, graph: Optional[torch.fx.Graph] = None) -> Optional[str]:
    """The fqn of the module that alone takes the model's one input (ResNet's stem conv), or
    None when there is no such module or the model does not trace.

    The entry conversion hooks that module rather than the model: ``torch.compile`` inlines
    a submodule's hooks into the model's graph, whereas the root module's own hooks would
    be compiled as a graph of their own.
    """
    if graph is None:
        from trp.compile import trace  # trp.compile imports this module

        graph = trace(model)
    if graph is None:
        return None
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1 or len(inputs[0].users) != 1:
        return None
    (user,) = inputs[0].users
    if user.op != "call_module" or user.args[:1] != (inputs[0],):
        return None
    return user.target


def _remove(model: nn.Module) -> None:
    for m in model.modules():
        for hook_id, fn in list(m._forward_pre_hooks.items()):
            if fn is _entry:
                del m._forward_pre_hooks[hook_id]
                m._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    for hook_id, fn in list(model._forward_hooks.items()):
        if fn is _exit:
            del model._forward_hooks[hook_id]
    if _reapply in getattr(model, "_deepcopy_hooks", ()):
        model._unregister_deepcopy_hook(_reapply)


def _reapply(copied: nn.Module) -> None:
    # A GraphModule's deepcopy rebuilds the module and keeps only a few kinds of hooks: the
    # conversions are installed again on the copy.
    set_channels_last(copied, True)


def is_channels_last(model: nn.Module) -> bool:
    """Whether ``model`` computes in channels_last from entry to exit (see the module doc)."""
    return any(fn is _exit for fn in model._forward_hooks.values())


def set_channels_last(model: nn.Module, enabled: bool = True, graph: Optional[torch.fx.Graph] = None) -> nn.Module:
    """Make ``model`` compute in channels_last from entry to exit (``enabled``), or undo it.

    Entry: every 4-D floating-point tensor argument of the module that takes the model's
    input (:func:`entry_module`; the model itself when there is none) is made
    channels_last-contiguous (a no-op when it already is). Exit: every 4-D tensor in the
    model's output (a tensor, or a tuple, list or dict of them) is made contiguous in the
    standard format, so the model's callers see NCHW as before. ``graph``: the model's fx
    graph when the caller has traced it. Idempotent; returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    _remove(model)
    if enabled:
        entry = entry_module(model, graph)
        target = model.get_submodule(entry) if entry else model
        target.register_forward_pre_hook(_entry, with_kwargs=True)
        model.register_forward_hook(_exit)
        if isinstance(model, torch.fx.GraphModule):
            model._register_deepcopy_hook(_reapply)
    return model
