"""What the HOOI sweeps after HOSVD buy: the relative Frobenius error of Tucker-2 at ranks
1/4 and 1/2 of each mode, after HOSVD and after each of up to 5 sweeps, for weights of
three kinds. Deterministic (fixed seeds); prints the table committed as
benches/results/hooi-sweeps.txt.

    python benches/hooi_sweeps.py
"""

import torch

from trp import families, models
from trp.decompose import RankSpec


def weights():
    g = torch.Generator().manual_seed(0)
    for c in (64, 256):
        yield f"gaussian {c}->{c} 3x3", torch.randn(c, c, 3, 3, generator=g)
    # a decaying spectrum in the channel unfolding, as TRP-trained layers have (the demo's)
    for c in (64, 256):
        conv = torch.nn.Conv2d(c, c, 3, bias=False)
        holder = torch.nn.Sequential(torch.nn.Conv2d(3, c, 1), conv)
        models.set_conv_spectra(holder, lambda full: 0.85 ** torch.arange(full, dtype=torch.float64),
                                generator=g)
        yield f"channel spectrum 0.85^i {c}->{c} 3x3", conv.weight.detach()
    # a planted Tucker rank (c/4, c/4) plus 10% noise
    for c in (64, 256):
        w = torch.randn(c, c, 3, 3, generator=g)
        low, _, _ = families.get("tucker").project(w, RankSpec(rank=(c // 4, c // 4)))
        noise = torch.randn(c, c, 3, 3, generator=g)
        yield f"planted ({c // 4}, {c // 4}) + 10% noise {c}->{c}", low + 0.1 * low.norm() / noise.norm() * noise


def main():
    tucker = families.get("tucker")
    print("weight | ranks | HOSVD | sweep 1 | sweep 2 | sweep 3 | sweep 5 | gain of 2 sweeps")
    for name, w in weights():
        for f in (4, 2):
            ranks = (w.shape[1] // f, w.shape[0] // f)
            e = tucker.factor(w, RankSpec(rank=ranks), sweeps=5).errors
            print(f"{name} | {ranks} | {e[0]:.4f} | {e[1]:.4f} | {e[2]:.4f} | {e[3]:.4f} | {e[5]:.4f} | "
                  f"{(e[0] - e[2]) / e[0] * 100:.2f}% lower")


if __name__ == "__main__":
    main()
