"""Drop-in low-rank layers holding the two factors of a Conv2d or Linear as parameters.

The arithmetic runs in :mod:`trp_kernels.ops`, which picks the kernel for the input's
device; the factors are ordinary trainable parameters, so fine-tuning works.

The factors live in the memory layout that their backend's kernel reads in place
(:func:`trp_kernels.ops.kernel_layout`: for the fused C++ kernels a dense permutation of
the standard strides), so that the kernel always computes with the parameters' current
values, however they were written (any optimizer, fused or not, ``.data``, ``copy_``,
``load_state_dict``, numpy views). The layout is chosen when a layer is built, when
:func:`trp.compile` sets its backend, and when ``.to()``/``.cuda()``/``.float()`` and the
like convert it; setting ``backend`` by hand leaves it (a layer whose factors are in
another layout is still computed correctly, its factors copied on each call), since
changing a parameter's strides under a ``fused=True`` optimizer's state corrupts it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from trp import decompose, families
from trp_kernels import ops
from trp_kernels.reference import (_pair, chain_min_input_hw, check_chain, conv_output_hw, epilogue, input_too_small,
                                  resolve_padding, stage_geometry)

BACKEND_CHOICES = ("auto", *ops.BACKENDS)
# The fqn under which trp.compile / trp.load put a layer in its model, named in its errors.
NAME_ATTR = "_trp_name"


def check_backend(backend: str) -> str:
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    return backend


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check_broadcast(residual: torch.Tensor, out_shape) -> None:
    """A residual of another shape is added outside the kernel, if it broadcasts to the output."""
    try:
        ok = torch.broadcast_shapes(residual.shape, out_shape) == torch.Size(out_shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"residual must have (or broadcast to) the output's shape {tuple(out_shape)}, "
                         f"got {tuple(residual.shape)}")


class _LowRank(nn.Module):
    """What both low-rank layers share: the rank, the backend setting and the epilogue.

    ``forward(x, residual=None)`` computes ``layer(x) + residual``, then ReLU when
    ``relu`` is set, in the kernel's epilogue where the backend fuses it (set by
    :func:`trp.compile`'s epilogue pass, see :mod:`trp.epilogue`).
    """

    ranks: tuple       # one per stage but the last (stage order)
    full_ranks: tuple
    relu: bool = False

    @property
    def rank(self):
        """The rank: an int for a one-mode family, else the tuple of per-stage ranks."""
        return families.rank_value(self.ranks)

    @property
    def full_rank(self):
        return families.rank_value(self.full_ranks)

    def stage_weights(self) -> list:
        """The factors, stage by stage (``weight1``, ``weight2``, ...)."""
        return [self._parameters[f"weight{i + 1}"] for i in range(self._n_stages)]

    @property
    def backend(self) -> str:
        """Requested backend: 'auto' (chosen per call from the input) or a backend name."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_backend(value)
        self._kept = [None]  # what the last call kept (ops.conv_chain's kept) was for the old backend

    def __getstate__(self):
        state = super().__getstate__()
        if "_kept" in state:  # a plan for this process's memory: a copy or a pickle starts without it
            state = {**state, "_kept": [None]}
        return state

    def resolved_backend(self, device=None, dtype=None) -> str:
        """The backend a call with tensors of ``device``/``dtype`` would run (default: the
        parameters'); raises :class:`trp_kernels.ops.BackendError` if an explicit backend
        cannot run them."""
        p = self.weight1
        return ops.resolve_backend(self._backend, device or p.device, dtype or p.dtype, max(self.ranks),
                                   getattr(self, "kernel_size", (1, 1)))

    def _describe(self) -> str:
        name = getattr(self, NAME_ATTR, None)
        return f"layer {name!r} ({type(self).__name__})" if name else f"{type(self).__name__}({self.extra_repr()})"

    def lay_out(self) -> None:
        """Put the factors (and their gradients, so that an optimizer sees one layout) in the
        memory layout the backend's kernel reads in place; see the module docstring."""
        for p in self.stage_weights():
            data = p.data
            laid = ops.kernel_layout(data, self._backend, getattr(self, "kernel_size", None))
            if laid is data:
                continue
            p.data = laid
            if p.grad is not None:
                p.grad = torch.empty_like(laid).copy_(p.grad)

    def _apply(self, fn, recurse=True):
        def tags():
            return [(p.device, p.dtype, p.stride()) for p in self.stage_weights()]

        before = tags()
        result = super()._apply(fn, recurse)
        if tags() != before:  # converted (device, dtype or memory format): lay out anew
            self.lay_out()
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)
        if local_metadata.get("assign_to_params_buffers", False):  # the file's tensors became the factors
            self.lay_out()

    def _check_ranks(self, rank, full_ranks: tuple) -> tuple:
        """The layer's ranks (stage order) from the ``rank`` argument, checked."""
        ranks = tuple(rank) if isinstance(rank, (list, tuple)) else (rank,)
        if len(ranks) != len(full_ranks):
            raise ValueError(f"rank must give {len(full_ranks)} rank(s) for this layer (one per stage but the "
                             f"last), got {rank!r}")
        for r, full in zip(ranks, full_ranks):
            _positive_int(r, "rank")
            if r > full:
                raise ValueError(f"rank must be <= full rank {full if len(ranks) == 1 else full_ranks} of this "
                                 f"layer, got {rank!r}")
        self.ranks, self.full_ranks = ranks, tuple(full_ranks)
        return ranks


