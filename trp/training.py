"""Trained Rank Pruning (Xu et al., IJCAI 2020; PAPERS.md section 1).

:class:`TRP` keeps a network low rank while it trains. In a plain loop it is two lines::

    for x, y in loader:
        trp.project()                 # 1. before the forward pass
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        trp.regularize()              # 2. after backward(), before optimizer.step()
        optimizer.step()

Every ``period`` iterations ``project()`` replaces each target weight by its truncated SVD
at ``energy`` (default 0.9; or a fixed ``rank`` or ``ratio`` of each layer's full rank) in the form of the family ``trp.compile`` will use (its unfolding; for
``tucker`` each channel mode's in turn), and ``regularize()`` adds the nuclear-norm
sub-gradient ``nuclear_weight · U_r V_rᵀ`` of that SVD (summed over the modes) to the
weight's gradient (every iteration with ``nuclear_every_step=True``). Targets are the layers
``trp.compile`` would factor with the same ``filter_fn``/``overrides``, so training and
compilation agree on what is low rank.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from trp import checkpoint, families, files
from trp.methods import Method, decide_on_rank0, distributed, unwrap
from trp.plan import LayerChoice, Plan

# Measured on ResNet-20, batch 128, 2 CPU cores: projecting all 18 target convs (and the
# sub-gradients) takes 18 ms against 506 ms for a training step (3.7%); every 2nd step
# keeps it under 2% (the reference code uses 1 by default and 5 in its script).
DEFAULT_PERIOD = 2


def _epoch_line(record: dict, epochs: int) -> str:
    """One epoch of fit's history, for people: 'epoch 3/30: train loss 0.7839, val accuracy
    51.25%, val loss 1.4599, lr 0.05, mean rank 11.2 over 18 layers'."""
    parts = [f"train loss {record['train_loss']:.4f}"]
    if "val_accuracy" in record:
        parts.append(f"val accuracy {record['val_accuracy']:.2f}%")
    parts += [f"{k.replace('_', ' ')} {v:.4f}" for k, v in record.items()
              if k.startswith("val_") and k != "val_accuracy" and isinstance(v, float)]
    parts.append(f"lr {record['lr']:.3g}")
    if record.get("ranks"):
        # a several-mode family's layer (tucker) counts with the mean of its ranks
        ranks = [r if isinstance(r, (int, float)) else sum(r) / len(r) for r in record["ranks"].values()]
        parts.append(f"mean rank {sum(ranks) / len(ranks):.1f} over {len(ranks)} layers")
    return f"epoch {record['epoch']}/{epochs}: " + ", ".join(parts)


