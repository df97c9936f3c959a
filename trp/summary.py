"""``trp.summary``: MACs and parameters of every conv and linear layer, before and after."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from trp import decompose, families
from trp.channels import CHANNELS_ATTR
from trp.compile import FOLDED_ATTR, NOTE_ATTR, ROUNDED
from trp.epilogue import EPILOGUE_ATTR
from trp.modules import LAYER_TYPES, LowRankConv2d, LowRankLinear, TapSparseConv2d, parameter_of
from trp_kernels import ops
from trp_kernels.reference import conv_output_hw

COLUMNS = ("name", "kind", "scheme", "rank", "full_rank", "macs_dense", "macs", "params_dense",
           "params", "backend", "note")


@dataclass
class Summary:
    """One row per conv/linear layer (factored or dense) and totals over those rows.

    MACs are per sample (one forward pass on the example input divided by its first
    dimension, the batch), counted for conv and linear layers only.
    """

    rows: list[dict] = field(default_factory=list)

    @property
    def macs_dense(self) -> int:
        return sum(r["macs_dense"] for r in self.rows)

    @property
    def macs(self) -> int:
        return sum(r["macs"] for r in self.rows)

    @property
    def params_dense(self) -> int:
        return sum(r["params_dense"] for r in self.rows)

    @property
    def params(self) -> int:
        return sum(r["params"] for r in self.rows)

    def __str__(self) -> str:
        head = ("layer", "kind", "scheme", "rank", "MACs dense", "MACs", "params dense", "params",
                "backend", "note")
        body = [(r["name"], r["kind"], r["scheme"] or "-",
                 _ranks(r["rank"], r["full_rank"]),
                 _human(r["macs_dense"]), _human(r["macs"]), _human(r["params_dense"]),
                 _human(r["params"]), r["backend"], r["note"]) for r in self.rows]
        total = ("total", "", "", "", _human(self.macs_dense), _human(self.macs),
                 _human(self.params_dense), _human(self.params), "", "")
        widths = [max(len(str(row[i])) for row in [head, total, *body]) for i in range(len(head))]

        def line(row):
            return "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()

        rule = "-" * len(line(head))
        factored = sum(r["rank"] is not None for r in self.rows)
        macs_x = self.macs_dense / self.macs if self.macs else float("nan")
        params_x = self.params_dense / self.params if self.params else float("nan")
        lines = [line(head), rule, *map(line, body), rule, line(total),
                 f"{factored} of {len(self.rows)} conv/linear layers factored; "
                 f"MACs {macs_x:.2f}x fewer, params {params_x:.2f}x fewer (conv/linear layers only)"]
        rounded = sum(ROUNDED in r["note"] for r in self.rows)
        if rounded:
            lines.append(f"{rounded} layer(s) stayed dense only because rank_multiple rounded their rank up to "
                         f"full rank (see their notes); a smaller rank_multiple factors them (on CPU the fused "
                         f"kernel takes any rank; 16 suits the GPU kernels)")
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle):  # IPython
        p.text(str(self))


def _ranks(rank, full_rank) -> str:
    """'16/64', or one 'rank/full' per stage ('16/64,32/128') for a family of several modes."""
    if rank is None:
        return "-"
    many = isinstance(rank, (list, tuple))
    return families.rank_text(rank if many else (rank,), full_rank if many else (full_rank,))


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _call_macs(m: nn.Module, x_shape, y: torch.Size) -> tuple[int, int]:
    """(MACs, MACs of the dense form) of one call of layer ``m``, whole batch."""
    out = y.numel()
    if isinstance(m, LowRankLinear):
        return out // m.out_features * m.rank * (m.in_features + m.out_features), out * m.in_features
    if isinstance(m, LowRankConv2d):  # each stage at its own output resolution
        batch = out // (m.out_channels * y[-2] * y[-1]) if y[-2] * y[-1] else 0
        hw, macs = x_shape[-2:], 0
        for w, geometry in m.stages():
            hw = conv_output_hw(hw, w.shape[-2:], *geometry)
            macs += batch * hw[0] * hw[1] * w[0].numel() * w.shape[0]
        return macs, out * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
    if isinstance(m, TapSparseConv2d):  # each output element sums the kept taps only
        return out * m.n_kept, out * m.n_taps
    if isinstance(m, nn.Linear):
        macs = out * m.in_features
    elif isinstance(m, nn.modules.conv._ConvTransposeNd):
        macs = torch.Size(x_shape).numel() * m.weight[0].numel()
    else:  # any other conv: every output element sums (in/groups) x kernel products
        macs = out * m.weight[0].numel()
    return macs, macs


def _row(fqn: str, m: nn.Module, shapes: list, batch: int) -> dict:
    macs = macs_dense = 0
    for x_shape, y_shape in shapes:
        a, b = _call_macs(m, x_shape, y_shape)
        macs, macs_dense = macs + a, macs_dense + b
    macs, macs_dense = macs // batch, macs_dense // batch
    params = sum(p.numel() for p in m.parameters(recurse=False))
    note, backend = getattr(m, NOTE_ATTR, None), "dense"
    row = dict(name=fqn, kind="", scheme=None, rank=None, full_rank=None, macs_dense=macs_dense, macs=macs,
               params_dense=params, params=params, backend=backend, note="")
    if isinstance(m, LAYER_TYPES):
        p = parameter_of(m)
        try:
            backend = m.resolved_backend(p.device, p.dtype)
            if backend != "torch" and not ops.is_fused(backend):
                note = "runs the reference arithmetic (fused kernel not built yet)"
        except ops.BackendError as e:
            backend, note = f"{m.backend}!", str(e)
        conv = not isinstance(m, LowRankLinear)
        dense_params = (m.out_channels * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                        if conv else m.in_features * m.out_features)
        taps = isinstance(m, TapSparseConv2d)
        row.update(kind="conv" if conv else "linear", scheme="taps" if taps else getattr(m, "scheme", None),
                   rank=m.n_kept if taps else m.rank, full_rank=m.n_taps if taps else m.full_rank,
                   params_dense=dense_params + (0 if m.bias is None else m.bias.numel()), backend=backend)
    else:
        row["kind"] = "linear" if isinstance(m, nn.Linear) else type(m).__name__.lower().replace("2d", "")
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            row["kind"] = "dwconv" if m.groups == m.in_channels else "gconv"
        note = note or ("not called by the example input" if not shapes else "not compiled")
    folded = getattr(m, FOLDED_ATTR, None)
    if folded:
        note = f"{folded} folded" + (f"; {note}" if note else "")
    built = getattr(m, CHANNELS_ATTR, None)
    if built:  # channels removed (trp.channels): the dense columns are the layer as it was built
        n_in, n_out = built
        scale = n_in * n_out / (m.in_channels * m.out_channels)
        row["macs_dense"] = round(row["macs_dense"] * scale)
        k = m.kernel_size[0] * m.kernel_size[1]
        row["params_dense"] = n_in * n_out * k + (0 if m.bias is None else n_out)
        cut = [f"{what} {a}->{b}" for what, a, b in (("in", n_in, m.in_channels), ("out", n_out, m.out_channels))
               if a != b]
        note = (f"{note}; " if note else "") + "channels removed: " + ", ".join(cut)
    fused = getattr(m, EPILOGUE_ATTR, None)
    if fused:
        note = (f"{note}; " if note else "") + f"epilogue: {fused}"
    row["note"] = note or ""
    return row


def summary(model: nn.Module, example_input) -> Summary:
    """Run ``model`` once on ``example_input`` (a tensor, or a tuple of positional inputs)
    in eval mode under ``torch.no_grad()`` (the model's train/eval modes are restored, so
    nothing, BatchNorm statistics included, changes) and tabulate every conv and linear layer."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("example_input must be a tensor or a tuple of tensors")
    layers = [(fqn, m) for fqn, m in model.named_modules(remove_duplicate=False)
              if isinstance(m, LAYER_TYPES) or decompose.is_layer(m)]
    shapes: dict[int, list] = {id(m): [] for _, m in layers}

    def hook(m, inputs, output):
        if id(m) in shapes and isinstance(output, torch.Tensor):
            shapes[id(m)].append((tuple(inputs[0].shape), output.shape))

    handles = [m.register_forward_hook(hook) for m in {id(m): m for _, m in layers}.values()]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()  # a training-mode pass would update BatchNorm running statistics
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    first = args[0]
    batch = max(int(first.shape[0]), 1) if first.dim() > 0 else 1
    rows, done = [], set()
    for fqn, m in layers:
        if id(m) in done:
            continue
        done.add(id(m))
        rows.append(_row(fqn, m, shapes[id(m)], batch))
    return Summary(rows)
