"""Autograd for every trp op, whichever backend ran the forward pass.

All ops share one backward: :mod:`trp_kernels.reference`'s, which recomputes the r-channel
intermediate (no forward kernel ever writes it to memory). The ops differ only in their
argument lists; arguments are found by name in the op's schema, and an op that fixes one
(a Triton op per conv scheme) passes it in ``fixed``.
"""

from __future__ import annotations

from trp_kernels import reference

_GRAD_ARGS = ("x", "weight1", "weight2", "bias", "residual")


def register(op, kind: str, **fixed) -> None:
    """Register autograd on ``op`` (a ``torch.library`` CustomOpDef) of ``kind`` 'conv' or
    'linear'. Gradients flow to x, weight1, weight2, bias and residual."""
    names = [a.name for a in op._opoverload._schema.arguments]
    needed = _GRAD_ARGS + ("relu",) + (("stride", "padding", "dilation", "scheme") if kind == "conv" else ())
    missing = [n for n in needed if n not in names and n not in fixed]
    if missing:
        raise TypeError(f"op {op._name} lacks argument(s) {missing}; its schema has {names}")
    slots = [names.index(n) for n in _GRAD_ARGS]

    def setup_context(ctx, inputs, output):
        a = {**fixed, **dict(zip(names, inputs))}
        ctx.save_for_backward(a["x"], a["weight1"], a["weight2"], output if a["relu"] else None)
        ctx.geometry = tuple(a[k] for k in ("stride", "padding", "dilation", "scheme")) if kind == "conv" else ()
        ctx.has_bias, ctx.has_residual, ctx.relu = a["bias"] is not None, a["residual"] is not None, a["relu"]

    def backward(ctx, grad_out):
        x, weight1, weight2, out = ctx.saved_tensors
        needs = [ctx.needs_input_grad[i] for i in slots]
        g = reference.epilogue_backward(grad_out, out, ctx.relu)
        if kind == "conv":
            grads = reference.lowrank_conv2d_backward(g, x, weight1, weight2, ctx.has_bias, *ctx.geometry,
                                                      needs[:4])
        else:
            grads = reference.lowrank_linear_backward(g, x, weight1, weight2, ctx.has_bias, needs[:4])
        result = [None] * len(names)
        for i, grad in zip(slots, (*grads, g if ctx.has_residual and needs[4] else None)):
            result[i] = grad
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)
