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
from trp_kernels import reference
from trp_kernels.reference import (_pair, chain_min_input_hw, check_chain, conv_output_hw, epilogue, input_too_small,
                                  min_input_hw, resolve_padding, stage_geometry)

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


class _Layer(nn.Module):
    """What every trp layer shares: the backend setting, the fused epilogue and its name
    in errors.

    ``forward(x, residual=None)`` computes ``layer(x) + residual``, then ReLU when
    ``relu`` is set, in the kernel's epilogue where the backend fuses it (set by
    :func:`trp.compile`'s epilogue pass, see :mod:`trp.epilogue`).
    """

    relu: bool = False

    @property
    def backend(self) -> str:
        """Requested backend: 'auto' (chosen per call from the input) or a backend name."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_backend(value)
        self._bound = [None]  # the last call's kept plan (ops.run_kept) was for the old backend

    def __getstate__(self):
        state = super().__getstate__()
        if "_bound" in state:  # a plan for this process's memory: a copy or a pickle starts without it
            state = {**state, "_bound": [None]}
        return state

    def _describe(self) -> str:
        name = getattr(self, NAME_ATTR, None)
        return f"layer {name!r} ({type(self).__name__})" if name else f"{type(self).__name__}({self.extra_repr()})"

    def lay_out(self) -> None:
        """Put the weights in the layout the backend's kernel reads in place (no-op here)."""

    def _rank_limit(self) -> Optional[int]:
        """The widest intermediate, for the backends' limits (None: none)."""
        return None

    def resolved_backend(self, device=None, dtype=None) -> str:
        """The backend a call with tensors of ``device``/``dtype`` would run (default: the
        parameters'); raises :class:`trp_kernels.ops.BackendError` if an explicit backend
        cannot run them."""
        p = parameter_of(self)
        return ops.resolve_backend(self._backend, device or p.device, dtype or p.dtype, self._rank_limit(),
                                   getattr(self, "kernel_size", (1, 1)))

    def _filled(self, dense: nn.Module) -> nn.Module:
        """``dense`` (a new nn.Conv2d or nn.Linear of this layer's shape) holding
        :meth:`dense_weight` and the bias, in this layer's train/eval mode."""
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        dense.train(self.training)
        return dense

    # -- what both conv layers share ----------------------------------------------------
    def _set_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation) -> None:
        """The ``nn.Conv2d`` arguments, checked, as attributes (and ``_padding4``)."""
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

    def _conv_input(self, x: torch.Tensor, residual: Optional[torch.Tensor]):
        """``(x, residual, unbatched, fused)`` for a conv call: an unbatched input as a batch
        of one, checked; ``fused`` False when ``residual`` only broadcasts to the output
        (then it is added outside the kernel)."""
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
            residual = residual.unsqueeze(0) if residual is not None and residual.dim() == 3 else residual
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"input must be (N, {self.in_channels}, H, W) or ({self.in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[2] < self._min_hw[0] or x.shape[3] < self._min_hw[1]:
            raise input_too_small(self._describe(), x.shape[2:], self.kernel_size, self._padding4, self.dilation)
        fused = residual is None or residual.shape == self._out_shape(x)
        if not fused:
            _check_broadcast(residual, self._out_shape(x))
        return x, residual, unbatched, fused

    def _out_shape(self, x: torch.Tensor) -> torch.Size:
        hw = conv_output_hw(x.shape[-2:], self.kernel_size, self.stride, self._padding4, self.dilation)
        return torch.Size((x.shape[0], self.out_channels, *hw))

    def _conv_config(self) -> dict:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    kernel_size=list(self.kernel_size), stride=list(self.stride),
                    padding=self.padding if isinstance(self.padding, (str, int)) else list(self.padding),
                    dilation=list(self.dilation), bias=self.bias is not None, backend=self._backend)

    def _conv_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        return s + (", bias=False" if self.bias is None else "")

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function (up to rounding)."""
        p = parameter_of(self)
        return self._filled(nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                      self.padding, self.dilation, bias=self.bias is not None,
                                      device=p.device, dtype=p.dtype))


class _LowRank(_Layer):
    """What both low-rank layers share: the rank and the factors' layout."""

    ranks: tuple       # one per stage but the last (stage order)
    full_ranks: tuple

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

    def _rank_limit(self) -> Optional[int]:
        return max(self.ranks)

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
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation)
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

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        weights = self.stage_weights()
        out = ops.run_kept(self._bound, x, weights, self.bias, residual, self.relu)
        if out is not None:  # the same call as the last one: its checks hold
            return out
        x, residual, unbatched, fused = self._conv_input(x, residual)
        chain = (weights, self._strides, self._paddings, self._dilations, self.bias)
        if not fused:
            out = epilogue(ops.conv_chain(x, *chain, backend=self._backend), residual, self.relu)
        else:
            out = ops.conv_chain(x, *chain, residual, self.relu, self._backend, None if unbatched else self._bound)
        return out.squeeze(0) if unbatched else out

    def config(self) -> dict:
        """JSON-ready constructor arguments (no weights)."""
        return dict(self._conv_config(), rank=self.rank if len(self.ranks) == 1 else list(self.ranks),
                    scheme=self.scheme)

    def extra_repr(self) -> str:
        ranks = families.rank_text(self.ranks, self.full_ranks)
        s = self._conv_repr() + f", rank={ranks}, scheme={self.scheme}, backend={self._backend}"
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
        return self._filled(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                      device=p.device, dtype=p.dtype))

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


