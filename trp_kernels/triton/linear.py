"""Fused low-rank linear layer: ``(x @ weight1.T) @ weight2.T + bias`` (then the epilogue)
with the r-wide intermediate kept on chip.

This is the channel-scheme conv kernel on a 1×1 "image": rows of ``x`` are its pixels, the
in-features its channels. Describing the matrix through strides lets one kernel (and one
autotuning space) serve both, and a non-contiguous ``x`` runs without a copy when its
leading dimensions can be viewed as one.
"""

from __future__ import annotations

from typing import Optional

import torch

from trp_kernels import _autograd
from trp_kernels.triton import _common, conv_channel


def linear(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor, bias: Optional[torch.Tensor],
           residual: Optional[torch.Tensor], relu: bool, config: Optional[dict] = None) -> torch.Tensor:
    """``reference.lowrank_linear(x, weight1, weight2, bias, residual, relu)`` in one kernel."""
    op = "triton linear"
    if x.dim() == 0 or weight1.dim() != 2 or weight2.dim() != 2:
        raise ValueError(f"{op}: want x (..., in), weight1 (r, in), weight2 (out, r); got "
                         f"{tuple(x.shape)}, {tuple(weight1.shape)}, {tuple(weight2.shape)}")
    if weight1.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: weight1 has {weight1.shape[1]} in-features, x has {x.shape[-1]}")
    out_shape = (*x.shape[:-1], weight2.shape[0])
    _common.check_tensors(op, x, weight1, weight2, bias, residual, out_shape)
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    x2 = x.reshape(-1, x.shape[-1])
    res2 = residual.reshape(-1, weight2.shape[0]) if residual is not None else out.view(-1, weight2.shape[0])
    m, k = x2.shape
    conv_channel.launch(
        x2, weight1, weight2, bias, res2 if residual is not None else None,
        out.view(m, weight2.shape[0]), (m, k, 1, 1), (1, 1),
        x_strides=(x2.stride(0), x2.stride(1), 0, 0), w1_strides=(weight1.stride(0), weight1.stride(1), 0, 0),
        out_strides=(weight2.shape[0], 1, 0, 0), res_strides=(res2.stride(0), res2.stride(1), 0, 0),
        stride=(1, 1), pad=(0, 0), dilation=(1, 1), relu=relu,
        precision=_common.dot_precision(x.dtype, conv=False), config=config, family="linear")
    return out


@_common.register_op("trp::triton_linear")
def _op(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor, bias: Optional[torch.Tensor],
        residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    return linear(x, weight1, weight2, bias, residual, relu)


_autograd.register(_op, "linear")