class LowRankConv2d(_LowRank):
    """A k×k ``nn.Conv2d`` as a chain of thin convolutions, ``weight1``, ``weight2``, ...
    (+ bias on the last), in the form of the family ``scheme`` (see :mod:`trp.families`:
    'channel' and 'spatial' are two stages, 'tucker' three, 'pointwise' two 1×1s).

    Same constructor arguments as ``nn.Conv2d`` (zero padding, groups=1) plus ``rank``
    (an int, or one per stage but the last for 'tucker'), ``scheme`` and ``backend``.
    Usually built with :meth:`from_conv` or by :func:`trp.compile`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank, stride=1,
                 padding=0, dilation=1, bias: bool = True, scheme: str = "channel",
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        for name in ("kernel_size", "stride", "dilation"):
            for v in getattr(self, name):
                _positive_int(v, name)
        if padding == "same" and self.stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions")
        self.padding = tuple(padding) if isinstance(padding, (list, tuple)) else padding
        self._padding4 = resolve_padding(padding, self.kernel_size, self.dilation)
        family = families.get(scheme)
        shape = (out_channels, in_channels, *self.kernel_size)
        refused = family.refuses_kernel(self.kernel_size)
        if refused:
            raise ValueError(f"{refused} (kernel_size={self.kernel_size})")
        self.scheme = family.name
        ranks = self._check_ranks(rank, family.full_ranks(shape))
        self.backend = backend
        shapes = family.stage_shapes(shape, ranks)
        self._n_stages = len(shapes)
        geometry = family.geometry(self.stride, self._padding4, self.dilation)
        self._strides = [v for g in geometry for v in g[0]]
        self._paddings = [v for g in geometry for v in g[1]]
        self._dilations = [v for g in geometry for v in g[2]]
        check_chain(type(self).__name__, shapes, self._strides, self._paddings, self._dilations)  # once, here
        self._min_hw = chain_min_input_hw(shapes, self._strides, self._paddings, self._dilations)
        factory = dict(device=device, dtype=dtype)
        for i, s in enumerate(shapes):
            self.register_parameter(f"weight{i + 1}", nn.Parameter(torch.empty(s, **factory)))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.lay_out()
        self.reset_parameters()

    @property
    def family(self) -> "families.Family":
        return families.get(self.scheme)

    def stages(self) -> list:
        """``(weight, (stride, padding4, dilation))`` per stage."""
        return list(zip(self.stage_weights(), stage_geometry(self._strides, self._paddings, self._dilations)))

    def reset_parameters(self) -> None:
        for w in self.stage_weights():
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, energy: Optional[float] = None, rank=None,
                  ratio: Optional[float] = None, rank_multiple: int = 16, scheme: str = "channel",
                  backend: str = "auto") -> "LowRankConv2d":
        """Factor ``conv`` in the form of ``scheme``; the rank comes from at most one of
        ``energy`` (default 0.9), ``rank`` or ``ratio`` (see :class:`trp.decompose.RankSpec`)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        reason = decompose.refusal(conv) or families.get(scheme).accepts(conv)
        if reason:
            raise ValueError(f"cannot factor this conv: {reason}")
        spec = decompose.RankSpec(energy=energy, rank=rank, ratio=ratio, rank_multiple=rank_multiple)
        return from_factors(conv, families.get(scheme).factor(conv.weight, spec), conv.bias, scheme, backend)

    def dense_weight(self) -> torch.Tensor:
        """The (n, c, kh, kw) weight that the factors multiply out to."""
        return self.family.compose(self.stage_weights())

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function (up to rounding)."""
        p = self.weight1
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, bias=self.bias is not None,
                         device=p.device, dtype=p.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        weights = self.stage_weights()
        out = ops.run_kept(self._kept, x, weights, self.bias, residual, self.relu)
        if out is not None:  # the same call as the last one: its checks hold
            return out
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
            residual = residual.unsqueeze(0) if residual is not None and residual.dim() == 3 else residual
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"input must be (N, {self.in_channels}, H, W) or ({self.in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[2] < self._min_hw[0] or x.shape[3] < self._min_hw[1]:
            raise input_too_small(self._describe(), x.shape[2:], self.kernel_size, self._padding4, self.dilation)
        chain = (weights, self._strides, self._paddings, self._dilations, self.bias)
        if residual is not None and residual.shape != self._out_shape(x):  # broadcasting: not fused
            _check_broadcast(residual, self._out_shape(x))
            out = epilogue(ops.conv_chain(x, *chain, backend=self._backend), residual, self.relu)
        else:
            out = ops.conv_chain(x, *chain, residual, self.relu, self._backend, None if unbatched else self._kept)
        return out.squeeze(0) if unbatched else out

    def _out_shape(self, x: torch.Tensor) -> torch.Size:
        hw = conv_output_hw(x.shape[-2:], self.kernel_size, self.stride, self._padding4, self.dilation)
        return torch.Size((x.shape[0], self.out_channels, *hw))

    def config(self) -> dict:
        """JSON-ready constructor arguments (no weights)."""
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    kernel_size=list(self.kernel_size), rank=self.rank if len(self.ranks) == 1 else list(self.ranks),
                    stride=list(self.stride),
                    padding=self.padding if isinstance(self.padding, (str, int)) else list(self.padding),
                    dilation=list(self.dilation), bias=self.bias is not None, scheme=self.scheme,
                    backend=self._backend)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        ranks = families.rank_text(self.ranks, self.full_ranks)
        s += f", rank={ranks}, scheme={self.scheme}, backend={self._backend}"
        return s + (", relu=True" if self.relu else "")


class LowRankLinear(_LowRank):
    """An ``nn.Linear`` as two thin ones: ``x @ weight1.T @ weight2.T + bias`` (the
    ``pointwise`` family)."""

    scheme = "pointwise"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        (rank,) = self._check_ranks(rank, (min(in_features, out_features),))
        self._n_stages = 2
        self.backend = backend
        factory = dict(device=device, dtype=dtype)
        self.weight1 = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.weight2 = nn.Parameter(torch.empty(out_features, rank, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.lay_out()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.weight1, self.weight2):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, energy: Optional[float] = None, rank: Optional[int] = None,
                    ratio: Optional[float] = None, rank_multiple: int = 16,
                    backend: str = "auto") -> "LowRankLinear":
        """Factor ``linear`` by truncated SVD (rank arguments as in :meth:`LowRankConv2d.from_conv`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        reason = decompose.refusal(linear)
        if reason:
            raise ValueError(f"cannot factor this linear layer: {reason}")
        spec = decompose.RankSpec(energy=energy, rank=rank, ratio=ratio, rank_multiple=rank_multiple)
        return from_factors(linear, families.get("pointwise").factor(linear.weight, spec), linear.bias,
                            "pointwise", backend)

    def dense_weight(self) -> torch.Tensor:
        return self.weight2 @ self.weight1

    def to_dense(self) -> nn.Linear:
        p = self.weight1
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=p.device, dtype=p.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.train(self.training)
        return linear

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input must have last dimension {self.in_features}, got shape {tuple(x.shape)}")
        if residual is not None and residual.shape != (*x.shape[:-1], self.out_features):  # broadcasting
            _check_broadcast(residual, (*x.shape[:-1], self.out_features))
            return epilogue(ops.lowrank_linear(x, self.weight1, self.weight2, self.bias, self._backend), residual,
                            self.relu)
        return ops.lowrank_linear(x, self.weight1, self.weight2, self.bias, self._backend, residual, self.relu)

    def config(self) -> dict:
        return dict(in_features=self.in_features, out_features=self.out_features, rank=self.rank,
                    bias=self.bias is not None, backend=self._backend)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}"
        if self.bias is None:
            s += ", bias=False"
        s += f", rank={self.rank}/{self.full_rank}, backend={self._backend}"
        return s + (", relu=True" if self.relu else "")


