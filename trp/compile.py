"""``trp.compile``: fold BatchNorm, factor the eligible layers, swap in low-rank modules.

The work is planned first and applied after, so bad arguments, unmatched overrides, an
unusable backend or a weight that cannot be factored raise before the model is touched.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union

import torch
import torch.fx
import torch.nn as nn

from trp import channels, decompose, epilogue, families, layout, program
from trp.plan import Plan, TapChoice
from trp.modules import (CONV_TYPES, LAYER_TYPES, LOWRANK_TYPES, NAME_ATTR, LowRankConv2d, TapSparseConv2d,
                         check_backend, from_factors, parameter_of)
from trp_kernels import ops

FilterFn = Callable[[nn.Module, str], bool]
OverrideValue = Union[None, int, tuple, float, dict]

# Attributes that compile leaves on layers, read by summary() and save().
NOTE_ATTR = "_trp_note"          # why a layer stayed dense
FOLDED_ATTR = "_trp_folded_bn"   # fqn of the BatchNorm folded into this conv
ROUNDED = "rank_multiple rounded"  # in the note of a layer kept dense only by rank rounding


@dataclass
class LayerPlan:
    """What an override asks for one layer: a rank spec and the families to try, in order
    (a parsed ``scheme``), or stay dense (``spec`` None)."""

    spec: Optional[decompose.RankSpec]
    scheme: tuple


@dataclass
class CompileConfig:
    """The arguments of :func:`compile`, validated."""

    energy: Optional[float] = None
    rank: Optional[int] = None
    ratio: Optional[float] = None
    overrides: Optional[dict] = None
    scheme: Union[str, tuple] = "channel"
    rank_multiple: int = 16
    backend: str = "auto"
    filter_fn: Optional[FilterFn] = None
    fold_bn: bool = True
    inplace: bool = True
    fuse_epilogue: bool = True
    spec: decompose.RankSpec = field(init=False)
    patterns: list = field(init=False)
    schemes: tuple = field(init=False)

    def __post_init__(self):
        self.spec = decompose.RankSpec(energy=self.energy, rank=self.rank, ratio=self.ratio,
                                       rank_multiple=self.rank_multiple)
        self.schemes = families.parse_scheme(self.scheme)
        check_backend(self.backend)
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"filter_fn must be callable (module, fqn) -> bool, got {self.filter_fn!r}")
        for name in ("fold_bn", "inplace", "fuse_epilogue"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.overrides is not None and not isinstance(self.overrides, dict):
            raise TypeError(f"overrides must be a dict from fqn regex to rank/energy/None/dict, "
                            f"got {type(self.overrides).__name__}")
        self.patterns = [(p, _compile_pattern(p), self._override_plan(p, v))
                         for p, v in (self.overrides or {}).items()]

    def _override_plan(self, pattern: str, value: OverrideValue) -> LayerPlan:
        what = f"overrides[{pattern!r}]"
        if value is None:
            return LayerPlan(None, self.schemes)
        if isinstance(value, bool):
            raise ValueError(f"{what} must be an int rank, a float energy, None or a dict, got {value!r}")
        if isinstance(value, (int, tuple)):
            value = {"rank": value}
        elif isinstance(value, float):
            value = {"energy": value}
        if not isinstance(value, dict):
            raise ValueError(f"{what} must be an int rank, a float energy, None or a dict, got {value!r}")
        allowed = {"energy", "rank", "ratio", "rank_multiple", "scheme"}
        unknown = set(value) - allowed
        if unknown:
            raise ValueError(f"{what} has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        try:
            scheme = families.parse_scheme(value["scheme"]) if "scheme" in value else self.schemes
            spec = decompose.RankSpec(energy=value.get("energy"), rank=value.get("rank"),
                                      ratio=value.get("ratio"),
                                      rank_multiple=value.get("rank_multiple", self.rank_multiple))
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        if not any(k in value for k in ("energy", "rank", "ratio")):
            spec = decompose.RankSpec(energy=self.spec.energy, rank=self.spec.rank, ratio=self.spec.ratio,
                                      rank_multiple=spec.rank_multiple)
        return LayerPlan(spec, scheme)

    def plan_for(self, fqn: str) -> tuple[Optional[str], LayerPlan]:
        """(matching override pattern or None, plan) for the layer ``fqn``."""
        for pattern, regex, plan in self.patterns:
            if regex.fullmatch(fqn):
                return pattern, plan
        return None, LayerPlan(self.spec, self.schemes)


def _compile_pattern(pattern) -> re.Pattern:
    if not isinstance(pattern, str):
        raise TypeError(f"overrides keys must be regex strings, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"overrides key {pattern!r} is not a valid regex: {e}") from None


# --- model structure -----------------------------------------------------------------

class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LAYER_TYPES) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> Optional[torch.fx.Graph]:
    """The model's fx graph, or None when it cannot be traced symbolically."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - any trace failure means: use the fallbacks
        return None


