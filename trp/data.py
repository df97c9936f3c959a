"""Real data without a network: scikit-learn's bundled handwritten digits (1,797 8×8 images).

Images are upsampled to ``size``×``size`` (bilinear) so that CIFAR-style networks apply, and
repeated to ``channels`` channels. The split is fixed and independent of any random seed or
library version: within each class, in the data set's own order, the last
``test_fraction`` of the images (rounded) are the test set: 1,438 train / 359 test at 0.2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors(size: int = 32, channels: int = 3, test_fraction: float = 0.2):
    """``(x_train, y_train, x_test, y_test)``, standardised with the training set's mean/std."""
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        n_test = round(len(idx) * test_fraction)
        test[idx[len(idx) - n_test:]] = True
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean, std = x[~test].mean(), x[~test].std()
    x = ((x - mean) / std).expand(-1, channels, -1, -1).contiguous()
    return x[~test], y[~test], x[test], y[test]


def digits(batch_size: int = 128, *, size: int = 32, channels: int = 3, test_fraction: float = 0.2,
           num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders over the digits; the training loader reshuffles every epoch
    from torch's global RNG (so a checkpoint of that RNG makes a resumed run identical)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    x_train, y_train, x_test, y_test = digits_tensors(size, channels, test_fraction)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True,
                       num_workers=num_workers)
    test = DataLoader(TensorDataset(x_test, y_test), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers)
    return train, test
