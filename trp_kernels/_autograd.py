"""Autograd for every trp op, whichever backend ran the forward pass.

All conv ops share one backward, :func:`trp_kernels.reference.conv_chain_backward` (the
reference, F.conv2d per stage, recomputing the intermediates that no forward kernel
writes to memory); the linear op has its own. The ops differ only in their argument
lists; arguments are found by name in the op's schema:

- ``chain``: ``trp::conv_chain`` (x, weights, strides, paddings, dilations, bias,
  residual, relu, ...);
- ``conv``: a fused kernel's op (x, weight1, ..., weightK, bias, residual, stride,
  padding, dilation, relu), whose chain is :func:`reference.kernel_stages` of the
  ``kernel`` it is registered with;
- ``linear``: (x, weight1, weight2, bias, residual, relu).
"""

from __future__ import annotations

from trp_kernels import reference

_NEEDED = {
    "chain": ("x", "weights", "strides", "paddings", "dilations", "bias", "residual", "relu"),
    "conv": ("x", "weight1", "bias", "residual", "stride", "padding", "dilation", "relu"),
    "linear": ("x", "weight1", "weight2", "bias", "residual", "relu"),
}


def register(op, kind: str, kernel: str = "") -> None:
    """Register autograd on ``op`` (a ``torch.library`` CustomOpDef) of ``kind`` 'chain',
    'conv' (with its fused ``kernel``) or 'linear'. Gradients flow to x, the weights,
    bias and residual."""
    names = [a.name for a in op._opoverload._schema.arguments]
    missing = [n for n in _NEEDED[kind] if n not in names]
    if missing:
        raise TypeError(f"op {op._name} lacks argument(s) {missing}; its schema has {names}")
    weight_names = ["weights"] if kind == "chain" else [n for n in names if n.startswith("weight")]

    def setup_context(ctx, inputs, output):
        a = dict(zip(names, inputs))
        weights = list(a["weights"]) if kind == "chain" else [a[n] for n in weight_names]
        ctx.n_weights = len(weights)
        ctx.save_for_backward(a["x"], *weights, output if a["relu"] else None)
        if kind == "chain":
            ctx.geometry = (a["strides"], a["paddings"], a["dilations"])
        elif kind == "conv":
            ctx.geometry = reference.kernel_stages(kernel, a["stride"], a["padding"], a["dilation"])
        ctx.has_bias, ctx.has_residual, ctx.relu = a["bias"] is not None, a["residual"] is not None, a["relu"]

    def backward(ctx, grad_out):
        x, *weights, out = ctx.saved_tensors
        # a Tensor[] argument's entry is a list of one flag per tensor (flattened in some
        # torch versions: then it spans one entry per tensor)
        given = list(ctx.needs_input_grad)
        nested = len(given) == len(names)
        needs, pos = {}, 0
        for n in names:
            if nested:
                v = given[pos]
                needs[n] = list(v) if isinstance(v, (list, tuple)) else [v] * (ctx.n_weights if n == "weights" else 1)
                pos += 1
            else:
                width = ctx.n_weights if n == "weights" else 1
                needs[n] = given[pos:pos + width]
                pos += width
        g = reference.epilogue_backward(grad_out, out, ctx.relu)
        need_w = [b for n in weight_names for b in needs[n]]
        if kind == "linear":
            gx, gw1, gw2, gb = reference.lowrank_linear_backward(
                g, x, *weights, ctx.has_bias, [needs["x"][0], *need_w, needs["bias"][0]])
            grads_w = [gw1, gw2]
        else:
            gx, grads_w, gb = reference.conv_chain_backward(
                g, x, weights, ctx.has_bias, *ctx.geometry, [needs["x"][0], *need_w, needs["bias"][0]])
        result = {"x": gx, "bias": gb, "residual": g if ctx.has_residual and needs["residual"][0] else None}
        if kind == "chain":
            result["weights"] = list(grads_w)
        else:
            result.update(zip(weight_names, grads_w))
        return tuple(result.get(n) for n in names)

    op.register_autograd(backward, setup_context=setup_context)
