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
at ``energy`` in the form of the family ``trp.compile`` will use (its unfolding; for
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

from trp import checkpoint, decompose, families, files
from trp.compile import CompileConfig, DefaultFilter, eligibility, find_stem, walk

# Measured on ResNet-20, batch 128, 2 CPU cores: projecting all 18 target convs (and the
# sub-gradients) takes 18 ms against 506 ms for a training step (3.7%); every 2nd step
# keeps it under 2% (the reference code uses 1 by default and 5 in its script).
DEFAULT_PERIOD = 2


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel (fqns are the inner ones)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


class TRP:
    """Trained Rank Pruning controller for any ``nn.Module`` and any optimizer."""

    def __init__(self, model: nn.Module, *, energy: float = 0.9, nuclear_weight: float = 3e-4,
                 period: int = DEFAULT_PERIOD, scheme: str = "channel", filter_fn=None,
                 overrides: Optional[dict] = None, nuclear_every_step: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(nuclear_weight, bool) or not isinstance(nuclear_weight, (int, float)) \
                or not math.isfinite(nuclear_weight) or nuclear_weight < 0:
            raise ValueError(f"nuclear_weight must be a number >= 0, got {nuclear_weight!r}")
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an int >= 1, got {period!r}")
        if not isinstance(nuclear_every_step, bool):
            raise TypeError(f"nuclear_every_step must be a bool, got {nuclear_every_step!r}")
        # rank_multiple=1: training projects to the rank the energy asks for; compile may round up.
        self.config = CompileConfig(energy=energy, overrides=overrides, scheme=scheme, rank_multiple=1,
                                    filter_fn=filter_fn)
        self.nuclear_weight = float(nuclear_weight)
        self.period = period
        self.nuclear_every_step = nuclear_every_step
        self.step_count = 0
        inner = unwrap(model)
        filt = self.config.filter_fn or DefaultFilter(find_stem(inner))
        self.targets: dict[str, tuple[nn.Module, decompose.RankSpec, families.Family]] = {}
        for fqn, m, _, _ in walk(inner):
            if decompose.is_layer(m):
                note, plan, family = eligibility(fqn, m, self.config, filt)
                if note is None:
                    self.targets[fqn] = (m, plan.spec, family)
        if not self.targets:
            raise ValueError("TRP found no target layer (no k×k Conv2d passes the filter); "
                             "pass filter_fn to choose layers")
        self.ranks: dict[str, int] = {}
        self._subgradients: dict[str, torch.Tensor] = {}

    def _due(self) -> bool:
        return self.step_count % self.period == 0

    @torch.no_grad()
    def _svds(self, fqn: str, project: bool) -> None:
        m, spec, family = self.targets[fqn]
        w = m.weight
        modes = len(family.modes())
        if not _distributed() or dist.get_rank() == 0:
            low, sub, ranks = family.project(w, spec, f"weight of {fqn!r}", project)
            rank = torch.tensor(ranks, device=w.device)
        else:
            sub = torch.empty_like(w)
            low = torch.empty_like(w) if project else None
            rank = torch.zeros(modes, dtype=torch.long, device=w.device)
        if _distributed():  # one process decides, every process gets the same bits
            dist.broadcast(sub, 0)
            dist.broadcast(rank, 0)
            if project:
                dist.broadcast(low, 0)
        if project:
            w.copy_(low)
        self._subgradients[fqn] = sub
        ranks = tuple(int(r) for r in rank.tolist())
        self.ranks[fqn] = families.rank_value(ranks)

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

    def compile_overrides(self) -> dict:
        """``trp.compile`` overrides that factor each target at the rank of the last projection
        (``{escaped fqn: rank}``): compile with these and ``rank_multiple=1`` to keep exactly
        the structure the network was trained in."""
        import re

        if not self.ranks:
            raise RuntimeError("no projection has run yet: call project() (or train) first")
        return {re.escape(fqn): rank for fqn, rank in self.ranks.items()}

    def state_dict(self) -> dict:
        """Step count and settings (what a checkpoint needs to resume exactly)."""
        return {"step_count": self.step_count, "period": self.period, "nuclear_weight": self.nuclear_weight,
                "nuclear_every_step": self.nuclear_every_step, "energy": self.config.energy,
                "scheme": self.config.scheme, "targets": list(self.targets), "ranks": dict(self.ranks)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("targets") != list(self.targets):
            raise ValueError(f"TRP state is for targets {state.get('targets')}, this controller has "
                             f"{list(self.targets)}")
        for key in ("period", "nuclear_weight", "nuclear_every_step", "energy", "scheme"):
            mine = getattr(self, key) if hasattr(self, key) else getattr(self.config, key)
            if state.get(key) != mine:
                raise ValueError(f"TRP state has {key}={state.get(key)!r}, this controller {mine!r}")
        self.step_count = int(state["step_count"])
        self.ranks = dict(state.get("ranks", {}))

    def __repr__(self) -> str:
        return (f"TRP(targets={len(self.targets)}, energy={self.config.energy}, nuclear_weight={self.nuclear_weight}, "
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

    torch.set_rng_state(state["torch"])
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


def _resume(state: dict, model: nn.Module, optimizer, scheduler, trp: Optional[TRP]) -> tuple[list, int]:
    """Apply a verified checkpoint, all or nothing: a checkpoint written for another model,
    optimizer or controller is a CheckpointError saying which, raised before anything
    changes (each load_state_dict below checks before it writes, the model's is checked here)."""
    error = checkpoint.CheckpointError
    missing = [k for k in ("epoch", "model", "optimizer", "rng", "history") if k not in state]
    if missing:
        raise error(f"the checkpoint lacks {missing}")
    if trp is not None and state.get("trp") is None:
        raise error("the checkpoint was written without a TRP controller; resume it without trp")
    own, saved = unwrap(model).state_dict(), state["model"]
    if not isinstance(saved, dict) or set(own) != set(saved):
        extra, lacking = sorted(set(saved) - set(own))[:5], sorted(set(own) - set(saved))[:5]
        raise error(f"the checkpoint does not match this model: it has {extra} the model lacks, and lacks {lacking}")
    shapes = [k for k in own if own[k].shape != getattr(saved[k], "shape", None)][:5]
    if shapes:
        raise error(f"the checkpoint does not match this model: other shapes for {shapes}")

    def apply(what, fn):
        try:
            fn()
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise error(f"the checkpoint does not match this {what}: {e}") from None

    if trp is not None:
        before = trp.state_dict()
        apply("TRP controller", lambda: trp.load_state_dict(state["trp"]))
    try:
        apply("optimizer", lambda: optimizer.load_state_dict(state["optimizer"]))
    except checkpoint.CheckpointError:
        if trp is not None:
            trp.load_state_dict(before)
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
    if _distributed():
        t = torch.tensor([correct, total, loss_sum], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        correct, total, loss_sum = int(t[0]), int(t[1]), float(t[2])
    return {"accuracy": 100.0 * correct / max(total, 1), "loss": loss_sum / max(total, 1)}


def fit(model: nn.Module, train_loader, val_loader=None, *, epochs: int, optimizer=None, scheduler=None,
        lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4, trp: Optional[TRP] = None,
        checkpoint_dir=None, resume: bool = False, device=None, loss_fn=None, progress: bool = True) -> list:
    """Train ``model`` for ``epochs`` with an optional :class:`TRP` controller.

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
    Returns the per-epoch history (train loss, validation accuracy/loss, TRP ranks).
    """
    import os

    from tqdm import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if trp is not None and not isinstance(trp, TRP):
        raise TypeError(f"trp must be a trp.TRP controller or None, got {type(trp).__name__}")
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
    if _distributed() and not isinstance(model, nn.parallel.DistributedDataParallel):
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    rank0 = not _distributed() or dist.get_rank() == 0
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
            history, start = _resume(state, model, optimizer, scheduler, trp)

    for epoch in range(start, epochs):
        if hasattr(getattr(train_loader, "sampler", None), "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        model.train()
        total, count = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not (progress and rank0),
                   leave=False, dynamic_ncols=True)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            if trp is not None:
                trp.project()
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if trp is not None:
                trp.regularize()
            optimizer.step()
            total, count = total + loss.item() * len(y), count + len(y)
            bar.set_postfix(loss=f"{total / count:.4f}")
        if scheduler is not None:
            scheduler.step()
        if _distributed():  # the global mean, the same on every rank
            t = torch.tensor([total, count], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            total, count = float(t[0]), int(t[1])
        record = {"epoch": epoch + 1, "train_loss": total / max(count, 1),
                  "lr": optimizer.param_groups[0]["lr"]}
        if val_loader is not None:
            record.update({f"val_{k}": v for k, v in evaluate(model, val_loader, device, loss_fn).items()})
        if trp is not None:
            record["ranks"] = dict(trp.ranks)
        history.append(record)
        if progress and rank0:
            tqdm.write(_epoch_line(record, epochs))
        if checkpoint_dir is not None and rank0:
            checkpoint.save(checkpoint_dir, {"epoch": epoch + 1, "model": unwrap(model).state_dict(),
                                             "optimizer": optimizer.state_dict(),
                                             "scheduler": scheduler.state_dict() if scheduler is not None else None,
                                             "trp": trp.state_dict() if trp is not None else None,
                                             "rng": _rng_state(), "history": history})
    return history