LOWRANK_TYPES = (LowRankConv2d, LowRankLinear)



def parameter_of(layer: nn.Module) -> torch.Tensor:
    """A parameter of a conv or linear layer, low-rank or not: its dtype and device are the
    layer's (``weight``, or a low-rank layer's first factor)."""
    return layer.weight1 if isinstance(layer, _LowRank) else layer.weight


def from_factors(layer: nn.Module, factors: "families.Factored", bias: Optional[torch.Tensor],
                 scheme: str = "channel", backend: str = "auto") -> _LowRank:
    """The low-rank module replacing ``layer`` (an nn.Conv2d or nn.Linear), holding
    ``factors`` (a :class:`trp.families.Factored` of family ``scheme``) and ``bias`` (which
    may differ from ``layer.bias``, e.g. after BN folding)."""
    like = parameter_of(layer)  # (a layer factored before gets new factors)
    factory = dict(device=like.device, dtype=like.dtype)
    rank = factors.ranks  # one per stage but the last, as the constructors take them
    if isinstance(layer, nn.Linear):
        new = LowRankLinear(layer.in_features, layer.out_features, rank, bias is not None, backend, **factory)
    else:
        new = LowRankConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, rank,
                            layer.stride, layer.padding, layer.dilation, bias is not None, scheme, backend,
                            **factory)
    with torch.no_grad():
        for p, w in zip(new.stage_weights(), factors.weights):
            p.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(layer.training)
    return new