class TRP(Method):
    """Trained Rank Pruning controller for any ``nn.Module`` and any optimizer (a
    :class:`trp.methods.Method`: ``trp.fit(..., method=TRP(model))`` calls :meth:`project`
    before each forward pass and :meth:`regularize` after each backward pass)."""

    name = "trp"

    def __init__(self, model: nn.Module, *, energy: Optional[float] = None, nuclear_weight: float = 3e-4,
                 period: int = DEFAULT_PERIOD, scheme: str = "channel", filter_fn=None,
                 overrides: Optional[dict] = None, nuclear_every_step: bool = False, rank=None,
                 ratio: Optional[float] = None):
        if isinstance(nuclear_weight, bool) or not isinstance(nuclear_weight, (int, float)) \
                or not math.isfinite(nuclear_weight) or nuclear_weight < 0:
            raise ValueError(f"nuclear_weight must be a number >= 0, got {nuclear_weight!r}")
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an int >= 1, got {period!r}")
        if not isinstance(nuclear_every_step, bool):
            raise TypeError(f"nuclear_every_step must be a bool, got {nuclear_every_step!r}")
        super().__init__(model, energy=energy, rank=rank, ratio=ratio, scheme=scheme, filter_fn=filter_fn,
                         overrides=overrides)
        self.nuclear_weight = float(nuclear_weight)
        self.period = period
        self.nuclear_every_step = nuclear_every_step
        self.step_count = 0
        self.ranks: dict[str, int] = {}
        self._subgradients: dict[str, torch.Tensor] = {}

    def _due(self) -> bool:
        return self.step_count % self.period == 0

    @torch.no_grad()
    def _svds(self, fqn: str, project: bool) -> None:
        m, layer, family = self.targets[fqn]
        w = m.weight

        def compute():
            low, sub, ranks = family.project(w, layer.spec, f"weight of {fqn!r}", project)
            return [sub, torch.tensor(ranks, device=w.device)] + ([low] if project else [])

        like = [w, torch.zeros(len(family.modes()), dtype=torch.long, device=w.device)] + ([w] if project else [])
        sub, rank, *low = decide_on_rank0(compute, like)
        if project:
            w.copy_(low[0])
        self._subgradients[fqn] = sub
        self.ranks[fqn] = families.rank_value(tuple(int(r) for r in rank.tolist()))

    def project(self) -> None:
        """Call before each forward pass: on every ``period``-th iteration, replace each
        target weight by its truncated SVD at ``energy``."""
        if self._due():
            for fqn in self.targets:
                self._svds(fqn, project=True)

    def regularize(self) -> None:
        """Call after ``loss.backward()`` and before ``optimizer.step()``: adds the
        nuclear-norm sub-gradient on projection iterations (every iteration with
        ``nuclear_every_step``), then advances the iteration count."""
        if self.nuclear_weight > 0 and (self._due() or self.nuclear_every_step):
            for fqn, (m, _, _) in self.targets.items():
                if fqn not in self._subgradients:
                    self._svds(fqn, project=False)
                sub = self._subgradients[fqn]
                if m.weight.grad is None:
                    m.weight.grad = self.nuclear_weight * sub
                else:
                    m.weight.grad.add_(sub, alpha=self.nuclear_weight)
        self._subgradients.clear()
        self.step_count += 1

    before_forward = project
    after_backward = regularize

    def record(self) -> dict:
        return {"ranks": dict(self.ranks)}

    def plan(self) -> Plan:
        """Each target at the family and ranks of the last projection: ``trp.compile(model,
        plan=controller.plan())`` keeps exactly the structure the network was trained in."""
        if not self.ranks:
            raise RuntimeError("no projection has run yet: call project() (or train) first")
        return Plan({fqn: LayerChoice(family.name, self.ranks[fqn]) for fqn, (_, _, family) in self.targets.items()})

    def state_dict(self) -> dict:
        """Step count and settings (what a checkpoint needs to resume exactly)."""
        return {**super().state_dict(), "step_count": self.step_count, "period": self.period,
                "nuclear_weight": self.nuclear_weight, "nuclear_every_step": self.nuclear_every_step,
                "energy": self.config.spec.energy, "rank": self.config.spec.rank, "ratio": self.config.spec.ratio,
                "scheme": self.config.scheme, "ranks": dict(self.ranks)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for key in ("period", "nuclear_weight", "nuclear_every_step", "energy", "rank", "ratio", "scheme"):
            mine = getattr(self, key) if key in ("period", "nuclear_weight", "nuclear_every_step") \
                else getattr(self.config.spec, key) if key in ("energy", "rank", "ratio") else getattr(self.config, key)
            if state.get(key) != mine:
                raise ValueError(f"TRP state has {key}={state.get(key)!r}, this controller {mine!r}")
        self.step_count = int(state["step_count"])
        self.ranks = dict(state.get("ranks", {}))

    def __repr__(self) -> str:
        return (f"TRP(targets={len(self.targets)}, {self.config.spec.describe()}, nuclear_weight={self.nuclear_weight}, "
                f"period={self.period}, scheme={self.config.scheme!r}, step={self.step_count})")


# --- fit -----------------------------------------------------------------------------

def _rng_state() -> dict:
    import random

    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    torch.set_rng_state(state["torch"].cpu())  # (a checkpoint may be mapped to the GPU)
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor its parameter's strides. Optimizer.load_state_dict
    keeps the strides the state was saved with, and a fused optimizer indexes parameter,
    gradient and state memory alike: state saved from parameters in another layout (e.g. on
    another device, where low-rank factors are laid out differently) would silently mix up
    elements."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_strided(p.shape, p.stride(), dtype=value.dtype,
                                                     device=value.device).copy_(value)


