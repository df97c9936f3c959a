"""The interface every compression method implements, so that :func:`trp.fit` drives any of
them and :func:`trp.compile` takes what each decides (``plan()``).

A method is built on a model; its targets are the layers :func:`trp.compile` would factor
with the same ``scheme``/``filter_fn``/``overrides`` (one selection, :func:`trp.compile.select_targets`).
``fit`` calls the hooks around each training step::

    method.epoch_start(epoch)
    for x, y in loader:
        method.before_forward()
        loss = loss_fn(model(x), y)
        extra = method.loss()              # an extra loss term, or None
        (loss + extra).backward()
        method.after_backward()            # e.g. add a sub-gradient to a weight's .grad
        optimizer.step()
        method.after_step()                # e.g. put back weights a mask held out of the step
    method.epoch_end(epoch)

A post-training method does its work in ``prune(model, loader)`` instead (one shot).
``state_dict``/``load_state_dict`` hold everything an exact resume needs; under DDP one
rank decides anything computed from the weights and every rank receives the same bits
(:func:`decide_on_rank0`). After training, ``trp.compile(model, plan=method.plan())``
factors each target as the method chose. Write your own by subclassing :class:`Method`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from trp.compile import CompileConfig, select_targets
from trp.plan import Plan


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel (fqns are the inner ones)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def decide_on_rank0(compute: Callable[[], Sequence[torch.Tensor]], like: Sequence[torch.Tensor]) -> list:
    """The DDP rule: rank 0 runs ``compute()`` and every rank receives its tensors, bit for
    bit (``like``: tensors of the same shapes, dtypes and devices, the buffers the other
    ranks receive into). Without a process group it is just ``compute()``."""
    if not distributed():
        return list(compute())
    # contiguous on every rank: a broadcast sends memory in order, so a transposed result
    # (eigh's eigenvectors) would arrive transposed
    out = [t.contiguous() for t in compute()] if dist.get_rank() == 0 else \
        [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]
    for t in out:
        dist.broadcast(t, 0)
    return out


class Method:
    """Base class of the compression methods (:class:`trp.TRP`, and a user's own).

    Subclasses set ``name`` and implement :meth:`plan`; every hook is optional. The
    constructor picks the targets: ``self.targets`` maps each fqn to ``(module, layer plan,
    family)``, the layers ``trp.compile`` would factor with the same arguments.
    """

    name = "method"

    def __init__(self, model: nn.Module, *, energy: Optional[float] = None, rank=None, ratio: Optional[float] = None,
                 scheme="channel", filter_fn=None, overrides: Optional[dict] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        # rank_multiple=1: a method works at the ranks it is asked for; compile may round up.
        self.config = CompileConfig(energy=energy, rank=rank, ratio=ratio, overrides=overrides, scheme=scheme,
                                    rank_multiple=1, filter_fn=filter_fn)
        self.targets = self.find_targets(unwrap(model))
        if not self.targets:
            raise ValueError(f"{type(self).__name__} found no target layer (no layer passes the filter with "
                             f"scheme {self.config.scheme!r}); pass filter_fn to choose layers")

    def find_targets(self, model: nn.Module) -> dict:
        """``{fqn: (module, layer plan, family)}``: the layers ``trp.compile`` would factor
        with this method's arguments (a method may add others, e.g. layers factored before)."""
        return select_targets(model, self.config)

    # -- the training step's hooks (trp.fit calls them) ------------------------------
    def epoch_start(self, epoch: int) -> None:
        """Before the epoch's first step (``epoch`` counts from 0)."""

    def before_forward(self) -> None:
        """Before each forward pass."""

    def loss(self) -> Optional[torch.Tensor]:
        """An extra term added to the step's loss, or None."""
        return None

    def after_backward(self) -> None:
        """After ``loss.backward()``, before ``optimizer.step()``."""

    def after_step(self) -> None:
        """After ``optimizer.step()``."""

    def epoch_end(self, epoch: int) -> None:
        """After the epoch's last step."""

    def prune(self, model: nn.Module, loader) -> None:
        """A post-training method's one-shot step (a training method has none)."""

    def record(self) -> dict:
        """What the epoch's history records about the method (e.g. the ranks)."""
        return {}

    # -- resume ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything an exact resume needs (the base: the method's name and targets)."""
        return {"method": self.name, "targets": list(self.targets)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; a ValueError, before anything changes, when
        it is another method's or another model's."""
        if state.get("method", self.name) != self.name:
            raise ValueError(f"the state is {state.get('method')!r}'s, this method is {self.name!r}")
        if state.get("targets") != list(self.targets):
            raise ValueError(f"{self.name} state is for targets {state.get('targets')}, this method has "
                             f"{list(self.targets)}")

    # -- the hand-off to compile -----------------------------------------------------
    def plan(self) -> Plan:
        """Each target's family and ranks, for ``trp.compile(model, plan=...)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement plan()")