def walk(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, nn.Module, str]]:
    """(fqn, module, parent, attribute name) for every module below ``model``, not
    descending into trp's layers. A module registered under several names is
    yielded under each (``named_children`` would hide the repeats)."""
    for name, child in model._modules.items():
        if child is None:
            continue
        fqn = f"{prefix}.{name}" if prefix else name
        yield fqn, child, model, name
        if not isinstance(child, LAYER_TYPES):
            yield from walk(child, fqn)


def find_stem(model: nn.Module, graph: Optional[torch.fx.Graph] = None) -> Optional[str]:
    """The fqn of the first convolution the input meets (by data flow when the model traces,
    else by registration order)."""
    modules = dict(model.named_modules())
    graph = graph if graph is not None else trace(model)
    if graph is not None:
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(modules.get(node.target),
                                                        (nn.modules.conv._ConvNd, *CONV_TYPES)):
                return node.target
    for fqn, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, *CONV_TYPES)):
            return fqn
    return None


class DefaultFilter:
    """The default choice of layers: every layer of a kind that a family of ``scheme``
    takes (k×k convs for channel/spatial/tucker, 1×1 convs and Linear for pointwise), but
    the stem. Whether factoring a layer cuts its MACs is decided after (the layer stays
    dense, with the reason in its summary note, where it would not)."""

    def __init__(self, stem: Optional[str], scheme="channel"):
        self.stem = stem
        self.schemes = families.parse_scheme(scheme)

    def why_not(self, module: nn.Module, fqn: str) -> Optional[str]:
        if fqn == self.stem:
            return "stem (the first conv the input meets) stays dense by default"
        if families.family_for(module, self.schemes) is None:
            kind = families.layer_kind(module)
            what = {"linear": "linear layers are", "1x1": "1x1 conv:", "kxk": "kxk conv:"}[kind]
            takers = [f.name for f in families.REGISTRY.values() if kind in f.kinds]
            return (f"{what} not factored by default with scheme {_scheme_text(self.schemes)} (add "
                    f"{' or '.join(repr(t) for t in takers)} to scheme, or admit them with filter_fn)")
        return None

    def __call__(self, module: nn.Module, fqn: str) -> bool:
        return self.why_not(module, fqn) is None


def _scheme_text(schemes: tuple) -> str:
    return repr(schemes[0]) if len(schemes) == 1 else repr(list(schemes))


def default_filter(model: nn.Module, scheme="channel") -> DefaultFilter:
    """The filter :func:`compile` uses when ``filter_fn`` is None; combine it with your own,
    e.g. ``f = trp.default_filter(m); filter_fn=lambda mod, q: isinstance(mod, nn.Linear) or f(mod, q)``."""
    return DefaultFilter(find_stem(model), scheme)


@dataclass
class BNFold:
    conv: str
    bn: str
    weight: Optional[torch.Tensor]  # the folded dense weight (None for a layer factored before)
    bias: torch.Tensor
    scale: torch.Tensor  # per output channel: weight = conv.weight · scale


def _fold_tensors(conv: nn.Module, bn: nn.BatchNorm2d) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(folded weight, folded bias, per-channel scale) of ``bn`` after ``conv``: an
    nn.Conv2d, or a low-rank conv factored before (its weight None: its last stage takes
    the scale)."""
    dense = isinstance(conv, nn.Conv2d)
    like = parameter_of(conv)
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64,
                                                                               device=like.device)
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale, shift = scale * bn.weight.detach().double(), shift * bn.weight.detach().double() + bn.bias.detach().double()
    dtype = like.dtype
    weight = (conv.weight.detach().double() * scale[:, None, None, None]).to(dtype) if dense else None
    return weight, (b * scale + shift).to(dtype), scale


def _scale_out(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight`` (output channels first) with each output channel's rows times ``scale``."""
    return weight * scale.to(dtype=weight.dtype, device=weight.device).reshape(-1, *([1] * (weight.dim() - 1)))


