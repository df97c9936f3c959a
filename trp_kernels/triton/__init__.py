"""Fused Triton kernels, one module per family, each registering its ``torch.library``
triton_op: ``trp::triton_conv_channel``, ``trp::triton_conv_spatial``, ``trp::triton_conv_tucker``,
``trp::triton_linear``.
Reached through :mod:`trp_kernels.ops` only."""

from trp_kernels.triton import conv_channel, conv_spatial, conv_tucker, linear  # noqa: F401 - registers the ops
