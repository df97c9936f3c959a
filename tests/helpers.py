import torch

from trp_kernels import reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b``."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# Awkward factored-conv shapes every kernel is tested on: (batch, c, n, (h, w), kernel,
# rank, stride, dilation, padding) with c and n not multiples of 16, odd sizes, ranks
# 1/17/64/256, stride 2, dilation 2, asymmetric and non-square.
AWKWARD_CONV_SHAPES = [
    (1, 5, 7, (9, 7), (3, 3), 1, (1, 1), (1, 1), 1),
    (3, 20, 18, (11, 9), (3, 3), 17, (2, 2), (1, 1), 1),
    (1, 33, 40, (7, 7), (3, 3), 64, (1, 1), (2, 2), 2),
    (3, 6, 9, (5, 6), (3, 3), 256, (1, 2), (1, 1), (0, 1, 2, 1)),
    (1, 12, 20, (8, 13), (5, 3), 17, (2, 1), (1, 2), "valid"),
]
LAYOUTS = ["nchw", "channels_last", "noncontiguous"]
EPILOGUES = ["none", "bias", "residual_relu"]


def make_input(shape, layout, dtype=torch.float32, device="cpu"):
    """A random NCHW-shaped tensor in ``layout``: nchw, channels_last, or noncontiguous
    (every other column of a wider tensor)."""
    if layout == "noncontiguous":
        n, c, h, w = shape
        return torch.randn(n, c, h, 2 * w, device=device, dtype=dtype)[..., ::2]
    x = torch.randn(shape, device=device, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def conv_case(scheme, batch, c, n, hw, kernel, rank, stride, dilation, padding, layout, epilogue,
              dtype=torch.float32, device="cpu"):
    """Inputs of a factored conv (the kernels' argument order):
    ``(x, weight1, weight2, bias, residual, stride, padding4, dilation, relu)``."""
    kh, kw = kernel
    x = make_input((batch, c, *hw), layout, dtype, device)
    scale = 1 / (c * kh * kw) ** 0.5
    if scheme == "channel":
        w1 = torch.randn(rank, c, kh, kw, device=device, dtype=dtype) * scale
        w2 = torch.randn(n, rank, 1, 1, device=device, dtype=dtype) / rank ** 0.5
    else:
        w1 = torch.randn(rank, c, kh, 1, device=device, dtype=dtype) * scale
        w2 = torch.randn(n, rank, 1, kw, device=device, dtype=dtype) / (rank * kw) ** 0.5
    pad4 = reference.resolve_padding(padding, kernel, dilation)
    hw_out = reference.conv_output_hw(hw, kernel, stride, pad4, dilation)
    bias = torch.randn(n, device=device, dtype=dtype) if epilogue != "none" else None
    residual = make_input((batch, n, *hw_out), layout, dtype, device) if epilogue == "residual_relu" else None
    return x, w1, w2, bias, residual, list(stride), list(pad4), list(dilation), epilogue == "residual_relu"


# Every chain a fused kernel computes (trp_kernels.reference.KERNELS).
CHAIN_KINDS = reference.KERNELS


def chain_case(kind, batch, c, n, hw, kernel, rank, stride, dilation, padding, layout, epilogue,
               dtype=torch.float32, device="cpu"):
    """Inputs of a conv chain of ``kind`` for one awkward shape:
    ``(x, weights, bias, residual, (stride, padding4, dilation), relu)``, the geometry the
    conv's (what ``reference.kernel_stages(kind, ...)`` spreads over the stages). Tucker
    gets two different ranks (``rank`` for the first 1×1, ``rank + 5`` for the core), so
    that a swapped mode shows."""
    if kind in reference.TWO_STAGE_KERNELS:
        x, w1, w2, bias, residual, stride, pad4, dilation, relu = conv_case(
            kind, batch, c, n, hw, kernel, rank, stride, dilation, padding, layout, epilogue, dtype, device)
        return x, [w1, w2], bias, residual, (tuple(stride), tuple(pad4), tuple(dilation)), relu
    kh, kw = kernel
    x = make_input((batch, c, *hw), layout, dtype, device)
    if kind == "tucker":
        r2 = rank + 5
        weights = [torch.randn(rank, c, 1, 1, device=device, dtype=dtype) / c ** 0.5,
                   torch.randn(r2, rank, kh, kw, device=device, dtype=dtype) / (rank * kh * kw) ** 0.5,
                   torch.randn(n, r2, 1, 1, device=device, dtype=dtype) / r2 ** 0.5]
    elif kind == "dense":
        weights = [torch.randn(n, c, kh, kw, device=device, dtype=dtype) / (c * kh * kw) ** 0.5]
    else:
        raise ValueError(f"kind must be one of {CHAIN_KINDS}, got {kind!r}")
    pad4 = reference.resolve_padding(padding, kernel, dilation)
    hw_out = reference.conv_output_hw(hw, kernel, stride, pad4, dilation)
    bias = torch.randn(n, device=device, dtype=dtype) if epilogue != "none" else None
    residual = make_input((batch, n, *hw_out), layout, dtype, device) if epilogue == "residual_relu" else None
    return x, weights, bias, residual, (tuple(stride), tuple(pad4), tuple(dilation)), epilogue == "residual_relu"