def _bn_pairs(model: nn.Module, graph: Optional[torch.fx.Graph]) -> list[tuple[str, str]]:
    """(conv fqn, bn fqn) pairs where the BN reads only that conv's output and the conv feeds
    only that BN, each called once."""
    modules = dict(model.named_modules())
    pairs = []
    if graph is not None:
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
                continue
            src = node.args[0] if node.args else None
            conv = modules.get(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
            # a trp conv with a fused ReLU or residual: the BN reads their result, not the conv's
            fused = isinstance(conv, CONV_TYPES) and (conv.relu or len(src.args) > 1 or bool(src.kwargs))
            if (conv is not None and isinstance(conv, (nn.Conv2d, *CONV_TYPES)) and not fused and len(src.users) == 1
                    and calls[src.target] == 1 and calls[node.target] == 1):
                pairs.append((src.target, node.target))
        return pairs
    # Untraceable model: only an nn.Sequential guarantees that a conv feeds the BN after it.
    seen: dict[int, int] = {}
    for m in model.modules():
        seen[id(m)] = seen.get(id(m), 0) + 1
    for fqn, seq in model.named_modules():
        if isinstance(seq, nn.Sequential):
            names = list(seq._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = seq._modules[a], seq._modules[b]
                if (isinstance(conv, nn.Conv2d) or isinstance(conv, CONV_TYPES) and not conv.relu) \
                        and isinstance(bn, nn.BatchNorm2d) \
                        and seen[id(conv)] == 1 and seen[id(bn)] == 1:
                    prefix = f"{fqn}." if fqn else ""
                    pairs.append((prefix + a, prefix + b))
    return pairs


def plan_bn_folds(model: nn.Module, graph: Optional[torch.fx.Graph]) -> tuple[list[BNFold], list[str]]:
    """Folds of eval-mode BatchNorm2d into the conv before it, and notes on the ones skipped."""
    modules = dict(model.named_modules())
    folds, skipped = [], []
    for conv_fqn, bn_fqn in _bn_pairs(model, graph):
        conv, bn = modules[conv_fqn], modules[bn_fqn]
        if bn.training:
            skipped.append(f"{bn_fqn} (training mode)")
        elif bn.running_mean is None:
            skipped.append(f"{bn_fqn} (track_running_stats=False)")
        elif bn.num_features != conv.out_channels:
            skipped.append(f"{bn_fqn} (num_features != {conv_fqn}.out_channels)")
        else:
            folds.append(BNFold(conv_fqn, bn_fqn, *_fold_tensors(conv, bn)))
    return folds, skipped


# --- compile -------------------------------------------------------------------------

def eligibility(fqn: str, m: nn.Module, cfg: CompileConfig,
                filt: FilterFn) -> tuple[Optional[str], LayerPlan, Optional[families.Family]]:
    """(note, plan, family): why the layer stays dense (None: it is a target), its rank plan
    and the family that factors it. The one rule for which layers are low rank, and in which
    form, shared by compile and TRP training."""
    reason = decompose.refusal(m)
    if reason:
        return reason, LayerPlan(None, cfg.schemes), None
    if not filt(m, fqn):
        why = filt.why_not(m, fqn) if isinstance(filt, DefaultFilter) else None
        return why or "excluded by filter_fn", LayerPlan(None, cfg.schemes), None
    pattern, plan = cfg.plan_for(fqn)
    if plan.spec is None:
        return f"kept dense by override {pattern!r}", plan, None
    family = families.family_for(m, plan.scheme)
    if family is None:  # a layer the filter admits that no named family takes by kind
        family = next((families.REGISTRY[n] for n in plan.scheme if families.REGISTRY[n].accepts(m) is None),
                      families.REGISTRY["pointwise"] if isinstance(m, nn.Linear) else None)
    if family is None or family.accepts(m) is not None:
        why = families.get(plan.scheme[0]).accepts(m) if family is None else family.accepts(m)
        return f"{why} (scheme {_scheme_text(plan.scheme)})", plan, None
    return None, plan, family


def select_targets(model: nn.Module, cfg: CompileConfig,
                   filt: Optional[FilterFn] = None) -> dict[str, tuple[nn.Module, LayerPlan, families.Family]]:
    """``{fqn: (module, plan, family)}`` for every layer of ``model`` that :func:`eligibility`
    makes a target under ``cfg`` (``filt``: its filter, default ``cfg.filter_fn`` or the
    default filter): the layers a training method works on are the ones compile factors.
    Whether factoring cuts a layer's MACs depends on the ranks the method ends with, and is
    decided when compile factors it (``_decide``)."""
    filt = filt or cfg.filter_fn or DefaultFilter(find_stem(model), cfg.schemes)
    targets = {}
    for fqn, m, _, _ in walk(model):
        if decompose.is_layer(m):
            note, plan, family = eligibility(fqn, m, cfg, filt)
            if note is None:
                targets[fqn] = (m, plan, family)
    return targets


def _shape(m: nn.Module) -> tuple:
    """The dense weight's shape (a low-rank conv's: the one its stages compose to)."""
    if isinstance(m, LowRankConv2d):
        return (m.out_channels, m.in_channels, *m.kernel_size)
    return tuple(m.weight.shape)


def _stride(m: nn.Module) -> tuple:
    return (1, 1) if isinstance(m, nn.Linear) else tuple(m.stride)


def _from_plan(fqn: str, m: nn.Module, plan: Plan) -> tuple[Optional[str], LayerPlan, Optional[families.Family]]:
    """:func:`eligibility` for a layer under a method's plan: its family and exact ranks,
    or stay dense when the plan leaves it out."""
    choice = plan.get(fqn)
    if choice is None:
        return "not in the plan", LayerPlan(None, ()), None
    family = families.get(choice.family)
    if isinstance(m, LOWRANK_TYPES):  # factored before: only new stage weights can replace its factors
        why = None if isinstance(m, LowRankConv2d) and choice.weights is not None else \
            "a layer factored before is factored again only from stage weights the plan gives"
        why = why or family.accepts(m)
    else:
        why = decompose.refusal(m) or family.accepts(m)
    if why:
        raise ValueError(f"plan[{fqn!r}] asks for family {choice.family!r}, which cannot factor it: {why}")
    return None, LayerPlan(decompose.RankSpec(rank=choice.ranks, rank_multiple=1), (family.name,)), family


def _given_factors(fqn: str, m: nn.Module, family: families.Family, ranks, weights: tuple,
                   fold: Optional[BNFold]) -> families.Factored:
    """A plan's explicit stage weights for ``m``, checked against the family's shapes at
    ``ranks``, with a folded BN's scale applied to the last stage (its output channels are
    the layer's)."""
    ranks = ranks if isinstance(ranks, tuple) else (ranks,)
    shape = _shape(m)
    want = [tuple(s) for s in family.stage_shapes(shape, ranks)]
    got = [tuple(w.shape) for w in weights]
    if got != want:
        raise ValueError(f"plan[{fqn!r}] gives stage weights of shapes {got}; family {family.name!r} at ranks "
                         f"{families.rank_value(ranks)} has {want}")
    like = parameter_of(m)
    weights = [w.detach().to(dtype=like.dtype, device=like.device) for w in weights]
    if fold is not None:
        weights[-1] = _scale_out(weights[-1], fold.scale)
    return families.Factored(tuple(w.contiguous() for w in weights), ranks, family.full_ranks(shape), ())


def _decide(fqn: str, m: nn.Module, fold: Optional[BNFold], cfg: CompileConfig, filt: FilterFn,
            chosen: Optional[Plan] = None) -> tuple[Optional[str], Optional[families.Factored], Optional[families.Family]]:
    """(note, factors, family): a note when the layer stays dense, else its factors. The one
    place that decides, with or without a method's plan, including the "would not cut
    MACs" rule. A plan's explicit factors that would not cut MACs come back with the note:
    the layer stays dense with the weight they compose to."""
    note, plan, family = eligibility(fqn, m, cfg, filt) if chosen is None else _from_plan(fqn, m, chosen)
    if note is not None:
        return note, None, None
    given = chosen[fqn].weights if chosen is not None else None
    if given is not None:
        f = _given_factors(fqn, m, family, plan.spec.rank, given, fold)
    else:
        f = family.factor(fold.weight if fold else m.weight, plan.spec, f"weight of {fqn!r}")
    shape, stride = _shape(m), _stride(m)
    dense = family.macs_per_pixel(shape, stride, None)
    low = family.macs_per_pixel(shape, stride, f.ranks)
    if low >= dense and not isinstance(m, LOWRANK_TYPES):  # (a layer factored before stays factored)
        ranks = families.rank_text(f.ranks, f.full_ranks)
        note = (f"{family.name} rank {ranks} ({plan.spec.describe()}) would not cut MACs "
                f"({low} vs {dense} MACs per output pixel)")
        if given is not None:
            return note + "; kept dense with the weight the plan's factors compose to", f, family
        if plan.spec.rank is None and plan.spec.rank_multiple > 1:
            exact = family.select(f.spectra, dataclasses.replace(plan.spec, rank_multiple=1))
            if family.macs_per_pixel(shape, stride, exact) < dense:
                shown = families.rank_value(exact)
                note += f"; {ROUNDED} {shown} to {families.rank_value(f.ranks)} " \
                        f"(rank_multiple=1 would factor it at {shown})"
        return note, None, None
    return None, f, family


def _tap_sparse(fqn: str, m: nn.Module, choice: TapChoice, fold: Optional[BNFold], backend: str) -> TapSparseConv2d:
    """The tap-sparse conv a plan's :class:`TapChoice` makes of layer ``m`` (its BN folded)."""
    if not isinstance(m, nn.Conv2d):
        raise ValueError(f"plan[{fqn!r}] makes a {type(m).__name__} tap-sparse; only an nn.Conv2d can be (a layer "
                         f"factored before cannot: SPP prunes the dense conv's taps)")
    why = decompose.refusal(m)
    if why:
        raise ValueError(f"plan[{fqn!r}] makes this conv tap-sparse, which it cannot be: {why}")
    if tuple(choice.keep.shape) != tuple(m.weight.shape[1:]):
        raise ValueError(f"plan[{fqn!r}]'s keep mask has shape {tuple(choice.keep.shape)}; the layer's taps are "
                         f"{tuple(m.weight.shape[1:])} (in_channels, kh, kw)")
    return TapSparseConv2d.from_conv(m, choice.keep, weight=fold.weight if fold else None,
                                     bias=fold.bias if fold else m.bias, backend=backend)


def compile(model: nn.Module, *, energy: Optional[float] = None, rank: Optional[int] = None,
            ratio: Optional[float] = None, overrides: Optional[dict] = None, scheme: str = "channel",
            rank_multiple: int = 16, backend: str = "auto", filter_fn: Optional[FilterFn] = None,
            fold_bn: bool = True, inplace: bool = True, fuse_epilogue: bool = True,
            channels_last: Optional[bool] = None, plan: Optional[Plan] = None) -> nn.Module:
    """Factor ``model``'s eligible layers into low-rank modules and return the model.

    - Rank: at most one of ``energy`` (default 0.9), ``rank``, ``ratio``; ``rank_multiple``
      rounds energy/ratio ranks up (default 16, for the GPU kernels; on narrow layers this
      can reach full rank and keep the layer dense, which its summary note then says: use 1
      for CPU-only models). ``overrides`` maps fqn regexes (``re.fullmatch``, first
      match wins) to an int rank, a float energy, None (stay dense) or a dict with keys
      energy/rank/ratio/rank_multiple/scheme. Overrides act on layers the filter admits.
    - ``filter_fn(module, fqn) -> bool`` chooses layers (default :func:`default_filter`:
      every k×k Conv2d except the stem).
    - ``fold_bn`` folds eval-mode BatchNorm2d into the conv that feeds it (the BN becomes
      ``nn.Identity``), a low-rank conv factored before included (its last stage takes the
      scale); a model in training mode keeps its BNs, with a warning. To fine-tune a
      compressed model, compile with ``fold_bn=False``, train, then compile it again in eval
      mode to fold.
    - ``backend``: 'auto' (per call: triton on CUDA, cpp on CPU, else torch), or one of
      'triton', 'cpp', 'torch', checked now against the layers' device and dtype.
    - ``fuse_epilogue``: fold a residual add and/or ReLU that follows a low-rank layer into
      its kernel's epilogue (ResNet blocks: ``relu(bn(conv(x)) + shortcut)`` with BN
      folded); a module whose forward is rewritten becomes a ``torch.fx.GraphModule`` with
      the same children and state_dict keys (see :mod:`trp.epilogue`). The summary names
      each fused layer's epilogue.
    - ``channels_last``: convert 4-D inputs to channels_last on entry and 4-D outputs back
      to NCHW on exit, so that every layer in between runs in the layout the fused kernels
      (and PyTorch's fast CPU convs and pools) want (see :mod:`trp.layout`). Default: on
      when the model has a low-rank conv and ``backend`` is not 'torch' (which stays the
      plain two-conv reference, layout untouched).
    - ``plan``: a training method's choice per layer (``method.plan()``, a
      :class:`trp.plan.Plan`): the family and exact ranks of each layer it names (or, for a
      :class:`trp.plan.TapChoice`, the taps it keeps: the layer becomes a
      :class:`trp.modules.TapSparseConv2d`), every other layer dense. It replaces ``energy``/``rank``/``ratio``/``overrides``/
      ``filter_fn``/``scheme``/``rank_multiple``; a layer it names that the family cannot
      factor is an error.
    - Layers already factored are not factored again (their backend is updated).

    Use the returned model: when the model's own forward is rewritten by the epilogue pass
    it is a new object, even with ``inplace=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if channels_last is not None and not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be True, False or None (automatic), got {channels_last!r}")
    if plan is not None:
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a trp.plan.Plan (a method's plan()), got {type(plan).__name__}")
        given = [k for k, v in (("energy", energy), ("rank", rank), ("ratio", ratio), ("overrides", overrides),
                                ("filter_fn", filter_fn)) if v is not None]
        given += [k for k, v, d in (("scheme", scheme, "channel"), ("rank_multiple", rank_multiple, 16)) if v != d]
        if given:
            raise ValueError(f"plan carries each layer's family and ranks; do not also pass {', '.join(given)}")
    cfg = CompileConfig(energy, rank, ratio, overrides, scheme, rank_multiple, backend, filter_fn,
                        fold_bn, inplace, fuse_epilogue)
    if not cfg.inplace:
        model = copy.deepcopy(model)

    entries = list(walk(model))
    layers = [(fqn, m) for fqn, m, _, _ in entries if decompose.is_layer(m) or isinstance(m, LOWRANK_TYPES)]
    if plan is not None:
        names = {fqn for fqn, m in layers if not isinstance(m, LOWRANK_TYPES) or plan.get(fqn) is not None
                 and getattr(plan[fqn], "weights", None) is not None}
        missing = sorted(set(plan) - names)
        factored = [fqn for fqn, m in layers if fqn in missing and isinstance(m, LOWRANK_TYPES)]
        if factored:
            raise ValueError(f"plan names {factored[:5]}, factored before: a layer factored before is factored "
                             f"again only from stage weights the plan gives (LayerChoice(..., weights=...))")
        if missing:
            raise ValueError(f"plan names {missing[:5]}, which are not conv or linear layers of this model "
                             f"(left to factor: {sorted(names)[:8]})")
    for pattern, regex, _ in cfg.patterns:
        if not any(regex.fullmatch(fqn) for fqn, _ in layers):
            names = ", ".join(fqn for fqn, _ in layers[:8])
            raise ValueError(f"overrides pattern {pattern!r} matches no conv or linear layer "
                             f"(re.fullmatch on names such as: {names})")
    if cfg.backend != "auto":
        for fqn, m in layers:
            for p in m.parameters(recurse=False):
                try:
                    ops.resolve_backend(cfg.backend, p.device, p.dtype, kernel_size=getattr(m, "kernel_size", None))
                except ops.BackendError as e:
                    raise ops.BackendError(f"{e} (layer {fqn!r})") from None

    graph = trace(model)
    folds, unfolded = plan_bn_folds(model, graph) if cfg.fold_bn else ([], [])
    if any("training mode" in u for u in unfolded):
        warnings.warn("trp.compile: the model is in training mode, so BatchNorm layers were not folded; "
                      "call model.eval() before trp.compile to fold them", stacklevel=2)
    folded = {f.conv: f for f in folds}
    filt = cfg.filter_fn or DefaultFilter(find_stem(model, graph), cfg.schemes)

    replaced: dict[int, nn.Module] = {}
    swaps, notes, composed = [], {}, {}
    for fqn, m, parent, name in entries:
        refactor = isinstance(m, LOWRANK_TYPES) and plan is not None and fqn in plan
        if not refactor and (isinstance(m, LOWRANK_TYPES) or not decompose.is_layer(m)):
            continue
        if id(m) in replaced:  # the same layer object registered twice: swap both
            swaps.append((parent, name, replaced[id(m)], m))
            continue
        fold = folded.get(fqn)
        if plan is not None and isinstance(plan.get(fqn), TapChoice):
            new = _tap_sparse(fqn, m, plan[fqn], fold, cfg.backend)
            replaced[id(m)] = new
            swaps.append((parent, name, new, m))
            continue
        note, factors, family = _decide(fqn, m, fold, cfg, filt, plan)
        if note is not None:
            notes[id(m)] = (m, note)
            if factors is not None:  # a plan's own factors, dense again: the layer computes what they do
                composed[fqn] = family.compose(factors.weights).reshape(m.weight.shape)
            continue
        bias = fold.bias if fold else m.bias
        new = from_factors(m, factors, bias, family.name, cfg.backend)
        if isinstance(m, LOWRANK_TYPES):  # factored again: its fused epilogue goes with it
            new.relu = m.relu
            if hasattr(m, epilogue.EPILOGUE_ATTR):
                setattr(new, epilogue.EPILOGUE_ATTR, getattr(m, epilogue.EPILOGUE_ATTR))
        replaced[id(m)] = new
        swaps.append((parent, name, new, m))

    # Apply: nothing above touched the model.
    modules = dict(model.named_modules())
    for fold in folds:
        conv = modules[fold.conv]
        target = replaced.get(id(conv))
        if target is None:
            with torch.no_grad():
                if isinstance(conv, LowRankConv2d):  # factored before (fine-tuned with its BN): scale the last stage
                    last = conv.stage_weights()[-1]
                    last.copy_(_scale_out(last, fold.scale))
                elif isinstance(conv, TapSparseConv2d):  # (taps: kept columns × output channels)
                    conv.taps.mul_(fold.scale.to(conv.taps)[None, :])
                else:
                    conv.weight.copy_(composed.pop(fold.conv, fold.weight))
                if conv.bias is None:
                    conv.bias = nn.Parameter(fold.bias.clone(),
                                             requires_grad=any(p.requires_grad for p in conv.parameters()))
                else:
                    conv.bias.copy_(fold.bias)
            target = conv
        setattr(target, FOLDED_ATTR, fold.bn)
        parent_fqn, _, attr = fold.bn.rpartition(".")
        setattr(modules[parent_fqn] if parent_fqn else model, attr, nn.Identity())
    with torch.no_grad():
        for fqn, weight in composed.items():  # not folded: the factors carry no BN scale
            modules[fqn].weight.copy_(weight)
    for m, note in notes.values():
        setattr(m, NOTE_ATTR, note)
    for parent, name, new, _old in swaps:
        setattr(parent, name, new)
    if any(isinstance(m, TapSparseConv2d) for m in model.modules()):
        channels.drop_dead_channels(model, trace(model))
    for fqn, m, _, _ in walk(model):
        if isinstance(m, LAYER_TYPES):
            m.backend = cfg.backend
            m.lay_out()  # a layer factored before may hold its factors for another backend
            setattr(m, NAME_ATTR, fqn)
    if cfg.fuse_epilogue:
        model, _ = epilogue.fuse(model)
    if channels_last is None:
        channels_last = cfg.backend != "torch" and any(isinstance(m, CONV_TYPES) for m in model.modules())
    layout.set_channels_last(model, bool(channels_last))
    return program.install(model, bool(channels_last))