def _resume(state: dict, model: nn.Module, optimizer, scheduler, method: Optional[Method]) -> tuple[list, int]:
    """Apply a verified checkpoint, all or nothing: a checkpoint written for another model,
    optimizer or method is a CheckpointError saying which, raised before anything changes
    (each load_state_dict below checks before it writes, the model's is checked here). A
    checkpoint written before methods had one interface keeps TRP's state under "trp"."""
    error = checkpoint.CheckpointError
    missing = [k for k in ("epoch", "model", "optimizer", "rng", "history") if k not in state]
    if missing:
        raise error(f"the checkpoint lacks {missing}")
    own, saved = unwrap(model).state_dict(), state["model"]
    if not isinstance(saved, dict) or set(own) != set(saved):
        extra, lacking = sorted(set(saved) - set(own))[:5], sorted(set(own) - set(saved))[:5]
        raise error(f"the checkpoint does not match this model: it has {extra} the model lacks, and lacks {lacking}")
    shapes = [k for k in own if own[k].shape != getattr(saved[k], "shape", None)][:5]
    if shapes:
        raise error(f"the checkpoint does not match this model: other shapes for {shapes}")
    method_state = state.get("method", state.get("trp"))
    if method is not None and method_state is None:
        raise error(f"the checkpoint was written without a method; resume it without method={method.name!r}")
    if method is None and method_state is not None:
        raise error(f"the checkpoint was written with method {method_state.get('method', 'trp')!r}; "
                    f"resume it with that method")

    def apply(what, fn):
        try:
            fn()
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise error(f"the checkpoint does not match this {what}: {e}") from None

    if method is not None:
        before = method.state_dict()
        apply(f"method ({method.name})", lambda: method.load_state_dict(method_state))
    try:
        apply("optimizer", lambda: optimizer.load_state_dict(state["optimizer"]))
    except checkpoint.CheckpointError:
        if method is not None:
            method.load_state_dict(before)
        raise
    _match_state_layout(optimizer)
    apply("model", lambda: unwrap(model).load_state_dict(saved))
    if scheduler is not None and state.get("scheduler") is not None:
        apply("scheduler", lambda: scheduler.load_state_dict(state["scheduler"]))
    apply("random number generators", lambda: _set_rng_state(state["rng"]))
    return list(state["history"]), int(state["epoch"])