class TapSparseConv2d(_Layer):
    """A k×k ``nn.Conv2d`` whose pruned im2col columns are gone (SPP's pruned convs): a
    column is one (input channel, kernel row, kernel column) tap across all filters. It
    holds the kept columns only, and runs at their cost (:func:`trp_kernels.ops.conv_taps`):

    - ``taps``: parameter (n_kept, out_channels), the kept columns' weights;
    - ``kept``: buffer (n_kept,) int64, each kept column as ``(ki * kw + kj) * in_channels +
      ci``, ascending (the packed form of :func:`trp_kernels.reference.pack_taps`).

    Training it trains the kept taps only: the pruned ones stay zero by construction.
    Same constructor arguments as ``nn.Conv2d`` (zero padding, groups=1) plus ``kept``
    (a bool mask (in_channels, kh, kw) of the kept taps, or how many are kept, their
    columns then set by ``load_state_dict``) and ``backend``. Usually built with
    :meth:`from_conv` or by :func:`trp.compile` from :meth:`trp.SPP.plan`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, kept, stride=1, padding=0, dilation=1,
                 bias: bool = True, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation)
        self.backend = backend
        cols = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        shape = (self.in_channels, *self.kernel_size)
        if isinstance(kept, torch.Tensor):
            if kept.dtype is not torch.bool or tuple(kept.shape) != shape:
                raise ValueError(f"kept must be a bool mask of shape {shape} (in_channels, kh, kw) or an int, got "
                                 f"{kept.dtype} {tuple(kept.shape)}")
            columns = reference.tap_columns(kept.cpu())
        elif isinstance(kept, int) and not isinstance(kept, bool) and 0 <= kept <= cols:
            columns = torch.arange(kept, dtype=torch.int64)
        else:
            raise ValueError(f"kept must be a bool mask of shape {shape} or an int in [0, {cols}], got {kept!r}")
        self._min_hw = min_input_hw(self.kernel_size, self._padding4, self.dilation)
        factory = dict(device=device, dtype=dtype)
        self.taps = nn.Parameter(torch.empty((columns.numel(), self.out_channels), **factory))
        self.register_buffer("kept", columns.to(device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def n_kept(self) -> int:
        return self.kept.numel()

    @property
    def n_taps(self) -> int:
        """All the im2col columns: in_channels · kh · kw."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def keep_mask(self) -> torch.Tensor:
        """The kept taps as a bool mask (in_channels, kh, kw)."""
        return reference.tap_mask(self.kept, self.in_channels, self.kernel_size)

    def reset_parameters(self) -> None:
        fan_in = max(self.n_kept, 1)
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(self.taps, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, keep: Optional[torch.Tensor] = None, *, weight: Optional[torch.Tensor] = None,
                  bias="conv", backend: str = "auto") -> "TapSparseConv2d":
        """``conv`` without its pruned taps: ``keep`` a bool mask (in_channels, kh, kw) of the
        kept ones (default: the taps whose column is not all zero). ``weight``/``bias``
        replace the conv's (e.g. after BN folding)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        reason = decompose.refusal(conv)
        if reason:
            raise ValueError(f"cannot make this conv tap-sparse: {reason}")
        w = (conv.weight if weight is None else weight).detach()
        if tuple(w.shape) != tuple(conv.weight.shape):
            raise ValueError(f"weight must have the conv's shape {tuple(conv.weight.shape)}, got {tuple(w.shape)}")
        if keep is None:
            keep = (w != 0).any(0)
        elif not isinstance(keep, torch.Tensor) or keep.dtype is not torch.bool or keep.shape != w.shape[1:]:
            raise ValueError(f"keep must be a bool mask of shape {tuple(w.shape[1:])} (in_channels, kh, kw), got "
                             f"{keep.dtype if isinstance(keep, torch.Tensor) else type(keep).__name__} "
                             f"{tuple(getattr(keep, 'shape', ()))}")
        bias = conv.bias if isinstance(bias, str) and bias == "conv" else bias
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, keep, conv.stride,
                  conv.padding, conv.dilation, bias is not None, backend, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.taps.copy_(reference.pack_taps(w, keep.to(w.device))[0])
            if bias is not None:
                new.bias.copy_(bias)
        new.train(conv.training)
        return new

    def select_channels(self, inputs: Optional[torch.Tensor] = None,
                        outputs: Optional[torch.Tensor] = None) -> "TapSparseConv2d":
        """A new layer reading only the input channels ``inputs`` and computing only the output
        channels ``outputs`` (bool masks, None: all), with the kept taps of those channels."""
        inputs = torch.ones(self.in_channels, dtype=torch.bool) if inputs is None else inputs.to(torch.bool).cpu()
        outputs = torch.ones(self.out_channels, dtype=torch.bool) if outputs is None else outputs.to(torch.bool).cpu()
        if inputs.shape != (self.in_channels,) or outputs.shape != (self.out_channels,):
            raise ValueError(f"inputs and outputs must be bool masks of shapes ({self.in_channels},) and "
                             f"({self.out_channels},), got {tuple(inputs.shape)} and {tuple(outputs.shape)}")
        p = self.taps
        keep = self.keep_mask().cpu()[inputs]
        weight = self.dense_weight().detach()[outputs.to(p.device)][:, inputs.to(p.device)]
        new = TapSparseConv2d(int(inputs.sum()), int(outputs.sum()), self.kernel_size, keep, self.stride,
                              self.padding, self.dilation, self.bias is not None, self._backend, device=p.device,
                              dtype=p.dtype)
        with torch.no_grad():
            new.taps.copy_(reference.pack_taps(weight, keep.to(p.device))[0])
            if self.bias is not None:
                new.bias.copy_(self.bias[outputs.to(p.device)])
        new.relu = self.relu
        new.train(self.training)
        return new

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.kept = self.kept.clone()  # a new tensor: plans kept for the old columns no longer match
        self._bound = [None]
        k = self.kept.cpu()
        if k.numel() and (k.dtype != torch.int64 or int(k.min()) < 0 or int(k.max()) >= self.n_taps
                          or (k.numel() > 1 and not bool((k[1:] > k[:-1]).all()))):
            error_msgs.append(f"{prefix}kept must hold ascending column numbers in [0, {self.n_taps}), "
                              f"got {k.tolist()[:8]}...")

    def dense_weight(self) -> torch.Tensor:
        """The (out, in, kh, kw) weight, zero at the pruned taps."""
        return reference.unpack_taps(self.taps, self.kept, self.in_channels, self.kernel_size)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = ops.run_kept(self._bound, x, (self.taps, self.kept), self.bias, residual, self.relu)
        if out is not None:  # the same call as the last one: its checks hold
            return out
        x, residual, unbatched, fused = self._conv_input(x, residual)
        args = (self.taps, self.kept, self.bias, self.kernel_size, self.stride, self._padding4, self.dilation)
        if not fused:
            out = epilogue(ops.conv_taps(x, *args, backend=self._backend), residual, self.relu)
        else:
            out = ops.conv_taps(x, *args, residual, self.relu, self._backend, None if unbatched else self._bound)
        return out.squeeze(0) if unbatched else out

    def config(self) -> dict:
        """JSON-ready constructor arguments (no weights; the kept columns are the ``kept`` buffer)."""
        return dict(self._conv_config(), kept=self.n_kept)

    def extra_repr(self) -> str:
        s = self._conv_repr() + f", taps={self.n_kept}/{self.n_taps}, backend={self._backend}"
        return s + (", relu=True" if self.relu else "")


LOWRANK_TYPES = (LowRankConv2d, LowRankLinear)
# Every layer trp swaps in: a leaf to tracing, compile, save and the epilogue pass.
LAYER_TYPES = (LowRankConv2d, LowRankLinear, TapSparseConv2d)
# The conv layers among them.
CONV_TYPES = (LowRankConv2d, TapSparseConv2d)



def parameter_of(layer: nn.Module) -> torch.Tensor:
    """A parameter of a conv or linear layer, low-rank or not: its dtype and device are the
    layer's (``weight``, or a low-rank layer's first factor)."""
    if isinstance(layer, _LowRank):
        return layer.weight1
    return layer.taps if isinstance(layer, TapSparseConv2d) else layer.weight


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
