"""Winograd F(2x2, 3x3) first stage against the direct sum, per layer: the fused C++ kernel
on ResNet-18's and CIFAR ResNets' 3x3 stride-1 shapes, as the channel scheme at a quarter
rank (rounded up to 16) and as a dense conv, with the residual + ReLU epilogue; the two
modes call by call in one process, the order alternating (same runtime, same caches).

    python benches/winograd_ab.py [--calls 200] [--threads 2]
    (results: benches/results/winograd/layers.txt)
"""
import argparse
import statistics
import time

import torch

from trp_kernels import cpp, reference

# (name, channels, spatial size) of the 3x3 stride-1 convs.
LAYERS = [("r18 layer1", 64, 56), ("r18 layer2", 128, 28), ("r18 layer3", 256, 14), ("r18 layer4", 512, 7),
          ("cifar 16", 16, 32), ("cifar 32", 32, 16), ("cifar 64", 64, 8)]


def rank_of(c: int) -> int:
    return max(16, -(-c // 4 // 16) * 16)


def case(kind: str, c: int, hw: int, batch: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, hw, hw, generator=g).contiguous(memory_format=torch.channels_last)
    if kind == "channel":
        r = rank_of(c)
        weights = [torch.randn(r, c, 3, 3, generator=g) / (9 * c) ** 0.5, torch.randn(c, r, 1, 1, generator=g) / r ** 0.5]
    else:
        weights = [torch.randn(c, c, 3, 3, generator=g) / (9 * c) ** 0.5]
    weights = [cpp.kernel_layout(w) for w in weights]
    bias = torch.randn(c, generator=g)
    res = torch.randn(batch, c, hw, hw, generator=g).contiguous(memory_format=torch.channels_last)
    call = lambda: cpp.fused_chain(x, weights, bias, kind, (1, 1), (1, 1, 1, 1), (1, 1), res, True)
    call.tensors = (x, weights, bias, res)
    return call


def errors(kind: str, call) -> tuple[float, float, float]:
    """Max |error| / max |output| against the float64 reference: the direct sum, Winograd,
    and PyTorch's own float32."""
    x, weights, bias, res = call.tensors
    stages = reference.kernel_stages(kind, (1, 1), (1, 1, 1, 1), (1, 1))
    d = lambda t: t.double()
    exact = reference.conv_chain(d(x), [d(w) for w in weights], *stages, d(bias), d(res), True)
    torch32 = reference.conv_chain(x, weights, *stages, bias, res, True)
    lib, out = cpp._require(), {}
    for mode in ("never", "always"):
        lib.winograd(mode)
        out[mode] = call()
    scale = exact.abs().max().item()
    return tuple((o.double() - exact).abs().max().item() / scale for o in (out["never"], out["always"], torch32))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lib = cpp._require()
    old = lib.winograd()
    print(f"{lib.isa()} build, {args.threads} threads, torch {torch.__version__}; median ms of {args.calls} "
          f"calls each, the modes alternating call by call; ratio: median of per-pair winograd/direct")
    print(f"{'layer':12s} {'kind':8s} {'rank':>4s} {'b':>2s} {'direct':>8s} {'winograd':>8s} {'ratio':>6s}")
    try:
        for batch in (1, 8):
            for name, c, hw in LAYERS:
                for kind in ("channel", "dense"):
                    call = case(kind, c, hw, batch)
                    times = {"never": [], "always": []}
                    with torch.inference_mode():
                        for i in range(args.calls + 5):
                            for mode in (("never", "always") if i % 2 else ("always", "never")):
                                lib.winograd(mode)
                                t0 = time.perf_counter()
                                call()
                                if i >= 5:
                                    times[mode].append(time.perf_counter() - t0)
                    ratio = statistics.median(a / b for a, b in zip(times["always"], times["never"]))
                    d, w = (statistics.median(times[m]) * 1e3 for m in ("never", "always"))
                    rank = rank_of(c) if kind == "channel" else c
                    print(f"{name:12s} {kind:8s} {rank:4d} {batch:2d} {d:8.3f} {w:8.3f} {ratio:6.2f}", flush=True)
        print("\nerror against the float64 reference, max |error| / max |output|, batch 1:")
        print(f"{'layer':12s} {'kind':8s} {'direct':>9s} {'winograd':>9s} {'torch fp32':>10s}")
        for name, c, hw in LAYERS:
            for kind in ("channel", "dense"):
                e = errors(kind, case(kind, c, hw, 1))
                print(f"{name:12s} {kind:8s} {e[0]:9.2e} {e[1]:9.2e} {e[2]:10.2e}", flush=True)
    finally:
        lib.winograd(old)


if __name__ == "__main__":
    main()