def _check_number(name: str, value, low: float, strict: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or (strict and value == low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device=None, loss_fn=None) -> dict:
    """Accuracy (%) and mean loss of ``model`` on ``loader``."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += float(loss_fn(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    if distributed():
        t = torch.tensor([correct, total, loss_sum], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        correct, total, loss_sum = int(t[0]), int(t[1]), float(t[2])
    return {"accuracy": 100.0 * correct / max(total, 1), "loss": loss_sum / max(total, 1)}


def fit(model: nn.Module, train_loader, val_loader=None, *, epochs: int, optimizer=None, scheduler=None,
        lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4, method: Optional[Method] = None,
        checkpoint_dir=None, resume: bool = False, device=None, loss_fn=None, progress: bool = True) -> list:
    """Train ``model`` for ``epochs`` with an optional compression ``method`` (a
    :class:`trp.methods.Method`, e.g. :class:`TRP`), whose hooks run around each step.

    Defaults follow the TRP paper's CIFAR schedule scaled to ``epochs``: SGD (``lr``, momentum
    0.9, weight decay 1e-4), learning rate ÷10 at 50% and 75% of the epochs. Pass your own
    ``optimizer`` (and ``scheduler``, stepped once per epoch) to change that. With
    ``checkpoint_dir`` a checkpoint (model, optimizer, scheduler, TRP state, RNG state,
    history) is written atomically after every epoch, with a checksum, the one before kept
    (:mod:`trp.checkpoint`); ``resume=True`` continues from the newest one that verifies,
    ending with the same weights as an uninterrupted run (a directory with no checkpoint
    starts from scratch; one whose checkpoints are all damaged raises
    :class:`trp.checkpoint.CheckpointError`). The directory is checked for writing before
    any training. Under ``torchrun`` the model is
    wrapped in DistributedDataParallel (if it is not already) and only rank 0 writes.
    Returns the per-epoch history (train loss, validation accuracy/loss, and what the
    method records, e.g. TRP's ranks).
    """
    import os

    from tqdm import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if method is not None and not isinstance(method, Method):
        raise TypeError(f"method must be a trp.methods.Method (e.g. trp.TRP(model)) or None, "
                        f"got {type(method).__name__}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    params = list(model.parameters())
    if not params:
        raise ValueError("model has no parameters to train")
    if optimizer is None:
        _check_number("lr", lr, 0, strict=True)
        _check_number("momentum", momentum, 0, strict=False)
        _check_number("weight_decay", weight_decay, 0, strict=False)
    device = torch.device(device) if device is not None else params[0].device
    model.to(device)
    if distributed() and not isinstance(model, nn.parallel.DistributedDataParallel):
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    rank0 = not distributed() or dist.get_rank() == 0
    loss_fn = loss_fn or nn.functional.cross_entropy
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        if scheduler is None:
            milestones = sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)

    history, start = [], 0
    if checkpoint_dir is not None and rank0:  # before any training: a bad directory fails now, not after an epoch
        try:
            os.makedirs(checkpoint_dir, exist_ok=True)
            files.check_writable(checkpoint_dir)
        except OSError as e:
            raise ValueError(f"checkpoint_dir {str(checkpoint_dir)!r} is not a writable directory: {e}") from None
    if resume:
        state = checkpoint.load_latest(checkpoint_dir, map_location=device, quarantine=rank0)
        if state is not None:
            history, start = _resume(state, model, optimizer, scheduler, method)

    for epoch in range(start, epochs):
        if hasattr(getattr(train_loader, "sampler", None), "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        model.train()
        if method is not None:
            method.epoch_start(epoch)
        total, count = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not (progress and rank0),
                   leave=False, dynamic_ncols=True)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            if method is not None:
                method.before_forward()
            loss = loss_fn(model(x), y)
            extra = method.loss() if method is not None else None
            optimizer.zero_grad(set_to_none=True)
            (loss if extra is None else loss + extra).backward()
            if method is not None:
                method.after_backward()
            optimizer.step()
            if method is not None:
                method.after_step()
            total, count = total + loss.item() * len(y), count + len(y)
            bar.set_postfix(loss=f"{total / count:.4f}")
        if method is not None:
            method.epoch_end(epoch)
        if scheduler is not None:
            scheduler.step()
        if distributed():  # the global mean, the same on every rank
            t = torch.tensor([total, count], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            total, count = float(t[0]), int(t[1])
        record = {"epoch": epoch + 1, "train_loss": total / max(count, 1),
                  "lr": optimizer.param_groups[0]["lr"]}
        if val_loader is not None:
            record.update({f"val_{k}": v for k, v in evaluate(model, val_loader, device, loss_fn).items()})
        if method is not None:
            record.update(method.record())
        history.append(record)
        if progress and rank0:
            tqdm.write(_epoch_line(record, epochs))
        if checkpoint_dir is not None and rank0:
            checkpoint.save(checkpoint_dir, {"epoch": epoch + 1, "model": unwrap(model).state_dict(),
                                             "optimizer": optimizer.state_dict(),
                                             "scheduler": scheduler.state_dict() if scheduler is not None else None,
                                             "method": method.state_dict() if method is not None else None,
                                             "rng": _rng_state(), "history": history})
    return history
